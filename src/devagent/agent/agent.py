"""The block agent: one export, its backend, its journal, and everything the control API
asks of it. The NBD protocol itself is served by :mod:`devagent.agent.nbd_server`.

The agent's own lifecycle is one table::

    CREATED --listen--> SERVING --fence--> FENCED (the local VM's unix sockets refused)
                        SERVING <--unfence-- FENCED (a migration rolled back after all)
    CREATED | SERVING | FENCED --stop--> STOPPING --stopped--> STOPPED

plus the operations each state allows (a swap, a TCP listener after the fence). Beside it,
each with its own table, live the quiesce hold (:mod:`devagent.agent.hold`) and the mirror
job (:mod:`devagent.agent.mirror_job`); the control API's handlers call one method here each.

``stop`` refuses new connections, fails waiting requests with ESHUTDOWN, waits for the ones
in flight, then closes every connection.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from devagent.agent.backend import Backend, Local
from devagent.agent.defaults import FETCH_CHUNK
from devagent.agent.duties import Duties
from devagent.agent.fetch import Fetch
from devagent.agent.hold import Hold
from devagent.agent.journal import Journal
from devagent.agent.lifecycle import Lifecycle
from devagent.agent.listener import UnixListener
from devagent.agent.messages import (
    AgentStats,
    BackendSpec,
    CompletionsAnswer,
    CutoverAnswer,
    FenceAnswer,
    FlushAnswer,
    LocalSpec,
    MirrorCancelled,
    MirrorRate,
    MirrorRequest,
    MirrorStarted,
    MirrorStopped,
    QuiesceAnswer,
    RemoteSpec,
    ResumeAnswer,
    StatusAnswer,
    SwapAnswer,
    UnfenceAnswer,
)
from devagent.agent.mirror_job import JobState, MirrorJob
from devagent.agent.nbd_server import NbdServer
from devagent.agent.spec import backend_status, open_backend
from devagent.errors import DevagentError, StateError, UsageError
from devagent.nbd.codec import Export
from devagent.tls import Tls

log = logging.getLogger(__name__)

#: The longest the fence walks the disk's extents for its holes: a 1 GiB disk of a few
#: extents takes well under a millisecond; one of very many has the rest fetched as before.
HOLE_SCAN_S = 0.005


class AgentState(enum.Enum):
    CREATED = "created"
    SERVING = "serving"
    FENCED = "fenced"
    STOPPING = "stopping"
    STOPPED = "stopped"


class AgentEvent(enum.Enum):
    LISTEN_UNIX = "listen on a unix socket"
    LISTEN_TCP = "listen on TCP"
    SWAP = "swap its backend"
    FENCE = "fence the local VM"
    UNFENCE = "unfence the local VM"
    STOP = "stop"
    STOPPED = "finish stopping"


_S, _E = AgentState, AgentEvent
TRANSITIONS: dict[tuple[AgentState, AgentEvent], AgentState] = {
    (_S.CREATED, _E.LISTEN_UNIX): _S.SERVING,
    (_S.CREATED, _E.LISTEN_TCP): _S.SERVING,
    (_S.SERVING, _E.LISTEN_UNIX): _S.SERVING,
    (_S.SERVING, _E.LISTEN_TCP): _S.SERVING,
    (_S.FENCED, _E.LISTEN_TCP): _S.FENCED,
    (_S.CREATED, _E.SWAP): _S.CREATED,
    (_S.SERVING, _E.SWAP): _S.SERVING,
    (_S.FENCED, _E.SWAP): _S.FENCED,
    (_S.CREATED, _E.FENCE): _S.FENCED,
    (_S.SERVING, _E.FENCE): _S.FENCED,
    (_S.FENCED, _E.FENCE): _S.FENCED,
    (_S.FENCED, _E.UNFENCE): _S.SERVING,
    (_S.SERVING, _E.UNFENCE): _S.SERVING,  # nothing fenced: nothing to undo
    (_S.CREATED, _E.STOP): _S.STOPPING,
    (_S.SERVING, _E.STOP): _S.STOPPING,
    (_S.FENCED, _E.STOP): _S.STOPPING,
    (_S.STOPPING, _E.STOPPED): _S.STOPPED,
}


class BlockAgent:
    """Serves ``backend`` as the NBD export ``export_name`` on any number of sockets."""

    def __init__(
        self,
        backend: Backend,
        export_name: str = "",
        *,
        journal: Journal | None = None,
        description: str = "",
        max_in_flight: int = 128,
        handshake_timeout: float = 30.0,
    ) -> None:
        self.backend = backend
        self.export_name = export_name
        self.export = Export(export_name, backend.size, backend.read_only, description)
        self.journal = journal if journal is not None else Journal()
        self.max_in_flight = max_in_flight
        self.handshake_timeout = handshake_timeout
        self.lifecycle: Lifecycle[AgentState, AgentEvent] = Lifecycle(
            f"agent for {export_name!r}", AgentState.CREATED, TRANSITIONS
        )
        self.server = NbdServer(self)
        self.hold = Hold(self.journal, export_name)
        self.duties = Duties(self)
        self.mirror_job: MirrorJob | None = None
        self._swap_lock = asyncio.Lock()

    @property
    def state(self) -> AgentState:
        return self.lifecycle.state

    @property
    def connections(self) -> int:
        return len(self.server)

    @property
    def addresses(self) -> list[str]:
        return self.server.addresses

    # -- serving ---------------------------------------------------------------------------

    async def listen_unix(self, where: str | Path | UnixListener) -> str:
        """Serve on a unix socket (a path, replacing a stale socket file there; or a socket
        bound already: :func:`~.listener.bind_unix`); returns its address."""
        self.lifecycle.require(AgentEvent.LISTEN_UNIX)
        address = await self.server.listen_unix(
            where if isinstance(where, UnixListener) else Path(where)
        )
        self.lifecycle.fire(AgentEvent.LISTEN_UNIX)
        log.info("export %r serving on %s", self.export_name, address)
        return address

    async def listen_tcp(self, host: str, port: int = 0, tls: Tls | None = None) -> tuple[str, int]:
        """Serve on TCP (port 0 picks a free one), TLS required with ``tls``; returns the
        bound host and port."""
        self.lifecycle.require(AgentEvent.LISTEN_TCP)
        bound = await self.server.listen_tcp(host, port, tls)
        self.lifecycle.fire(AgentEvent.LISTEN_TCP)
        how = "TLS required" if tls is not None else "plaintext"
        log.info("export %r serving on tcp:%s:%d (%s)", self.export_name, *bound, how)
        return bound

    async def fence_local(self) -> int:
        """Refuse the VM instance on this host for good (one writer at a time): stop serving
        the unix sockets its QEMU uses, remove them so that it cannot reconnect, and drop its
        connections. Peers on TCP (the destination fetching the disk) are served on.
        Returns how many connections were dropped."""
        self.lifecycle.fire(AgentEvent.FENCE)
        dropped = self.server.close_unix()
        log.info("export %r fenced: %d local connection(s) dropped", self.export_name, dropped)
        return dropped

    async def unfence_local(self) -> tuple[bool, list[str]]:
        """Undo :meth:`fence_local`: serve the local VM's unix sockets again, where they were
        (its QEMU's NBD client reconnects by itself). Only for a migration that rolled back
        before the destination ran the guest: the VM here is again the only writer. Returns
        whether it was fenced, and the addresses served again."""
        fenced = self.state is AgentState.FENCED
        self.lifecycle.require(AgentEvent.UNFENCE)
        reopened = await self.server.reopen_unix() if fenced else []
        self.lifecycle.fire(AgentEvent.UNFENCE)
        log.info("export %r unfenced: serving %s again", self.export_name, reopened)
        return fenced, reopened

    async def swap_backend(
        self, new: Backend, *, before_switch: Callable[[], Awaitable[object]] | None = None
    ) -> Backend:
        """Quiesce, switch to ``new``, resume; returns the old backend (the caller closes it).

        ``before_switch`` runs while every guest request is held and none is in flight (a
        mirror's last copy, say); if it raises, nothing is switched and the held requests go
        on with the old backend."""
        self.lifecycle.require(AgentEvent.SWAP)
        if new.size != self.backend.size:
            raise UsageError(f"new backend is {new.size} bytes, the export is {self.backend.size}")
        async with self._swap_lock:
            await self.journal.quiesce()
            try:
                if before_switch is not None:
                    await before_switch()
                old, self.backend = self.backend, new
            finally:
                self.journal.resume()
        log.info("export %r: backend %r replaced by %r", self.export_name, old, new)
        return old

    async def stop(self, *, close_backend: bool = True, drain_timeout: float = 30.0) -> None:
        """Stop serving: answer (or fail with ESHUTDOWN) every request, close everything."""
        if self.state in (AgentState.STOPPING, AgentState.STOPPED):
            return
        self.lifecycle.fire(AgentEvent.STOP)
        self.server.stop_listening()
        self.journal.shutdown()
        tasks = self.server.pending()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=drain_timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        await self.server.close()
        if close_backend:
            await self.backend.close()
        self.lifecycle.fire(AgentEvent.STOPPED)
        log.info("export %r stopped", self.export_name)

    def stats(self) -> AgentStats:
        return AgentStats(
            export=self.export_name,
            size=self.export.size,
            state=self.state.value,
            connections=self.connections,
            addresses=list(self.addresses),
            journal=self.journal.stats(),
        )

    # -- what the control API asks ---------------------------------------------------------

    def status(self) -> StatusAnswer:
        stats = self.stats()
        return StatusAnswer(
            export=stats.export,
            size=stats.size,
            state=stats.state,
            connections=stats.connections,
            addresses=stats.addresses,
            journal=stats.journal,
            pid=os.getpid(),
            backend=repr(self.backend),
            held=self.hold.engaged,
            backend_status=backend_status(self.backend),
        )

    async def quiesce(self) -> QuiesceAnswer:
        drained = await self.hold.quiesce()
        return QuiesceAnswer(drained_in_s=round(drained, 6))

    def resume(self) -> ResumeAnswer:
        return ResumeAnswer(held_s=round(self.hold.resume(), 6))

    def completions(self, since: float) -> CompletionsAnswer:
        times = self.journal.completions_since(since)
        return CompletionsAnswer(completions=times, complete=self.journal.covers(since))

    async def swap_to(self, spec: BackendSpec) -> SwapAnswer:
        """Open the backend ``spec`` describes and make it this agent's; its duties start,
        the old backend's end, the old backend is closed. A Fetch replica that spills (it has
        no room) swapped to its remote first hands every chunk it holds back to the remote
        (the guest's I/O goes on), and again, held, at the switch: nothing the guest wrote
        stays behind in the replica. A Fetch swapped to its own replica as Local must be
        whole (:meth:`Fetch.require_whole`), checked again at the switch."""
        self._refuse_while_held("a swap")
        handing_back = self._hands_back(spec)
        if handing_back is not None:
            await handing_back.write_back()
        settling = self._settles(spec)
        if settling is not None:  # whole, and its data and bits durable (checked again, held)
            await settling.require_whole()
            await settling.wait_complete()
        new = await open_backend(spec, current=self.backend)
        taken_over = isinstance(new, Fetch) and new.remote is self.backend
        started = time.monotonic()
        try:
            last: Callable[[], Awaitable[object]] | None = None
            if handing_back is not None:
                last = handing_back.write_back
            elif settling is not None:
                last = settling.require_whole  # again, with nothing in flight
            old = await self.swap_backend(new, before_switch=last)
        except BaseException:
            if isinstance(new, Fetch):
                await new.close(remote_too=not taken_over)
            else:
                await new.close()
            raise
        hold_s = time.monotonic() - started
        await self.duties.cancel(old)
        self.duties.start(new, spec)
        try:
            if not taken_over:  # else the old backend lives on as the Fetch's remote
                await old.close()
        except DevagentError as err:
            log.warning("closing the old backend %r failed: %s", old, err)
        return SwapAnswer(old=repr(old), new=repr(new), hold_s=round(hold_s, 6))

    def _settles(self, spec: BackendSpec) -> Fetch | None:
        """The Fetch whose own replica ``spec`` serves alone (as Local): it must be whole."""
        current = self.backend
        if (
            isinstance(current, Fetch)
            and isinstance(spec, LocalSpec)
            and (Path(spec.path) == current.path)
        ):
            return current
        return None

    def _hands_back(self, spec: BackendSpec) -> Fetch | None:
        """The Fetch that ``spec`` (its remote, served alone) takes over from; a Fetch that
        takes writes refuses (its lock-free writes could land after a hand-back)."""
        current = self.backend
        if not isinstance(current, Fetch) or not isinstance(spec, RemoteSpec):
            return None
        if current.spilling is None:
            raise UsageError(
                f"export {self.export_name!r} serves a replica that takes writes: it goes to "
                "its remote alone only while it spills (no room)"
            )
        return current

    async def start_mirror(self, request: MirrorRequest) -> MirrorStarted:
        """Mirror the device to ``request.target`` under the running guest."""
        if self.mirror_job is not None and self.mirror_job.state is not JobState.ENDED:
            raise StateError(f"export {self.export_name!r}: a mirror is already running")
        self._refuse_while_held("a mirror")
        job = self.mirror_job = MirrorJob(self)
        return await job.start(request)

    async def cutover_mirror(self, keep_source: bool) -> CutoverAnswer:
        return await self._running_job().cutover(keep_source)

    async def cancel_mirror(self) -> MirrorCancelled:
        return await self._running_job().cancel()

    async def stop_mirror(self) -> MirrorStopped:
        return await self._running_job().stop()

    def mirror_rate(self, rate: MirrorRate) -> MirrorRate:
        """The running mirror's copy rate, changed."""
        self._running_job().mirror.pace.set(rate.rate_limit)
        return rate

    async def flush(self) -> FlushAnswer:
        """Make everything written so far durable now (ahead of a switchover, whose own
        flush then has little left to do)."""
        started = time.monotonic()
        await self.backend.flush()
        return FlushAnswer(flushed_in_s=round(time.monotonic() - started, 6))

    async def fence(self) -> FenceAnswer:
        """Fenced (:meth:`fence_local`); the disk's holes, looked up once it can no longer
        change (:data:`HOLE_SCAN_S` at most: this is on the switchover's path)."""
        dropped = await self.fence_local()
        if not isinstance(self.backend, Local):
            return FenceAnswer(fenced=True, dropped=dropped)
        zeroes = await self.backend.zero_chunks(FETCH_CHUNK, HOLE_SCAN_S)
        return FenceAnswer(
            fenced=True, dropped=dropped, chunk_size=FETCH_CHUNK,
            zeroes=base64.b64encode(zeroes).decode() if any(zeroes) else "",
        )  # fmt: skip

    async def unfence(self) -> UnfenceAnswer:
        was_fenced, listening = await self.unfence_local()
        return UnfenceAnswer(unfenced=was_fenced, listening=listening)

    def _running_job(self) -> MirrorJob:
        job = self.mirror_job
        if job is None or job.state is not JobState.RUNNING:
            raise StateError(f"export {self.export_name!r}: no mirror is running")
        return job

    def _refuse_while_held(self, what: str) -> None:
        if self.hold.engaged:
            raise StateError(f"the agent is quiesced by /quiesce: resume it before {what}")
