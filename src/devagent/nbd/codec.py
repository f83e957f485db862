"""Pure NBD codec: server and client connection state machines, no sockets, no asyncio.

Shaped after h11: a connection object is fed bytes (``receive_data``; ``b""`` means EOF),
hands back events (``next_event``) or ``NEED_DATA``, and produces the bytes to send
(``data_to_send`` for the handshake, ``reply_*``/``request`` return values in transmission).
Each side's states and legal transitions sit in one table; a missing transition raises and
names role, state and event.  Headers are parsed from a :class:`Buffer` that rolls back a
half-read message, so a message split at any offset parses exactly as a whole one.

Everything the peer controls is bounded before it is buffered: option length
(``MAX_OPTION_LENGTH``), request payload (``MAX_PAYLOAD``; an oversized WRITE's payload is
streamed to nowhere, never buffered), offset + length against the export size.  A request
that is well framed but wrong becomes a :class:`BadRequest` carrying the errno to answer; a
stream that cannot be framed any more raises :class:`NbdProtocolError` and the connection
goes to ``CLOSED``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from devagent.nbd.proto import (
    BASE_ALLOCATION,
    CLIENT_FLAGS,
    ERROR_CHUNK,
    EXPORT_NAME_REPLY,
    EXTENT,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    MAX_STRING,
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
    ZERO_PAD,
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

Bytes = bytes | bytearray | memoryview

#: Id of ``base:allocation`` in NBD_REP_META_CONTEXT replies to SET_META_CONTEXT.
BASE_ALLOCATION_ID = 1
#: A structured reply header followed by the offset of an OFFSET_DATA chunk.
_DATA_CHUNK = struct.Struct(STRUCTURED_REPLY.format + "Q")
#: No command flags.
NO_FLAGS = CommandFlag(0)
#: Preferred block size we advertise in NBD_INFO_BLOCK_SIZE.
PREFERRED_BLOCK = 4096


class NeedData(enum.Enum):
    """Sentinel: the buffer holds no complete message yet."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Literal[NeedData.NEED_DATA] = NeedData.NEED_DATA


class Buffer:
    """Received bytes with a read cursor that can be committed or rolled back (wsproto)."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0  # first byte not yet committed
        self._cursor = 0  # next byte to read

    def feed(self, data: Bytes) -> None:
        self._data += data

    def __len__(self) -> int:
        """Bytes available to read from the cursor."""
        return len(self._data) - self._cursor

    def consume(self, n: int) -> bytes | None:
        """Take ``n`` bytes from the cursor, or ``None`` (cursor unmoved) if fewer are here."""
        if len(self) < n:
            return None
        with memoryview(self._data) as view:  # one copy, not two
            chunk = bytes(view[self._cursor : self._cursor + n])
        self._cursor += n
        return chunk

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...] | None:
        """Unpack ``fmt`` at the cursor without copying, or ``None`` if it is not all here."""
        if len(self._data) - self._cursor < fmt.size:
            return None
        values = fmt.unpack_from(self._data, self._cursor)
        self._cursor += fmt.size
        return values

    def discard(self, n: int) -> int:
        """Drop up to ``n`` bytes at the cursor and commit; return how many were dropped."""
        taken = min(n, len(self))
        self._cursor += taken
        self.commit()
        return taken

    def commit(self) -> None:
        self._start = self._cursor
        # Compact lazily: copying the tail costs, so only when the dead head is large.
        if self._start > 65536 or self._start == len(self._data):
            del self._data[: self._start]
            self._cursor -= self._start
            self._start = 0

    def rollback(self) -> None:
        self._cursor = self._start

    @property
    def pending(self) -> int:
        """Bytes received and not committed (what a half-read message holds)."""
        return len(self._data) - self._start


# ---------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Export:
    """What the server knows about one export while negotiating."""

    name: str
    size: int
    read_only: bool = False
    description: str = ""

    @property
    def transmission_flags(self) -> TransmissionFlag:
        flags = (
            TransmissionFlag.HAS_FLAGS
            | TransmissionFlag.SEND_FLUSH
            | TransmissionFlag.SEND_FUA
            | TransmissionFlag.CAN_MULTI_CONN
        )
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            flags |= TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES
        return flags


@dataclass(frozen=True, slots=True)
class OptionHandled:
    """The server answered one option during the handshake (for the log and for tests)."""

    option: int
    reply: Reply
    export_name: str | None = None


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The handshake is over: transmission on ``export`` begins."""

    export: Export
    structured: bool
    contexts: Mapping[int, str]


@dataclass(frozen=True, slots=True)
class Request:
    """A well-formed transmission request to carry out."""

    handle: int
    command: Command
    flags: CommandFlag
    offset: int
    length: int
    data: bytes | None = None


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A framed request that must be answered with ``errno`` and not carried out."""

    handle: int
    command: int
    flags: int
    offset: int
    length: int
    errno: Errno
    message: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The peer ended the session: ``reason`` is ``"disc"``, ``"abort"`` or ``"eof"``."""

    reason: str


ServerEvent = OptionHandled | Negotiated | Request | BadRequest | Disconnect


class ServerState(enum.Enum):
    AWAIT_CLIENT_FLAGS = "await-client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class _Violation:
    """Transition key for a stream that broke the protocol."""


_SERVER_TRANSITIONS: dict[tuple[ServerState, type[object]], ServerState] = {
    (ServerState.AWAIT_CLIENT_FLAGS, ClientFlag): ServerState.OPTIONS,
    (ServerState.AWAIT_CLIENT_FLAGS, Disconnect): ServerState.CLOSED,
    (ServerState.AWAIT_CLIENT_FLAGS, _Violation): ServerState.CLOSED,
    (ServerState.OPTIONS, OptionHandled): ServerState.OPTIONS,
    (ServerState.OPTIONS, Negotiated): ServerState.TRANSMISSION,
    (ServerState.OPTIONS, Disconnect): ServerState.CLOSED,
    (ServerState.OPTIONS, _Violation): ServerState.CLOSED,
    (ServerState.TRANSMISSION, Request): ServerState.TRANSMISSION,
    (ServerState.TRANSMISSION, BadRequest): ServerState.TRANSMISSION,
    (ServerState.TRANSMISSION, Disconnect): ServerState.CLOSED,
    (ServerState.TRANSMISSION, _Violation): ServerState.CLOSED,
}

#: Command flags each command accepts (FUA is valid on every command, section "Command flags").
_ALLOWED_FLAGS: dict[Command, CommandFlag] = {
    Command.READ: CommandFlag.FUA,
    Command.WRITE: CommandFlag.FUA,
    Command.FLUSH: CommandFlag.FUA,
    Command.TRIM: CommandFlag.FUA,
    Command.WRITE_ZEROES: CommandFlag.FUA | CommandFlag.NO_HOLE,
    Command.BLOCK_STATUS: CommandFlag.FUA | CommandFlag.REQ_ONE,
}
_WRITING = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
#: Commands that answer ENOSPC (not EINVAL) past the end of the export (section "Error values").
_SPACE_ERRORS = frozenset({Command.WRITE, Command.WRITE_ZEROES})


_COMMANDS = {command.value: command for command in Command}
_FLAGS = [CommandFlag(value) for value in range(1 + max(map(int, _ALLOWED_FLAGS.values())))]


def _decode_string(raw: bytes, what: str) -> str:
    if len(raw) > MAX_STRING:
        raise ValueError(f"{what} is {len(raw)} bytes, more than {MAX_STRING}")
    text = raw.decode("utf-8")  # UnicodeDecodeError is a ValueError
    if "\0" in text:
        raise ValueError(f"{what} contains NUL")
    return text


class _OptionInvalid(Exception):
    """An option's payload is malformed: answer NBD_REP_ERR_INVALID (or ``reply``)."""

    def __init__(self, message: str, reply: Reply = Reply.ERR_INVALID) -> None:
        super().__init__(message)
        self.reply = reply


class ServerConnection:
    """Server side of one NBD connection: fixed newstyle handshake, then transmission."""

    def __init__(self, exports: Mapping[str, Export]) -> None:
        self._exports = exports
        self._buffer = Buffer()
        self._out = bytearray(
            GREETING.pack(
                NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
            )
        )
        self.state = ServerState.AWAIT_CLIENT_FLAGS
        self.no_zeroes = False
        self.structured = False
        self.export: Export | None = None
        self._contexts: dict[int, str] = {}
        self._contexts_for: str | None = None
        self._discard = 0  # payload bytes of a refused WRITE still to drop
        self._eof = False

    # -- plumbing ---------------------------------------------------------------------

    def _transition(self, event: object) -> None:
        key = (self.state, type(event))
        try:
            self.state = _SERVER_TRANSITIONS[key]
        except KeyError:
            raise NbdUsageError(
                f"server: no transition from {self.state.value} on {type(event).__name__}"
            ) from None

    def _violation(self, message: str) -> NbdProtocolError:
        self._transition(_Violation())
        return NbdProtocolError(message)

    def receive_data(self, data: Bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
        elif self.state is not ServerState.CLOSED:
            self._buffer.feed(data)

    def data_to_send(self) -> bytes:
        """Handshake bytes produced so far (greeting, option replies)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return self._buffer.pending

    # -- events -------------------------------------------------------------------------

    def next_event(self) -> ServerEvent | NeedData:
        """The next event from the bytes received, or NEED_DATA.

        Raises NbdProtocolError (and moves to CLOSED) when the stream cannot be parsed.
        """
        while True:
            if self.state is ServerState.CLOSED:
                return NEED_DATA
            event: ServerEvent | NeedData | None
            if self.state is ServerState.AWAIT_CLIENT_FLAGS:
                event = self._parse_client_flags()
            elif self.state is ServerState.OPTIONS:
                event = self._parse_option()
            else:
                event = self._parse_request()
            if event is NEED_DATA and self._eof:
                event = Disconnect("eof")
            if event is None:  # client flags taken; go on with options
                continue
            if event is not NEED_DATA:
                self._transition(event)
            return event

    def _parse_client_flags(self) -> NeedData | None:
        raw = self._buffer.consume(CLIENT_FLAGS.size)
        if raw is None:
            return NEED_DATA
        self._buffer.commit()
        (value,) = CLIENT_FLAGS.unpack(raw)
        known = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES
        if value & ~int(known):  # int: ~ on an IntFlag keeps only its members
            raise self._violation(f"unknown client flags {value:#x}")
        self.no_zeroes = bool(value & ClientFlag.C_NO_ZEROES)
        self._transition(ClientFlag(value))
        return None

    def _parse_option(self) -> OptionHandled | Negotiated | Disconnect | NeedData:
        raw = self._buffer.consume(OPTION_HEADER.size)
        if raw is None:
            return NEED_DATA
        magic, option, length = OPTION_HEADER.unpack(raw)
        if magic != IHAVEOPT:
            raise self._violation(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_LENGTH:
            raise self._violation(f"option {option:#x} length {length} over {MAX_OPTION_LENGTH}")
        data = self._buffer.consume(length)
        if data is None:
            self._buffer.rollback()
            return NEED_DATA
        self._buffer.commit()
        return self._handle_option(option, data)

    def _reply(self, option: int, reply: Reply, payload: bytes = b"") -> None:
        self._out += OPTION_REPLY_HEADER.pack(REPLY_MAGIC, option, reply, len(payload))
        self._out += payload

    def _handle_option(self, option: int, data: bytes) -> OptionHandled | Negotiated | Disconnect:
        if option == Option.EXPORT_NAME:
            return self._export_name(data)
        if option == Option.ABORT:
            self._reply(option, Reply.ACK)
            return Disconnect("abort")
        try:
            if option == Option.LIST:
                return self._list(data)
            if option in (Option.INFO, Option.GO):
                return self._info_or_go(Option(option), data)
            if option == Option.STRUCTURED_REPLY:
                if data:
                    raise _OptionInvalid("STRUCTURED_REPLY carries no data")
                if self.structured:
                    raise _OptionInvalid("structured replies already negotiated")
                self.structured = True
                self._reply(option, Reply.ACK)
                return OptionHandled(option, Reply.ACK)
            if option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
                return self._meta_context(Option(option), data)
        except _OptionInvalid as err:
            message = str(err).encode()
            self._reply(option, err.reply, message)
            return OptionHandled(option, err.reply)
        self._reply(option, Reply.ERR_UNSUP, f"option {option:#x} not supported".encode())
        return OptionHandled(option, Reply.ERR_UNSUP)

    def _enter_transmission(self, export: Export) -> Negotiated:
        self.export = export
        if self._contexts_for != export.name:
            self._contexts = {}
        return Negotiated(export, self.structured, dict(self._contexts))

    def _export_name(self, data: bytes) -> Negotiated:
        try:
            name = _decode_string(data, "export name")
        except ValueError as err:
            raise self._violation(f"EXPORT_NAME: {err}") from None
        export = self._exports.get(name)
        if export is None:
            raise self._violation(f"EXPORT_NAME: no export named {name!r}")
        self._out += EXPORT_NAME_REPLY.pack(export.size, export.transmission_flags)
        if not self.no_zeroes:
            self._out += bytes(ZERO_PAD)
        return self._enter_transmission(export)

    def _list(self, data: bytes) -> OptionHandled:
        if data:
            raise _OptionInvalid("LIST carries no data")
        for name in self._exports:
            encoded = name.encode()
            self._reply(Option.LIST, Reply.SERVER, U32.pack(len(encoded)) + encoded)
        self._reply(Option.LIST, Reply.ACK)
        return OptionHandled(Option.LIST, Reply.ACK)

    @staticmethod
    def _take_string(data: bytes, pos: int, what: str) -> tuple[str, int]:
        if pos + 4 > len(data):
            raise _OptionInvalid(f"{what}: truncated length")
        (n,) = U32.unpack_from(data, pos)
        pos += 4
        if pos + n > len(data):
            raise _OptionInvalid(f"{what}: length {n} runs past the option")
        try:
            return _decode_string(data[pos : pos + n], what), pos + n
        except ValueError as err:
            raise _OptionInvalid(str(err)) from None

    def _info_or_go(self, option: Option, data: bytes) -> OptionHandled | Negotiated:
        name, pos = self._take_string(data, 0, "export name")
        if pos + 2 > len(data):
            raise _OptionInvalid("missing information request count")
        (count,) = U16.unpack_from(data, pos)
        pos += 2
        if len(data) != pos + 2 * count:
            raise _OptionInvalid("information requests do not match the option length")
        requests = {U16.unpack_from(data, pos + 2 * i)[0] for i in range(count)}
        export = self._exports.get(name)
        if export is None:
            raise _OptionInvalid(f"no export named {name!r}", Reply.ERR_UNKNOWN)
        self._reply(
            option,
            Reply.INFO,
            INFO_EXPORT.pack(Info.EXPORT, export.size, export.transmission_flags),
        )
        if Info.BLOCK_SIZE in requests:
            self._reply(
                option,
                Reply.INFO,
                INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, 1, PREFERRED_BLOCK, MAX_PAYLOAD),
            )
        if Info.DESCRIPTION in requests and export.description:
            self._reply(
                option, Reply.INFO, U16.pack(Info.DESCRIPTION) + export.description.encode()
            )
        self._reply(option, Reply.ACK)
        if option is Option.GO:
            return self._enter_transmission(export)
        return OptionHandled(option, Reply.ACK, name)

    def _meta_context(self, option: Option, data: bytes) -> OptionHandled:
        setting = option is Option.SET_META_CONTEXT
        if setting:
            self._contexts, self._contexts_for = {}, None
        if not self.structured:
            raise _OptionInvalid("negotiate structured replies first")
        name, pos = self._take_string(data, 0, "export name")
        if pos + 4 > len(data):
            raise _OptionInvalid("missing query count")
        (count,) = U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            query, pos = self._take_string(data, pos, "query")
            if ":" not in query:
                raise _OptionInvalid(f"query {query!r} has no namespace")
            queries.append(query)
        if pos != len(data):
            raise _OptionInvalid("trailing bytes after the queries")
        if name not in self._exports:
            raise _OptionInvalid(f"no export named {name!r}", Reply.ERR_UNKNOWN)
        if setting:
            matched = BASE_ALLOCATION in queries
        else:  # LIST: no query lists all; "base:" is the namespace wildcard
            matched = not queries or any(q in (BASE_ALLOCATION, "base:") for q in queries)
        if matched:
            context_id = BASE_ALLOCATION_ID if setting else 0
            self._reply(option, Reply.META_CONTEXT, U32.pack(context_id) + BASE_ALLOCATION.encode())
            if setting:
                self._contexts = {BASE_ALLOCATION_ID: BASE_ALLOCATION}
                self._contexts_for = name
        self._reply(option, Reply.ACK)
        return OptionHandled(option, Reply.ACK, name)

    def _parse_request(self) -> Request | BadRequest | Disconnect | NeedData:
        if self._discard:
            self._discard -= self._buffer.discard(self._discard)
            if self._discard:
                return NEED_DATA
        header = self._buffer.unpack(REQUEST)
        if header is None:
            return NEED_DATA
        magic, flags, kind, handle, offset, length = header
        if magic != REQUEST_MAGIC:
            raise self._violation(f"bad request magic {magic:#x}")
        if kind == Command.WRITE:
            if length > MAX_PAYLOAD:
                self._buffer.commit()
                self._discard = length
                self._discard -= self._buffer.discard(self._discard)
                message = f"write of {length} bytes over {MAX_PAYLOAD}"
                return BadRequest(handle, kind, flags, offset, length, Errno.EOVERFLOW, message)
            data = self._buffer.consume(length)
            if data is None:
                self._buffer.rollback()
                return NEED_DATA
        else:
            data = None
        self._buffer.commit()
        command = _COMMANDS.get(kind)
        if command is Command.DISC:
            return Disconnect("disc")
        refusal = self._refusal(command, kind, flags, offset, length)
        if refusal is not None:
            return BadRequest(handle, kind, flags, offset, length, *refusal)
        assert command is not None
        return Request(handle, command, _FLAGS[flags], offset, length, data)

    def _refusal(
        self, command: Command | None, kind: int, flags: int, offset: int, length: int
    ) -> tuple[Errno, str] | None:
        """Why a framed request must be refused (section "Error values"), or None."""
        assert self.export is not None
        if command is None:
            return Errno.EINVAL, f"unknown Command value {kind:#x}"
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None:
            return Errno.EINVAL, f"command {command.name} not supported"
        if flags & ~int(allowed):
            return Errno.EINVAL, f"flags {flags:#x} not valid for {command.name}"
        if command is Command.READ and length > MAX_PAYLOAD:
            return Errno.EOVERFLOW, f"read of {length} bytes over {MAX_PAYLOAD}"
        if command is Command.FLUSH:
            if offset or length:
                return Errno.EINVAL, "FLUSH offset and length must be zero"
        elif offset + length > self.export.size:
            errno = Errno.ENOSPC if command in _SPACE_ERRORS else Errno.EINVAL
            return errno, f"{offset}+{length} beyond the export size {self.export.size}"
        if command in _WRITING and self.export.read_only:
            return Errno.EPERM, "export is read-only"
        if command is Command.BLOCK_STATUS:
            if not self._contexts:
                return Errno.EINVAL, "no metadata context negotiated"
            if length == 0:
                return Errno.EINVAL, "BLOCK_STATUS of zero length"
        return None

    # -- replies ------------------------------------------------------------------------

    def _require_transmission(self) -> None:
        if self.state is not ServerState.TRANSMISSION:
            raise NbdUsageError(f"server: cannot reply in state {self.state.value}")

    def reply_ok(self, handle: int) -> list[Bytes]:
        """Success without payload (any command but READ and BLOCK_STATUS)."""
        return [SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)]

    def reply_read(self, handle: int, offset: int, data: Bytes) -> list[Bytes]:
        """Success of a READ: the data in one chunk (or a simple reply)."""
        if not self.structured:
            return [SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle), data]
        if not data:
            return [
                STRUCTURED_REPLY.pack(
                    STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ChunkType.NONE, handle, 0
                )
            ]
        header = _DATA_CHUNK.pack(
            STRUCTURED_REPLY_MAGIC,
            ReplyFlag.DONE,
            ChunkType.OFFSET_DATA,
            handle,
            8 + len(data),
            offset,
        )
        return [header, data]

    def reply_error(
        self, handle: int, command: int, errno: Errno, message: str = ""
    ) -> list[Bytes]:
        """Failure of any request; structured (with the message) whenever negotiated."""
        if errno == 0:
            raise NbdUsageError("an error reply needs a nonzero errno")
        if not self.structured:
            return [SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, errno, handle)]
        text = message.encode()[:MAX_STRING]
        payload = ERROR_CHUNK.pack(errno, len(text)) + text
        header = STRUCTURED_REPLY.pack(
            STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ChunkType.ERROR, handle, len(payload)
        )
        return [header + payload]

    def reply_block_status(self, handle: int, extents: Sequence[tuple[int, int]]) -> list[Bytes]:
        """Success of BLOCK_STATUS: one chunk per negotiated context (only base:allocation)."""
        if not self.structured or not extents:
            raise NbdUsageError("block status needs structured replies and one extent")
        payload = bytearray(U32.pack(BASE_ALLOCATION_ID))
        for length, flags in extents:
            payload += EXTENT.pack(length, flags)
        header = STRUCTURED_REPLY.pack(
            STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ChunkType.BLOCK_STATUS, handle, len(payload)
        )
        return [header, bytes(payload)]


# ---------------------------------------------------------------------------------------
# Client side


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


ClientEvent = Ready | Completed


class ClientState(enum.Enum):
    AWAIT_GREETING = "await-greeting"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


_CLIENT_TRANSITIONS: dict[tuple[ClientState, type[object]], ClientState] = {
    (ClientState.AWAIT_GREETING, HandshakeFlag): ClientState.OPTIONS,
    (ClientState.OPTIONS, Ready): ClientState.TRANSMISSION,
    (ClientState.TRANSMISSION, Completed): ClientState.TRANSMISSION,
    (ClientState.TRANSMISSION, Disconnect): ClientState.CLOSED,
    (ClientState.AWAIT_GREETING, _Violation): ClientState.CLOSED,
    (ClientState.OPTIONS, _Violation): ClientState.CLOSED,
    (ClientState.TRANSMISSION, _Violation): ClientState.CLOSED,
}


@dataclass(slots=True)
class _Pending:
    command: Command
    offset: int
    length: int
    data: bytearray | None = None
    extents: list[tuple[int, int]] | None = None
    error: int = 0
    message: str = ""


class ClientConnection:
    """Client side: GO handshake (with structured replies and meta contexts), then requests
    matched to replies by handle, any number in flight."""

    def __init__(
        self,
        export_name: str = "",
        *,
        structured: bool = True,
        contexts: Sequence[str] = (BASE_ALLOCATION,),
    ) -> None:
        self.export_name = export_name
        self._buffer = Buffer()
        self._out = bytearray()
        self.state = ClientState.AWAIT_GREETING
        self._options: list[tuple[Option, bytes]] = []
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
        self._transition(_Violation())
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

    def _parse_option_reply(self) -> Ready | NeedData | None:
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
    ) -> tuple[int, list[Bytes]]:
        """Encode one request; returns its handle and the bytes to send."""
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
            self._pending[handle] = _Pending(command, offset, length)
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
        return Completed(handle, pending.command, error, data=data)

    def _parse_chunk(self) -> Completed | NeedData | None:
        raw = self._buffer.consume(STRUCTURED_REPLY.size)
        if raw is None:
            return NEED_DATA
        _, flags, kind, handle, length = STRUCTURED_REPLY.unpack(raw)
        if length > MAX_PAYLOAD + 64:
            raise self._violation(f"reply chunk of {length} bytes")
        payload = self._buffer.consume(length)
        if payload is None:
            self._buffer.rollback()
            return NEED_DATA
        self._buffer.commit()
        pending = self._take_pending(handle)
        if kind == ChunkType.OFFSET_DATA and length > 8:
            (offset,) = U64.unpack_from(payload)
            start = offset - pending.offset
            if start < 0 or start + length - 8 > pending.length:
                raise self._violation("data chunk outside the request")
            if pending.data is None:
                pending.data = bytearray(pending.length)
            pending.data[start : start + length - 8] = payload[8:]
        elif kind == ChunkType.OFFSET_HOLE and length == 12:
            if pending.data is None:
                pending.data = bytearray(pending.length)
        elif kind == ChunkType.BLOCK_STATUS and length >= 12 and (length - 4) % 8 == 0:
            pending.extents = [EXTENT.unpack_from(payload, pos) for pos in range(4, length, 8)]
        elif kind & (1 << 15) and length >= ERROR_CHUNK.size:
            error, text_len = ERROR_CHUNK.unpack_from(payload)
            pending.error = error or Errno.EINVAL
            pending.message = payload[6 : 6 + text_len].decode("utf-8", "replace")
        elif kind != ChunkType.NONE:
            raise self._violation(f"unexpected chunk type {kind:#x} of {length} bytes")
        if not flags & ReplyFlag.DONE:
            return None
        del self._pending[handle]
        data = None
        if pending.command is Command.READ and not pending.error:
            data = bytes(pending.data) if pending.data is not None else bytes(pending.length)
        return Completed(
            handle, pending.command, pending.error, pending.message, data, pending.extents
        )
