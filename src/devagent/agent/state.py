"""Device state: what one agent hands another when a device moves (size, chunking, bitmaps,
counters), as a versioned, checksummed blob.

Layout (network byte order)::

    magic "DAST" | version u16 | size u64 | chunk_size u32 | n_counters u16 | n_bitmaps u16
    n_counters x (name_len u16, name, value u64)
    n_bitmaps  x (name_len u16, name, n_bits u64, ceil(n_bits / 8) bytes, LSB first)
    crc32 u32 of everything before it

``import_`` rejects a wrong magic, an unknown version, a bad checksum, truncation or
trailing bytes with :class:`StateFormatError`, never with a struct or index error.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from devagent.errors import UsageError

MAGIC = b"DAST"
VERSION = 1
_HEADER = struct.Struct(">4sHQIHH")
_NAME = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_CRC = struct.Struct(">I")


class StateFormatError(UsageError):
    """A device-state blob that this version cannot read."""


class Bitmap:
    """A fixed-size bit set, one bit per chunk."""

    def __init__(self, n_bits: int, data: bytes | None = None) -> None:
        self.n_bits = n_bits
        n_bytes = (n_bits + 7) // 8
        if data is not None and len(data) != n_bytes:
            raise StateFormatError(
                f"bitmap of {n_bits} bits needs {n_bytes} bytes, got {len(data)}"
            )
        self._bits = bytearray(data) if data is not None else bytearray(n_bytes)

    @classmethod
    def copy_or_full(cls, n_bits: int, given: Bitmap | None, *, what: str) -> Bitmap:
        """A copy of ``given`` (which must have ``n_bits``), else every bit set (and none
        past the last: ``count`` counts every bit)."""
        if given is not None and given.n_bits != n_bits:
            raise UsageError(f"{what} has {given.n_bits} bits for {n_bits}")
        bits = bytearray(given.to_bytes() if given else b"\xff" * ((n_bits + 7) // 8))
        if n_bits & 7:
            bits[-1] &= (1 << (n_bits & 7)) - 1
        return cls(n_bits, bytes(bits))

    def _check(self, index: int) -> None:
        if not 0 <= index < self.n_bits:
            raise UsageError(f"bit {index} outside a bitmap of {self.n_bits}")

    def set(self, index: int, value: bool = True) -> None:
        self._check(index)
        if value:
            self._bits[index >> 3] |= 1 << (index & 7)
        else:
            self._bits[index >> 3] &= ~(1 << (index & 7)) & 0xFF

    def __getitem__(self, index: int) -> bool:
        self._check(index)
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def set_range(self, start: int, stop: int, value: bool = True) -> None:
        for index in range(start, stop):
            self.set(index, value)

    def count(self) -> int:
        return sum(bin(byte).count("1") for byte in self._bits)

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitmap) and (self.n_bits, self._bits) == (
            other.n_bits,
            other._bits,
        )

    def __repr__(self) -> str:
        return f"Bitmap({self.n_bits} bits, {self.count()} set)"


@dataclass
class DeviceState:
    """A device's state as agents exchange it."""

    size: int
    chunk_size: int
    bitmaps: dict[str, Bitmap] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def n_chunks(self) -> int:
        return (self.size + self.chunk_size - 1) // self.chunk_size

    def new_bitmap(self, name: str) -> Bitmap:
        bitmap = self.bitmaps[name] = Bitmap(self.n_chunks)
        return bitmap

    def export(self) -> bytes:
        out = bytearray(
            _HEADER.pack(
                MAGIC, VERSION, self.size, self.chunk_size, len(self.counters), len(self.bitmaps)
            )
        )
        for name, value in self.counters.items():
            out += _pack_name(name) + _U64.pack(value)
        for name, bitmap in self.bitmaps.items():
            out += _pack_name(name) + _U64.pack(bitmap.n_bits) + bitmap.to_bytes()
        out += _CRC.pack(zlib.crc32(out))
        return bytes(out)

    @classmethod
    def import_(cls, blob: bytes) -> DeviceState:
        if len(blob) < _HEADER.size + _CRC.size:
            raise StateFormatError(f"device state of {len(blob)} bytes is too short")
        magic, version, size, chunk_size, n_counters, n_bitmaps = _HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise StateFormatError(f"not a device state (magic {magic!r})")
        if version != VERSION:
            raise StateFormatError(f"device state version {version}, this agent reads {VERSION}")
        (crc,) = _CRC.unpack_from(blob, len(blob) - _CRC.size)
        body = blob[: -_CRC.size]
        if zlib.crc32(body) != crc:
            raise StateFormatError("device state checksum mismatch")
        if chunk_size == 0:
            raise StateFormatError("device state with chunk size 0")
        state = cls(size, chunk_size)
        reader = _Reader(body, _HEADER.size)
        for _ in range(n_counters):
            name = reader.name()
            state.counters[name] = reader.u64()
        for _ in range(n_bitmaps):
            name = reader.name()
            n_bits = reader.u64()
            if n_bits != state.n_chunks:
                raise StateFormatError(
                    f"bitmap {name!r} has {n_bits} bits for {state.n_chunks} chunks"
                )
            state.bitmaps[name] = Bitmap(n_bits, reader.take((n_bits + 7) // 8))
        if reader.pos != len(body):
            raise StateFormatError(f"{len(body) - reader.pos} trailing bytes in device state")
        return state


def _pack_name(name: str) -> bytes:
    encoded = name.encode()
    return _NAME.pack(len(encoded)) + encoded


class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise StateFormatError("device state is truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u64(self) -> int:
        (value,) = _U64.unpack(self.take(8))
        return int(value)

    def name(self) -> str:
        (n,) = _NAME.unpack(self.take(2))
        try:
            return self.take(n).decode()
        except UnicodeDecodeError as err:
            raise StateFormatError("device state holds a name that is not UTF-8") from err
