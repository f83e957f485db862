"""The client side of the pure NBD codec: the GO handshake (structured replies and meta
contexts), then requests matched to their replies by handle, any number in flight, simple
and structured replies reassembled into one :class:`Completed` each."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from devagent.nbd.codec import NEED_DATA, NO_FLAGS, Buffer, Bytes, Disconnect, NeedData, Violation
from devagent.nbd.proto import (
    BASE_ALLOCATION,
    CLIENT_FLAGS,
    ERROR_CHUNK,
    EXTENT,
    GREETING,
    IHAVEOPT,
    INFO_EXPORT,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    NBDMAGIC,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    REPLY_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
    U64,
    ChunkType,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    HandshakeFlag,
    Info,
    NbdProtocolError,
    NbdUsageError,
    Option,
    Reply,
    ReplyFlag,
    TransmissionFlag,
    parse,
)


@dataclass(frozen=True, slots=True)
class StartTls:
    """The server acknowledged STARTTLS: the connection's owner runs the TLS handshake,
    then calls :meth:`ClientConnection.tls_established` (options go on, encrypted)."""


@dataclass(frozen=True, slots=True)
class Ready:
    """Client: the handshake succeeded; transmission can start."""

    size: int
    flags: TransmissionFlag
    structured: bool
    contexts: Mapping[int, str]


@dataclass(frozen=True, slots=True)
class Completed:
    """Client: the full reply to one request."""

    handle: int
    command: Command
    error: int
    message: str = ""
    data: bytes | None = None
    extents: list[tuple[int, int]] | None = None
    pieces: list[tuple[int, bytes]] | None = None  # a READ asked in pieces: its data's


ClientEvent = Ready | StartTls | Completed


class ClientState(enum.Enum):
    AWAIT_GREETING = "await-greeting"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


_CLIENT_TRANSITIONS: dict[tuple[ClientState, type[object]], ClientState] = {
    (ClientState.AWAIT_GREETING, HandshakeFlag): ClientState.OPTIONS,
    (ClientState.OPTIONS, Ready): ClientState.TRANSMISSION,
    (ClientState.OPTIONS, StartTls): ClientState.OPTIONS,
    (ClientState.TRANSMISSION, Completed): ClientState.TRANSMISSION,
    (ClientState.TRANSMISSION, Disconnect): ClientState.CLOSED,
    (ClientState.AWAIT_GREETING, Violation): ClientState.CLOSED,
    (ClientState.OPTIONS, Violation): ClientState.CLOSED,
    (ClientState.TRANSMISSION, Violation): ClientState.CLOSED,
}


@dataclass(slots=True)
class _Pending:
    command: Command
    offset: int
    length: int
    data: bytearray | None = None  # a READ's bytes as its chunks arrive
    whole: bytes | None = None  # ...or all of them in one chunk
    extents: list[tuple[int, int]] | None = None
    error: int = 0
    message: str = ""
    pieces: list[tuple[int, bytes]] | None = None  # data chunks as they come; holes dropped
    taken: int = 0  # bytes of data chunks so far (pieces: never more than the read)

    def read_data(self) -> bytes:
        """The READ's answer once its last chunk is in (no chunk at all: zeroes)."""
        if self.data is not None:
            return bytes(self.data)
        return self.whole if self.whole is not None else bytes(self.length)


class ClientConnection:
    """Client side: GO handshake (with structured replies and meta contexts), then requests
    matched to replies by handle, any number in flight."""

    def __init__(
        self,
        export_name: str = "",
        *,
        structured: bool = True,
        contexts: Sequence[str] = (BASE_ALLOCATION,),
        tls: bool = False,
    ) -> None:
        self.export_name = export_name
        self._buffer = Buffer()
        self._out = bytearray()
        self.state = ClientState.AWAIT_GREETING
        self._options: list[tuple[Option, bytes]] = []
        self._tls_pending = False
        if tls:  # first, and required: a refusal is an error, never a plaintext fallback
            self._options.append((Option.STARTTLS, b""))
        if structured:
            self._options.append((Option.STRUCTURED_REPLY, b""))
            if contexts:
                self._options.append((Option.SET_META_CONTEXT, self._meta_payload(contexts)))
        name = export_name.encode()
        self._options.append(
            (Option.GO, U32.pack(len(name)) + name + U16.pack(1) + U16.pack(Info.BLOCK_SIZE))
        )
        self.structured = False
        self.contexts: dict[int, str] = {}
        self.size = 0
        self.flags = TransmissionFlag(0)
        self._pending: dict[int, _Pending] = {}
        self._next_handle = 1
        self._eof = False
        self.holes_received = 0  # OFFSET_HOLE chunks: the server answers reads sparsely

    def _meta_payload(self, contexts: Sequence[str]) -> bytes:
        name = self.export_name.encode()
        out = bytearray(U32.pack(len(name)) + name + U32.pack(len(contexts)))
        for context in contexts:
            encoded = context.encode()
            out += U32.pack(len(encoded)) + encoded
        return bytes(out)

    def _transition(self, event: object) -> None:
        try:
            self.state = _CLIENT_TRANSITIONS[(self.state, type(event))]
        except KeyError:
            raise NbdUsageError(
                f"client: no transition from {self.state.value} on {type(event).__name__}"
            ) from None

    def _violation(self, message: str) -> NbdProtocolError:
        self._transition(Violation())
        return NbdProtocolError(message)

    def receive_data(self, data: Bytes) -> None:
        if not data:
            self._eof = True
        else:
            self._buffer.feed(data)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def tls_established(self) -> None:
        """The TLS handshake after STARTTLS succeeded: the next option goes, encrypted."""
        if not self._tls_pending:
            raise NbdUsageError("client: TLS established without a STARTTLS")
        self._tls_pending = False
        self._send_next_option()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def _send_next_option(self) -> None:
        option, payload = self._options[0]
        self._out += OPTION_HEADER.pack(IHAVEOPT, option, len(payload)) + payload

    def next_event(self) -> ClientEvent | NeedData:
        """Next event; raises NbdProtocolError on a broken server stream or at EOF."""
        while True:
            if self.state is ClientState.AWAIT_GREETING:
                raw = self._buffer.consume(GREETING.size)
                if raw is None:
                    return self._need_data()
                self._buffer.commit()
                magic, opt_magic, hs_flags = GREETING.unpack(raw)
                if magic != NBDMAGIC or opt_magic != IHAVEOPT:
                    raise self._violation(f"bad greeting {magic:#x} {opt_magic:#x}")
                if not hs_flags & HandshakeFlag.FIXED_NEWSTYLE:
                    raise self._violation("server does not speak fixed newstyle")
                flags = ClientFlag.C_FIXED_NEWSTYLE
                if hs_flags & HandshakeFlag.NO_ZEROES:
                    flags |= ClientFlag.C_NO_ZEROES
                self._out += CLIENT_FLAGS.pack(flags)
                self._send_next_option()
                self._transition(HandshakeFlag(hs_flags & 3))
            elif self.state is ClientState.OPTIONS:
                if self._tls_pending:
                    return NEED_DATA
                ready = self._parse_option_reply()
                if ready is NEED_DATA:
                    return self._need_data()
                if ready is not None:
                    self._transition(ready)
                    return ready
            elif self.state is ClientState.TRANSMISSION:
                done = self._parse_reply()
                if done is NEED_DATA:
                    return self._need_data()
                if done is not None:
                    self._transition(done)
                    return done
            else:
                return NEED_DATA

    def _need_data(self) -> NeedData:
        if self._eof:
            raise self._violation(f"server closed the connection in state {self.state.value}")
        return NEED_DATA

    def _parse_option_reply(self) -> Ready | StartTls | NeedData | None:
        raw = self._buffer.consume(OPTION_REPLY_HEADER.size)
        if raw is None:
            return NEED_DATA
        magic, option, reply_type, length = OPTION_REPLY_HEADER.unpack(raw)
        if magic != REPLY_MAGIC:
            raise self._violation(f"bad option reply magic {magic:#x}")
        if length > MAX_OPTION_LENGTH:
            raise self._violation(f"option reply of {length} bytes")
        payload = self._buffer.consume(length)
        if payload is None:
            self._buffer.rollback()
            return NEED_DATA
        self._buffer.commit()
        current, _ = self._options[0]
        if option != current:
            raise self._violation(f"reply to option {option:#x} while asking {current.name}")
        try:
            reply = parse(Reply, reply_type)
        except NbdProtocolError as err:
            raise self._violation(str(err)) from None
        if reply is Reply.INFO and len(payload) >= 2:
            (info,) = U16.unpack_from(payload)
            if info == Info.EXPORT and len(payload) == INFO_EXPORT.size:
                _, self.size, flags = INFO_EXPORT.unpack(payload)
                self.flags = TransmissionFlag(flags)
            return None
        if reply is Reply.META_CONTEXT and len(payload) >= 4:
            (context_id,) = U32.unpack_from(payload)
            self.contexts[context_id] = payload[4:].decode("utf-8", "replace")
            return None
        if reply.is_error:
            text = payload.decode("utf-8", "replace")
            if current is Option.STARTTLS:
                raise self._violation(f"server refused TLS: {reply.name} {text}".rstrip())
            if current is Option.GO:
                raise self._violation(
                    f"server refused export {self.export_name!r}: {reply.name} {text}"
                )
            if current is Option.SET_META_CONTEXT:
                self.contexts = {}
        elif reply is not Reply.ACK:
            raise self._violation(f"unexpected reply {reply.name} to {current.name}")
        elif current is Option.STRUCTURED_REPLY:
            self.structured = True
        self._options.pop(0)
        if current is Option.GO:
            return Ready(self.size, self.flags, self.structured, dict(self.contexts))
        if current is Option.STARTTLS:
            if self._buffer.pending:
                raise self._violation("server sent data after its STARTTLS reply")
            self._tls_pending = True
            return StartTls()
        self._send_next_option()
        return None

    # -- transmission ------------------------------------------------------------------

    def request(
        self,
        command: Command,
        offset: int = 0,
        length: int = 0,
        data: Bytes | None = None,
        flags: CommandFlag = NO_FLAGS,
        handle: int | None = None,
        pieces: bool = False,
    ) -> tuple[int, list[Bytes]]:
        """Encode one request; returns its handle and the bytes to send. A READ asked in
        ``pieces`` completes with its data chunks as (offset, bytes), its holes left out
        (nothing the size of the read is made)."""
        if self.state is not ClientState.TRANSMISSION:
            raise NbdUsageError(f"client: cannot send requests in state {self.state.value}")
        if command is Command.WRITE:
            if data is None:
                raise NbdUsageError("WRITE needs data")
            length = len(data)
        if handle is None:
            handle = self._next_handle
            self._next_handle = (self._next_handle + 1) & 0xFFFFFFFFFFFFFFFF or 1
        if handle in self._pending:
            raise NbdUsageError(f"handle {handle:#x} is still in flight")
        header = REQUEST.pack(REQUEST_MAGIC, flags, command, handle, offset, length)
        if command is not Command.DISC:
            self._pending[handle] = _Pending(command, offset, length, pieces=[] if pieces else None)
        else:
            self._transition(Disconnect("disc"))
        return handle, ([header, data] if command is Command.WRITE and data else [header])

    def _parse_reply(self) -> Completed | NeedData | None:
        raw = self._buffer.consume(4)
        if raw is None:
            return NEED_DATA
        (magic,) = U32.unpack(raw)
        self._buffer.rollback()
        if magic == SIMPLE_REPLY_MAGIC:
            return self._parse_simple()
        if magic == STRUCTURED_REPLY_MAGIC:
            return self._parse_chunk()
        raise self._violation(f"bad reply magic {magic:#x}")

    def _take_data(self, pending: _Pending, size: int) -> None:
        """An OFFSET_DATA chunk's payload (its offset, then ``size`` bytes) into ``pending``,
        copied once from the receive buffer. The usual reply, one chunk that is the whole
        read, becomes the answer's bytes as it is."""
        (offset,) = self._buffer.unpack(U64) or (0,)
        start = offset - pending.offset
        if start < 0 or start + size > pending.length:
            raise self._violation("data chunk outside the request")
        if pending.pieces is not None:
            pending.taken += size
            if pending.taken > pending.length:
                raise self._violation("data chunks overlap: more data than the read")
            pending.pieces.append((offset, self._buffer.consume(size) or b""))
            return
        if start == 0 and size == pending.length and pending.data is None and pending.whole is None:
            pending.whole = self._buffer.consume(size)
            return
        if pending.data is None:
            pending.data = bytearray(pending.length)
            self._adopt_whole(pending)
        self._buffer.consume_into(pending.data, start, size)

    @staticmethod
    def _adopt_whole(pending: _Pending) -> None:
        """A chunk after a whole-read one (the server may send one): into ``data`` too."""
        if pending.whole is not None and pending.data is not None:
            pending.data[:] = pending.whole
            pending.whole = None

    def _take_pending(self, handle: int) -> _Pending:
        pending = self._pending.get(handle)
        if pending is None:
            raise self._violation(f"reply for unknown handle {handle:#x}")
        return pending

    def _parse_simple(self) -> Completed | NeedData:
        raw = self._buffer.consume(SIMPLE_REPLY.size)
        if raw is None:
            return NEED_DATA
        _, error, handle = SIMPLE_REPLY.unpack(raw)
        pending = self._take_pending(handle)
        data = None
        if pending.command is Command.READ and error == 0:
            data = self._buffer.consume(pending.length)
            if data is None:
                self._buffer.rollback()
                return NEED_DATA
        self._buffer.commit()
        del self._pending[handle]
        if pending.pieces is not None and data is not None:
            return Completed(handle, pending.command, error, pieces=[(pending.offset, data)])
        return Completed(handle, pending.command, error, data=data)

    def _parse_chunk(self) -> Completed | NeedData | None:
        header = self._buffer.unpack(STRUCTURED_REPLY)
        if header is None:
            return NEED_DATA
        _, flags, kind, handle, length = header
        if length > MAX_PAYLOAD + 64:
            raise self._violation(f"reply chunk of {length} bytes")
        if len(self._buffer) < length:
            self._buffer.rollback()
            return NEED_DATA
        pending = self._take_pending(handle)
        if kind == ChunkType.OFFSET_DATA and length > 8:
            self._take_data(pending, length - 8)
        else:
            self._take_other(pending, kind, self._buffer.consume(length) or b"")
        self._buffer.commit()
        if not flags & ReplyFlag.DONE:
            return None
        del self._pending[handle]
        data = None
        if pending.pieces is not None:
            self._order_pieces(pending.pieces)
        elif pending.command is Command.READ and not pending.error:
            data = pending.read_data()
        return Completed(
            handle,
            pending.command,
            pending.error,
            pending.message,
            data,
            pending.extents,
            pending.pieces,
        )

    def _order_pieces(self, pieces: list[tuple[int, bytes]]) -> None:
        """A read's data chunks in order, none overlapping another (the server may send
        them in any order, never overlapping)."""
        pieces.sort(key=lambda piece: piece[0])
        for (at, data), (after, _) in itertools.pairwise(pieces):
            if at + len(data) > after:
                raise self._violation("data chunks of one read overlap")

    def _take_other(self, pending: _Pending, kind: int, payload: bytes) -> None:
        """A reply chunk other than data: a hole, block status, an error, or none."""
        length = len(payload)
        if kind == ChunkType.OFFSET_HOLE and length == 12:
            self.holes_received += 1
            if pending.data is None and pending.pieces is None:
                pending.data = bytearray(pending.length)
                self._adopt_whole(pending)
        elif kind == ChunkType.BLOCK_STATUS and length >= 12 and (length - 4) % 8 == 0:
            pending.extents = [EXTENT.unpack_from(payload, pos) for pos in range(4, length, 8)]
        elif kind & (1 << 15) and length >= ERROR_CHUNK.size:
            error, text_len = ERROR_CHUNK.unpack_from(payload)
            pending.error = error or Errno.EINVAL
            pending.message = payload[6 : 6 + text_len].decode("utf-8", "replace")
        elif kind != ChunkType.NONE:
            raise self._violation(f"unexpected chunk type {kind:#x} of {length} bytes")
