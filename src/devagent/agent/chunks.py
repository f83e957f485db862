"""What a Fetch backend's requests use beside its replica: per-chunk locks (a fetch and a
write of one chunk never overlap), the demand gate (the copier yields to on-demand fetches),
the pacer that keeps its copies under a rate limit, the
remote's zero ranges (chunks the copier need not move), and the early answer of a read;
and the chunk helpers a mirror shares (runs of chunks, a backend's zero ranges)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from devagent.agent.backend import Backend, BackendError
from devagent.errors import UsageError
from devagent.nbd.codec import zero_blocks
from devagent.wait import all_of

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class ChunkLocks:
    """Per-chunk locks, made on demand and dropped when unused."""

    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def users(self, index: int) -> int:
        """How many requests hold chunk ``index``'s lock or wait for it."""
        slot = self._slots.get(index)
        return 0 if slot is None else slot.users

    @contextlib.asynccontextmanager
    async def hold(self, chunks: Sequence[int]) -> AsyncIterator[None]:
        users: list[int] = []
        acquired: list[int] = []
        try:
            for index in sorted(set(chunks)):
                slot = self._slots.get(index)
                if slot is None:
                    slot = self._slots[index] = _Slot()
                slot.users += 1
                users.append(index)
                await slot.lock.acquire()
                acquired.append(index)
            yield
        finally:
            for index in acquired:
                self._slots[index].lock.release()
            for index in users:
                slot = self._slots[index]
                slot.users -= 1
                if not slot.users:
                    del self._slots[index]


class Count:
    """Operations in flight, and an event set while there are none."""

    def __init__(self) -> None:
        self.n = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        """Count one operation for the duration of the block."""
        self.n += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.n -= 1
            if not self.n:
                self.idle.set()


class DemandGate:
    """On-demand fetches first: the copier's workers wait while any is pending."""

    def __init__(self) -> None:
        self._fetches = Count()  # on-demand fetches under way
        self.yielding = 0  # copier workers waiting for them to end
        self.yielded_s = 0.0  # how long the workers waited, summed over them

    @property
    def pending(self) -> int:
        return self._fetches.n

    def counted(self) -> contextlib.AbstractContextManager[None]:
        """Count an on-demand fetch for the duration of the block."""
        return self._fetches.counted()

    async def wait_idle(self) -> None:
        """The copier's turn: return once no on-demand fetch is pending."""
        if self._fetches.idle.is_set():
            return
        self.yielding += 1
        began = time.monotonic()
        try:
            await self._fetches.idle.wait()
        finally:
            self.yielding -= 1
            self.yielded_s += time.monotonic() - began


class Pacer:
    """Spaces out byte transfers to ``rate`` bytes per second on average."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise UsageError(f"rate limit must be positive, got {rate}")
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._next = 0.0

    async def take(self, n: int) -> None:
        """Wait for this transfer's turn: ``n`` bytes start now, the next ones after
        ``n / rate`` seconds."""
        now = self._clock()
        start = max(now, self._next)
        self._next = start + n / self.rate
        if start > now:
            await self._sleep(start - now)


#: How far ahead one remote BLOCK_STATUS looks for the copier.
STATUS_WINDOW = 1 << 30


class RemoteZeroes:
    """Which chunks the remote reports as reading zeroes, asked a window at a time."""

    def __init__(self, remote: Backend) -> None:
        self.remote = remote
        self._lock = asyncio.Lock()
        self._known: list[tuple[int, int, bool]] = []  # (start, end, zero) from the remote
        self._ends: list[int] = []  # each known extent's end, for bisection
        self._epoch = 0  # :meth:`forget`s so far

    async def chunks(
        self, batch: Sequence[int], span: Callable[[int], tuple[int, int]]
    ) -> list[int]:
        """The chunks of ``batch`` (ascending; ``span(i)``: chunk ``i``'s byte range) that
        read zeroes."""
        start, end = span(batch[0])[0], span(batch[-1])[1]
        async with self._lock:
            known_from = self._known[0][0] if self._known else 0
            known_to = self._known[-1][1] if self._known else 0
            if not (known_from <= start and end <= known_to):
                await self._ask(start)
            zeros = self._zeroes_over(start, end)
        if zeros and zeros[0][0] <= start and end <= zeros[0][1]:
            return list(batch)  # a hole's run, as the copier takes them
        out, k = [], 0
        for i in batch:  # both ascending: the first extent ending at or after the chunk
            first, last = span(i)
            while k < len(zeros) and zeros[k][1] < last:
                k += 1
            if k < len(zeros) and zeros[k][0] <= first:
                out.append(i)
        return out

    def zeroes_within(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ranges of [``start``, ``end``) the remote's last answer said read zeroes (no
        asking)."""
        return [(max(s, start), min(e, end)) for s, e in self._zeroes_over(start, end)]

    def zero_until(self, offset: int) -> int:
        """Where the zero extent ``offset`` lies in ends, by the remote's last answer (no
        asking); ``offset`` itself when it is not known to read zeroes."""
        return max((e for _, e in self._zeroes_over(offset, offset + 1)), default=offset)

    def _zeroes_over(self, start: int, end: int) -> list[tuple[int, int]]:
        """The known zero extents overlapping [``start``, ``end``), found by bisection: a
        window's answer holds thousands of extents on a disk written here and there."""
        out: list[tuple[int, int]] = []
        for k in range(bisect.bisect_right(self._ends, start), len(self._known)):
            s, e, zero = self._known[k]
            if s >= end:
                break
            if zero:
                out.append((s, e))
        return out

    def forget(self) -> None:
        """The remote was written (a spilled write): what it said of its zeroes is old,
        and so is any answer still on its way."""
        self._known, self._ends = [], []
        self._epoch += 1

    async def _ask(self, start: int) -> None:
        epoch = self._epoch
        try:
            length = min(STATUS_WINDOW, self.remote.size - start)
            extents = await self.remote.block_status(start, length)
        except BackendError as err:
            log.debug("remote block status failed: %s", err)
            extents = []
        self._known, self._ends = [], []
        if epoch != self._epoch:  # the remote was written while we asked: say nothing
            return
        pos = start
        for extent in extents:
            self._known.append((pos, pos + extent.length, extent.zero))
            pos += extent.length
            self._ends.append(pos)


#: A zero range shorter than this inside a fetched piece is read all the same.
MIN_ZERO_SKIP = 4096


def data_parts(start: int, end: int, zeroes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges of [``start``, ``end``) outside the sorted, disjoint ``zeroes`` (those
    shorter than :data:`MIN_ZERO_SKIP` count as data), neighbours merged."""
    out: list[tuple[int, int]] = []
    pos = start
    for zs, ze in zeroes:
        zs, ze = max(zs, start), min(ze, end)
        if ze - zs < MIN_ZERO_SKIP:
            continue
        if zs > pos:
            out.append((pos, zs))
        pos = max(pos, ze)
    if pos < end:
        out.append((pos, end))
    return out


async def put_sparsely(target: Backend, offset: int, data: bytes | bytearray) -> int:
    """Write ``data`` at ``offset`` of ``target``, its zero blocks as ``write_zeroes`` (a
    chunk holding one written 4 KiB block of a sparse disk crosses the link as 4 KiB);
    the bytes written as data."""
    zeroes = zero_blocks(data)
    if zeroes == [(0, len(data))]:
        await target.write_zeroes(offset, len(data), True)
        return 0
    if not zeroes:
        await target.write(offset, bytes(data))
        return len(data)
    parts = data_parts(0, len(data), zeroes)
    await all_of(
        *(target.write_zeroes(offset + s, e - s, True) for s, e in zeroes),
        *(target.write(offset + s, bytes(data[s:e])) for s, e in parts),
    )
    return sum(e - s for s, e in parts)


class EarlyRead:
    """A read's range, answered from the first fetched piece that holds all of it."""

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length
        self.future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def offer(self, start: int, data: bytes | bytearray) -> None:
        skip = self.offset - start
        if not self.future.done() and skip >= 0 and skip + self.length <= len(data):
            self.future.set_result(bytes(data[skip : skip + self.length]))


def log_lost_store(task: asyncio.Future[Any]) -> None:
    """The read was answered already; a store that failed after it leaves its chunks absent
    (fetched again next time) and a log line."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("storing fetched chunks failed: %s", task.exception())


def chunk_runs(chunks: list[int]) -> list[tuple[int, int]]:
    """Sorted chunk numbers as (first, count) runs of neighbours."""
    out: list[tuple[int, int]] = []
    for chunk in chunks:
        if out and out[-1][0] + out[-1][1] == chunk:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((chunk, 1))
    return out


async def zero_ranges(source: Backend, start: int, length: int) -> list[tuple[int, int]]:
    """(offset, length) ranges of [start, start+length) that ``source`` reads as zero."""
    out: list[tuple[int, int]] = []
    pos, end = start, start + length
    while pos < end:
        extents = await source.block_status(pos, end - pos)
        if not extents or all(e.length <= 0 for e in extents):
            break  # a backend that says nothing: treat the rest as data
        for extent in extents:
            n = min(extent.length, end - pos)
            if n <= 0:
                continue
            if extent.zero:
                out.append((pos, n))
            pos += n
            if pos >= end:
                break
    return out
