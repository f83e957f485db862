"""The block agent: serves one export over NBD (unix sockets and TCP) through the journal.

Per connection there is one reader (``data_received`` feeding the pure codec), one writer
(``_write``: a reply is queued whole, so replies never interleave, and the small replies of
one loop iteration leave in one send), and a map of pending requests (one task each, so many
are in flight at once).  Replies leave in completion order, matched by handle.  A READ the
page cache can serve and a small aligned WRITE are answered by the reader itself, without a
task (the journal still admits and completes them); everything else gets a task.
Backpressure: past ``max_in_flight`` requests or a full transport write buffer the
connection stops reading until it drains.

On disconnect every request already admitted runs to its end (a write the guest sent is never
half done) and requests still waiting at a closed gate are cancelled, so nobody hangs and no
stale write runs after a swap.  ``stop`` refuses new connections, fails waiting requests with
ESHUTDOWN, waits for the ones in flight, then closes every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any, cast

from devagent.agent.backend import Backend, BackendError, Extent
from devagent.agent.journal import Entry, Journal, JournalClosed
from devagent.errors import StateError, UsageError
from devagent.nbd.codec import Bytes, Disconnect, Export, NeedData
from devagent.nbd.proto import Command, CommandFlag, Errno, NbdProtocolError
from devagent.nbd.server_codec import (
    BadRequest,
    Negotiated,
    OptionHandled,
    Request,
    ServerConnection,
)

log = logging.getLogger(__name__)


#: Replies with a payload this large are not coalesced with others.
COALESCE_MAX = 64 * 1024
#: Commands the reader starts without a task (``_read_at_once``, ``_start_write``).
_AT_ONCE = frozenset({Command.READ, Command.WRITE})


def _as_command(value: int) -> Command:
    """The journal's kind for a refused request: its command if known, else READ."""
    try:
        return Command(value)
    except ValueError:
        return Command.READ


class AgentState(enum.Enum):
    CREATED = "created"
    SERVING = "serving"
    STOPPING = "stopping"
    STOPPED = "stopped"


def _merge(extents: Sequence[Extent], length: int, req_one: bool) -> list[tuple[int, int]]:
    """Extents as (length, NBD flags) pairs, neighbours with equal flags merged."""
    out: list[tuple[int, int]] = []
    for extent in extents:
        if extent.length <= 0:
            continue
        if out and out[-1][1] == extent.nbd_flags:
            out[-1] = (out[-1][0] + extent.length, extent.nbd_flags)
        else:
            out.append((extent.length, extent.nbd_flags))
    if not out:
        out = [(length, 0)]
    return out[:1] if req_one else out


class _PeerAdapter(logging.LoggerAdapter[logging.Logger]):
    """Prefixes each record with the peer's address."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        peer = self.extra["peer"] if self.extra else "?"
        return f"[{peer}] {msg}", kwargs


class _Connection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, agent: BlockAgent) -> None:
        self.agent = agent
        self.codec = ServerConnection({agent.export_name: agent.export})
        self.transport: asyncio.Transport | None = None
        self.log: logging.LoggerAdapter[logging.Logger] = logging.LoggerAdapter(log, {})
        self.pending: dict[asyncio.Future[Any], Request | BadRequest] = {}
        self.gated: set[asyncio.Task[None]] = set()  # tasks not yet admitted by the journal
        self._paused_reading = False
        self._paused_writing = False
        self._out: list[Bytes] = []  # replies not yet handed to the transport
        self._closing = False
        self._handshake_timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses, hence the cast).
        self.transport = cast(asyncio.Transport, transport)
        self.agent._accepted += 1
        peer = transport.get_extra_info("peername") or f"unix#{self.agent._accepted}"
        if isinstance(peer, tuple):
            peer = f"{peer[0]}:{peer[1]}"
        child = log.getChild(self.agent.export_name or "default")
        self.log = _PeerAdapter(child, {"peer": peer})
        self.agent._connections.add(self)
        self.log.debug("connected")
        self.transport.write(self.codec.data_to_send())
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self.agent.handshake_timeout, self._handshake_expired
        )

    def _handshake_expired(self) -> None:
        if self.codec.export is None and not self._closing:
            self.log.warning("closing: no handshake within %.0f s", self.agent.handshake_timeout)
            self._close_when_idle()

    def data_received(self, data: bytes) -> None:
        self.codec.receive_data(data)
        self._pump()

    def eof_received(self) -> bool | None:
        # The client is gone: whatever still waits at a closed gate will never be wanted.
        for task in self.gated:
            task.cancel()
        self.codec.receive_data(b"")
        self._pump()
        return bool(self.pending)  # keep the socket until the running requests end

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        for task in self.gated:
            task.cancel()
        self.agent._connections.discard(self)
        self._closing = True
        self.log.debug("connection lost (%d requests still running)", len(self.pending))

    def pause_writing(self) -> None:
        self._paused_writing = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._update_reading()

    # -- the reader ----------------------------------------------------------------------

    def _pump(self) -> None:
        # Stop at max_in_flight even with complete requests buffered: _forget pumps again.
        while not self._closing and len(self.pending) < self.agent.max_in_flight:
            try:
                event = self.codec.next_event()
            except NbdProtocolError as err:
                phase = "handshake" if self.codec.export is None else "transmission"
                self.log.warning("closing: broken %s: %s", phase, err)
                self._close_when_idle()
                return
            if isinstance(event, NeedData):
                break
            if isinstance(event, Request | BadRequest):
                entry = None
                if isinstance(event, Request) and event.command in _AT_ONCE:
                    entry = self.agent.journal.try_admit(event.command, event.offset, event.length)
                    if entry is not None:
                        if event.command is Command.WRITE:
                            self._start_write(event, entry)
                            continue
                        if self._read_at_once(event, entry):
                            continue
                task = asyncio.create_task(self._serve(event, entry))
                self.pending[task] = event
                task.add_done_callback(self._done)
            elif isinstance(event, OptionHandled):
                self._send_handshake()
                self.log.debug("option %#x: %s", event.option, event.reply.name)
            elif isinstance(event, Negotiated):
                self._send_handshake()
                if self._handshake_timer is not None:
                    self._handshake_timer.cancel()
                self.log.info(
                    "export %r negotiated (structured=%s, contexts=%s)",
                    event.export.name,
                    event.structured,
                    list(event.contexts.values()),
                )
            elif isinstance(event, Disconnect):
                self.log.debug("client disconnect: %s", event.reason)
                if self.codec.export is None and event.reason == "eof":
                    self.log.info("client left during the handshake")
                self._close_when_idle()
                return
        self._update_reading()

    def _send_handshake(self) -> None:
        out = self.codec.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    def _update_reading(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        want_pause = self._paused_writing or len(self.pending) >= self.agent.max_in_flight
        if want_pause and not self._paused_reading:
            self.transport.pause_reading()
        elif not want_pause and self._paused_reading:
            self.transport.resume_reading()
        self._paused_reading = want_pause

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("request failed unexpectedly", exc_info=task.exception())
        self._forget(task)

    def _forget(self, future: asyncio.Future[Any]) -> None:
        """A pending request is over: close if we were waiting for that, else read on."""
        full = len(self.pending) >= self.agent.max_in_flight
        self.pending.pop(future, None)
        if self._closing:
            if not self.pending:
                self.close()
        elif full:  # requests may wait in the codec's buffer
            self._pump()
        else:
            self._update_reading()

    @property
    def is_unix(self) -> bool:
        """A connection on a unix socket: the local QEMU, not a peer agent."""
        if self.transport is None:
            return False
        return isinstance(self.transport.get_extra_info("sockname"), str)

    def close(self) -> None:
        """Hand the queued replies to the transport, then close it (it sends them first)."""
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _close_when_idle(self) -> None:
        """Take no more requests; close once every pending request has replied.

        Reading goes on (the codec ignores bytes once closed) so that a client that drops
        the socket after DISC is noticed and its requests held at the gate are cancelled.
        """
        self._closing = True
        if self.transport is None:
            return
        if not self.pending:
            self.close()
        elif self._paused_reading:
            self.transport.resume_reading()
            self._paused_reading = False

    # -- one request -----------------------------------------------------------------------

    def _write(self, parts: list[Bytes]) -> None:
        """Queue one reply: small replies of one loop iteration leave in one send; a large
        one goes at once (joining megabytes only costs copies)."""
        if len(parts[-1]) >= COALESCE_MAX:
            self._flush()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.writelines(parts)
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.extend(parts)

    def _flush(self) -> None:
        if not self._out:
            return
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def _read_at_once(self, request: Request, entry: Entry) -> bool:
        """Answer a READ the page cache can serve, with no task; False if it cannot (the
        caller then starts a task with the already admitted entry)."""
        data = self.agent.backend.read_nowait(request.offset, request.length)
        if data is None:
            return False
        self.agent.journal.complete(entry)
        self._write(self.codec.reply_read(request.handle, request.offset, data))
        return True

    def _start_write(self, request: Request, entry: Entry) -> None:
        """A WRITE, with no task: done inline if the backend can do it without blocking
        (measured: twice the 4 KiB rate of a thread hop), else handed to the backend and
        answered from the completion callback."""
        assert request.data is not None
        fua = bool(request.flags & CommandFlag.FUA)
        if not fua and self.agent.backend.write_nowait(request.offset, request.data):
            self.agent.journal.complete(entry)
            self._write(self.codec.reply_ok(request.handle))
            return
        future = self.agent.backend.start_write(request.offset, request.data, fua)
        self.pending[future] = request
        future.add_done_callback(functools.partial(self._write_done, request, entry))

    def _write_done(self, request: Request, entry: Entry, future: asyncio.Future[Any]) -> None:
        parts: list[Bytes] | None = None
        if future.cancelled():
            errno: int = Errno.ESHUTDOWN
        elif (err := future.exception()) is None:
            errno, parts = 0, self.codec.reply_ok(request.handle)
        else:
            errno = err.errno if isinstance(err, BackendError) else Errno.EIO
            if isinstance(err, BackendError):
                self.log.warning("WRITE %d+%d failed: %s", request.offset, request.length, err)
            else:
                self.log.error("WRITE %d+%d crashed", request.offset, request.length, exc_info=err)
            parts = self.codec.reply_error(request.handle, Command.WRITE, Errno(errno), str(err))
        self.agent.journal.complete(entry, errno)
        if parts is not None:
            self._write(parts)
        self._forget(future)

    async def _serve(self, request: Request | BadRequest, entry: Entry | None = None) -> None:
        journal = self.agent.journal
        kind = request.command if isinstance(request, Request) else _as_command(request.command)
        if entry is None:
            task = asyncio.current_task()
            assert task is not None
            self.gated.add(task)
            try:
                entry = await journal.admit(kind, request.offset, request.length)
            except JournalClosed:
                self._write(
                    self.codec.reply_error(
                        request.handle, request.command, Errno.ESHUTDOWN, "the agent is stopping"
                    )
                )
                return
            finally:
                self.gated.discard(task)
        errno = 0
        try:
            if isinstance(request, BadRequest):
                errno = request.errno
                parts = self.codec.reply_error(
                    request.handle, request.command, request.errno, request.message
                )
            else:
                parts = await self._execute(request)
        except BackendError as err:
            errno = err.errno
            self.log.warning("%s %d+%d failed: %s", kind.name, request.offset, request.length, err)
            parts = self.codec.reply_error(request.handle, request.command, err.errno, str(err))
        except asyncio.CancelledError:
            journal.complete(entry, Errno.ESHUTDOWN)
            raise
        except Exception as err:
            errno = Errno.EIO
            self.log.exception("%s %d+%d crashed", kind.name, request.offset, request.length)
            parts = self.codec.reply_error(request.handle, request.command, Errno.EIO, repr(err))
        journal.complete(entry, errno)
        self._write(parts)

    async def _execute(self, request: Request) -> list[Bytes]:
        backend = self.agent.backend
        command, handle = request.command, request.handle
        fua = bool(request.flags & CommandFlag.FUA)
        if command is Command.READ:
            data = await backend.read(request.offset, request.length)
            return self.codec.reply_read(handle, request.offset, data)
        if command is Command.WRITE:
            assert request.data is not None
            await backend.write(request.offset, request.data, fua)
        elif command is Command.FLUSH:
            await backend.flush()
        elif command is Command.TRIM:
            await backend.trim(request.offset, request.length)
            if fua:
                await backend.flush()
        elif command is Command.WRITE_ZEROES:
            may_trim = not request.flags & CommandFlag.NO_HOLE
            await backend.write_zeroes(request.offset, request.length, may_trim)
            if fua:
                await backend.flush()
        elif command is Command.BLOCK_STATUS:
            extents = await backend.block_status(request.offset, request.length)
            req_one = bool(request.flags & CommandFlag.REQ_ONE)
            return self.codec.reply_block_status(handle, _merge(extents, request.length, req_one))
        else:  # the codec only lets the commands above through
            raise BackendError(f"{command.name} not supported", Errno.EINVAL)
        return self.codec.reply_ok(handle)


def _is_unix(server: asyncio.Server) -> bool:
    return any(sock.family == socket.AF_UNIX for sock in server.sockets)


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
        self.state = AgentState.CREATED
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[Path] = []
        self._connections: set[_Connection] = set()
        self.fenced = False  # the local VM instance is refused (see fence_local)
        self._accepted = 0
        self._swap_lock = asyncio.Lock()
        self.addresses: list[str] = []

    def _require(self, *states: AgentState) -> None:
        if self.state not in states:
            raise StateError(f"agent for {self.export_name!r} is {self.state.value}")

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def listen_unix(self, path: str | Path) -> str:
        """Serve on a unix socket (replacing a stale socket file); returns its address."""
        self._require(AgentState.CREATED, AgentState.SERVING)
        path = Path(path)
        with contextlib.suppress(FileNotFoundError):
            if path.is_socket():
                path.unlink()
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: _Connection(self), str(path))
        self._servers.append(server)
        self._unix_paths.append(path)
        self.state = AgentState.SERVING
        address = f"unix:{path}"
        self.addresses.append(address)
        log.info("export %r serving on %s", self.export_name, address)
        return address

    async def fence_local(self) -> int:
        """Refuse the VM instance on this host for good (one writer at a time): stop serving
        the unix sockets its QEMU uses, remove them so that it cannot reconnect, and drop its
        connections. Peers on TCP (the destination fetching the disk) are served on.
        Returns how many connections were dropped."""
        unix_servers = [s for s in self._servers if _is_unix(s)]
        for server in unix_servers:
            server.close()
            self._servers.remove(server)
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.addresses = [a for a in self.addresses if not a.startswith("unix:")]
        dropped = [c for c in self._connections if c.is_unix]
        for connection in dropped:
            connection.close()
        self.fenced = True
        log.info("export %r fenced: %d local connection(s) dropped", self.export_name, len(dropped))
        return len(dropped)

    async def listen_tcp(self, host: str, port: int = 0) -> tuple[str, int]:
        """Serve on TCP (port 0 picks a free one); returns the bound host and port."""
        self._require(AgentState.CREATED, AgentState.SERVING)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(self), host, port)
        self._servers.append(server)
        self.state = AgentState.SERVING
        bound = server.sockets[0].getsockname()
        address = f"tcp:{bound[0]}:{bound[1]}"
        self.addresses.append(address)
        log.info("export %r serving on %s", self.export_name, address)
        return bound[0], bound[1]

    async def swap_backend(
        self, new: Backend, *, before_switch: Callable[[], Awaitable[object]] | None = None
    ) -> Backend:
        """Quiesce, switch to ``new``, resume; returns the old backend (the caller closes it).

        ``before_switch`` runs while every guest request is held and none is in flight (a
        mirror's last copy, say); if it raises, nothing is switched and the held requests go
        on with the old backend."""
        self._require(AgentState.CREATED, AgentState.SERVING)
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
        self.state = AgentState.STOPPING
        for server in self._servers:
            server.close()
        self.journal.shutdown()
        tasks = [t for c in self._connections for t in c.pending]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=drain_timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        for connection in list(self._connections):
            connection.close()
        for server in self._servers:
            await server.wait_closed()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if close_backend:
            await self.backend.close()
        self.state = AgentState.STOPPED
        log.info("export %r stopped", self.export_name)

    def stats(self) -> dict[str, Any]:
        return {
            "export": self.export_name,
            "size": self.export.size,
            "state": self.state.value,
            "connections": self.connections,
            "addresses": list(self.addresses),
            "journal": self.journal.stats(),
        }
