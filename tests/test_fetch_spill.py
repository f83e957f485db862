"""A Fetch whose replica runs out of room (a real, small tmpfs filling up): it spills, the
guest's writes going to the remote, its reads answered from both, never an error; once the
filesystem has room again it fills again and ends complete, equal to what the guest wrote."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from devagent.agent import fetch as fetch_module
from devagent.agent.fetch import Fetch
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
    monkeypatch.setattr(fetch_module, "ROOM_PROBE_S", 0.05)
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
    monkeypatch.setattr(fetch_module, "ROOM_PROBE_S", 0.05)
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
    monkeypatch.setattr(fetch_module, "ROOM_PROBE_S", 0.05)
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
