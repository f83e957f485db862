"""Fetch backend against an in-memory fake remote: copy-on-read, single-flight, partial writes
into absent chunks, writes racing fetches, the copier (priority, rate, holes), durability of
the presence bitmap across an agent crash, progress."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devagent.agent.backend import Backend, BackendError, Extent
from devagent.agent.chunks import MIN_ZERO_SKIP, Pacer, data_parts
from devagent.agent.copier import SPARSE_PROBE, SPARSE_SPAN, ZERO_RUN_CHUNKS
from devagent.agent.fetch import Fetch
from devagent.agent.presence import (
    HEADER_SIZE,
    PresenceMap,
    bits_to_chunks,
    presence_path,
    span_bits,
)
from devagent.errors import UsageError
from devagent.nbd.proto import Errno


async def until(condition: Callable[[], bool], what: str = "condition") -> None:
    """Poll until ``condition()`` holds; a hang guard (30 s), not a timing assertion."""
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} never became true")


CHUNK = 64 * 1024
SIZE = 64 * CHUNK  # 4 MiB


class FakeRemote(Backend):
    """Bytes in memory; reads can be held (all, or those at some offsets) or made to fail."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = bytearray(data)
        self.reads: list[tuple[int, int]] = []
        self.status_calls = 0
        self.hold_all = False
        self.hold_at: set[int] = set()
        self.release = asyncio.Event()
        self.fail: Errno | None = None
        self.latency: tuple[float, float] | None = None  # (min, max) seconds per read
        self.rng = random.Random(0)
        self.closed = False
        self.sparse = False  # answers a read in pieces, its zero 4 KiB blocks left out
        self.piece_reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def answers_sparsely(self) -> bool:
        return self.sparse

    async def read_pieces(self, offset: int, length: int) -> list[tuple[int, bytes]]:
        self.piece_reads.append((offset, length))
        data = self.data[offset : offset + length]
        if not self.sparse:
            return [(offset, bytes(data))]
        pieces: list[tuple[int, bytes]] = []
        for pos in range(0, length, 4096):
            block = bytes(data[pos : pos + 4096])
            if not any(block):
                continue
            if pieces and pieces[-1][0] + len(pieces[-1][1]) == offset + pos:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + block)
            else:
                pieces.append((offset + pos, block))
        return pieces

    async def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        if self.latency is not None:
            await asyncio.sleep(self.rng.uniform(*self.latency))
        if self.hold_all or offset in self.hold_at:
            await self.release.wait()
        if self.fail is not None:
            raise BackendError("remote read failed on purpose", self.fail)
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        raise AssertionError("Fetch must never write to its remote")

    async def flush(self) -> None:
        raise AssertionError("Fetch must never flush its remote")

    async def trim(self, offset: int, length: int) -> None:
        raise AssertionError("Fetch must never trim its remote")

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        raise AssertionError("Fetch must never zero its remote")

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Zero 4 KiB blocks are holes, the rest data."""
        self.status_calls += 1
        out: list[Extent] = []
        for pos in range(offset, offset + length, 4096):
            n = min(4096, offset + length - pos)
            zero = not any(self.data[pos : pos + n])
            if out and out[-1].zero == zero:
                out[-1] = Extent(out[-1].length + n, zero, zero)
            else:
                out.append(Extent(n, zero, zero))
        return out

    def chunk_reads(self, index: int) -> int:
        start, end = index * CHUNK, (index + 1) * CHUNK
        return sum(1 for off, n in self.reads if off < end and off + n > start)

    async def close(self) -> None:
        self.closed = True


def pattern(size: int = SIZE, seed: int = 1) -> bytearray:
    return bytearray(random.Random(seed).randbytes(size))


@pytest.fixture
def remote() -> FakeRemote:
    return FakeRemote(pattern())


@pytest.fixture
async def fetch(tmp_path: Path, remote: FakeRemote) -> AsyncIterator[Fetch]:
    backend = Fetch(tmp_path / "replica.img", remote, chunk_size=CHUNK)
    try:
        yield backend
    finally:
        remote.release.set()
        await backend.close()


def on_disk(path: Path) -> bytes:
    return path.read_bytes()


def durable_bits(replica: Path, n_chunks: int) -> list[bool]:
    raw = presence_path(replica).read_bytes()[HEADER_SIZE:]
    return [bool(raw[i >> 3] & (1 << (i & 7))) for i in range(n_chunks)]


async def abandon(backend: Fetch) -> None:
    """What SIGKILL leaves: the page cache as it is, no sync, no final bitmap write (once
    the stores under way are done, to keep the test deterministic)."""
    await backend.settle()
    await backend.stop_copier()
    if backend._sync_timer is not None:
        backend._sync_timer.cancel()
    await backend._local.close()
    backend._map.close()
    backend._closed = True


async def test_a_read_fetches_absent_chunks_once_and_then_serves_the_replica(
    fetch: Fetch, remote: FakeRemote
) -> None:
    assert fetch.present_bytes == 0 and not fetch.complete
    got = await fetch.read(CHUNK + 100, CHUNK)  # spans chunks 1 and 2
    assert got == remote.data[CHUNK + 100 : 2 * CHUNK + 100]
    assert remote.reads == [(CHUNK, 2 * CHUNK)]  # one remote read for the run
    await fetch.settle()  # the answer may leave before the chunks are stored
    assert fetch.present_bytes == 2 * CHUNK
    assert fetch.fetched_on_demand == 2 * CHUNK
    assert await fetch.read(CHUNK, 2 * CHUNK) == remote.data[CHUNK : 3 * CHUNK]
    assert len(remote.reads) == 1  # served from the replica
    assert on_disk(fetch.path)[CHUNK : 3 * CHUNK] == remote.data[CHUNK : 3 * CHUNK]
    assert fetch.read_nowait(CHUNK, 4096) == remote.data[CHUNK : CHUNK + 4096]
    assert fetch.read_nowait(0, 4096) is None  # chunk 0 is absent


async def test_a_read_answered_before_its_store_still_orders_later_writes(
    fetch: Fetch, remote: FakeRemote
) -> None:
    for index in range(7, 12):
        assert (
            await fetch.read(index * CHUNK, CHUNK)
            == remote.data[index * CHUNK : (index + 1) * CHUNK]
        )
        await fetch.write(index * CHUNK + 100, b"\x88" * 200)  # right after the answer
    await fetch.settle()
    for index in range(7, 12):
        data = await fetch.read(index * CHUNK, CHUNK)
        assert data[100:300] == b"\x88" * 200
        assert data[:100] == remote.data[index * CHUNK : index * CHUNK + 100]
        assert on_disk(fetch.path)[index * CHUNK + 100 : index * CHUNK + 300] == b"\x88" * 200
    assert len(remote.reads) == 5  # the writes found their chunks present (or being stored)


async def test_concurrent_reads_of_one_chunk_fetch_it_once(
    fetch: Fetch, remote: FakeRemote
) -> None:
    remote.hold_all = True
    readers = [asyncio.create_task(fetch.read(5 * CHUNK + i * 512, 512)) for i in range(20)]
    # every reader at the chunk's lock and the first, holding it, at the remote: only a
    # reader that skipped the lock, or did not look again once it held it, could fetch a
    # second time (the first may reach the remote after the last reader reached the lock)
    await until(
        lambda: (
            (fetch.lock_users(5) == 20 and remote.chunk_reads(5) >= 1) or remote.chunk_reads(5) > 1
        ),
        "readers at the lock",
    )
    assert remote.chunk_reads(5) == 1
    remote.release.set()
    results = await asyncio.gather(*readers)
    assert remote.chunk_reads(5) == 1
    for i, data in enumerate(results):
        assert data == remote.data[5 * CHUNK + i * 512 : 5 * CHUNK + (i + 1) * 512]


async def test_a_partial_write_into_an_absent_chunk_keeps_the_rest_of_it(
    fetch: Fetch, remote: FakeRemote
) -> None:
    await fetch.write(3 * CHUNK + 1000, b"\xee" * 3000)
    expected = bytearray(remote.data[3 * CHUNK : 4 * CHUNK])
    expected[1000:4000] = b"\xee" * 3000
    assert await fetch.read(3 * CHUNK, CHUNK) == expected
    assert remote.chunk_reads(3) == 1
    # a write spanning chunks 6..8 partly: 6 and 8 fetched, 7 (wholly covered) not
    await fetch.write(6 * CHUNK + CHUNK // 2, b"\x11" * (2 * CHUNK))
    assert remote.chunk_reads(6) == 1 and remote.chunk_reads(8) == 1
    assert remote.chunk_reads(7) == 0
    expected = bytearray(remote.data[6 * CHUNK : 9 * CHUNK])
    expected[CHUNK // 2 : CHUNK // 2 + 2 * CHUNK] = b"\x11" * (2 * CHUNK)
    assert await fetch.read(6 * CHUNK, 3 * CHUNK) == expected
    assert len(remote.reads) == 3  # the read was served locally


async def test_a_write_of_whole_chunks_needs_no_fetch(fetch: Fetch, remote: FakeRemote) -> None:
    await fetch.write(10 * CHUNK, b"\x22" * (2 * CHUNK))
    assert remote.reads == []
    assert await fetch.read(10 * CHUNK, 2 * CHUNK) == b"\x22" * (2 * CHUNK)
    assert fetch.present_bytes == 2 * CHUNK
    assert durable_bits(fetch.path, 64)[10:12] == [True, True]  # guest writes: bits at once


async def test_a_write_racing_a_fetch_of_its_chunk_wins(fetch: Fetch, remote: FakeRemote) -> None:
    remote.hold_all = True
    reader = asyncio.create_task(fetch.read(4 * CHUNK, CHUNK))
    await until(lambda: remote.reads != [], "the fetch")
    writer = asyncio.create_task(fetch.write(4 * CHUNK, b"\x33" * CHUNK))
    partial = asyncio.create_task(fetch.write(4 * CHUNK + 10, b"\x44" * 10))
    await until(
        lambda: fetch.lock_users(4) == 3 or writer.done() or partial.done(),
        "both writes at the chunk's lock",
    )
    assert not writer.done() and not partial.done()  # ordered behind the fetch
    remote.release.set()
    await asyncio.gather(writer, partial)
    expected = bytearray(b"\x33" * CHUNK)
    expected[10:20] = b"\x44" * 10
    assert len(await reader) == CHUNK  # concurrent with the writes: may see them or not
    # the fetch never overwrote the writes that came after it; the partial write found the
    # chunk present and fetched nothing more
    assert await fetch.read(4 * CHUNK, CHUNK) == expected
    assert remote.chunk_reads(4) == 1


async def test_write_zeroes_and_trim_into_absent_chunks(fetch: Fetch, remote: FakeRemote) -> None:
    await fetch.write_zeroes(2 * CHUNK + 4096, 4096)
    expected = bytearray(remote.data[2 * CHUNK : 3 * CHUNK])
    expected[4096:8192] = bytes(4096)
    assert await fetch.read(2 * CHUNK, CHUNK) == expected
    await fetch.write_zeroes(20 * CHUNK, 3 * CHUNK, may_trim=True)  # whole chunks: no fetch
    assert remote.chunk_reads(20) == remote.chunk_reads(21) == 0
    assert await fetch.read(20 * CHUNK, 3 * CHUNK) == bytes(3 * CHUNK)
    # trim: whole absent chunks become present (punched), a partly covered one stays absent
    await fetch.trim(30 * CHUNK, CHUNK + 512)
    assert fetch._map.is_present(30) and not fetch._map.is_present(31)
    assert await fetch.read(31 * CHUNK, CHUNK) == remote.data[31 * CHUNK : 32 * CHUNK]


async def test_a_failing_remote_fails_the_request_and_marks_nothing(
    fetch: Fetch, remote: FakeRemote
) -> None:
    remote.fail = Errno.EIO
    with pytest.raises(BackendError) as failed:
        await fetch.read(0, 4096)
    assert failed.value.errno == Errno.EIO
    with pytest.raises(BackendError):
        await fetch.write(CHUNK + 1, b"x")
    assert fetch.present_bytes == 0
    remote.fail = None
    assert await fetch.read(CHUNK, 2) == remote.data[CHUNK : CHUNK + 2]


async def test_the_copier_fills_everything_skipping_zero_ranges(tmp_path: Path) -> None:
    data = bytearray(SIZE)
    data[0:CHUNK] = pattern(CHUNK, 2)  # chunk 0 data
    data[10 * CHUNK + 5 : 10 * CHUNK + 9] = b"abcd"  # chunk 10: a few bytes
    data[SIZE - 100 :] = b"z" * 100  # the last chunk
    remote = FakeRemote(data)
    backend = Fetch(tmp_path / "r.img", remote, chunk_size=CHUNK)
    try:
        backend.start_copier()
        await backend.wait_complete()
        assert backend.complete and backend.present_bytes == SIZE
        assert on_disk(backend.path) == data
        # of chunks 10 and the last only their one data block each crossed
        assert backend.fetched_in_background == CHUNK + 2 * 4096
        assert backend.skipped_as_zero == SIZE - CHUNK - 2 * 4096
        assert (10 * CHUNK, 4096) in remote.reads and (SIZE - 4096, 4096) in remote.reads
        fetched = sorted({off // CHUNK for off, _ in remote.reads})
        assert fetched == [0, 10, 63]
        # and once some zeroes, to learn that this remote sends them as they are
        assert remote.piece_reads == [(CHUNK, SPARSE_PROBE)]
        assert all(durable_bits(backend.path, 64))
        assert os.stat(backend.path).st_blocks * 512 < SIZE // 2  # still sparse
    finally:
        await backend.close()
    assert remote.closed


async def test_from_a_remote_answering_sparsely_scattered_data_comes_in_few_reads(
    tmp_path: Path,
) -> None:
    """A disk the guest wrote 4 KiB here and there: each batch spans many chunks and is
    one read whose holes do not cross; the replica stays sparse and exact."""
    chunk, n = 4096 * 4, 1024  # 16 MiB; the copy batch is 1 MiB: 64 chunks of it
    data = bytearray(n * chunk)
    data[0 : 128 * chunk] = pattern(128 * chunk, 5)  # dense at first, as a prefilled disk
    scattered = range(128 * chunk + 4096, n * chunk, 5 * chunk + 4096)
    for at in scattered:
        data[at : at + 4096] = pattern(4096, at)
    remote = FakeRemote(data)
    remote.sparse = True
    backend = Fetch(tmp_path / "r.img", remote, chunk_size=chunk)
    try:
        backend.start_copier()
        await backend.wait_complete()
        assert on_disk(backend.path) == data
        assert backend.fetched_in_background == 128 * chunk + len(scattered) * 4096
        assert backend.skipped_as_zero == n * chunk - backend.fetched_in_background
        # ~200 pieces of 4 KiB, per piece a read of its own before: now the probe, then
        # one read per span
        most = 1 + backend.copy_workers + n * chunk // SPARSE_SPAN
        assert len(remote.piece_reads) <= most, remote.piece_reads
        assert max(length for _, length in remote.piece_reads) <= SPARSE_SPAN
        batch = backend._batch_chunks * chunk  # where every chunk is data, batches as ever
        assert all(length <= batch for at, length in remote.piece_reads if at < 128 * chunk)
        # before the probe found zeroes to ask with, the data came in plain reads
        assert all(at + length <= 128 * chunk for at, length in remote.reads), remote.reads
        assert os.stat(backend.path).st_blocks * 512 < n * chunk // 4  # still sparse
    finally:
        await backend.close()


async def test_a_batch_steps_over_present_chunks(tmp_path: Path) -> None:
    """Every other chunk already present (a hybrid push marks the zero chunks it passes):
    a batch takes the absent chunks within its span, not one chunk at a time."""
    chunk, n = 4096 * 4, 1024  # 16 MiB; a sparse batch spans 256 chunks
    data = bytearray(n * chunk)
    data[0 : 32 * chunk] = pattern(32 * chunk, 7)  # dense; then 32 zero chunks (the probe's)
    odd = range(65, n, 2)  # 4 KiB of data each; the even chunks between are zero and present
    for index in odd:
        data[index * chunk : index * chunk + 4096] = pattern(4096, index)
    remote = FakeRemote(data)
    remote.sparse = True
    replica = tmp_path / "r.img"
    replica.write_bytes(bytes(n * chunk))
    with replica.open("r+b") as f:  # present chunks the guest wrote since: kept as they are
        for index in (64, 100, 512, 1000):
            f.seek(index * chunk)
            f.write(b"\x77" * chunk)
            data[index * chunk : (index + 1) * chunk] = b"\x77" * chunk
    backend = Fetch(replica, remote, chunk_size=chunk, seed=list(range(64, n, 2)))
    batches: list[list[int]] = []
    copy_batch = backend._copy_batch

    async def counted(batch: list[int], hole: bool = False) -> None:
        batches.append(list(batch))
        await copy_batch(batch, hole)

    backend._copy_batch = counted  # type: ignore[method-assign]
    try:
        backend.start_copier()
        await backend.wait_complete()
        assert on_disk(backend.path) == data
        assert backend.fetched_in_background == 32 * chunk + len(odd) * 4096
        scattered = [b for b in batches if b[0] >= 64]
        assert {c for b in scattered for c in b} == set(odd)
        # one batch per absent chunk before (480); the workers' first batches go before
        # the probe (a copy batch's span, 64 chunks), then SPARSE_SPAN's 256
        most = backend.copy_workers + 2 * n * chunk // SPARSE_SPAN
        assert len(scattered) <= most, [len(b) for b in scattered]
        assert all(b[-1] - b[0] < SPARSE_SPAN // chunk for b in batches)
    finally:
        await backend.close()


async def test_the_copier_clears_what_a_crash_left_in_absent_chunks(tmp_path: Path) -> None:
    """Bytes a crash left in the replica between a data write and its bit: where the
    remote reads zeroes, the copier makes the replica read zeroes again (a clear that
    finds data punches), in a hole's batch and in a span read sparsely alike."""
    chunk, n = 4096 * 4, 512  # 8 MiB
    data = bytearray(n * chunk)
    data[0 : 32 * chunk] = pattern(32 * chunk, 9)
    for index in range(40, 200, 8):  # 4 KiB here and there, then a hole to the end
        data[index * chunk : index * chunk + 4096] = pattern(4096, index)
    remote = FakeRemote(data)
    remote.sparse = True
    path = tmp_path / "r.img"
    await Fetch(path, remote, chunk_size=chunk).close(remote_too=False)
    with path.open("r+b") as f:
        for index in (33, 48, 60, 300):  # zero chunks in and out of a span, one holding
            # 4 KiB, one in the hole
            f.seek(index * chunk + 8192)
            f.write(b"\xee" * 4096)
    backend = Fetch(path, remote, chunk_size=chunk)
    try:
        backend.start_copier()
        await backend.wait_complete()
        assert on_disk(backend.path) == data
    finally:
        await backend.close()


async def test_the_copier_takes_a_hole_in_a_few_big_batches(tmp_path: Path) -> None:
    """A disk that is mostly hole (1 GiB holding 64 MiB, say): each hole goes in batches of
    up to ZERO_RUN_CHUNKS chunks, a clear and a mark each, not one per copy batch (each
    was a thread hop and a share of the syncs, seconds over a whole disk)."""
    chunk, n = 4096, 8192  # 32 MiB; the copy batch is 1 MiB: 256 chunks
    data = bytearray(n * chunk)
    data[0:chunk] = pattern(chunk, 3)
    data[5000 * chunk : 5001 * chunk] = pattern(chunk, 4)
    remote = FakeRemote(data)
    backend = Fetch(tmp_path / "r.img", remote, chunk_size=chunk)
    cleared: list[tuple[int, int]] = []
    clear = backend._local.clear

    async def counted(ranges: list[tuple[int, int]]) -> None:
        cleared.extend((start, end - start) for start, end in ranges)
        await clear(ranges)

    backend._local.clear = counted  # type: ignore[method-assign]
    try:
        backend.start_copier()
        await backend.wait_complete()
        assert on_disk(backend.path) == data
        assert sorted({off // chunk for off, _ in remote.reads}) == [0, 5000]
        assert backend.skipped_as_zero == (n - 2) * chunk
        # the workers' first batches go before the remote's zeroes are known: then the
        # holes 1..4999 and 5001..8191 in batches of at most 4096 chunks
        assert len(cleared) <= 8, cleared
        assert max(length for _, length in cleared) == ZERO_RUN_CHUNKS * chunk
        assert all(durable_bits(backend.path, n))
    finally:
        await backend.close()


@given(
    zeroes=st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 9_000)), max_size=8),
    start=st.integers(0, 4_000),
    length=st.integers(1, 24_000),
)
def test_data_parts_read_every_byte_outside_the_long_zero_ranges(
    zeroes: list[tuple[int, int]], start: int, length: int
) -> None:
    end = start + length
    zero = bytearray(30_000)
    for at, n in zeroes:
        zero[at : at + n] = b"\1" * len(zero[at : at + n])
    ranges: list[tuple[int, int]] = []  # the sorted disjoint runs, as a block status says
    for pos in range(30_000):
        if zero[pos] and ranges and ranges[-1][1] == pos:
            ranges[-1] = (ranges[-1][0], pos + 1)
        elif zero[pos]:
            ranges.append((pos, pos + 1))
    parts = data_parts(start, end, ranges)
    assert all(start <= a < b <= end for a, b in parts)
    assert all(b1 < a2 for (_, b1), (a2, _) in itertools.pairwise(parts))
    covered = {pos for a, b in parts for pos in range(a, b)}
    assert all(pos in covered for pos in range(start, end) if not zero[pos])
    gaps = [
        (b1, a2) for (_, b1), (a2, _) in zip([(0, start), *parts], [*parts, (end, 0)], strict=True)
    ]
    assert all(b - a >= MIN_ZERO_SKIP and all(zero[a:b]) for a, b in gaps if b > a)


async def test_the_copier_yields_to_on_demand_fetches(tmp_path: Path) -> None:
    remote = FakeRemote(pattern())
    backend = Fetch(tmp_path / "r.img", remote, chunk_size=CHUNK, copy_workers=1, copy_batch=CHUNK)
    try:
        remote.hold_at = {50 * CHUNK}
        # 4 ms a read: the copier cannot reach chunk 50 itself before the demand for it
        # (an idle machine's copier otherwise did, within one poll of ``until``)
        remote.latency = (0.004, 0.004)
        backend.start_copier()
        await until(lambda: len(remote.reads) >= 3, "the copier's first fetches")
        demand = asyncio.create_task(backend.read(50 * CHUNK, 4096))
        await until(lambda: (50 * CHUNK, CHUNK) in remote.reads, "the demand fetch")
        seen = len(remote.reads)
        # the copier's one worker parked behind the demand: from here on only a copier that
        # did not yield could read anything
        await until(
            lambda: backend.demand.yielding == 1 or len(remote.reads) > seen + 1,
            "the copier yielding",
        )
        assert len(remote.reads) <= seen + 1  # at most the batch already under way
        assert not demand.done()
        remote.release.set()
        assert await demand == remote.data[50 * CHUNK : 50 * CHUNK + 4096]
        await backend.wait_complete()
        assert remote.chunk_reads(50) == 1
        assert backend.fetched_on_demand == CHUNK
        assert backend.fetched_in_background == SIZE - CHUNK
        assert on_disk(backend.path) == remote.data
    finally:
        remote.release.set()
        await backend.close()


async def test_the_pacer_spaces_transfers_to_the_rate() -> None:
    now = [100.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pacer = Pacer(4 << 20, clock=lambda: now[0], sleep=sleep)
    for _ in range(9):
        await pacer.take(1 << 20)
    assert slept == pytest.approx([0.25] * 8)  # the first goes at once
    assert now[0] == pytest.approx(102.0)
    with pytest.raises(UsageError):
        Pacer(0)


async def test_a_rate_limited_copier_completes(tmp_path: Path) -> None:
    remote = FakeRemote(pattern(8 * CHUNK))
    backend = Fetch(tmp_path / "r.img", remote, chunk_size=CHUNK, rate_limit=16 << 20)
    try:
        assert backend._pacer is not None
        backend.start_copier()
        await backend.wait_complete()
        assert on_disk(backend.path) == remote.data
    finally:
        await backend.close()


async def test_an_agent_crash_keeps_every_completed_write(tmp_path: Path) -> None:
    remote = FakeRemote(pattern())
    replica = tmp_path / "r.img"
    first = Fetch(replica, remote, chunk_size=CHUNK, sync_interval=3600)
    await first.write(5 * CHUNK + 7, b"\x55" * 100)  # partial write into an absent chunk
    await first.write(8 * CHUNK, b"\x66" * CHUNK)  # whole chunk
    await first.read(12 * CHUNK, 10)  # copy-on-read: bit waits for a sync
    await first.read(13 * CHUNK, 10)
    assert not first.write_nowait(12 * CHUNK, bytes(4096))  # its bit still waits for a sync
    await first.write(13 * CHUNK + 1, b"\x77")  # a write into a fetched, unsynced chunk
    await abandon(first)  # SIGKILL: no sync, no close

    bits = durable_bits(replica, 64)
    assert bits[5] and bits[8] and bits[13] and not bits[12]
    remote.data[:] = pattern(seed=9)  # any re-fetch would now show other bytes
    second = Fetch(replica, remote, chunk_size=CHUNK)
    try:
        assert second.present_bytes == 3 * CHUNK
        chunk5 = await second.read(5 * CHUNK, CHUNK)
        assert chunk5[7:107] == b"\x55" * 100
        assert chunk5[:7] == pattern()[5 * CHUNK : 5 * CHUNK + 7]  # the old remote's bytes
        assert await second.read(8 * CHUNK, CHUNK) == b"\x66" * CHUNK
        chunk13 = await second.read(13 * CHUNK, 4)
        assert (
            chunk13
            == pattern()[13 * CHUNK : 13 * CHUNK + 1]
            + b"\x77"
            + pattern()[13 * CHUNK + 2 : 13 * CHUNK + 4]
        )
        # chunk 12 was never durable: fetched again (from the changed remote)
        assert await second.read(12 * CHUNK, 10) == remote.data[12 * CHUNK : 12 * CHUNK + 10]
    finally:
        await second.close()


async def test_flush_makes_fetched_bits_durable(fetch: Fetch) -> None:
    fetch.sync_interval = 3600
    await fetch.read(0, 10)
    await fetch.settle()
    assert not durable_bits(fetch.path, 64)[0]
    await fetch.flush()
    assert durable_bits(fetch.path, 64)[0]


async def test_a_restarted_fetch_resumes_where_it_was(tmp_path: Path) -> None:
    remote = FakeRemote(pattern())
    replica = tmp_path / "r.img"
    first = Fetch(replica, remote, chunk_size=CHUNK)
    await first.read(0, 10 * CHUNK)
    await first.close()
    assert remote.closed
    reads = len(remote.reads)
    second = Fetch(replica, remote, chunk_size=CHUNK)
    try:
        assert second.present_bytes == 10 * CHUNK
        second.start_copier()
        await second.wait_complete()
        assert len(remote.reads) > reads
        assert all(off >= 10 * CHUNK for off, _ in remote.reads[reads:])
        assert on_disk(replica) == remote.data
        assert second.status().complete is True
    finally:
        await second.close()
    with pytest.raises(UsageError, match="chunks of"):
        Fetch(replica, FakeRemote(pattern()), chunk_size=2 * CHUNK)
    with pytest.raises(UsageError, match="bytes, the remote"):
        Fetch(replica, FakeRemote(pattern(2 * SIZE)), chunk_size=CHUNK)


async def test_block_status_mixes_replica_and_remote(tmp_path: Path) -> None:
    data = bytearray(SIZE)
    data[: 4 * CHUNK] = b"\x01" * (4 * CHUNK)
    remote = FakeRemote(data)
    backend = Fetch(tmp_path / "r.img", remote, chunk_size=CHUNK)
    try:
        await backend.write(8 * CHUNK, b"\x02" * CHUNK)  # present, data
        await backend.write_zeroes(9 * CHUNK, CHUNK)  # present, hole
        extents = await backend.block_status(0, 12 * CHUNK)
        assert sum(e.length for e in extents) == 12 * CHUNK
        flat = []
        for e in extents:
            flat += [e.zero] * (e.length // 4096)
        per_chunk = [flat[i * 16] for i in range(12)]
        assert per_chunk == [False] * 4 + [True] * 4 + [False, True, True, True]
    finally:
        await backend.close()


async def test_progress_figures(fetch: Fetch) -> None:
    fetch.start_copier()
    await fetch.wait_complete()
    status = fetch.status()
    assert status.present_bytes == SIZE == status.size
    assert status.complete is True
    assert status.fetched_in_background_bytes + status.fetched_on_demand_bytes == SIZE
    # complete and durable: a small aligned write goes inline, and reads back at once
    assert fetch.write_nowait(0, b"\x5a" * 4096) is True
    assert await fetch.read(0, 4096) == b"\x5a" * 4096
    assert fetch.read_nowait(0, 4096) == b"\x5a" * 4096


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_random_concurrent_requests_with_the_copier_match_a_model(
    tmp_path: Path, seed: int
) -> None:
    """Rounds of concurrent requests on disjoint random ranges, a slow remote, the copier
    running, one agent crash and restart half way: the replica ends equal to the model."""
    rng = random.Random(seed)
    size = 32 * CHUNK + 12345  # a short last chunk
    remote = FakeRemote(pattern(size, seed))
    remote.latency = (0.0, 0.003)
    model = bytearray(remote.data)
    defined = bytearray(b"\1" * size)  # 0 where a trim left the bytes unspecified
    replica = tmp_path / "r.img"

    def pick(taken: list[tuple[int, int]]) -> tuple[int, int] | None:
        length = rng.choice([1, 512, 4096, CHUNK - 7, CHUNK, 3 * CHUNK + 100])
        offset = rng.randrange(0, size - length)
        if any(offset < e and s < offset + length for s, e in taken):
            return None
        taken.append((offset, offset + length))
        return offset, length

    backend = Fetch(replica, remote, chunk_size=CHUNK, copy_workers=3, copy_batch=2 * CHUNK)
    try:
        for round_no in range(24):
            if round_no == 4:
                backend.start_copier()
            if round_no == 12:  # SIGKILL and restart, copier going again
                await abandon(backend)
                backend = Fetch(replica, remote, chunk_size=CHUNK, copy_workers=3)
                backend.start_copier()
            taken: list[tuple[int, int]] = []
            ops = []
            for _ in range(8):
                where = pick(taken)
                if where is None:
                    continue
                offset, length = where
                kind = rng.choice(["read", "read", "write", "write", "zero", "trim"])
                if kind == "read":
                    ops.append((kind, offset, length, backend.read(offset, length)))
                elif kind == "write":
                    data = rng.randbytes(length)
                    ops.append((kind, offset, data, backend.write(offset, data)))
                elif kind == "zero":
                    ops.append((kind, offset, length, backend.write_zeroes(offset, length)))
                else:
                    ops.append((kind, offset, length, backend.trim(offset, length)))
            results = await asyncio.gather(*(op[3] for op in ops))
            for (kind, offset, arg, _), result in zip(ops, results, strict=True):
                if kind == "read":
                    assert isinstance(arg, int) and len(result) == arg
                    for i in range(arg):
                        if defined[offset + i]:
                            assert result[i] == model[offset + i], (round_no, offset + i)
                elif kind == "write":
                    assert isinstance(arg, bytes)
                    model[offset : offset + len(arg)] = arg
                    defined[offset : offset + len(arg)] = b"\1" * len(arg)
                elif kind == "zero":
                    assert isinstance(arg, int)
                    model[offset : offset + arg] = bytes(arg)
                    defined[offset : offset + arg] = b"\1" * arg
                else:
                    assert isinstance(arg, int)
                    defined[offset : offset + arg] = bytes(arg)
        await backend.wait_complete()
        final = on_disk(replica)
        assert len(final) == size
        mismatches = [i for i in range(size) if defined[i] and final[i] != model[i]]
        assert mismatches == []
    finally:
        await backend.close()


# -- live: a real NBD client through an agent whose backend is Fetch ----------------------


async def run(*argv: str) -> str:
    """Run a tool without blocking the event loop (the agents live in this process)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, f"{argv[0]} failed: {out.decode(errors='replace')}"
    return out.decode(errors="replace")


QEMU_IO_SCRIPT = [
    "write -P 0xab 100000 5000",  # unaligned, inside one absent chunk
    "write -P 0xcd 1M 128k",  # whole chunks
    "write -P 0xef 2000000 300000",  # spans chunks, partial at both ends
    "write -z 3M 64k",
    "write -z 3200000 1000",  # partial zeroing of an absent chunk
    "read -P 0xab 100000 5000",
    "read -P 0xcd 1M 128k",
    "read -P 0 3M 64k",
    "flush",
]


async def test_qemu_io_through_a_fetch_agent_then_compare(tmp_path: Path) -> None:
    from devagent.agent.agent import BlockAgent
    from devagent.agent.backend import Local
    from devagent.agent.remote import Remote

    size = 16 << 20
    source = tmp_path / "source.img"
    with source.open("wb") as f:  # data in the first half, a hole in the second
        f.write(random.Random(7).randbytes(size // 2))
        f.truncate(size)
    expected = tmp_path / "expected.img"
    expected.write_bytes(source.read_bytes())
    replica = tmp_path / "replica.img"
    sock = tmp_path / "fetch.sock"

    src_agent = BlockAgent(Local(source, read_only=True), "src")
    fetch: Fetch | None = None
    agent: BlockAgent | None = None
    try:
        _, port = await src_agent.listen_tcp("127.0.0.1", 0)
        remote = await Remote.open(f"tcp:127.0.0.1:{port}", "src")
        fetch = Fetch(replica, remote, chunk_size=CHUNK)
        agent = BlockAgent(fetch, "disk")
        await agent.listen_unix(sock)
        uri = f"nbd+unix:///disk?socket={sock}"
        args = [a for cmd in QEMU_IO_SCRIPT for a in ("-c", cmd)]
        await run("qemu-io", "-f", "raw", *args, uri)
        await run("qemu-io", "-f", "raw", *args, str(expected))
        assert fetch.fetched_on_demand > 0 and not fetch.complete
        fetch.start_copier()
        await fetch.wait_complete()
        assert fetch.skipped_as_zero > 0  # the source's hole did not cross the wire
        await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(replica), str(expected))
        await run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(expected))
        assert src_agent.journal.stats().counts.get("WRITE", 0) == 0
    finally:
        if agent is not None:
            await agent.stop()  # closes the Fetch, which closes its Remote
        elif fetch is not None:
            await fetch.close()
        await src_agent.stop()


@given(st.binary(max_size=64), st.integers(min_value=0, max_value=600))
def test_bits_to_chunks_reads_each_set_bit_below_the_last_chunk(bits: bytes, n: int) -> None:
    expected = [i for i in range(min(len(bits) * 8, n)) if bits[i >> 3] & (1 << (i & 7))]
    assert bits_to_chunks(bits, n) == expected


@given(st.binary(max_size=40), st.lists(st.integers(min_value=0, max_value=299)))
def test_marking_bits_at_once_is_marking_each_chunk(bits: bytes, before: list[int]) -> None:
    """Marking a seed's bits a byte at a time does what marking each of its chunks does:
    bits past the last chunk ignored, the count right."""
    import tempfile  # (hypothesis: no function-scoped fixtures)

    with tempfile.TemporaryDirectory() as folder:
        at_once = PresenceMap(Path(folder) / "a", 300 * 4096, 4096, fresh=True)
        each = PresenceMap(Path(folder) / "b", 300 * 4096, 4096, fresh=True)
        try:
            for presence in (at_once, each):
                presence.mark_present(before)
            at_once.mark_present_bits(bits)
            each.mark_present(bits_to_chunks(bits, 300))
            assert at_once.present == each.present and at_once.count == each.count
        finally:
            at_once.close()
            each.close()


async def test_a_seed_given_as_bits_is_the_seed_given_as_chunks(tmp_path: Path) -> None:
    """The switchover's handover arrives as bits (bit ``i & 7`` of byte ``i >> 3``): the
    same chunks present, and their bits durable only after a sync."""
    size, chunk = 10 * 65536, 65536
    source = FakeRemote(b"S" * size)
    replica = tmp_path / "replica.img"
    replica.write_bytes(bytes(size))
    fetch = Fetch(replica, source, chunk_size=chunk, seed=bytes([0b10000101, 0xFF]),
                  sync_interval=60)  # fmt: skip
    try:
        assert fetch.present_bytes == 5 * chunk  # chunks 0, 2, 7, 8, 9 (10-15: no such)
        assert presence_path(replica).read_bytes()[HEADER_SIZE:] == bytes(2)
        await fetch.flush()
        assert presence_path(replica).read_bytes()[HEADER_SIZE:] == bytes([0b10000101, 0b11])
    finally:
        await fetch.close()


async def test_chunks_that_read_zeroes_on_both_sides_are_present_without_a_fetch(
    tmp_path: Path,
) -> None:
    """The source's holes at the switchover (``zeroes``) are present at once where the
    replica has a hole too (a fresh sparse file); where the replica holds data (a crash's
    leftover, or a push's write the source then trimmed) they are fetched as any absent
    chunk. A push's seed is present beside them."""
    size, chunk = 8 * 65536, 65536
    data = bytearray(size)
    data[3 * chunk : 3 * chunk + 10] = b"D" * 10
    source = FakeRemote(data)
    replica = tmp_path / "replica.img"
    with replica.open("wb") as f:
        f.truncate(size)
        f.seek(3 * chunk)
        f.write(b"D" * 10)  # chunk 3 pushed
        f.seek(5 * chunk)
        f.write(b"M" * 100)  # chunk 5: a leftover
    zeroes = span_bits([(0, 3), (4, 8)], 8)
    fetch = Fetch(replica, source, chunk_size=chunk, seed=[3], zeroes=zeroes, sync_interval=60)
    try:
        assert fetch.present_bytes == 7 * chunk  # all but chunk 5
        # the zero chunks' bits durable at once (a hole needs no data sync), the pushed one's not
        assert presence_path(replica).read_bytes()[HEADER_SIZE:] == bytes([0b11010111])
        assert await fetch.read(0, 5 * chunk) == bytes(data[: 5 * chunk])
        assert source.reads == []
        assert await fetch.read(5 * chunk, chunk) == bytes(chunk)  # fetched: the leftover gone
        assert source.reads
        await fetch.settle()
        await fetch.flush()
        assert presence_path(replica).read_bytes()[HEADER_SIZE:] == bytes([0xFF])
    finally:
        await fetch.close()


async def test_a_disk_that_is_all_hole_is_complete_at_once(tmp_path: Path) -> None:
    """Every chunk reads zeroes on both sides: the replica is whole from its start (the
    source lets it go at once), with nothing fetched."""
    size, chunk = 8 * 65536, 65536
    source = FakeRemote(bytes(size))
    fetch = Fetch(tmp_path / "replica.img", source, chunk_size=chunk,
                  zeroes=span_bits([(0, 8)], 8))  # fmt: skip
    try:
        await asyncio.wait_for(fetch.wait_complete(), 5)
        assert fetch.complete and source.reads == []
    finally:
        await fetch.close()


async def test_a_replica_that_has_no_time_to_look_at_its_holes_fetches_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The look at the replica's own holes has a bound (the guest waits for it): past it,
    the remote's zero chunks are fetched as any absent chunk, never trusted unseen."""
    monkeypatch.setattr("devagent.agent.replica.ZERO_CHECK_S", 0.0)
    size, chunk = 8 * 65536, 65536
    replica = tmp_path / "replica.img"
    fetch = Fetch(replica, FakeRemote(bytes(size)), chunk_size=chunk,
                  zeroes=span_bits([(0, 8)], 8))  # fmt: skip
    try:
        assert fetch.present_bytes == 0
    finally:
        await fetch.close()


async def test_seeded_chunks_are_served_from_the_replica_and_made_durable_later(
    tmp_path: Path,
) -> None:
    """Chunks a mirror pushed before switchover are served from the replica, not fetched;
    their bits reach the file only after a sync (like fetched ones), and a restarted agent
    trusts its bitmap file, not the seed."""
    size, chunk = 8 * 65536, 65536
    source = FakeRemote(b"S" * size)
    replica = tmp_path / "replica.img"
    replica.write_bytes(b"M" * (4 * chunk) + bytes(size - 4 * chunk))  # chunks 0-3 pushed
    fetch = Fetch(replica, source, chunk_size=chunk, seed=[0, 1, 2, 3], sync_interval=60)
    try:
        assert fetch.present_bytes == 4 * chunk
        assert presence_path(replica).read_bytes()[HEADER_SIZE:] == bytes(1)  # not durable yet
        assert await fetch.read(0, chunk) == b"M" * chunk  # from the replica
        assert await fetch.read(5 * chunk, chunk) == b"S" * chunk  # fetched
        assert not [off for off, _ in source.reads if off < 4 * chunk]
        await fetch.settle()  # the early-answered read stores its chunk
        await fetch.flush()
        assert presence_path(replica).read_bytes()[HEADER_SIZE:] == bytes([0b101111])
    finally:
        await fetch.close()
    again = Fetch(replica, source, chunk_size=chunk, seed=[6, 7])  # the file wins
    try:
        assert again.present_bytes == 5 * chunk
    finally:
        await again.close()
