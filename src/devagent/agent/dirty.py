"""A mirror's dirty set: the chunks of a device the copy's target may lack."""

from __future__ import annotations

from collections.abc import Iterable

from devagent.agent.state import Bitmap
from devagent.errors import UsageError


class DirtySet:
    """One bit per ``chunk_size`` bytes of a ``size``-byte device (all set at first, or as
    ``given``), and the bytes guest writes have dirtied anew (:meth:`mark_written`)."""

    def __init__(self, size: int, chunk_size: int, given: Bitmap | None = None) -> None:
        if chunk_size <= 0 or chunk_size & 511:
            raise UsageError(f"chunk size {chunk_size} is not a positive multiple of 512")
        self.size = size
        self.chunk_size = chunk_size
        self.n_chunks = (size + chunk_size - 1) // chunk_size
        self._bits = Bitmap.copy_or_full(self.n_chunks, given, what="dirty bitmap")
        #: Bytes of chunks guest writes turned from clean to dirty: what a copy must redo.
        self.redirtied_bytes = 0

    def __getitem__(self, chunk: int) -> bool:
        return self._bits[chunk]

    def clear(self, chunk: int) -> None:
        self._bits.set(chunk, False)

    def chunks(self, offset: int, length: int) -> range:
        """The chunks ``length`` bytes at ``offset`` touch."""
        if length <= 0:
            return range(0)
        return range(offset // self.chunk_size, (offset + length - 1) // self.chunk_size + 1)

    def span(self, first: int, count: int) -> tuple[int, int]:
        """Offset and length of ``count`` chunks from ``first`` (the last one may be short)."""
        offset = first * self.chunk_size
        return offset, min((first + count) * self.chunk_size, self.size) - offset

    def within(self, ranges: Iterable[tuple[int, int]]) -> set[int]:
        """The chunks wholly inside these (offset, length) ranges; a range reaching the
        device's end covers its last, short chunk."""
        out: set[int] = set()
        for offset, length in ranges:
            stop = (
                self.n_chunks
                if offset + length == self.size
                else (offset + length) // self.chunk_size
            )
            out.update(range(-(-offset // self.chunk_size), stop))
        return out

    def mark(self, chunks: Iterable[int]) -> None:
        for chunk in chunks:
            self._bits.set(chunk)

    def mark_written(self, chunks: Iterable[int]) -> None:
        """A guest write's :meth:`mark`, counting the chunks it dirtied anew."""
        for chunk in chunks:
            if not self._bits[chunk]:
                self._bits.set(chunk)
                self.redirtied_bytes += self.chunk_size

    def listed(self) -> list[int]:
        """The dirty chunks, in order."""
        out: list[int] = []
        for index, byte in enumerate(self._bits.to_bytes()):
            if byte:
                base = index * 8
                out.extend(base + bit for bit in range(8) if byte >> bit & 1)
        return out

    def with_(self, also: Iterable[int]) -> Bitmap:
        """A copy of the bits with ``also`` set too."""
        bitmap = Bitmap(self.n_chunks, self._bits.to_bytes())
        for chunk in also:
            bitmap.set(chunk)
        return bitmap

    def bytes_of(self, bitmap: Bitmap) -> int:
        """The device bytes ``bitmap``'s set chunks cover."""
        total = bitmap.count() * self.chunk_size
        if self.n_chunks and bitmap[self.n_chunks - 1]:
            total -= self.n_chunks * self.chunk_size - self.size
        return total
