"""The server side of the pure NBD codec: the fixed newstyle handshake (options, export
names, structured replies, the ``base:allocation`` meta context), then transmission requests
checked against the export (a well-framed wrong request becomes a :class:`BadRequest`
carrying its errno) and the replies to them, built only in transmission."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from devagent.nbd.codec import (
    BASE_ALLOCATION_ID,
    DATA_CHUNK,
    HOLE_CHUNK,
    NEED_DATA,
    PREFERRED_BLOCK,
    Buffer,
    Bytes,
    Disconnect,
    Export,
    NeedData,
    Violation,
    decode_string,
    zero_blocks,
)
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
)


@dataclass(frozen=True, slots=True)
class OptionHandled:
    """The server answered one option during the handshake (for the log and for tests)."""

    option: int
    reply: Reply
    export_name: str | None = None


@dataclass(frozen=True, slots=True)
class StartTls:
    """The client asked for TLS and the ACK is queued: once it is sent, the connection's
    owner runs the TLS handshake, then calls :meth:`ServerConnection.tls_established`.
    Until then the codec parses nothing more."""


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


ServerEvent = OptionHandled | StartTls | Negotiated | Request | BadRequest | Disconnect


class ServerState(enum.Enum):
    AWAIT_CLIENT_FLAGS = "await-client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


_SERVER_TRANSITIONS: dict[tuple[ServerState, type[object]], ServerState] = {
    (ServerState.AWAIT_CLIENT_FLAGS, ClientFlag): ServerState.OPTIONS,
    (ServerState.AWAIT_CLIENT_FLAGS, Disconnect): ServerState.CLOSED,
    (ServerState.AWAIT_CLIENT_FLAGS, Violation): ServerState.CLOSED,
    (ServerState.OPTIONS, OptionHandled): ServerState.OPTIONS,
    (ServerState.OPTIONS, StartTls): ServerState.OPTIONS,
    (ServerState.OPTIONS, Negotiated): ServerState.TRANSMISSION,
    (ServerState.OPTIONS, Disconnect): ServerState.CLOSED,
    (ServerState.OPTIONS, Violation): ServerState.CLOSED,
    (ServerState.TRANSMISSION, Request): ServerState.TRANSMISSION,
    (ServerState.TRANSMISSION, BadRequest): ServerState.TRANSMISSION,
    (ServerState.TRANSMISSION, Disconnect): ServerState.CLOSED,
    (ServerState.TRANSMISSION, Violation): ServerState.CLOSED,
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


class _OptionInvalid(Exception):
    """An option's payload is malformed: answer NBD_REP_ERR_INVALID (or ``reply``)."""

    def __init__(self, message: str, reply: Reply = Reply.ERR_INVALID) -> None:
        super().__init__(message)
        self.reply = reply


class ServerConnection:
    """Server side of one NBD connection: fixed newstyle handshake, then transmission.

    With ``tls``, TLS is offered and required (the NBD document's "TLS required" mode):
    before ``NBD_OPT_STARTTLS`` every option but ``ABORT`` is answered
    ``NBD_REP_ERR_TLS_REQD``, and ``NBD_OPT_EXPORT_NAME`` (which cannot be refused by a
    reply) closes the connection. There is no way on without TLS.
    """

    def __init__(self, exports: Mapping[str, Export], *, tls: bool = False) -> None:
        self._exports = exports
        self.tls_required = tls
        self.tls_active = False
        self._tls_pending = False  # STARTTLS acknowledged, the handshake not yet done
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
        self._transition(Violation())
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

    def tls_established(self) -> None:
        """The TLS handshake that followed STARTTLS succeeded: options go on, encrypted."""
        if not self._tls_pending:
            raise NbdUsageError("server: TLS established without a STARTTLS")
        self._tls_pending, self.tls_active = False, True

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
            if self.state is ServerState.CLOSED or self._tls_pending:
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

    def _parse_option(self) -> OptionHandled | StartTls | Negotiated | Disconnect | NeedData:
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

    def _handle_option(
        self, option: int, data: bytes
    ) -> OptionHandled | StartTls | Negotiated | Disconnect:
        if option == Option.ABORT:
            self._reply(option, Reply.ACK)
            return Disconnect("abort")
        if self.tls_required and not self.tls_active:
            return self._before_tls(option, data)
        if option == Option.EXPORT_NAME:
            return self._export_name(data)
        try:
            if option == Option.STARTTLS and self.tls_active:
                raise _OptionInvalid("TLS is already on")
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

    def _before_tls(self, option: int, data: bytes) -> OptionHandled | StartTls:
        """An option on a connection that must first turn to TLS."""
        if option == Option.STARTTLS:
            if data:
                self._reply(option, Reply.ERR_INVALID, b"STARTTLS carries no data")
                return OptionHandled(option, Reply.ERR_INVALID)
            if self._buffer.pending:
                raise self._violation("data sent after STARTTLS before its reply")
            self._reply(option, Reply.ACK)
            self._tls_pending = True
            return StartTls()
        if option == Option.EXPORT_NAME:
            raise self._violation("EXPORT_NAME before STARTTLS: TLS is required")
        self._reply(option, Reply.ERR_TLS_REQD, b"TLS is required: send NBD_OPT_STARTTLS first")
        return OptionHandled(option, Reply.ERR_TLS_REQD)

    def _enter_transmission(self, export: Export) -> Negotiated:
        self.export = export
        if self._contexts_for != export.name:
            self._contexts = {}
        return Negotiated(export, self.structured, dict(self._contexts))

    def _export_name(self, data: bytes) -> Negotiated:
        try:
            name = decode_string(data, "export name")
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
            return decode_string(data[pos : pos + n], what), pos + n
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
        """Replies answer requests, and requests exist only once transmission began. After a
        disconnect (CLOSED) the requests still in flight are answered all the same: the
        server finishes what it accepted before it closes (NBD, "Terminating the
        transmission phase")."""
        if self.export is None:
            raise NbdUsageError(
                f"server: cannot reply in state {self.state.value}, before transmission"
            )

    def reply_ok(self, handle: int) -> list[Bytes]:
        """Success without payload (any command but READ and BLOCK_STATUS)."""
        self._require_transmission()
        return [SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)]

    def reply_read(
        self, handle: int, offset: int, data: bytes | bytearray, sparse: bool = False
    ) -> list[Bytes]:
        """Success of a READ: the data in one chunk (or a simple reply). ``sparse``, with
        structured replies: its zero blocks (:func:`zero_blocks`) go as hole chunks, whose
        zeroes never cross (a chunk the guest wrote 4 KiB of on a sparse disk: 4 KiB)."""
        self._require_transmission()
        if not self.structured:
            return [SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle), data]
        if not data:
            return [STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE,
                                          ChunkType.NONE, handle, 0)]  # fmt: skip
        end, pos = len(data), 0
        parts: list[Bytes] = []
        for start, stop in [*(zero_blocks(data) if sparse else ()), (end, end)]:
            if start > pos:
                flags = ReplyFlag.DONE if start == end else ReplyFlag(0)
                parts.append(DATA_CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, ChunkType.OFFSET_DATA,
                                             handle, 8 + start - pos, offset + pos))  # fmt: skip
                parts.append(data if start - pos == end else memoryview(data)[pos:start])
            if stop > start:
                flags = ReplyFlag.DONE if stop == end else ReplyFlag(0)
                parts.append(HOLE_CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, ChunkType.OFFSET_HOLE,
                                             handle, 12, offset + start, stop - start))  # fmt: skip
            pos = stop
        return parts

    def reply_error(
        self, handle: int, command: int, errno: Errno, message: str = ""
    ) -> list[Bytes]:
        """Failure of any request; structured (with the message) whenever negotiated."""
        self._require_transmission()
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
        self._require_transmission()
        if not self.structured or not extents:
            raise NbdUsageError("block status needs structured replies and one extent")
        payload = bytearray(U32.pack(BASE_ALLOCATION_ID))
        for length, flags in extents:
            payload += EXTENT.pack(length, flags)
        header = STRUCTURED_REPLY.pack(
            STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ChunkType.BLOCK_STATUS, handle, len(payload)
        )
        return [header, bytes(payload)]
