"""The mirror job the control API runs on an agent: it opens the target, swaps a
:class:`Mirrored` in as the agent's backend, runs its copy task, and ends it in one of three
ways: a cutover (switch to the target, or keep the source for a migration), a cancel, or a
stop that hands over the chunks the target may still lack.

    STARTING --started--> RUNNING --end--> ENDING --ended--> ENDED
    STARTING --abort--> ENDED           ENDING --abort (the end failed)--> RUNNING
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import logging
import time

from devagent.agent.backend import Backend
from devagent.agent.defaults import MAX_CUTOVER_DIRTY
from devagent.agent.lifecycle import Lifecycle
from devagent.agent.messages import (
    CutoverAnswer,
    MirrorCancelled,
    MirrorRequest,
    MirrorStarted,
    MirrorStopped,
)
from devagent.agent.mirror import Mirrored
from devagent.agent.spec import open_backend
from devagent.agent.swapping import SwapsBackends
from devagent.errors import DevagentError, StateError, UsageError

log = logging.getLogger(__name__)


class JobState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    ENDING = "ending"
    ENDED = "ended"


class JobEvent(enum.Enum):
    STARTED = "start"
    END = "end"
    ABORT = "abort"
    ENDED = "finish ending"


_S, _E = JobState, JobEvent
TRANSITIONS: dict[tuple[JobState, JobEvent], JobState] = {
    (_S.STARTING, _E.STARTED): _S.RUNNING,
    (_S.STARTING, _E.ABORT): _S.ENDED,
    (_S.RUNNING, _E.END): _S.ENDING,
    (_S.ENDING, _E.ABORT): _S.RUNNING,
    (_S.ENDING, _E.ENDED): _S.ENDED,
}


class MirrorJob:
    """One mirror of ``agent``'s device, from start to end."""

    def __init__(self, agent: SwapsBackends) -> None:
        self.agent = agent
        self.lifecycle: Lifecycle[JobState, JobEvent] = Lifecycle(
            f"the mirror of export {agent.export_name!r}", JobState.STARTING, TRANSITIONS
        )
        self._mirror: Mirrored | None = None
        self._task: asyncio.Task[bool] | None = None

    @property
    def state(self) -> JobState:
        return self.lifecycle.state

    @property
    def mirror(self) -> Mirrored:
        if self._mirror is None or self._task is None:
            raise StateError(f"{self.lifecycle.name} is {self.state.value}")
        return self._mirror

    async def start(self, request: MirrorRequest) -> MirrorStarted:
        """Open the target, swap the agent onto a Mirrored of its backend, start copying."""
        try:
            target = await open_backend(request.target)
            try:
                mirror = Mirrored(
                    self.agent.backend,
                    target,
                    sync=request.sync,
                    rate_limit=request.rate_limit,
                    target_zeroed=request.target_zeroed,
                    parallel=request.parallel,
                    max_copy=request.max_copy,
                )
                await self.agent.swap_backend(mirror)
            except BaseException:
                await target.close()
                raise
        except BaseException:
            self.lifecycle.fire(JobEvent.ABORT)
            raise
        self._mirror = mirror
        self._task = asyncio.create_task(
            mirror.run(
                converge_bytes=request.converge_bytes,
                max_passes=request.max_passes,
                active=request.active,
            )
        )
        self.lifecycle.fire(JobEvent.STARTED)
        return MirrorStarted(mirror=mirror.stats(), target=repr(target))

    async def cutover(self, keep_source: bool) -> CutoverAnswer:
        """Wait for the mirror to converge, then copy the last dirty chunks with guest I/O
        held and switch the agent to the target (``keep_source``: a migration, the target
        is complete but this agent goes on serving its own source). The retired backend is
        closed."""
        mirror, task = self.mirror, self._task
        assert task is not None
        self.lifecycle.fire(JobEvent.END)
        try:
            if not await task and mirror.dirty_bytes > MAX_CUTOVER_DIRTY:
                raise StateError(f"the mirror did not converge: {mirror.stats()}")
            started = time.time()
            if keep_source:
                await self.agent.swap_backend(mirror.source, before_switch=mirror.finish)
                retired = mirror.target
            else:
                retired = await cutover(self.agent)
        except BaseException:
            self.lifecycle.fire(JobEvent.ABORT)
            raise
        held = time.time() - started
        self.lifecycle.fire(JobEvent.ENDED)
        await retired.close()
        return CutoverAnswer(
            held_from=started,
            held_s=round(held, 6),
            mirror=mirror.stats(),
            new=repr(self.agent.backend),
        )

    async def cancel(self) -> MirrorCancelled:
        """Stop the mirror and go on serving its source. The target is closed first: the
        copy is given up, so nothing it would still get matters, and a target that no
        longer answers (a destination removed, a cut link) fails at once rather than hold
        the copies in flight, the guest's write-through writes and the swap back for the
        remote's I/O timeout."""
        self.mirror.abandon()
        await self.mirror.target.close()
        mirror = await self._end()
        return MirrorCancelled(cancelled=True, mirror=mirror.stats())

    async def stop(self) -> MirrorStopped:
        """Stop pushing and hand over what is left: the chunks the target may still lack."""
        mirror = await self._end()
        dirty = mirror.dirty_bitmap()
        return MirrorStopped(
            chunk_size=mirror.chunk_size,
            chunks=dirty.n_bits,
            dirty=base64.b64encode(dirty.to_bytes()).decode(),
            dirty_bytes=mirror.dirty_bytes,
            mirror=mirror.stats(),
        )

    async def _end(self) -> Mirrored:
        """Stop the copy task and serve the mirror's source again; the swap waits for the
        copies in flight, so nothing lands on the target after it. The target is closed."""
        mirror, task = self.mirror, self._task
        assert task is not None
        self.lifecycle.fire(JobEvent.END)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, DevagentError):
            await task
        try:
            await self.agent.swap_backend(mirror.source)
        except BaseException:
            self.lifecycle.fire(JobEvent.ABORT)
            raise
        self.lifecycle.fire(JobEvent.ENDED)
        await mirror.target.close()
        return mirror


async def cutover(agent: SwapsBackends) -> Backend:
    """Quiesce ``agent``, finish its :class:`Mirrored` backend, switch it to the target,
    resume.  Returns the source (the caller closes it).  On failure the agent goes on
    serving the mirror's source and the error (MirrorFailed) is raised."""
    mirror = agent.backend
    if not isinstance(mirror, Mirrored):
        raise UsageError(f"agent backend is {mirror!r}, not a mirror")
    await agent.swap_backend(mirror.target, before_switch=mirror.finish)
    mirror.handed_over = True
    log.info("agent %r now serves the mirror target %r", agent.export_name, mirror.target)
    return mirror.source
