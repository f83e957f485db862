"""The mirror job: ordering rules, sync mode, holes, rate limit, failures and the state
machine with in-memory fakes; then a real pair of agents over TCP with qemu-io writing
through the mirrored one and qemu-img comparing the images."""

from __future__ import annotations

import asyncio
import random
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_fakes import MemoryBackend
from devagent.agent import mirror as mirror_mod
from devagent.agent.agent import BlockAgent
from devagent.agent.backend import Backend, BackendError, Extent, Local
from devagent.agent.chunks import put_sparsely
from devagent.agent.mirror import DIRTY_BITMAP, Mirrored
from devagent.agent.mirror_job import JobEvent, MirrorJob, cutover
from devagent.agent.mirror_states import MirrorEvent, MirrorFailed, MirrorState, MirrorStateError
from devagent.agent.pace import Pace
from devagent.agent.state import DeviceState
from devagent.errors import PeerError
from devagent.nbd.client import NbdClient, NbdRequestFailed
from devagent.nbd.proto import AllocationState, Errno

CHUNK = 64 * 1024
SIZE = 4 << 20
S = MirrorState


class Disk(MemoryBackend):
    """A memory backend that reports all-zero 64 KiB blocks as holes, counts operations by
    kind, and can run a hook in the middle of a read (after the bytes were taken)."""

    def __init__(self, size: int = SIZE) -> None:
        super().__init__(size)
        self.during_read: Callable[[int, int], Awaitable[None]] | None = None
        self.before_write: Callable[[int, int], Awaitable[None]] | None = None
        self.after_write: Callable[[int, int], Awaitable[None]] | None = None
        self.during_status: Callable[[], Awaitable[None]] | None = None

    async def read(self, offset: int, length: int) -> bytes:
        data = await super().read(offset, length)
        if self.during_read is not None:
            await self.during_read(offset, length)
        return data

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        if self.before_write is not None:
            await self.before_write(offset, len(data))
        await super().write(offset, data, fua)
        if self.after_write is not None:
            await self.after_write(offset, len(data))

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        await self._enter("status", offset, length)
        if self.during_status is not None:
            await self.during_status()
        out: list[Extent] = []
        pos, end = offset, offset + length
        while pos < end:
            stop = min(end, (pos // CHUNK + 1) * CHUNK)
            zero = not any(self.data[pos:stop])
            if out and out[-1].zero == zero:
                out[-1] = Extent(out[-1].length + stop - pos, zero, zero)
            else:
                out.append(Extent(stop - pos, zero, zero))
            pos = stop
        return out

    def ops(self, kind: str) -> list[tuple[int, int]]:
        return [(offset, length) for op, offset, length in self.log if op == kind]


def fill(disk: Disk, chunk: int, byte: int, count: int = 1) -> None:
    disk.data[chunk * CHUNK : (chunk + count) * CHUNK] = bytes([byte]) * (count * CHUNK)


async def test_state_machine_exact_sequence() -> None:
    source, target = Disk(), Disk()
    fill(source, 2, 0xAA)
    mirror = Mirrored(source, target, chunk_size=CHUNK)
    assert mirror.state is S.COPYING
    assert await mirror.run()
    await mirror.wait_converged()
    await mirror.write(5 * CHUNK, b"\x01" * 4096)
    assert mirror.dirty_bytes == CHUNK
    assert await mirror.run()  # CONVERGED -> COPYING -> CONVERGED
    await mirror.finish()
    assert mirror.history == [S.COPYING, S.CONVERGED, S.COPYING, S.CONVERGED, S.FINISHED]
    with pytest.raises(MirrorStateError, match="cannot run a mirror that is finished"):
        await mirror.run()
    with pytest.raises(MirrorStateError, match="finished: no transition on converge"):
        mirror._transition(MirrorEvent.CONVERGE)
    assert target.data == source.data


async def test_first_pass_skips_holes_and_copies_neighbours_together() -> None:
    source, target = Disk(), Disk()
    fill(source, 3, 0x33)
    fill(source, 10, 0x10, count=3)
    mirror = Mirrored(source, target, chunk_size=CHUNK)
    assert mirror.dirty_bytes == SIZE  # nothing is known to be on the target yet
    assert await mirror.run(max_passes=1)
    assert target.ops("write") == [(3 * CHUNK, CHUNK), (10 * CHUNK, 3 * CHUNK)]
    assert target.ops("zero") == []  # the target starts zeroed: holes cost nothing
    assert mirror.copied_bytes == 4 * CHUNK and mirror.passes == 1
    assert target.data == source.data


async def test_a_size_that_is_not_a_whole_number_of_chunks() -> None:
    size = 10 * CHUNK + 4096  # 11 chunks, the last one short
    source, target = Disk(size), Disk(size)
    source.data[-4096:] = b"\xff" * 4096
    mirror = Mirrored(source, target, chunk_size=CHUNK, sync=True)
    assert mirror.dirty_bytes == size
    assert await mirror.run()
    assert mirror.dirty_bytes == 0 and target.ops("write") == [(10 * CHUNK, 4096)]
    await mirror.write(size - 512, b"\x01" * 512)
    assert target.data == source.data


async def test_target_not_zeroed_gets_zeroes_where_the_source_has_holes() -> None:
    source, target = Disk(), Disk()
    target.data[:] = b"\xee" * SIZE
    fill(source, 0, 0x01)
    mirror = Mirrored(source, target, chunk_size=CHUNK, target_zeroed=False)
    assert await mirror.run()
    assert target.ops("zero") == [(CHUNK, SIZE - CHUNK)]
    assert target.data == source.data


async def test_a_write_into_a_hole_during_the_first_pass_is_copied() -> None:
    """The first pass clears a window's bits before it asks ``block_status``: a write that
    lands after the answer was made marks its chunk again."""
    source, target = Disk(), Disk()
    mirror = Mirrored(source, target, chunk_size=CHUNK)

    async def guest_write() -> None:
        source.during_status = None
        await mirror.write(20 * CHUNK, b"\x20" * 512)

    source.during_status = guest_write
    assert await mirror.run()
    assert target.ops("write") == [(20 * CHUNK, 4096)]  # the chunk's one block of data
    assert target.ops("zero") == [(20 * CHUNK + 4096, CHUNK - 4096)]  # its hole, as one
    assert (mirror.stats().copied_bytes, mirror.stats().sent_bytes) == (CHUNK, 4096)
    assert target.data == source.data


@given(
    blocks=st.lists(st.sampled_from(["zero", "data", "one byte"]), min_size=1, max_size=20),
    tail=st.integers(0, 4095),
)
def test_a_copy_sends_its_zero_blocks_as_zeroes(blocks: list[str], tail: int) -> None:
    data = bytearray()
    for i, kind in enumerate(blocks):
        block = bytearray(4096)
        if kind == "data":
            block[:] = bytes([i + 1]) * 4096
        elif kind == "one byte":
            block[4095] = 7
        data += block
    data += b"\x05" * tail
    target = Disk(len(data) + 8192)
    target.data[:] = b"\xee" * len(target.data)  # what was there before
    sent = asyncio.run(put_sparsely(target, 4096, data))
    assert target.data[4096 : 4096 + len(data)] == data
    assert target.data[:4096] == target.data[4096 + len(data) :][:4096] == b"\xee" * 4096
    written = sum(n for _, n in target.ops("write"))
    assert written == sent == len(data) - 4096 * blocks.count("zero")  # zeroes as zeroes


async def test_a_pace_gives_back_what_a_copy_did_not_send() -> None:
    now, slept = [10.0], []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pace = Pace(1000.0, clock=lambda: now[0], sleep=sleep)
    pace.charge(1000)  # a 1000-byte copy booked: the next may start 1 s from now
    pace.charge(-600)  # of which 600 bytes went as write_zeroes
    await pace.wait()
    assert slept == [pytest.approx(0.4)]
    pace.charge(-5000)  # giving back more than is booked frees nothing past now
    pace.charge(100)
    await pace.wait()
    assert slept[1:] == [pytest.approx(0.1)]


async def test_a_cancelled_run_leaves_its_chunks_dirty() -> None:
    source, target = Disk(), Disk()
    fill(source, 0, 0x01, count=4)
    mirror = Mirrored(source, target, chunk_size=CHUNK, max_copy=CHUNK)
    target.hold = True
    job = asyncio.create_task(mirror.run())
    while target.started < 4:
        await asyncio.sleep(0)
    assert mirror.dirty_bytes == 4 * CHUNK  # copies in flight count as dirty
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert mirror.state is S.COPYING and mirror.dirty_bytes == 4 * CHUNK
    target.hold = False
    target.release.set()
    await mirror.finish()
    assert target.data == source.data


async def test_local_to_local_keeps_holes_and_marks_inline_writes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    for path in (src, dst):
        with path.open("wb") as f:
            f.truncate(SIZE)
    with src.open("r+b") as f:
        f.seek(CHUNK)
        f.write(b"\x11" * CHUNK)
    mirror = Mirrored(Local(src), Local(dst), chunk_size=CHUNK)
    try:
        assert await mirror.run()
        assert mirror.write_nowait(8 * CHUNK, b"\x88" * 4096)  # the agent's inline path
        assert mirror.dirty_bytes == CHUNK
        await mirror.trim(CHUNK, 4096)
        await mirror.finish()
        assert mirror.write_nowait(0, b"\x01" * 4096) is False  # write-through from now
        await mirror.write(0, b"\x01" * 4096)
        status = await mirror.target.block_status(0, SIZE)
        # the tail stayed a hole, from the end of chunk 8's one written block
        assert Extent(SIZE - 8 * CHUNK - 4096, True, True) in status
    finally:
        await mirror.close()
    assert src.read_bytes() == dst.read_bytes()


async def test_a_write_during_a_chunk_copy_dirties_it_again() -> None:
    source, target = Disk(), Disk()
    fill(source, 1, 0x01)
    mirror = Mirrored(source, target, chunk_size=CHUNK)
    seen: list[bytes] = []

    async def guest_write(offset: int, length: int) -> None:
        if not seen:  # once: the copy has the old bytes, the write lands before it ends
            seen.append(bytes(source.data[offset : offset + 8]))
            await mirror.write(CHUNK + 4096, b"\x02" * 4096)

    source.during_read = guest_write
    assert await mirror.run(max_passes=1) is False  # one pass leaves the chunk dirty
    assert target.data[CHUNK + 4096 : CHUNK + 8192] == b"\x01" * 4096  # the stale copy
    assert mirror.dirty_bytes == CHUNK
    assert await mirror.run(max_passes=1)
    assert target.ops("write") == [(CHUNK, CHUNK), (CHUNK, CHUNK)]
    assert target.data == source.data


async def test_a_write_in_flight_on_the_source_is_not_lost_by_a_copy() -> None:
    """The write marks its chunk after the source has it, so a copy that cleared the bit
    while the write was still in flight does not hide it."""
    source, target = Disk(), Disk()
    fill(source, 0, 0x01)
    mirror = Mirrored(source, target, chunk_size=CHUNK)
    await mirror.run()
    source.hold = True
    write = asyncio.create_task(mirror.write(0, b"\x02" * 4096))
    await asyncio.sleep(0)
    source.hold = False
    copy = asyncio.create_task(mirror.run(max_passes=1))  # clears chunk 0, reads old bytes
    while not target.ops("write")[1:]:
        await asyncio.sleep(0)
    source.release.set()
    await write
    assert await copy is False  # its one pass copied the old bytes
    assert target.data[:4096] == b"\x01" * 4096
    assert mirror.dirty_bytes == CHUNK  # marked again after landing
    await mirror.finish()
    assert target.data == source.data


async def test_sync_mode_never_leaves_dirty_chunks() -> None:
    source, target = Disk(), Disk()
    fill(source, 0, 0x01, count=SIZE // CHUNK)
    mirror = Mirrored(source, target, chunk_size=CHUNK, sync=True, max_copy=CHUNK)
    rng = random.Random(1)
    writes = 0
    guests: list[asyncio.Task[None]] = []

    async def guest_write(offset: int, length: int) -> None:
        # a write into the very chunk being copied: it waits for the copy, then goes to both
        nonlocal writes
        writes += 1
        if writes < 20:
            start = offset + rng.randrange(0, length - 512, 512)
            guests.append(asyncio.create_task(mirror.write(start, rng.randbytes(512))))
            for _ in range(5):  # the write would be done by now if it did not wait
                await asyncio.sleep(0)

    source.during_read = guest_write
    assert await mirror.run(converge_bytes=SIZE)  # sync mode ignores it: converges to zero
    source.during_read = None
    await asyncio.gather(*guests)
    assert len(guests) == 19 and mirror.passes == 1  # nothing was dirtied again
    assert mirror.dirty_bytes == 0 and mirror.state is S.CONVERGED
    for _ in range(50):
        await mirror.write(rng.randrange(0, SIZE - 4096, 512), rng.randbytes(4096))
        await mirror.trim(rng.randrange(0, SIZE - CHUNK, 512), 4096)
        assert mirror.dirty_bytes == 0
    assert target.data == source.data


async def test_overlapping_write_through_requests_reach_both_sides_in_one_order() -> None:
    source, target = Disk(), Disk()
    mirror = Mirrored(source, target, chunk_size=CHUNK, sync=True)
    await mirror.run()

    async def slow_once(offset: int, length: int) -> None:
        target.before_write = None
        for _ in range(20):  # time enough for the second write to finish, if it did not wait
            await asyncio.sleep(0)

    target.before_write = slow_once
    first = asyncio.create_task(mirror.write(0, b"A" * 4096))
    await asyncio.sleep(0)
    second = asyncio.create_task(mirror.write(2048, b"B" * 4096))
    await asyncio.gather(first, second)
    assert source.data[:6144] == b"A" * 2048 + b"B" * 4096
    assert target.data == source.data


async def test_rate_limit_is_respected() -> None:
    source, target = Disk(), Disk()
    fill(source, 0, 0x01, count=32)  # 2 MiB of data
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds
        await asyncio.sleep(0)

    rate = 1 << 20
    mirror = Mirrored(
        source,
        target,
        chunk_size=CHUNK,
        rate_limit=rate,
        parallel=2,
        max_copy=CHUNK,
        clock=lambda: now[0],
        sleep=sleep,
    )
    assert await mirror.run()
    assert mirror.copied_bytes == 2 << 20
    assert (2 << 20) - 2 * CHUNK <= now[0] * rate <= 2 << 20


async def test_a_new_rate_forgets_what_the_old_one_booked() -> None:
    """A push slowed to a trickle, then given the link: it goes on at once, not after the
    time the trickle had booked for what it sent."""
    now = [0.0]
    mirror = Mirrored(Disk(), Disk(), chunk_size=CHUNK, rate_limit=1.0, clock=lambda: now[0])
    mirror.pace.charge(CHUNK)  # at 1 byte/s: booked until t = 65536 s
    mirror.pace.set(1e9)
    now[0] = 0.001
    await asyncio.wait_for(mirror.pace.wait(), 1.0)
    mirror.pace.charge(CHUNK)
    assert mirror.pace._next_free == pytest.approx(0.001 + CHUNK / 1e9)


async def test_target_failure_fails_the_job_and_the_source_keeps_serving() -> None:
    source, target = Disk(), Disk()
    fill(source, 0, 0x01, count=4)
    mirror = Mirrored(source, target, chunk_size=CHUNK)
    target.fail = Errno.EIO
    with pytest.raises(MirrorFailed, match="failed on purpose") as failed:
        await mirror.run()
    assert isinstance(failed.value.__cause__, BackendError)
    assert mirror.state is S.FAILED and mirror.history == [S.COPYING, S.FAILED]
    with pytest.raises(MirrorFailed):
        await mirror.wait_converged()
    with pytest.raises(MirrorFailed):
        await mirror.finish()
    await mirror.write(0, b"\x05" * 4096)  # the guest is unharmed
    await mirror.flush()
    assert await mirror.read(0, 4096) == b"\x05" * 4096
    assert mirror.dirty_bytes >= 4 * CHUNK  # the record of what the target lacks is kept


async def test_sync_mode_target_failure_answers_eio_once() -> None:
    source, target = Disk(), Disk()
    mirror = Mirrored(source, target, chunk_size=CHUNK, sync=True)
    await mirror.run()
    target.fail = Errno.ENOSPC
    with pytest.raises(BackendError) as failed:
        await mirror.write(0, b"\x01" * 512)
    assert failed.value.errno == Errno.EIO and mirror.state is S.FAILED
    assert source.data[:512] == b"\x01" * 512
    await mirror.write(512, b"\x02" * 512)  # the job is over: the source alone, no error
    assert mirror.dirty_bytes == CHUNK


async def test_sync_mode_source_failure_answers_the_source_error() -> None:
    source, target = Disk(), Disk()
    mirror = Mirrored(source, target, chunk_size=CHUNK, sync=True)
    await mirror.run()
    source.fail = Errno.ENOSPC
    with pytest.raises(BackendError) as failed:
        await mirror.write(CHUNK, b"\x01" * 512)
    assert failed.value.errno == Errno.ENOSPC
    assert mirror.state is S.CONVERGED
    assert mirror.dirty_bytes == CHUNK  # the target now has bytes the source lacks


async def test_converges_under_a_steady_random_write_load() -> None:
    """A writer dirties one random range for every third chunk the copier moves: steady
    load tied to the copy's progress (no timing), so a pass always sees new dirt."""
    source, target = Disk(), Disk()
    rng = random.Random(7)
    fill(source, 0, 0x01, count=SIZE // CHUNK)
    mirror = Mirrored(source, target, chunk_size=CHUNK, max_copy=CHUNK)
    tokens: asyncio.Queue[None] = asyncio.Queue()
    copies = 0

    async def copied(offset: int, length: int) -> None:
        nonlocal copies
        copies += 1
        if copies % 3 == 0:
            tokens.put_nowait(None)

    target.after_write = copied
    written = 0

    async def writer() -> None:
        nonlocal written
        while True:
            await tokens.get()
            offset = rng.randrange(0, SIZE - 8192, 512)
            await mirror.write(offset, rng.randbytes(rng.choice((512, 4096, 8192))))
            written += 1

    load = asyncio.create_task(writer())
    try:
        assert await mirror.run(converge_bytes=2 * CHUNK, max_passes=20)
        assert mirror.passes >= 3 and written >= 21
        await mirror.write(0, b"\x09" * 512)  # the guest goes on; finish copies the last
        await mirror.finish()  # writer still live: write-through from finish's start
        for _ in range(10):  # after FINISHED every write reaches both sides
            await mirror.write(rng.randrange(0, SIZE - 4096), rng.randbytes(4096))
            assert mirror.dirty_bytes == 0
    finally:
        load.cancel()
    assert target.data == source.data


async def test_an_active_mirror_converges_with_nothing_dirty_and_the_target_flushed() -> None:
    """``active``: at convergence writes go to both sides and the rest is copied and flushed
    with no hold, so the switchover's ``finish`` copies nothing."""
    source, target = Disk(), Disk()
    rng = random.Random(11)
    fill(source, 0, 0x02, count=SIZE // CHUNK)
    mirror = Mirrored(source, target, chunk_size=CHUNK, max_copy=CHUNK)
    stop = asyncio.Event()
    dirty_after: list[int] = []  # dirty bytes after each write sent once CONVERGED
    twenty_after = asyncio.Event()

    async def writer() -> None:  # the guest writes throughout, with no hold at any point
        while not stop.is_set():
            converged = mirror.state is S.CONVERGED
            await mirror.write(rng.randrange(0, SIZE - 4096, 512), rng.randbytes(4096))
            if converged:
                dirty_after.append(mirror.dirty_bytes)
                if len(dirty_after) == 20:
                    twenty_after.set()
            await asyncio.sleep(0)

    load = asyncio.create_task(writer())
    try:
        assert await mirror.run(converge_bytes=8 * CHUNK, max_passes=20, active=True)
        assert mirror.state is S.CONVERGED and mirror.dirty_bytes == 0
        assert target.log[-1][0] in ("flush", "write")  # flushed; write-through may follow
        assert "flush" in [op for op, _, _ in target.log]
        await asyncio.wait_for(twenty_after.wait(), 30)  # more guest writes, on both sides
        assert dirty_after[:20] == [0] * 20
        assert mirror.dirty_bytes == 0
    finally:
        stop.set()
        await load
    copied = mirror.copied_bytes
    await mirror.finish()
    assert mirror.copied_bytes == copied and target.log[-1][0] == "flush"
    assert target.data == source.data


async def test_an_active_mirror_that_cannot_keep_up_goes_write_through_and_converges() -> None:
    """A writer that dirties more than each pass copies: without ``active`` the passes run
    out; with it the mirror goes write-through and converges all the same."""
    source, target = Disk(), Disk()
    fill(source, 0, 0x03, count=SIZE // CHUNK)
    mirror = Mirrored(source, target, chunk_size=CHUNK, max_copy=CHUNK)
    rng = random.Random(5)

    budget = [1200]  # the guest's writes, in all (write-through ones reach this hook too)
    guest: list[asyncio.Task[None]] = []

    async def dirty_many(offset: int, length: int) -> None:  # 3 new dirty chunks per copy
        for _ in range(3):  # a concurrent guest: its writes do not wait on this copy
            if budget[0] <= 0:
                return
            budget[0] -= 1
            at = rng.randrange(0, SIZE // CHUNK) * CHUNK
            guest.append(asyncio.create_task(mirror.write(at, rng.randbytes(4096))))
        await asyncio.sleep(0)

    target.after_write = dirty_many
    assert not await mirror.run(converge_bytes=0, max_passes=2)
    assert mirror.state is S.COPYING and mirror.dirty_bytes > 0
    assert await mirror.run(converge_bytes=0, max_passes=2, active=True)
    target.after_write = None
    await asyncio.gather(*guest)
    assert mirror.state is S.CONVERGED and mirror.dirty_bytes == 0
    assert target.data == source.data


def dirty_two_per_copy(
    mirror: Mirrored,
    rng: random.Random,
    guest: list[asyncio.Task[None]],
    chunks_below: Callable[[int], int],
) -> Callable[[int, int], Awaitable[None]]:
    """A target's after_write hook: for each copy to the target, the guest writes two
    chunks picked at random below chunks_below(the copy's offset), about the first
    pass's worth in all (write-through writes reach the hook too: without a budget they
    would dirty more for ever)."""
    budget = 2 * (SIZE // CHUNK)

    async def dirty(offset: int, length: int) -> None:
        nonlocal budget
        for _ in range(min(2, budget)):
            budget -= 1
            at = rng.randrange(0, chunks_below(offset)) * CHUNK
            guest.append(asyncio.create_task(mirror.write(at, rng.randbytes(4096))))
        await asyncio.sleep(0)

    return dirty


async def test_an_active_mirror_goes_write_through_after_the_first_pass_that_falls_behind() -> None:
    """A pass after which the guest dirtied more than half of what it copied: more passes
    would each copy about as much again, so an active mirror goes write-through at once
    rather than after all its passes; a guest that dirties little gets its passes."""
    source, target = Disk(), Disk()
    fill(source, 0, 0x03, count=SIZE // CHUNK)
    mirror = Mirrored(source, target, chunk_size=CHUNK, max_copy=CHUNK)
    rng = random.Random(6)
    guest: list[asyncio.Task[None]] = []

    target.after_write = dirty_two_per_copy(mirror, rng, guest, lambda offset: SIZE // CHUNK)
    assert await mirror.run(converge_bytes=0, max_passes=20, active=True)
    target.after_write = None
    await asyncio.gather(*guest)
    assert mirror.passes == 1 and mirror.state is S.CONVERGED and mirror.dirty_bytes == 0
    assert mirror.writes_paced and mirror.stats().writes_paced
    assert target.data == source.data

    calm_target = Disk()
    calm = Mirrored(source, calm_target, chunk_size=CHUNK, max_copy=CHUNK)
    writes = 0

    async def dirty_few(offset: int, length: int) -> None:  # a write every fourth copy
        nonlocal writes
        writes += 1
        if writes % 4 == 0 and writes < 2 * (SIZE // CHUNK):
            guest.append(asyncio.create_task(calm.write(offset, rng.randbytes(4096))))
        await asyncio.sleep(0)

    calm_target.after_write = dirty_few
    assert await calm.run(converge_bytes=0, max_passes=20, active=True)
    await asyncio.gather(*guest)
    assert calm.passes >= 2  # not behind: it went on copying
    assert not calm.writes_paced


async def test_an_active_pass_goes_write_through_as_soon_as_the_guest_outruns_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A guest that dirties again two chunks the pass has copied for each one it copies:
    judged once the pass has copied BEHIND_AFTER bytes, its writes go to both sides from
    then on, so it stops dirtying the disk anew in the middle of the first pass (at the
    pass's end it would have dirtied most of it again); the dirt of a pass as calm as a
    write per four copies never sends it there."""
    monkeypatch.setattr(mirror_mod, "BEHIND_AFTER", 4 * CHUNK)
    source, target = Disk(), Disk()
    fill(source, 0, 0x03, count=SIZE // CHUNK)
    mirror = Mirrored(source, target, chunk_size=CHUNK, max_copy=CHUNK)
    rng = random.Random(7)
    guest: list[asyncio.Task[None]] = []
    # Somewhere the pass has already been.
    target.after_write = dirty_two_per_copy(mirror, rng, guest, lambda offset: offset // CHUNK + 1)
    assert await mirror.run(converge_bytes=0, max_passes=20, active=True)
    target.after_write = None
    await asyncio.gather(*guest)
    assert mirror.writes_paced and mirror.passes == 1 and mirror.state is S.CONVERGED
    # Dirtied anew: what it took to judge (4 copies, 4 in flight), not the whole disk.
    assert 0 < mirror.redirtied_bytes <= 16 * CHUNK < SIZE // 2
    assert target.data == source.data

    calm_target = Disk()
    calm = Mirrored(source, calm_target, chunk_size=CHUNK, max_copy=CHUNK)
    copies = 0

    async def dirty_few(offset: int, length: int) -> None:  # a copied chunk every fourth copy
        nonlocal copies
        copies += 1
        if copies % 4 == 0 and copies < SIZE // CHUNK:
            guest.append(asyncio.create_task(calm.write(offset, rng.randbytes(4096))))
        await asyncio.sleep(0)

    calm_target.after_write = dirty_few
    assert await calm.run(converge_bytes=0, max_passes=20, active=True)
    await asyncio.gather(*guest)
    assert calm.redirtied_bytes > 0 and not calm.writes_paced and calm.passes >= 2


async def test_finish_flushes_the_target_after_the_last_copy() -> None:
    source, target = Disk(), Disk()
    fill(source, 7, 0x07)
    mirror = Mirrored(source, target, chunk_size=CHUNK)
    await mirror.finish()  # without run: finish does the whole copy itself
    assert target.log[-1][0] == "flush" and target.ops("write") == [(7 * CHUNK, CHUNK)]
    assert mirror.state is S.FINISHED and target.data == source.data


async def test_dirty_set_hands_over_through_device_state() -> None:
    source, target = Disk(), Disk()
    fill(source, 0, 0x01, count=SIZE // CHUNK)
    mirror = Mirrored(source, target, chunk_size=CHUNK)
    await mirror.run()
    await mirror.write(3 * CHUNK + 100, b"x")
    await mirror.write_zeroes(9 * CHUNK, 2 * CHUNK)
    blob = mirror.export_state().export()
    state = DeviceState.import_(blob)
    assert state.counters["mirror_copied_bytes"] == SIZE
    dirty = state.bitmaps[DIRTY_BITMAP]
    assert [i for i in range(dirty.n_bits) if dirty[i]] == [3, 9, 10]
    # a later mirror starts from the handed-over set: only those chunks move
    again = Disk()
    again.data[:] = target.data
    resumed = Mirrored(source, again, chunk_size=CHUNK, dirty=dirty)
    await resumed.finish()
    assert again.ops("write") == [(3 * CHUNK, CHUNK)]
    assert again.ops("zero") == [(9 * CHUNK, 2 * CHUNK)]  # a zeroed run costs no data
    assert again.data == source.data


# -- real agents, real clients ----------------------------------------------------------------


class NbdTarget(Backend):
    """The smallest network backend: every request forwarded over one NBD connection."""

    def __init__(self, client: NbdClient) -> None:
        self.client = client

    @property
    def size(self) -> int:
        return self.client.size

    async def _call(self, request: Awaitable[object]) -> object:
        try:
            return await request
        except NbdRequestFailed as err:
            raise BackendError(str(err), Errno(err.errno)) from err
        except PeerError as err:
            raise BackendError(str(err), Errno.EIO) from err

    async def read(self, offset: int, length: int) -> bytes:
        data = await self._call(self.client.read(offset, length))
        assert isinstance(data, bytes)
        return data

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._call(self.client.write(offset, data, fua))

    async def flush(self) -> None:
        await self._call(self.client.flush())

    async def trim(self, offset: int, length: int) -> None:
        await self._call(self.client.trim(offset, length))

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        await self._call(self.client.write_zeroes(offset, length, no_hole=not may_trim))

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        extents = await self._call(self.client.block_status(offset, length))
        assert isinstance(extents, list)
        return [
            Extent(n, bool(f & AllocationState.HOLE), bool(f & AllocationState.ZERO))
            for n, f in extents
        ]

    async def close(self) -> None:
        await self.client.close()


class Pair:
    """Agent A serving Mirrored(Local(src) -> NBD/TCP -> agent B serving Local(dst))."""

    def __init__(self, tmp: Path, size: int) -> None:
        self.src, self.dst, self.sock = tmp / "src.img", tmp / "dst.img", tmp / "a.sock"
        for path in (self.src, self.dst):
            with path.open("wb") as f:
                f.truncate(size)
        self.b = BlockAgent(Local(self.dst), "disk")
        self.a: BlockAgent | None = None
        self.mirror: Mirrored | None = None

    async def start(self, **mirror_kw: object) -> Mirrored:
        host, port = await self.b.listen_tcp("127.0.0.1", 0)
        client = await NbdClient.connect(host=host, port=port, export="disk")
        self.mirror = Mirrored(Local(self.src), NbdTarget(client), **mirror_kw)  # type: ignore[arg-type]
        self.a = BlockAgent(self.mirror, "disk")
        await self.a.listen_unix(self.sock)
        return self.mirror

    async def stop(self) -> None:
        if self.a is not None:
            await self.a.stop()  # closes the mirror (source and, unless handed over, target)
        if self.mirror is not None:
            await self.mirror.source.close()
        await self.b.stop()


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    agents = Pair(tmp_path, 64 << 20)
    try:
        yield agents
    finally:
        await agents.stop()


def qemu_io_args(sock: Path, commands: list[str]) -> list[str]:
    args = ["qemu-io", "-f", "raw", f"nbd+unix:///disk?socket={sock}"]
    for command in commands:
        args += ["-c", command]
    return args


async def run(*args: str) -> tuple[int, str]:
    """Run a program to its end (killed if the test is cancelled); its code and output."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def run_qemu_io(sock: Path, commands: list[str]) -> None:
    code, text = await run(*qemu_io_args(sock, commands))
    assert code == 0 and "error" not in text.lower() and "fail" not in text, text


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_real_mirror_over_tcp_with_qemu_io_writing(pair: Pair, sync: bool) -> None:
    rng = random.Random(3)
    size = 64 << 20
    with pair.src.open("r+b") as f:  # some data to start with, holes elsewhere
        for _ in range(64):
            f.seek(rng.randrange(0, size // 65536) * 65536)
            f.write(rng.randbytes(65536))
    mirror = await pair.start(chunk_size=CHUNK, sync=sync)
    commands = []
    for i in range(300):
        length = rng.choice((4096, 65536, 1 << 20))
        offset = rng.randrange(0, (size - length) // 4096) * 4096
        kind = rng.random()
        if kind < 0.8:
            commands.append(f"aio_write -P {i % 255 + 1} {offset} {length}")
        elif kind < 0.9:
            commands.append(f"aio_write -z {offset} {length}")
        else:
            commands.append(f"discard {offset} {length}")
        if i % 50 == 49:
            commands.append("aio_flush")
    commands.append("aio_flush")
    guest = asyncio.create_task(run_qemu_io(pair.sock, commands))
    while not guest.done():  # the copy runs, and runs again, while the guest writes
        assert await mirror.run(converge_bytes=1 << 20, max_passes=50)
        await asyncio.wait([guest], timeout=0.02)
    await guest
    assert pair.a is not None and pair.a.journal.errors == 0
    if sync:
        assert mirror.dirty_bytes == 0
    source = await cutover(pair.a)
    assert mirror.state is S.FINISHED and pair.a.backend is mirror.target
    await source.close()
    code, text = await run(
        "qemu-img", "compare", "-f", "raw", "-F", "raw", str(pair.src), str(pair.dst)
    )
    assert code == 0 and "Images are identical" in text, text
    # the agent now writes through to B: a write after the cutover lands in dst
    await run_qemu_io(pair.sock, ["write -P 0x5a 0 4096", "flush"])
    with pair.dst.open("rb") as f:
        assert f.read(4096) == b"\x5a" * 4096


async def test_a_cancel_fails_no_guest_write_of_a_sync_mirror(tmp_path: Path) -> None:
    """In sync mode a guest write is answered once both sides have it; a cancel closes
    the target under a write in flight: the write is the source's alone, not an EIO."""
    source, target = Disk(), Disk()
    landed = target.write

    async def slow(offset: int, data: bytes, fua: bool = False) -> None:  # a far target
        await asyncio.sleep(0.05)
        await landed(offset, data, fua)

    target.write = slow  # type: ignore[method-assign]

    class Agent:
        export_name = "disk"

        def __init__(self, backend: Backend) -> None:
            self.backend = backend

        async def swap_backend(self, new: Backend, **_: object) -> Backend:
            old, self.backend = self.backend, new
            return old

    mirror = Mirrored(source, target, sync=True)
    job = MirrorJob(cast(Any, Agent(mirror)))
    job._mirror, job._task = mirror, asyncio.create_task(mirror.run())
    job.lifecycle.fire(JobEvent.STARTED)
    await asyncio.sleep(0.1)
    write = asyncio.create_task(mirror.write(0, b"\x5a" * 4096))
    await asyncio.sleep(0.01)
    await job.cancel()
    await write  # no BackendError
    assert await source.read(0, 4096) == b"\x5a" * 4096
