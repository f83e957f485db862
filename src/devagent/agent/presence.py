"""The presence bitmap of a Fetch replica: one bit per chunk, in a file beside the replica
(``<replica>.present``: a 32-byte header, magic ``DAPRESNT``, version, size, chunk size,
then the bits, bit ``i & 7`` of byte ``i >> 3`` for chunk ``i``). ``present`` bits say what
may be served from the replica; ``durable`` ones what the file holds.

Durability — what survives what:

- A bit written to the bitmap file with ``pwrite`` is in the page cache: it survives SIGKILL
  of the agent (not a host crash).  Bits of chunks completed by a guest write (WRITE,
  WRITE_ZEROES, TRIM of a whole chunk, and any write into a chunk fetched but not yet
  synced) are written at once, after the data's ``pwrite``: an acknowledged write is never
  re-fetched over after an agent restart.
- Bits of chunks fetched from the remote (background copier and copy-on-read) are written only
  after an ``fdatasync`` of the replica, in batches (``sync_batch`` chunks or
  ``sync_interval`` seconds): such a chunk can always be fetched again, so a host crash just
  re-fetches it, and never shows a present chunk whose data did not reach the disk.
- FLUSH (and FUA, which is a write then a FLUSH) ``fdatasync``s the replica, then writes the
  pending fetched bits, then ``fdatasync``s the bitmap: after a FLUSH every bit on disk has
  its data on disk.
- Between FLUSHes a host crash (not an agent crash) may leave the bit of a guest-written
  chunk on disk without its data: the guest's unflushed write is lost, as on any disk, and
  for a chunk first written partly, its fetched remainder too.  Agent crashes never.
- A chunk never reads as present unless its data is in the replica: the in-memory bit is set
  only after the data's ``pwrite`` returned.
- A chunk goes absent again only when the replica had no room for a guest write to it (the
  Fetch *spills* it to the remote): its bit is cleared, in memory and in the file, after the
  remote holds the chunk and the write. The file's blocks are allocated when it is made, so
  that a full filesystem still takes a bit's change.
"""

from __future__ import annotations

import base64
import logging
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

from devagent.errors import UsageError

log = logging.getLogger(__name__)


MAGIC = b"DAPRESNT"
VERSION = 1
_HEADER = struct.Struct(">8sHQI")
HEADER_SIZE = 32
#: Largest single read asked of the remote.


def presence_path(replica: str | Path) -> Path:
    replica = Path(replica)
    return replica.with_name(replica.name + ".present")


#: The set bits of each byte value, low bit first.
_SET_BITS = tuple(tuple(i for i in range(8) if value >> i & 1) for value in range(256))


def bits_to_chunks(bits: bytes, n_chunks: int) -> list[int]:
    """The indexes of the set bits (bit ``i & 7`` of byte ``i >> 3``), below ``n_chunks``
    (a byte at a time: a switchover's handover of a 1 GiB disk is 16 K chunks)."""
    chunks = [(k << 3) + i for k, value in enumerate(bits) if value for i in _SET_BITS[value]]
    while chunks and chunks[-1] >= n_chunks:
        chunks.pop()
    return chunks


class PresenceMap:
    """One bit per chunk, twice: ``present`` (may be served from the replica) and ``durable``
    (what the bitmap file holds; a subset of ``present``)."""

    def __init__(self, path: Path, size: int, chunk_size: int, *, fresh: bool) -> None:
        self.path = path
        self.size, self.chunk_size = size, chunk_size
        self.n_chunks = (size + chunk_size - 1) // chunk_size
        n_bytes = (self.n_chunks + 7) // 8
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            header = os.pread(self._fd, HEADER_SIZE, 0)
            if fresh or not header:
                os.ftruncate(self._fd, 0)
                packed = _HEADER.pack(MAGIC, VERSION, size, chunk_size)
                os.pwrite(self._fd, packed.ljust(HEADER_SIZE, b"\0"), 0)
                os.ftruncate(self._fd, HEADER_SIZE + n_bytes)
                try:
                    os.posix_fallocate(self._fd, 0, HEADER_SIZE + n_bytes)  # room for each bit
                except OSError as err:
                    message = f"no room for the presence bitmap {path}: {err.strerror}"
                    raise UsageError(message) from err
                bits = bytes(n_bytes)
            else:
                if len(header) < _HEADER.size:
                    raise UsageError(f"{path} is truncated")
                magic, version, f_size, f_chunk = _HEADER.unpack_from(header)
                if magic != MAGIC or version != VERSION:
                    raise UsageError(f"{path} is not a presence bitmap of version {VERSION}")
                if (f_size, f_chunk) != (size, chunk_size):
                    raise UsageError(
                        f"{path} is for {f_size} bytes in chunks of {f_chunk}, not {size} in "
                        f"chunks of {chunk_size} (remove the replica and its bitmap to restart)"
                    )
                bits = os.pread(self._fd, n_bytes, HEADER_SIZE)
                if len(bits) != n_bytes:
                    raise UsageError(f"{path} is truncated")
        except BaseException:
            os.close(self._fd)
            raise
        self.present = bytearray(bits)
        self.durable = bytearray(bits)
        self.count = sum(bin(b).count("1") for b in bits)
        self.new = fresh or not header  # made now, not read back from an earlier run
        self._refused = False  # the file refused a bit's write (said once)

    @property
    def present_bytes(self) -> int:
        """Bytes in present chunks (the last chunk may be short)."""
        n = self.n_chunks
        total = self.count * self.chunk_size
        if n and self.is_present(n - 1):
            total -= n * self.chunk_size - self.size
        return total

    def is_present(self, index: int) -> bool:
        return bool(self.present[index >> 3] & (1 << (index & 7)))

    def is_durable(self, index: int) -> bool:
        return bool(self.durable[index >> 3] & (1 << (index & 7)))

    def mark_present(self, chunks: Sequence[int]) -> None:
        for index in chunks:
            mask = 1 << (index & 7)
            if not self.present[index >> 3] & mask:
                self.present[index >> 3] |= mask
                self.count += 1

    def mark_present_bits(self, bits: bytes) -> None:
        """:meth:`mark_present` for the chunks whose bits are set in ``bits`` (those past
        the last chunk ignored), all at once."""
        n_bytes = len(self.present)
        given = bytearray(bits[:n_bytes].ljust(n_bytes, b"\0"))
        if n_bytes and self.n_chunks % 8:
            given[-1] &= (1 << (self.n_chunks % 8)) - 1
        merged = int.from_bytes(self.present, "little") | int.from_bytes(given, "little")
        self.present[:] = merged.to_bytes(n_bytes, "little")
        self.count = merged.bit_count()

    def persist(self, chunks: Sequence[int]) -> None:
        """Make these (present) bits durable: into the file at once (page cache)."""
        lo, hi = len(self.durable), -1
        for index in chunks:
            byte, mask = index >> 3, 1 << (index & 7)
            if self.present[byte] & mask and not self.durable[byte] & mask:
                self.durable[byte] |= mask
                lo, hi = min(lo, byte), max(hi, byte)
        self._write(lo, hi)

    def persist_present(self) -> None:
        """Make every present bit durable, the whole bitmap written at once (a new
        replica's chunks that read zeroes on both sides: a hole needs no data sync)."""
        self.durable[:] = self.present
        self._write(0, len(self.durable) - 1)

    def forget(self, chunks: Sequence[int]) -> None:
        """These chunks are no longer in the replica (spilled): clear their bits, in the
        file at once. A file that refuses (a read-only filesystem) is logged: this agent
        knows better in memory, and the replica cannot be trusted after a restart anyway."""
        lo, hi = len(self.durable), -1
        for index in chunks:
            byte, mask = index >> 3, 1 << (index & 7)
            if self.present[byte] & mask:
                self.present[byte] &= ~mask
                self.count -= 1
            if self.durable[byte] & mask:
                self.durable[byte] &= ~mask
                lo, hi = min(lo, byte), max(hi, byte)
        self._write(lo, hi)

    def _write(self, lo: int, hi: int) -> None:
        """Bytes ``lo..hi`` of the durable bits into the file (none if ``hi < lo``). A file
        that refuses (a filesystem gone read-only: its replica is lost anyway) is logged
        once per episode."""
        if hi < lo:
            return
        try:
            os.pwrite(self._fd, self.durable[lo : hi + 1], HEADER_SIZE + lo)
            self._refused = False
        except OSError as err:
            if not self._refused:
                log.error("%s: cannot write the presence bits: %s", self.path, err)
            self._refused = True

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def span_bits(spans: Iterable[tuple[int, int]], chunks: int) -> bytes:
    """Bits with the chunks of each ``[first, stop)`` span set (an empty one, ``stop <=
    first``, sets none), whole bytes at a time."""
    bits = bytearray(-(-chunks // 8))
    for first, stop in spans:
        if stop <= first:
            continue
        while first < stop and first & 7:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1
        whole = (stop - first) >> 3
        bits[first >> 3 : (first >> 3) + whole] = b"\xff" * whole
        first += whole << 3
        while first < stop:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1
    return bytes(bits)


def every_chunk(chunks: int) -> str:
    """Base64 bits with each of ``chunks`` chunks present."""
    return clean_chunks(base64.b64encode(bytes(-(-chunks // 8))).decode(), chunks)


def clean_chunks(dirty_b64: str, chunks: int) -> str:
    """The chunks a stopped mirror's target holds (not dirty), as base64 bits."""
    dirty = base64.b64decode(dirty_b64)
    clean = bytearray(~b & 0xFF for b in dirty)
    if chunks % 8:
        clean[-1] &= (1 << (chunks % 8)) - 1
    return base64.b64encode(bytes(clean)).decode()
