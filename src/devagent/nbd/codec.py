"""Pure NBD codec, the pieces both sides share: no sockets, no asyncio.

Shaped after h11: a connection object is fed bytes (``receive_data``; ``b""`` means EOF),
hands back events (``next_event``) or ``NEED_DATA``, and produces the bytes to send
(``data_to_send`` for the handshake, ``reply_*``/``request`` return values in transmission).
Each side's states and legal transitions sit in one table; a missing transition raises and
names role, state and event.  Headers are parsed from a :class:`Buffer` that rolls back a
half-read message, so a message split at any offset parses exactly as a whole one.

The server side is :mod:`devagent.nbd.server_codec`, the client side
:mod:`devagent.nbd.client_codec`; this module holds what they share: the buffer, the
``NEED_DATA`` sentinel, :class:`Export`, :class:`Disconnect` and the wire constants.

Everything the peer controls is bounded before it is buffered: option length
(``MAX_OPTION_LENGTH``), request payload (``MAX_PAYLOAD``; an oversized WRITE's payload is
streamed to nowhere, never buffered), offset + length against the export size.  A request
that is well framed but wrong becomes a ``BadRequest`` carrying the errno to answer; a
stream that cannot be framed any more raises :class:`NbdProtocolError` and the connection
goes to ``CLOSED``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, Literal

from devagent.nbd.proto import (
    MAX_STRING,
    STRUCTURED_REPLY,
    CommandFlag,
    TransmissionFlag,
)

Bytes = bytes | bytearray | memoryview

#: Id of ``base:allocation`` in NBD_REP_META_CONTEXT replies to SET_META_CONTEXT.
BASE_ALLOCATION_ID = 1
#: A structured reply header followed by the offset of an OFFSET_DATA chunk.
DATA_CHUNK = struct.Struct(STRUCTURED_REPLY.format + "Q")
#: A whole OFFSET_HOLE chunk: a structured reply header, the hole's offset and length.
HOLE_CHUNK = struct.Struct(STRUCTURED_REPLY.format + "QI")
#: No command flags.
NO_FLAGS = CommandFlag(0)
#: Preferred block size we advertise in NBD_INFO_BLOCK_SIZE.
PREFERRED_BLOCK = 4096


#: The granule of zeroes left off the link: a sparse READ reply's holes, a mirror's zeroes.
ZERO_BLOCK = 4096
_ZEROES = bytes(ZERO_BLOCK)


def zero_blocks(data: bytes | bytearray) -> list[tuple[int, int]]:
    """The runs of whole :data:`ZERO_BLOCK` blocks of ``data`` that are zeroes, as (start,
    end) offsets into it. A block whose first byte is not zero is passed over at once: data
    that is all data costs one look a block (18 us a MiB; 0.5 ms for 4 MiB of zeroes)."""
    out: list[tuple[int, int]] = []
    for pos in range(0, len(data) - ZERO_BLOCK + 1, ZERO_BLOCK):
        if data[pos] or not data.startswith(_ZEROES, pos):
            continue
        if out and out[-1][1] == pos:
            out[-1] = (out[-1][0], pos + ZERO_BLOCK)
        else:
            out.append((pos, pos + ZERO_BLOCK))
    return out


#: What a transport may put in a connection's receive buffer at once, client's or server's
#: (TLS decrypts into it); the bytes go to the codec's :class:`Buffer` from there.
RECEIVE_BUFFER = 256 << 10


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

    def consume_into(self, target: bytearray, start: int, n: int) -> None:
        """Copy ``n`` bytes from the cursor into ``target[start:]`` (the caller saw that they
        are here): one copy, no bytes object in between."""
        with memoryview(self._data) as view:
            target[start : start + n] = view[self._cursor : self._cursor + n]
        self._cursor += n

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
# Events and helpers both sides use


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
class Disconnect:
    """The peer ended the session: ``reason`` is ``"disc"``, ``"abort"`` or ``"eof"``."""

    reason: str


class Violation:
    """Transition key for a stream that broke the protocol."""


def decode_string(raw: bytes, what: str) -> str:
    if len(raw) > MAX_STRING:
        raise ValueError(f"{what} is {len(raw)} bytes, more than {MAX_STRING}")
    text = raw.decode("utf-8")  # UnicodeDecodeError is a ValueError
    if "\0" in text:
        raise ValueError(f"{what} contains NUL")
    return text
