"""Pure codec for QEMU's ``-netdev stream`` framing: no sockets, no asyncio.

The wire (QEMU ``net/stream.c``: ``net_stream_receive`` writes, ``net/net.c``
``net_fill_rstate`` reads) carries each Ethernet frame after its length, a 4-byte
big-endian unsigned integer; there is nothing else, no magic and no vnet header.  Two agents
use the same framing between them over TCP.

Shaped after h11: a :class:`FrameDecoder` is fed bytes (``receive_data``; ``b""`` is EOF)
and hands back events (``next_event``): a :class:`Frame`, a :class:`Dropped` frame, the
final :class:`Closed`, or ``NEED_DATA``.  The length header is read from a buffer that rolls
back a half-read frame, so a stream split at any offset decodes exactly as a whole one.

What the peer controls is bounded: a frame longer than ``Limit.MAX_FRAME`` (QEMU's own
``NET_BUFSIZE``) is never buffered.  The framing has no marker to find the next frame by, so
after such a length the only sound resync is a new connection: the decoder counts it,
raises :class:`StreamProtocolError` once and goes to ``CLOSED`` (it then ignores what it is
fed); the connection's owner closes the socket and reconnects.  QEMU does the same
(``net_fill_rstate`` fails and QEMU ends the connection).  A frame shorter than an Ethernet
header (a runt, length 0 included) is consumed, counted and dropped without losing sync; a
frame cut short by EOF is counted and dropped.

Error tree::

    devagent.errors.ProtocolError
    └── StreamProtocolError   the peer sent a length that cannot be framed (carries it)
    devagent.errors.UsageError
    └── StreamUsageError      our caller fed bytes after EOF or asked to encode a frame the
                              wire cannot carry
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Literal

from devagent.errors import ProtocolError, UsageError
from devagent.nbd.codec import Buffer

Bytes = bytes | bytearray | memoryview

#: The length header, network byte order (``net_stream_receive``: ``htonl(size)``).
LENGTH = struct.Struct(">I")


class Limit(enum.IntEnum):
    """Sizes of the stream framing (QEMU ``include/net/net.h``: ``NET_BUFSIZE`` is
    4096 + 65536, the largest frame ``net_fill_rstate`` accepts; an Ethernet header is
    destination, source and EtherType: 6 + 6 + 2)."""

    HEADER = 4
    MIN_FRAME = 14
    MAX_FRAME = 4096 + 65536


class DropReason(enum.Enum):
    """Why a frame the peer sent was not delivered."""

    RUNT = "runt"  # shorter than an Ethernet header
    OVERSIZED = "oversized"  # longer than Limit.MAX_FRAME: the connection is closed
    TRUNCATED = "truncated"  # EOF in the middle of a header or a frame


class CloseReason(enum.Enum):
    EOF = "eof"  # the peer closed its side
    BROKEN = "broken"  # the peer sent a length that cannot be framed


class StreamProtocolError(ProtocolError):
    """The peer sent a frame length that cannot be framed; the connection must close."""

    def __init__(self, message: str, *, reason: DropReason, length: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.length = length


class StreamUsageError(UsageError):
    """Our caller asked the codec for something it cannot do."""


class NeedData(enum.Enum):
    """Sentinel: no complete frame is buffered yet."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Literal[NeedData.NEED_DATA] = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Frame:
    """One Ethernet frame, as the peer sent it."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Dropped:
    """A frame the peer sent that is not delivered: ``length`` is what its header declared
    (``None`` when EOF cut the header itself), ``received`` how many of its bytes came."""

    reason: DropReason
    length: int | None
    received: int


@dataclass(frozen=True, slots=True)
class Closed:
    """The stream is over; every later ``next_event`` returns the same."""

    reason: CloseReason


Event = Frame | Dropped | Closed


class DecoderState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass(slots=True)
class DecoderStats:
    """What one decoder saw: delivered frames and bytes, and drops by reason."""

    frames: int = 0
    bytes: int = 0
    runt: int = 0
    oversized: int = 0
    truncated: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "frames": self.frames,
            "bytes": self.bytes,
            "runt": self.runt,
            "oversized": self.oversized,
            "truncated": self.truncated,
        }


class FrameDecoder:
    """Turns the bytes of one stream connection into frames."""

    def __init__(self, max_frame: int = Limit.MAX_FRAME) -> None:
        if not Limit.MIN_FRAME <= max_frame <= Limit.MAX_FRAME:
            raise StreamUsageError(
                f"max_frame {max_frame} is outside {Limit.MIN_FRAME}..{Limit.MAX_FRAME}"
            )
        self.max_frame = max_frame
        self.state = DecoderState.OPEN
        self.stats = DecoderStats()
        self._buffer = Buffer()
        self._eof = False
        self._closed: Closed | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet decoded (never more than one incomplete frame plus
        whatever the last ``receive_data`` brought)."""
        return self._buffer.pending

    def receive_data(self, data: Bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if self.state is DecoderState.CLOSED:
            return  # a broken stream is read to its end and ignored, not buffered
        if self._eof:
            if data:
                raise StreamUsageError("bytes fed after EOF")
            return
        if data:
            self._buffer.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Event | NeedData:
        """The next frame, drop or close; ``NEED_DATA`` until more bytes come.

        Raises :class:`StreamProtocolError` once, for a length over ``max_frame``."""
        if self._closed is not None:
            return self._closed
        header = self._buffer.unpack(LENGTH)
        if header is None:
            return self._incomplete(None)
        (length,) = header
        if length > self.max_frame:
            self.stats.oversized += 1
            self._close(CloseReason.BROKEN)
            self._buffer = Buffer()  # the rest is unframeable: free it
            raise StreamProtocolError(
                f"frame length {length:#x} ({length}) is over the limit of {self.max_frame}",
                reason=DropReason.OVERSIZED,
                length=length,
            )
        payload = self._buffer.consume(length)
        if payload is None:
            return self._incomplete(length)
        self._buffer.commit()
        if length < Limit.MIN_FRAME:
            self.stats.runt += 1
            return Dropped(DropReason.RUNT, length, length)
        self.stats.frames += 1
        self.stats.bytes += length
        return Frame(payload)

    def _incomplete(self, length: int | None) -> Dropped | Closed | NeedData:
        self._buffer.rollback()
        if not self._eof:
            return NEED_DATA
        received = self._buffer.pending - (0 if length is None else Limit.HEADER)
        closed = self._close(CloseReason.EOF)
        if self._buffer.pending == 0:
            return closed
        self.stats.truncated += 1
        return Dropped(DropReason.TRUNCATED, length, received)

    def _close(self, reason: CloseReason) -> Closed:
        self.state = DecoderState.CLOSED
        self._closed = Closed(reason)
        return self._closed


def frame_header(length: int) -> bytes:
    """The 4-byte header that goes before a frame of ``length`` bytes."""
    if not Limit.MIN_FRAME <= length <= Limit.MAX_FRAME:
        raise StreamUsageError(
            f"a frame of {length} bytes cannot be sent: {Limit.MIN_FRAME}..{Limit.MAX_FRAME}"
        )
    return LENGTH.pack(length)


def encode_frame(frame: Bytes) -> bytes:
    """One frame with its header, ready to send."""
    return frame_header(len(frame)) + bytes(frame)
