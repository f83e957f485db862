"""Background work a backend spec asks of an agent once its backend is open: ``then_local``
(once a Fetch replica is complete, swap the agent to ``Local(replica)`` and drop the
remote)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from devagent.agent.backend import Backend, Local
from devagent.agent.fetch import Fetch, NotWhole
from devagent.agent.messages import BackendSpec, FetchSpec
from devagent.agent.swapping import SwapsBackends
from devagent.errors import DevagentError, StateError

log = logging.getLogger(__name__)

#: How often ``then_local`` retries a swap the agent's state refused (a quiesce in progress).
THEN_LOCAL_RETRY_S = 1.0


class Duties:
    """The duties of one agent's backends, one task per backend at most."""

    def __init__(self, agent: SwapsBackends) -> None:
        self.agent = agent
        self._tasks: dict[int, asyncio.Task[None]] = {}  # id(backend) -> its duty

    def start(self, backend: Backend, spec: BackendSpec) -> None:
        if isinstance(spec, FetchSpec) and spec.then_local and isinstance(backend, Fetch):
            if not spec.copier:
                log.warning("then_local without the copier: waits for the guest to read it all")
            self._tasks[id(backend)] = asyncio.create_task(self._then_local(backend))

    async def _then_local(self, fetch: Fetch) -> None:
        try:
            await fetch.wait_complete()
        except DevagentError as err:
            log.error("replica %s: cannot make it durable, staying on Fetch: %s", fetch.path, err)
            return

        while self.agent.backend is fetch:
            try:
                local = Local(fetch.path)
            except DevagentError as err:  # (a read-only space refuses to open it)
                log.info("replica %s: cannot open it as Local yet: %s", fetch.path, err)
                await asyncio.sleep(THEN_LOCAL_RETRY_S)
                continue
            try:
                old = await self.agent.swap_backend(local, before_switch=fetch.require_whole)
            except NotWhole as err:  # a write spilled meanwhile: wait until whole again
                await local.close()
                log.info("%s: staying on Fetch until it is whole again", err)
                try:
                    await fetch.spill.room.wait()  # complete but spilling: room first
                    await fetch.wait_complete()
                except DevagentError as failed:
                    log.error("replica %s: staying on Fetch: %s", fetch.path, failed)
                    return
                continue
            except StateError as err:  # held by /quiesce, say: try again shortly
                await local.close()
                log.info("replica %s complete, swap to Local put off: %s", fetch.path, err)
                await asyncio.sleep(THEN_LOCAL_RETRY_S)
                continue
            except BaseException:
                await local.close()
                raise
            log.info(
                "export %r: replica %s complete; now served by %r, remote %r dropped",
                self.agent.export_name,
                fetch.path,
                local,
                fetch.remote,
            )
            self._tasks.pop(id(fetch), None)
            await old.close()

    async def wait(self, backend: Backend) -> None:
        """Return once ``backend``'s duty has ended (at once if it has none): for then_local,
        once the agent serves ``Local(replica)``, or once the duty gave up."""
        task = self._tasks.get(id(backend))
        if task is not None:
            await asyncio.wait([task])

    async def cancel(self, backend: Backend) -> None:
        task = self._tasks.pop(id(backend), None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def cancel_all(self) -> None:
        for key in list(self._tasks):
            task = self._tasks.pop(key)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
