"""A Fetch whose replica runs out of room (a real, small tmpfs filling up): it spills, the
guest's writes going to the remote, its reads answered from both, never an error; once the
filesystem has room again it fills again and ends complete, equal to what the guest wrote."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from devagent.agent import fetch as fetch_module
from devagent.agent import spill as spill_module
from devagent.agent.backend import Backend, Extent, NoRoom
from devagent.agent.duties import Duties
from devagent.agent.fetch import Fetch, NotWhole
from devagent.agent.messages import FetchSpec, RemoteSpec
from devagent.errors import StateError
from devagent.nbd.proto import Errno
from test_fetch import CHUNK, SIZE, FakeRemote, pattern, until


class WritableRemote(FakeRemote):
    """The source's disk as a spilling Fetch uses it: read, and written."""

    def __init__(self, data: bytes | bytearray) -> None:
        super().__init__(data)
        self.writes = 0
        self.flushes = 0

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self.writes += 1
        self.data[offset : offset + len(data)] = data

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        self.writes += 1
        self.data[offset : offset + length] = bytes(length)

    async def flush(self) -> None:
        self.flushes += 1


def _mount(point: Path, size: str, *options: str) -> None:
    opts = ",".join((f"size={size}", *options))
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], check=True)


def grow(point: Path) -> None:
    """Room again: the tmpfs grows to 16 MiB."""
    subprocess.run(["mount", "-o", "remount,size=16m", str(point)], check=True)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1.5 MiB tmpfs: room for the bitmap and a third of the 4 MiB replica."""
    point = tmp_path / "space"
    point.mkdir()
    _mount(point, "1536k")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture
async def spilling(
    small_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Fetch, WritableRemote, bytearray]]:
    """A Fetch filling up its replica until it has no room: spilling."""
    monkeypatch.setattr(spill_module, "ROOM_PROBE_S", 0.05)
    remote = WritableRemote(pattern())
    fetch = Fetch(small_fs / "replica.img", remote, chunk_size=CHUNK)
    fetch.start_copier()
    try:
        await until(lambda: fetch.spilling is not None, "the replica to run out of room")
        yield fetch, remote, bytearray(pattern())
    finally:
        await fetch.close()


async def test_a_full_replica_spills_the_guests_io_to_the_remote_without_an_error(
    spilling: tuple[Fetch, WritableRemote, bytearray],
) -> None:
    fetch, remote, model = spilling
    assert "No space left on device" in (fetch.spilling or "")
    present = fetch.present_bytes
    assert 0 < present < SIZE
    rng = random.Random(7)
    for _ in range(200):  # writes on present and absent chunks, whole and partial
        offset = rng.randrange(0, SIZE - 8192, 512)
        length = rng.choice([512, 4096, 8192, CHUNK + 512])
        length = min(length, SIZE - offset)
        data = rng.randbytes(length)
        await fetch.write(offset, data)
        model[offset : offset + length] = data
        if rng.random() < 0.1:
            await fetch.write_zeroes(offset, 4096)
            model[offset : offset + 4096] = bytes(4096)
    for _ in range(100):
        offset = rng.randrange(0, SIZE - CHUNK)
        assert await fetch.read(offset, CHUNK) == model[offset : offset + CHUNK]
    await fetch.trim(0, CHUNK)  # advisory: dropped while spilling
    await fetch.flush()
    assert remote.flushes >= 1  # the spilled writes are durable where they went
    status = fetch.status()
    assert status.spilling is not None and status.spilled_bytes > 0
    assert fetch.present_bytes < present  # written-back chunks forgotten, nothing filled
    for index in range(SIZE // CHUNK):  # the remote holds every byte the replica lacks
        if not fetch._map.is_present(index):
            span = slice(index * CHUNK, (index + 1) * CHUNK)
            assert remote.data[span] == model[span]


async def test_a_spilling_replica_hands_every_chunk_back_to_the_remote(
    spilling: tuple[Fetch, WritableRemote, bytearray],
) -> None:
    """A replica that will not get room again (a read-only space): what it holds, the
    guest's newer writes among it, goes back to the remote, and the remote alone then
    holds the whole disk; the guest's I/O goes on meanwhile."""
    fetch, remote, model = spilling
    rng = random.Random(9)
    present = [i for i in range(SIZE // CHUNK) if fetch._map.is_present(i)]
    assert present
    for index in present[:4]:  # the guest's writes on present chunks before the spill
        data = rng.randbytes(4096)  # (through the replica: the space had room for them)
        await fetch._local.write(index * CHUNK, data)
        model[index * CHUNK : index * CHUNK + 4096] = data

    async def guest() -> None:
        for _ in range(50):
            offset = rng.randrange(0, SIZE - 4096, 4096)
            data = rng.randbytes(4096)
            await fetch.write(offset, data)
            model[offset : offset + 4096] = data

    moved, _ = await asyncio.gather(fetch.write_back(), guest())
    assert moved >= 4 * CHUNK and fetch.present_bytes == 0 and remote.flushes >= 1
    assert remote.data == model


async def test_a_replica_that_takes_writes_hands_nothing_back(tmp_path: Path) -> None:
    fetch = Fetch(tmp_path / "replica.img", WritableRemote(pattern()), chunk_size=CHUNK)
    try:
        with pytest.raises(StateError, match="only while it spills"):
            await fetch.write_back()
    finally:
        await fetch.close()


async def test_once_there_is_room_again_the_replica_fills_and_ends_complete(
    spilling: tuple[Fetch, WritableRemote, bytearray], small_fs: Path
) -> None:
    fetch, _, model = spilling
    rng = random.Random(8)
    for _ in range(50):
        offset = rng.randrange(0, SIZE - 4096, 4096)
        data = rng.randbytes(4096)
        await fetch.write(offset, data)
        model[offset : offset + 4096] = data
    await asyncio.to_thread(grow, small_fs)
    await until(lambda: fetch.spilling is None, "the Fetch to see room again")
    more = [(rng.randrange(0, SIZE - 4096, 4096), rng.randbytes(4096)) for _ in range(20)]
    for offset, data in more:  # the replica takes them again
        await fetch.write(offset, data)
        model[offset : offset + 4096] = data
    await asyncio.wait_for(fetch.wait_complete(), 30)
    assert fetch.complete and fetch.status().spilling is None
    assert (small_fs / "replica.img").read_bytes() == model


async def test_writes_racing_the_replica_filling_up_are_all_kept(
    small_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guest writes in flight, lock-free on present chunks and locked on absent ones, while
    the copier fills the replica up and the Fetch starts spilling, then fills again: every
    write is kept (each task owns its own 4 KiB blocks, so the model is exact)."""
    monkeypatch.setattr(spill_module, "ROOM_PROBE_S", 0.05)
    remote = WritableRemote(pattern())
    fetch = Fetch(small_fs / "replica.img", remote, chunk_size=CHUNK)
    model = bytearray(pattern())
    blocks = list(range(SIZE // 4096))
    random.Random(9).shuffle(blocks)

    async def writer(mine: list[int], seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(3):
            for block in mine:
                data = rng.randbytes(4096)
                await fetch.write(block * 4096, data)
                model[block * 4096 : (block + 1) * 4096] = data
                assert await fetch.read(block * 4096, 4096) == data

    try:
        fetch.start_copier()
        tasks = [writer(blocks[i::8], i) for i in range(8)]
        await asyncio.gather(*tasks)
        assert fetch.spilling is not None and fetch.spilled_bytes > 0
        await asyncio.to_thread(grow, small_fs)
        await asyncio.wait_for(fetch.wait_complete(), 30)
        for offset in range(0, SIZE, CHUNK):
            assert await fetch.read(offset, CHUNK) == model[offset : offset + CHUNK]
        assert (small_fs / "replica.img").read_bytes() == model
    finally:
        await fetch.close()


async def test_a_replica_complete_before_the_spill_fills_again_after_it(
    small_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copier had finished (the replica complete, its zero chunks holes) when the space
    filled up: a write into a hole spills and forgets its chunk; once there is room the
    copier runs again and the replica ends complete and right."""
    monkeypatch.setattr(spill_module, "ROOM_PROBE_S", 0.05)
    data = pattern()
    data[CHUNK * 8 : CHUNK * 24] = bytes(CHUNK * 16)  # zeroes: holes in the replica
    remote = WritableRemote(data)
    model = bytearray(data)
    await asyncio.to_thread(grow, small_fs)
    fetch = Fetch(small_fs / "replica.img", remote, chunk_size=CHUNK)
    filler = small_fs / "filler"
    try:
        fetch.start_copier()
        await asyncio.wait_for(fetch.wait_complete(), 30)
        await asyncio.to_thread(_fill_up, filler)
        await fetch.write(CHUNK * 10, b"\x77" * 4096)  # into a hole: no room
        model[CHUNK * 10 : CHUNK * 10 + 4096] = b"\x77" * 4096
        assert fetch.spilling is not None and not fetch.complete
        assert await fetch.read(CHUNK * 10, CHUNK) == model[CHUNK * 10 : CHUNK * 11]
        filler.unlink()
        await until(lambda: fetch.spilling is None, "room again")
        await asyncio.wait_for(fetch.wait_complete(), 30)
        assert (small_fs / "replica.img").read_bytes() == model
    finally:
        await fetch.close()


def _fill_up(filler: Path) -> None:
    """Take every free block of the filesystem."""
    with filler.open("wb") as f:
        size = 1 << 20
        taken = 0
        while size >= 4096:
            try:
                os.posix_fallocate(f.fileno(), taken, size)
                taken += size
            except OSError:
                size //= 2


# --- races, on a replica made to refuse writes (its Local instrumented) -------------------


class GatedRemote(WritableRemote):
    """Writes at some offsets wait for ``write_release``; block-status answers for
    ``status_gate`` (computed at once, delivered later)."""

    def __init__(self, data: bytes | bytearray) -> None:
        super().__init__(data)
        self.hold_write_at: set[int] = set()
        self.write_release = asyncio.Event()
        self.status_gate: asyncio.Event | None = None

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        if offset in self.hold_write_at:
            await self.write_release.wait()
        await super().write(offset, data, fua)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        answer = await super().block_status(offset, length)
        if self.status_gate is not None:
            await self.status_gate.wait()
        return answer


class Refusing:
    """The replica's writes: NoRoom while ``full`` (only into ``chunks``, if given), and
    held at ``hold`` offsets until ``gate``."""

    def __init__(self, fetch: Fetch) -> None:
        self.full = False
        self.chunks: set[int] | None = None
        self.hold: set[int] = set()
        self.gate = asyncio.Event()
        self._write = fetch._local.write
        fetch._local.write = self.write  # type: ignore[method-assign]

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        if offset in self.hold:
            await self.gate.wait()
        if self.full and (self.chunks is None or offset // CHUNK in self.chunks):
            raise NoRoom("write: No space left on device", Errno.ENOSPC)
        await self._write(offset, data, fua)


def with_room_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, remote: GatedRemote
) -> tuple[Fetch, GatedRemote, list[bool]]:
    """A Fetch of ``remote`` whose probe for room says what ``room[0]`` says, asked often."""
    monkeypatch.setattr(spill_module, "ROOM_PROBE_S", 0.01)
    fetch = Fetch(tmp_path / "r.img", remote, chunk_size=CHUNK)
    room = [False]
    monkeypatch.setattr(fetch.spill, "has_room", lambda: room[0])
    return fetch, remote, room


async def test_a_lock_free_write_in_flight_when_the_spill_begins_is_kept(tmp_path: Path) -> None:
    fetch = Fetch(tmp_path / "r.img", GatedRemote(pattern()), chunk_size=CHUNK)
    try:
        await fetch.read(0, CHUNK)  # chunk 0 present
        await fetch.flush()
        replica = Refusing(fetch)
        replica.hold, replica.full, replica.chunks = {0}, True, {5}
        first = asyncio.create_task(fetch.write(0, b"A" * 4096))  # lock-free, in flight
        await asyncio.sleep(0.01)
        spill = asyncio.create_task(fetch.write(5 * CHUNK, b"B" * 4096))  # no room: spills
        await until(lambda: fetch.spilling is not None, "the spill")
        same_chunk = asyncio.create_task(fetch.write(4096, b"C" * 4096))  # spilled
        await asyncio.sleep(0.01)
        replica.gate.set()
        await asyncio.gather(first, spill, same_chunk)
        assert await fetch.read(0, 8192) == b"A" * 4096 + b"C" * 4096
    finally:
        await fetch.close()


async def test_a_spill_while_the_prober_ends_the_last_one_keeps_spilling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetch, remote, room = with_room_switch(tmp_path, monkeypatch, GatedRemote(pattern()))
    try:
        replica = Refusing(fetch)
        replica.full = True
        await fetch.write(3 * CHUNK, b"x" * 4096)
        remote.hold_write_at = {7 * CHUNK}
        held = asyncio.create_task(fetch.write(7 * CHUNK, b"a" * 4096))  # spilled, held
        await asyncio.sleep(0.01)
        room[0] = True
        await until(lambda: fetch.spilling is None, "the prober to see room")
        room[0] = False
        await fetch.write(9 * CHUNK, b"b" * 4096)  # no room again while the prober waits
        remote.write_release.set()
        await held
        await asyncio.sleep(0.1)
        assert fetch.spilling is not None and not fetch.spill.fast  # still spilling, locked
        replica.full, room[0] = False, True
        await until(lambda: fetch.spilling is None and fetch.spill.fast, "room, for good")
        assert await fetch.read(9 * CHUNK, 4096) == b"b" * 4096
    finally:
        await fetch.close()


async def test_a_zero_map_asked_before_a_spilled_write_never_punches_it(tmp_path: Path) -> None:
    data = pattern()
    data[10 * CHUNK : 11 * CHUNK] = bytes(CHUNK)  # the remote's chunk 10 reads zeroes
    remote = GatedRemote(data)
    fetch = Fetch(tmp_path / "r.img", remote, chunk_size=CHUNK)
    try:
        await fetch.read(0, CHUNK)
        replica = Refusing(fetch)
        remote.status_gate = asyncio.Event()
        asking = asyncio.create_task(fetch._copy_batch([0]))  # its zero map is on its way
        await asyncio.sleep(0.01)
        replica.full = True
        await fetch.write(10 * CHUNK, b"W" * 4096)  # spilled to the remote
        remote.status_gate.set()  # the old answer lands now
        await asyncio.gather(asking)
        replica.full = False
        await fetch._copy_batch([10])
        assert await fetch.read(10 * CHUNK, 4096) == b"W" * 4096
    finally:
        await fetch.close()


async def test_then_local_waits_while_a_spill_made_the_replica_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica was complete, its swap to Local under way, when a write into a hole
    spilled and forgot its chunk: the swap waits until the replica is whole again."""
    data = pattern()
    data[10 * CHUNK : 11 * CHUNK] = bytes(CHUNK)
    fetch, _, room = with_room_switch(tmp_path, monkeypatch, GatedRemote(data))

    class Agent:
        export_name = "disk"
        backend: Backend = fetch

        async def swap_backend(
            self, new: Backend, *, before_switch: Callable[[], Awaitable[object]] | None = None
        ) -> Backend:
            if before_switch is not None:
                await before_switch()
            old, self.backend = self.backend, new
            return old

    agent = Agent()
    flushing = asyncio.Event()
    flush = fetch._local.flush

    async def slow_flush() -> None:
        await flushing.wait()
        await flush()

    try:
        fetch.start_copier()
        await until(lambda: fetch.complete, "the replica complete")
        await fetch.settle()
        fetch._local.flush = slow_flush  # type: ignore[method-assign]
        duties = Duties(cast(Any, agent))
        spec = FetchSpec(path=str(fetch.path), remote=RemoteSpec(address="tcp:h:1", export="e"),
                         copier=True, then_local=True)  # fmt: skip
        duties.start(fetch, spec)
        await asyncio.sleep(0.01)  # then_local waits in wait_complete's flush
        replica = Refusing(fetch)
        replica.full, replica.chunks = True, {10}
        await fetch.write(10 * CHUNK, b"W" * 4096)  # into a hole: spilled, chunk forgotten
        flushing.set()
        await asyncio.sleep(0.2)
        assert agent.backend is fetch  # not swapped while a chunk is on the remote only
        replica.full, room[0] = False, True  # the prober sees room, the copier runs again
        await until(lambda: agent.backend is not fetch, "the swap to Local")
        assert await agent.backend.read(10 * CHUNK, 4096) == b"W" * 4096
        await agent.backend.close()
    finally:
        flushing.set()
        await fetch.close()


async def test_a_write_whose_spill_ended_while_it_waited_goes_to_the_replica(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """W finds no room and starts a spill, which waits for a slow lock-free write; room
    comes back meanwhile and the spill ends: W must not write back and forget its chunk
    (a lock-free write landing there afterwards would be lost), it goes to the replica."""
    fetch, remote, room = with_room_switch(tmp_path, monkeypatch, GatedRemote(pattern()))
    try:
        await fetch.read(0, CHUNK)  # chunk 0 present, chunk 1 absent
        await fetch.flush()
        replica = Refusing(fetch)
        replica.hold, replica.full, replica.chunks = {0}, True, {1}
        slow = asyncio.create_task(fetch.write(0, b"F" * 4096))  # lock-free, held
        await asyncio.sleep(0.01)
        w = asyncio.create_task(fetch.write(CHUNK, b"W" * 4096))  # locked: no room, spills
        await until(lambda: fetch.spilling is not None, "the spill")
        replica.full, room[0] = False, True
        await until(lambda: fetch.spilling is None, "the spill to end")
        replica.gate.set()
        await asyncio.gather(slow, w)
        assert remote.writes == 0 and fetch.spilled_bytes == 0  # nothing went to the remote
        assert fetch.present_bytes == 2 * CHUNK  # nothing forgotten
        assert await fetch.read(0, 4096) == b"F" * 4096
        assert await fetch.read(CHUNK, 4096) == b"W" * 4096
    finally:
        await fetch.close()


async def test_a_whole_replica_whose_space_went_read_only_is_not_served_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica is complete when its space turns read-only, before any write met it.
    Asked whether it can be served alone (a migration's source is about to let it go), it
    spills at once and says why: a guest's write then goes to the remote, and handing the
    chunks back leaves the remote with every byte. (A filesystem with the replica open for
    writing cannot be remounted read-only here: the probe's answer is what is faked; the
    chaos lab turns a real ext4 read-only, and a full one is below.)"""
    remote = WritableRemote(pattern())
    fetch = Fetch(tmp_path / "replica.img", remote, chunk_size=CHUNK)
    try:
        fetch.start_copier()
        await until(lambda: fetch.complete, "the replica complete")
        await fetch.require_whole()  # whole and writable: nothing to say

        def read_only(replica: Path, chunk_size: int, probe: str = "room") -> OSError:
            assert replica == fetch.path and chunk_size == CHUNK
            return OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(fetch_module, "no_room", read_only)
        with pytest.raises(NotWhole, match="Read-only file system"):
            await fetch.require_whole()
        assert "Read-only file system" in (fetch.spilling or "")
        await fetch.write(CHUNK + 512, b"W" * 4096)
        model = bytearray(pattern())
        model[CHUNK + 512 : CHUNK + 512 + 4096] = b"W" * 4096
        assert remote.data[CHUNK : 2 * CHUNK] == model[CHUNK : 2 * CHUNK]
        assert await fetch.write_back() > 0
        assert bytes(remote.data) == bytes(model)
    finally:
        await fetch.close()


async def test_a_whole_replica_on_a_full_space_is_not_served_alone(
    small_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Complete, but not a chunk's room left beside it: it spills (a write then goes to
    the remote) rather than be served alone, where a write would wait for room."""
    monkeypatch.setattr(spill_module, "ROOM_PROBE_S", 0.05)
    remote = WritableRemote(pattern(1 << 20))
    fetch = Fetch(small_fs / "replica.img", remote, chunk_size=CHUNK)
    try:
        fetch.start_copier()
        await fetch.wait_complete()
        await fetch.require_whole()
        await asyncio.to_thread(_fill_up, small_fs / "filler")
        with pytest.raises(NotWhole, match="No space left on device"):
            await fetch.require_whole()
        await fetch.write(0, b"F" * 4096)
        assert remote.data[:4096] == b"F" * 4096
        (small_fs / "filler").unlink()
        await until(lambda: fetch.spilling is None and fetch.complete, "room and whole again")
        await fetch.wait_complete()
        await fetch.require_whole()
    finally:
        await fetch.close()
