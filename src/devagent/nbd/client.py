"""A small asyncio NBD client over the pure codec: GO handshake, structured replies,
pipelined requests matched by handle.

Used by tests and by the ``Remote`` backend (an agent forwarding to another agent).  The
handshake runs on asyncio streams; then a :class:`_Receiver` takes the transport's reading
side: the bytes go from the transport (TLS decrypts into it) into the codec and each
completed reply to its waiter, in the transport's own callback, with no reader task and no
stream buffer in between. Writes go straight to the stream.  When the connection drops
every waiter gets :class:`PeerError`, nobody hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from pathlib import Path

from devagent.errors import PeerError, StateError
from devagent.nbd.client_codec import ClientConnection, Completed, Ready, StartTls
from devagent.nbd.codec import NO_FLAGS, RECEIVE_BUFFER, NeedData
from devagent.nbd.proto import BASE_ALLOCATION, Command, CommandFlag, Errno, TransmissionFlag

log = logging.getLogger(__name__)

#: A TCP connection whose sent data stays unacknowledged this long is dead (a cut link):
#: it fails, and its owner reconnects, rather than waiting out TCP's own retransmission
#: back-off, which after a 30 s cut resumed the traffic about 25 s after the link came back.
TCP_USER_TIMEOUT_MS = 3000
#: An idle connection is probed after 1 s of silence, each second, 3 times.
KEEPALIVE = (1, 1, 3)


def notice_dead_links(sock: socket.socket | None) -> None:
    """Have the kernel declare ``sock``'s connection dead within seconds of its link's
    loss, busy (:data:`TCP_USER_TIMEOUT_MS`) or idle (:data:`KEEPALIVE`)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle, interval, count = KEEPALIVE
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_MS)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


async def _start_tls(
    writer: asyncio.StreamWriter, context: ssl.SSLContext, server_name: str | None
) -> None:
    """The TLS handshake of a connection whose STARTTLS the server acknowledged."""
    try:
        await writer.start_tls(context, server_hostname=server_name)
    except (ssl.SSLError, OSError) as err:  # a certificate refused is an SSLError
        raise PeerError(f"TLS with NBD server {server_name} failed: {err}") from err


class NbdRequestFailed(PeerError):
    """The server answered a request with an error."""

    def __init__(self, command: Command, errno: int, message: str = "") -> None:
        try:
            name = Errno(errno).name
        except ValueError:
            name = str(errno)
        super().__init__(f"{command.name} failed: {name} {message}".rstrip())
        self.command = command
        self.errno = errno


class _Receiver(asyncio.BufferedProtocol):
    """The transport's protocol once the handshake is done: what arrives goes to the
    client's codec at once. Flow control and the connection's loss also reach the stream
    protocol it replaces (so the writer's ``drain`` and ``wait_closed`` keep working)."""

    def __init__(self, client: NbdClient, previous: asyncio.BaseProtocol) -> None:
        self._client = client
        self._previous = previous
        self._view = memoryview(bytearray(RECEIVE_BUFFER))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self._client._received(self._view[:nbytes])

    def eof_received(self) -> bool:
        self._client._received(b"")
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._ended(PeerError(f"NBD connection: {exc}") if exc else None)
        self._previous.connection_lost(exc)

    def pause_writing(self) -> None:
        self._previous.pause_writing()

    def resume_writing(self) -> None:
        self._previous.resume_writing()


class NbdClient:
    """An NBD connection in the transmission phase."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, codec: ClientConnection
    ) -> None:
        self._writer = writer
        self._codec = codec
        self._waiters: dict[int, asyncio.Future[Completed]] = {}
        self._closed_error: BaseException | None = None
        self._done = asyncio.get_running_loop().create_future()  # set when reading ends
        # The server says nothing between its GO reply and our first request: the stream
        # holds no unread byte to hand over.
        transport = writer.transport
        transport.set_protocol(_Receiver(self, transport.get_protocol()))
        if reader.at_eof():
            self._ended(None)

    @classmethod
    async def connect(
        cls,
        *,
        unix: str | Path | None = None,
        host: str | None = None,
        port: int | None = None,
        export: str = "",
        structured: bool = True,
        contexts: tuple[str, ...] = (BASE_ALLOCATION,),
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> NbdClient:
        """Connect, negotiate with NBD_OPT_GO and return a client ready for requests.
        With ``tls``: STARTTLS first, and the server must present the certificate of
        ``server_name`` (default: ``host``); a server that refuses TLS is an error."""
        try:
            if unix is not None:
                reader, writer = await asyncio.open_unix_connection(str(unix))
            else:
                reader, writer = await asyncio.open_connection(host, port)
                notice_dead_links(writer.get_extra_info("socket"))
        except OSError as err:
            raise PeerError(f"cannot connect to NBD server: {err}") from err
        codec = ClientConnection(
            export, structured=structured, contexts=contexts, tls=tls is not None
        )
        try:
            while True:
                event = codec.next_event()
                out = codec.data_to_send()
                if out:
                    writer.write(out)
                if isinstance(event, Ready):
                    break
                if isinstance(event, StartTls):
                    assert tls is not None
                    await _start_tls(writer, tls, server_name or host)
                    codec.tls_established()
                elif isinstance(event, NeedData):
                    codec.receive_data(await reader.read(65536))
        except OSError as err:  # the server went away as the client negotiated
            writer.close()
            raise PeerError(f"NBD handshake failed: {err}") from err
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, codec)

    @property
    def size(self) -> int:
        return self._codec.size

    @property
    def flags(self) -> TransmissionFlag:
        return self._codec.flags

    @property
    def structured(self) -> bool:
        return self._codec.structured

    @property
    def contexts(self) -> dict[int, str]:
        return dict(self._codec.contexts)

    @property
    def holes_received(self) -> int:
        """Hole chunks in the server's read replies so far (some servers never send any)."""
        return self._codec.holes_received

    def _received(self, data: bytes | memoryview) -> None:
        """Bytes from the transport (``b""``: the server's EOF): every reply they complete
        goes to its waiter."""
        if self._done.done():
            return
        try:
            self._codec.receive_data(data)
            while not isinstance(event := self._codec.next_event(), NeedData):
                if isinstance(event, Completed):
                    waiter = self._waiters.pop(event.handle, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(event)
        except PeerError as err:  # the server broke the protocol: this connection is over
            self._ended(err)
            self._writer.transport.abort()
            return
        if not data:
            self._ended(None)

    def _ended(self, error: PeerError | None) -> None:
        """Reading is over: every waiter fails with ``error`` (or: the server closed)."""
        if self._done.done():
            return
        failure = error or PeerError("NBD server closed the connection")
        self._closed_error = failure
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(failure)
        self._waiters.clear()
        self._done.set_result(None)

    async def call(
        self,
        command: Command,
        offset: int = 0,
        length: int = 0,
        data: bytes | None = None,
        flags: CommandFlag = NO_FLAGS,
        pieces: bool = False,
    ) -> Completed:
        """Send one request and wait for its reply (raises NbdRequestFailed on an error);
        ``pieces``: a READ's data chunks, holes left out (:meth:`ClientConnection.request`)."""
        if self._closed_error is not None:
            raise PeerError(f"NBD connection is closed: {self._closed_error}")
        handle, parts = self._codec.request(command, offset, length, data, flags, pieces=pieces)
        waiter: asyncio.Future[Completed] = asyncio.get_running_loop().create_future()
        self._waiters[handle] = waiter
        try:
            self._writer.writelines(parts)
            await self._writer.drain()
        except OSError as err:  # ConnectionResetError & co: the reader fails the waiters
            self._waiters.pop(handle, None)
            if waiter.done():
                waiter.exception()  # retrieved: the error is raised below instead
            else:
                waiter.cancel()
            raise PeerError(f"NBD connection lost: {err}") from err
        done = await waiter
        if done.error:
            raise NbdRequestFailed(command, done.error, done.message)
        return done

    async def read(self, offset: int, length: int) -> bytes:
        done = await self.call(Command.READ, offset, length)
        return done.data if done.data is not None else b""

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        flags = CommandFlag.FUA if fua else CommandFlag(0)
        await self.call(Command.WRITE, offset, len(data), data, flags)

    async def flush(self) -> None:
        await self.call(Command.FLUSH)

    async def trim(self, offset: int, length: int) -> None:
        await self.call(Command.TRIM, offset, length)

    async def write_zeroes(self, offset: int, length: int, no_hole: bool = False) -> None:
        flags = CommandFlag.NO_HOLE if no_hole else CommandFlag(0)
        await self.call(Command.WRITE_ZEROES, offset, length, flags=flags)

    async def block_status(
        self, offset: int, length: int, req_one: bool = False
    ) -> list[tuple[int, int]]:
        """(length, flags) extents of ``base:allocation`` from ``offset``."""
        if not self._codec.contexts:
            raise StateError("no metadata context was negotiated")
        flags = CommandFlag.REQ_ONE if req_one else CommandFlag(0)
        done = await self.call(Command.BLOCK_STATUS, offset, length, flags=flags)
        return done.extents or []

    async def wait_closed(self) -> None:
        """Return once the connection is gone (the peer closed it, or :meth:`close`)."""
        await asyncio.shield(self._done)

    def abort(self) -> None:
        """Drop the socket at once, without a polite NBD_CMD_DISC."""
        self._writer.transport.abort()

    async def close(self) -> None:
        """Soft disconnect (NBD_CMD_DISC) and close the socket."""
        if self._closed_error is None:
            with contextlib.suppress(Exception):
                _, parts = self._codec.request(Command.DISC)
                self._writer.writelines(parts)
                await self._writer.drain()
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        self._ended(PeerError("NBD connection closed"))

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
