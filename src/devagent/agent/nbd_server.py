"""The block agent's NBD server: it accepts connections (unix sockets and TCP) and serves
the NBD protocol on each, through the agent's journal to its backend.

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
stale write runs after a swap.  :class:`NbdServer` holds one agent's listening sockets and
connections: the agent's ``stop`` closes them once every request has answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import ssl
from collections.abc import Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

from devagent.agent.backend import Backend, BackendError, Extent
from devagent.agent.journal import Entry, Journal, JournalClosed
from devagent.agent.listener import UnixListener, bind_unix
from devagent.nbd.codec import RECEIVE_BUFFER, Bytes, Disconnect, Export, NeedData
from devagent.nbd.proto import Command, CommandFlag, Errno, NbdProtocolError, Reply
from devagent.nbd.server_codec import (
    BadRequest,
    Negotiated,
    OptionHandled,
    Request,
    ServerConnection,
    StartTls,
)
from devagent.tls import Tls, peer_of_transport


class ServedAgent(Protocol):
    """What the NBD server serves: :class:`devagent.agent.agent.BlockAgent`'s export, its
    journal and backend, and its limits."""

    export_name: str
    export: Export
    journal: Journal
    max_in_flight: int
    handshake_timeout: float

    @property
    def backend(self) -> Backend: ...

    @property
    def server(self) -> NbdServer: ...


log = logging.getLogger(__name__)


#: Replies with a payload this large are not coalesced with others.
COALESCE_MAX = 64 * 1024
#: A READ this long or longer is answered sparsely, its zero blocks as hole chunks (a look
#: at each 4 KiB block; a guest's 4 KiB read is left alone).
SPARSE_READ_MIN = 16 * 1024
#: Commands the reader starts without a task (``_read_at_once``, ``_start_write``).
_AT_ONCE = frozenset({Command.READ, Command.WRITE})


def _as_command(value: int) -> Command:
    """The journal's kind for a refused request: its command if known, else READ."""
    try:
        return Command(value)
    except ValueError:
        return Command.READ


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


class NbdConnection(asyncio.BufferedProtocol):
    """One client connection: the codec's events become requests on the agent's journal and
    backend, their results replies. With ``tls`` (a TCP connection of an agent that has a
    certificate), TLS is required: the connection turns to TLS at the client's STARTTLS,
    and is closed unless the client's certificate is a host's this agent admits. What
    arrives lands in the connection's own buffer (TLS decrypts into it) and goes to the
    codec from there: no bytes object per arrival."""

    def __init__(self, agent: ServedAgent, tls: Tls | None = None) -> None:
        self.agent = agent
        self.tls = tls
        self.codec = ServerConnection({agent.export_name: agent.export}, tls=tls is not None)
        self.transport: asyncio.Transport | None = None
        self.log: logging.LoggerAdapter[logging.Logger] = logging.LoggerAdapter(log, {})
        self.pending: dict[asyncio.Future[Any], Request | BadRequest] = {}
        self.gated: set[asyncio.Task[None]] = set()  # tasks not yet admitted by the journal
        self._paused_reading = False
        self._paused_writing = False
        self._out: list[Bytes] = []  # replies not yet handed to the transport
        self._closing = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._tls_task: asyncio.Task[None] | None = None
        self._address = "?"  # the peer's address (host:port) or unix#N
        self._received = memoryview(bytearray(RECEIVE_BUFFER))

    # -- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses, hence the cast).
        self.transport = cast(asyncio.Transport, transport)
        number = self.agent.server.connected(self)
        peer = transport.get_extra_info("peername") or f"unix#{number}"
        if isinstance(peer, tuple):
            peer = f"{peer[0]}:{peer[1]}"
        self._address = str(peer)
        self.log = self._logger(self._address)
        self.log.debug("connected")
        self.transport.write(self.codec.data_to_send())
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self.agent.handshake_timeout, self._handshake_expired
        )

    def _logger(self, peer: str) -> logging.LoggerAdapter[logging.Logger]:
        child = log.getChild(self.agent.export_name or "default")
        return _PeerAdapter(child, {"peer": peer})

    def _handshake_expired(self) -> None:
        if self.codec.export is None and not self._closing:
            self.log.warning("closing: no handshake within %.0f s", self.agent.handshake_timeout)
            self._close_when_idle()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._received

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._received[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
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
        self.agent.server.disconnected(self)
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
                if event.reply is Reply.ERR_TLS_REQD:
                    self.log.warning("refused option %#x: TLS is required", event.option)
            elif isinstance(event, StartTls):
                self._send_handshake()  # the ACK, the last plaintext
                assert self.transport is not None
                self.transport.pause_reading()  # the client's hello is the handshake's
                self._tls_task = asyncio.create_task(self._start_tls(self.transport))
                return
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

    async def _start_tls(self, plain: asyncio.Transport) -> None:
        """Run the TLS handshake on ``plain``, check the client's certificate, and go on
        reading options on the TLS transport; close on any failure."""
        assert self.tls is not None
        loop = asyncio.get_running_loop()
        try:
            secure = await loop.start_tls(
                plain, self, self.tls.server, server_side=True,
                ssl_handshake_timeout=self.agent.handshake_timeout,
            )  # fmt: skip
        except (ssl.SSLError, OSError, TimeoutError) as err:
            self.log.warning("closing: TLS handshake failed: %s", err)
            plain.abort()
            self.connection_lost(err)
            return
        if secure is None:  # closed meanwhile
            return
        peer = peer_of_transport(secure)
        refusal = self.tls.refusal(peer)
        if refusal is not None:
            self.log.warning("closing: %s", refusal)
            secure.abort()
            return
        self.transport = secure
        self.log = self._logger(f"host {peer.name if peer else '?'} {self._address}")
        self.log.debug("TLS established")
        self.codec.tls_established()
        self._pump()

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
    def reading_paused(self) -> bool:
        """Backpressure is on: the connection reads no more requests until it drains."""
        return self._paused_reading

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
        if len(parts) > 1 and sum(map(len, parts)) >= COALESCE_MAX:
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
        self._write(self._reply_read(request, data))
        return True

    def _reply_read(self, request: Request, data: bytes | bytearray) -> list[Bytes]:
        sparse = request.length >= SPARSE_READ_MIN
        return self.codec.reply_read(request.handle, request.offset, data, sparse)

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
            return self._reply_read(request, await backend.read(request.offset, request.length))
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


class NbdServer:
    """The listening sockets of one agent and the connections they accepted."""

    def __init__(self, agent: ServedAgent) -> None:
        self.agent = agent
        self.addresses: list[str] = []
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[Path] = []
        self._fenced_paths: list[Path] = []  # unix sockets closed by a fence, to reopen
        self._connections: set[NbdConnection] = set()
        self._accepted = 0

    def __len__(self) -> int:
        return len(self._connections)

    def __iter__(self) -> Iterator[NbdConnection]:
        """The open connections."""
        return iter(list(self._connections))

    def connected(self, connection: NbdConnection) -> int:
        """Count ``connection`` in; returns its number (for the log of a unix peer)."""
        self._accepted += 1
        self._connections.add(connection)
        return self._accepted

    def disconnected(self, connection: NbdConnection) -> None:
        self._connections.discard(connection)

    async def listen_unix(self, where: Path | UnixListener) -> str:
        """Serve on a unix socket (a path: bound now by :func:`bind_unix`; or one bound
        already), plaintext; returns its address."""
        listener = where if isinstance(where, UnixListener) else bind_unix(where)
        path = listener.path
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(
            lambda: NbdConnection(self.agent), sock=listener.sock
        )
        self._servers.append(server)
        self._unix_paths.append(path)
        self.addresses.append(f"unix:{path}")
        return f"unix:{path}"

    async def listen_tcp(self, host: str, port: int, tls: Tls | None = None) -> tuple[str, int]:
        """Serve on TCP (port 0 picks a free one), with ``tls`` required when given;
        returns the bound host and port."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: NbdConnection(self.agent, tls), host, port)
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        self.addresses.append(f"tcp:{bound[0]}:{bound[1]}")
        return bound[0], bound[1]

    def close_unix(self) -> int:
        """Stop serving the unix sockets, remove them, drop their connections; returns how
        many connections were dropped. TCP peers are served on."""
        for server in [s for s in self._servers if _is_unix(s)]:
            server.close()
            self._servers.remove(server)
        self._remove_unix_paths()
        self._fenced_paths += self._unix_paths
        self._unix_paths = []
        self.addresses = [a for a in self.addresses if not a.startswith("unix:")]
        dropped = [c for c in self._connections if c.is_unix]
        for connection in dropped:
            connection.close()
        return len(dropped)

    async def reopen_unix(self) -> list[str]:
        """Serve again the unix sockets :meth:`close_unix` closed; returns their addresses."""
        paths, self._fenced_paths = self._fenced_paths, []
        return [await self.listen_unix(path) for path in paths]

    def stop_listening(self) -> None:
        for server in self._servers:
            server.close()

    def pending(self) -> list[asyncio.Future[Any]]:
        """Every request still running, on every connection."""
        return [task for connection in self._connections for task in connection.pending]

    async def close(self) -> None:
        """Close every connection (queued replies leave first) and every socket."""
        for connection in list(self._connections):
            connection.close()
        for server in self._servers:
            await server.wait_closed()
        self._remove_unix_paths()

    def _remove_unix_paths(self) -> None:
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
