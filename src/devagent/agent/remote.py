"""``Remote``: a backend whose bytes live on another host, behind that host's agent (NBD).

Every request is forwarded over one pipelined NBD connection (many requests in flight,
matched by handle in :class:`NbdClient`).  Each request is its own retry loop, which is what
makes a dropped connection harmless:

    arrive ──▶ wait for a connection ──▶ send ──▶ reply ──▶ done
                   ▲                        │ connection lost (or the peer answers
                   └──── reconnected ◀──────┘ ESHUTDOWN: it is stopping)

Reads, writes at an offset, trims, zeroings and flushes are idempotent, so re-sending a
request whose reply was lost is safe.  One reconnect task at a time retries with backoff
(``backoff_min`` doubling to ``backoff_max``), checks the export size is unchanged, and sends
one FLUSH before it lets anybody in: the peer's journal answers that FLUSH only after every
write admitted before it (from the old connection too) has completed, so a write still
running on the old connection cannot land after its re-sent copy and a newer write.

A request older than ``io_timeout`` (counted from its arrival, reconnects included) fails
with ``BackendError(EIO)`` and an error log line naming the peer and export; later requests
go on trying.  ``close`` fails every waiter with ESHUTDOWN and never hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from typing import Any

from devagent.agent.backend import Backend, BackendError, Extent
from devagent.agent.messages import RemoteStatus
from devagent.errors import PeerError, StateError, UsageError
from devagent.nbd.client import NbdClient, NbdRequestFailed
from devagent.nbd.client_codec import Completed
from devagent.nbd.codec import NO_FLAGS
from devagent.nbd.proto import Command, CommandFlag, Errno, TransmissionFlag
from devagent.tls import process_tls
from devagent.vocab import parse_address

log = logging.getLogger(__name__)

#: Largest BLOCK_STATUS length asked of the peer (the field is 32 bits).
STATUS_MAX = 1 << 30
#: How long ``close`` waits for a polite NBD disconnect before it drops the socket.
CLOSE_GRACE = 2.0
#: While reconnecting, each dial has this long: a SYN lost to a cut link is given up soon
#: and a new one sent, so that a link that comes back is used within about a second and a
#: half (with ``backoff_max`` between dials).
RECONNECT_DIAL_S = 1.0


class RemoteState(enum.Enum):
    CREATED = "created"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


def _errno(value: int) -> Errno:
    try:
        return Errno(value)
    except ValueError:
        return Errno.EIO


class Remote(Backend):
    """A device served by another agent (or any NBD server), reached over NBD."""

    def __init__(
        self,
        address: str,
        export: str = "",
        *,
        io_timeout: float = 120.0,
        connect_timeout: float = 10.0,
        backoff_min: float = 0.05,
        backoff_max: float = 0.5,
        host: str = "",
    ) -> None:
        self._kind, self._where, self._port = parse_address(address)
        self.host = host  # whose certificate the server must present (TLS over TCP)
        if io_timeout <= 0:
            raise UsageError(f"io_timeout must be positive, got {io_timeout}")
        self.address = address
        self.export = export
        self.io_timeout = io_timeout
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.state = RemoteState.CREATED
        self.reconnects = 0
        self.last_error: str | None = None
        self.timeouts = 0
        self.retries = 0  # requests sent again after a lost connection
        self._client: NbdClient | None = None
        self._size: int | None = None
        self._ready = asyncio.Event()
        self._reconnector: asyncio.Task[None] | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        self._closers: set[asyncio.Task[None]] = set()
        self._disconnected_at: float | None = None
        self._sparse = False  # the server answered a read with a hole chunk
        self._waiting = 0
        self.log = log.getChild(export or "default")

    @classmethod
    async def open(cls, address: str, export: str = "", **kwargs: Any) -> Remote:
        """A Remote with its first connection made (so that ``size`` is known)."""
        remote = cls(address, export, **kwargs)
        await remote.connect()
        return remote

    def __repr__(self) -> str:
        return f"Remote({self.address!r}, {self.export!r})"

    # -- properties ------------------------------------------------------------------------

    @property
    def peer(self) -> str:
        return self.address

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def waiting(self) -> int:
        """Requests waiting for a connection (the peer is away)."""
        return self._waiting

    @property
    def size(self) -> int:
        if self._size is None:
            raise StateError(f"{self!r} has never connected: its size is unknown")
        return self._size

    @property
    def read_only(self) -> bool:
        if self._client is None:
            return False
        return bool(self._client.flags & TransmissionFlag.READ_ONLY)

    @property
    def has_block_status(self) -> bool:
        return self._client is not None and bool(self._client.contexts)

    def status(self) -> RemoteStatus:
        return RemoteStatus(
            peer=self.peer,
            export=self.export,
            state=self.state.value,
            connected=self.connected,
            reconnects=self.reconnects,
            timeouts=self.timeouts,
            retries=self.retries,
            last_error=self.last_error,
        )

    # -- connection ------------------------------------------------------------------------

    async def _dial(self, timeout: float | None = None) -> NbdClient:
        """One connection and handshake, in ``timeout`` (default ``connect_timeout``)."""
        timeout = self.connect_timeout if timeout is None else timeout
        if self._kind == "unix":
            coro = NbdClient.connect(unix=self._where, export=self.export)
        else:
            tls = process_tls()
            coro = NbdClient.connect(
                host=self._where, port=self._port, export=self.export,
                tls=tls.client if tls is not None else None, server_name=self.host or None,
            )  # fmt: skip
        try:
            return await asyncio.wait_for(coro, timeout)
        except TimeoutError:
            raise PeerError(f"no NBD handshake within {timeout:g} s") from None
        except OSError as err:  # a handshake cut short by a reset
            raise PeerError(f"handshake failed: {err}") from err

    async def connect(self) -> None:
        """Make the first connection (retrying with backoff up to ``connect_timeout``)."""
        if self.state is not RemoteState.CREATED:
            raise StateError(f"{self!r} is {self.state.value}")
        deadline = time.monotonic() + self.connect_timeout
        delay = self.backoff_min
        while True:
            try:
                client = await self._dial()
                break
            except PeerError as err:
                self.last_error = str(err)
                if time.monotonic() + delay > deadline:
                    raise PeerError(
                        f"cannot reach NBD export {self.export!r} at {self.address}: {err}"
                    ) from err
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
        self._size = client.size
        self._adopt(client)
        self.log.info(
            "connected to %s export %r (%d bytes, block status %s)",
            self.address,
            self.export,
            client.size,
            "yes" if client.contexts else "no",
        )

    def _adopt(self, client: NbdClient) -> None:
        self._client = client
        self.state = RemoteState.CONNECTED
        self._disconnected_at = None
        self._ready.set()
        watcher = asyncio.create_task(self._watch(client))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, client: NbdClient) -> None:
        """Notice a dropped connection even when no request is in flight."""
        with contextlib.suppress(asyncio.CancelledError):
            await client.wait_closed()
            self._lost(client, PeerError("the peer closed the connection"))

    def _lost(self, client: NbdClient, err: BaseException) -> None:
        """``client`` failed: drop it (once) and start reconnecting."""
        if self._client is not client or self.state is RemoteState.CLOSED:
            return
        self._client = None
        self._ready.clear()
        self.state = RemoteState.RECONNECTING
        self._disconnected_at = time.monotonic()
        self.last_error = str(err)
        self.log.warning("lost %s export %r: %s; reconnecting", self.address, self.export, err)
        closer = asyncio.create_task(_close_quietly(client))
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)
        self._reconnector = asyncio.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = self.backoff_min
        attempts = 0
        while self.state is RemoteState.RECONNECTING:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)
            attempts += 1
            client: NbdClient | None = None
            try:
                client = await self._dial(RECONNECT_DIAL_S)
                if client.size != self._size:
                    raise PeerError(f"export size changed from {self._size} to {client.size} bytes")
                if client.flags & TransmissionFlag.SEND_FLUSH:
                    # Barrier: writes still running from the old connection end first.
                    try:
                        await asyncio.wait_for(client.flush(), self.io_timeout)
                    except NbdRequestFailed as err:  # refused, not lost: go on without it
                        self.log.info("barrier flush on reconnect refused: %s", err)
            except (PeerError, TimeoutError) as err:
                if client is not None:
                    await _close_quietly(client)
                self.last_error = str(err) or type(err).__name__
                level = logging.WARNING if attempts == 1 or attempts % 30 == 0 else logging.DEBUG
                self.log.log(
                    level,
                    "reconnect to %s export %r, attempt %d: %s",
                    self.address,
                    self.export,
                    attempts,
                    self.last_error,
                )
                continue
            if self.state is not RemoteState.RECONNECTING:  # closed meanwhile
                await _close_quietly(client)
                return
            away = time.monotonic() - (self._disconnected_at or time.monotonic())
            self.reconnects += 1
            self._adopt(client)
            self.log.info(
                "reconnected to %s export %r after %.2f s (%d attempts)",
                self.address,
                self.export,
                away,
                attempts,
            )

    # -- requests --------------------------------------------------------------------------

    def _timed_out(self, command: Command, offset: int, length: int, why: str) -> BackendError:
        self.timeouts += 1
        self.log.error(
            "%s %d+%d to %s export %r failed after io_timeout %.1f s: %s. Every write the guest "
            "saw acknowledged is kept (this one was not: it failed); the agent keeps "
            "redialing, and I/O goes on once %s answers: bring its link or agent back, or "
            "raise io_timeout for longer outages",
            command.name,
            offset,
            length,
            self.address,
            self.export,
            self.io_timeout,
            why,
            self.address,
        )
        return BackendError(
            f"{command.name} to {self.address} export {self.export!r} timed out after "
            f"{self.io_timeout:.1f} s: {why}",
            Errno.EIO,
        )

    async def _call(
        self,
        command: Command,
        offset: int = 0,
        length: int = 0,
        data: bytes | None = None,
        flags: CommandFlag = NO_FLAGS,
        pieces: bool = False,
    ) -> Completed:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.io_timeout
        while True:
            if self.state is RemoteState.CLOSED:
                raise BackendError(f"{self!r} is closed", Errno.ESHUTDOWN)
            client = self._client
            if client is None:
                self._waiting += 1
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._ready.wait()
                except TimeoutError:
                    raise self._timed_out(
                        command, offset, length, f"down: {self.last_error}"
                    ) from None
                finally:
                    self._waiting -= 1
                continue
            try:
                async with asyncio.timeout_at(deadline):
                    return await client.call(command, offset, length, data, flags, pieces)
            except TimeoutError:
                raise self._timed_out(command, offset, length, "no reply") from None
            except NbdRequestFailed as err:
                if err.errno == Errno.ESHUTDOWN:  # the peer is stopping: try its successor
                    self._lost(client, err)
                    self.retries += 1
                    continue
                raise BackendError(
                    f"{self.address} export {self.export!r}: {err}", _errno(err.errno)
                ) from err
            except PeerError as err:
                self._lost(client, err)
                self.retries += 1

    @property
    def answers_sparsely(self) -> bool:
        """True once the server answered a read with a hole chunk (ours and QEMU's do)."""
        return self._sparse

    async def read(self, offset: int, length: int) -> bytes:
        done = await self._call(Command.READ, offset, length)
        self._note_holes()
        data = done.data if done.data is not None else b""
        if len(data) != length:
            raise BackendError(f"short read from {self.address}: {len(data)} of {length}")
        return data

    async def read_pieces(self, offset: int, length: int) -> list[tuple[int, bytes]]:
        """The read's data chunks as the server sent them, its holes left out."""
        done = await self._call(Command.READ, offset, length, pieces=True)
        self._note_holes()
        return done.pieces or []

    def _note_holes(self) -> None:
        if not self._sparse and self._client is not None and self._client.holes_received:
            self._sparse = True

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        flags = CommandFlag.FUA if fua else NO_FLAGS
        await self._call(Command.WRITE, offset, len(data), data, flags)

    async def flush(self) -> None:
        await self._call(Command.FLUSH)

    async def trim(self, offset: int, length: int) -> None:
        await self._call(Command.TRIM, offset, length)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        flags = NO_FLAGS if may_trim else CommandFlag.NO_HOLE
        await self._call(Command.WRITE_ZEROES, offset, length, flags=flags)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """The peer's ``base:allocation`` extents (clipped to the range; possibly shorter
        than asked), or one data extent when the peer did not negotiate it."""
        if self._client is not None and not self._client.contexts:
            return [Extent(length)]
        ask = min(length, STATUS_MAX)
        done = await self._call(Command.BLOCK_STATUS, offset, ask)
        if not done.extents:  # negotiated on a reconnect without the context
            return [Extent(length)]
        out: list[Extent] = []
        left = ask
        for ext_length, flags in done.extents:
            take = min(ext_length, left)
            if take <= 0:
                break
            out.append(Extent(take, hole=bool(flags & 1), zero=bool(flags & 2)))
            left -= take
        return out

    async def close(self) -> None:
        """Fail every waiter with ESHUTDOWN and drop the connection; never hangs."""
        if self.state is RemoteState.CLOSED:
            return
        self.state = RemoteState.CLOSED
        self._ready.set()  # wake the waiters: they see CLOSED
        tasks = [t for t in (self._reconnector, *self._watchers) if t is not None]
        for task in tasks:
            task.cancel()
        client, self._client = self._client, None
        if client is not None:
            await _close_quietly(client)
        await asyncio.gather(*tasks, *self._closers, return_exceptions=True)
        self.log.info("closed the connection to %s export %r", self.address, self.export)


async def _close_quietly(client: NbdClient) -> None:
    """Close ``client`` politely if that is quick, else drop its socket."""
    try:
        await asyncio.wait_for(client.close(), CLOSE_GRACE)
    except (TimeoutError, OSError, PeerError):
        client.abort()
