"""NBD wire constants and fixed-size message formats.

Every constant set is an ``IntEnum`` whose docstring names the section of the NBD protocol
document (``doc/proto.md`` in NetworkBlockDevice/nbd) that defines it.  ``parse`` turns a
number into its enum member or raises :class:`NbdProtocolError` printing the value in hex,
so that an unknown value off the wire can never pass for a known one.

Error tree of the NBD layer::

    devagent.errors.ProtocolError
    └── NbdProtocolError          the peer broke the NBD protocol (carries the NBD errno to
                                  answer with when one fits, else the connection must close)
    devagent.errors.UsageError
    └── NbdUsageError             our caller asked the codec for something the state forbids
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from typing import TypeVar

from devagent.errors import ProtocolError, UsageError

# Magic numbers (section "Handshake" and "Transmission").
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", INIT_PASSWD
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", newstyle / option magic
REPLY_MAGIC = 0x0003E889045565A9  # option reply magic (fixed newstyle)
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: Largest request payload we accept or send (section "Block size constraints": 32 MiB is
#: the customary maximum block size).
MAX_PAYLOAD = 32 * 1024 * 1024
#: Largest option payload we accept: names and queries are strings of at most 4096 bytes
#: (section "Conventions"); a few of them plus counts fit comfortably.
MAX_OPTION_LENGTH = 64 * 1024
#: Longest string (export name, context name, message) the spec allows (section "Conventions").
MAX_STRING = 4096
#: Number of zero bytes after an NBD_OPT_EXPORT_NAME reply unless NO_ZEROES was negotiated.
ZERO_PAD = 124

# Named struct formats, all network byte order.
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, min, preferred, max
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
ERROR_CHUNK = struct.Struct(">IH")  # error, message length
EXTENT = struct.Struct(">II")  # length, status flags


class NbdProtocolError(ProtocolError):
    """The peer sent bytes that break the NBD protocol.

    ``errno`` is the NBD error to answer with when the offence concerns one request that can
    still be answered; ``None`` means the connection cannot go on and must be closed.
    """

    def __init__(self, message: str, errno: Errno | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class NbdUsageError(UsageError):
    """Our caller asked the codec for something its state does not allow."""


E = TypeVar("E", bound=IntEnum)


def parse(enum: type[E], value: int) -> E:
    """Return ``enum(value)`` or raise :class:`NbdProtocolError` naming the value in hex."""
    try:
        return enum(value)
    except ValueError:
        raise NbdProtocolError(f"unknown {enum.__name__} value {value:#x}") from None


class HandshakeFlag(IntFlag):
    """Server handshake flags (section "Values / Handshake phase / Handshake flags")."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """Client flags (section "Values / Handshake phase / Client flags")."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    """Transmission flags (section "Values / Handshake phase / Transmission flags")."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(IntEnum):
    """Option types (section "Values / Handshake phase / Option types")."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Reply(IntEnum):
    """Option reply types (section "Values / Handshake phase / Option reply types")."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9

    @property
    def is_error(self) -> bool:
        return bool(self & (1 << 31))


class Info(IntEnum):
    """NBD_INFO types inside NBD_REP_INFO (section "Option reply types", NBD_REP_INFO)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(IntEnum):
    """Request types (section "Values / Transmission phase / Request types")."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(IntFlag):
    """Command flags (section "Values / Transmission phase / Command flags")."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(IntFlag):
    """Structured reply flags (section "Transmission phase / Structured reply flags")."""

    DONE = 1 << 0


class ChunkType(IntEnum):
    """Structured reply types (section "Transmission phase / Structured reply types")."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2

    @property
    def is_error(self) -> bool:
        return bool(self & (1 << 15))


class Errno(IntEnum):
    """NBD error values (section "Values / Transmission phase / Error values")."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class AllocationState(IntFlag):
    """Flags of the ``base:allocation`` context (section "Metadata contexts")."""

    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"
