"""The Local backend on a real file: I/O, durability paths, allocation map, errors."""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_fakes import read_bytes
from devagent.agent import backend as backend_module
from devagent.agent.backend import BackendError, Extent, Local, nbd_errno
from devagent.agent.presence import bits_to_chunks, span_bits
from devagent.nbd.proto import Errno

MiB = 1 << 20


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[Local]:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(8 * MiB)
        f.seek(2 * MiB)
        f.write(b"\x5a" * MiB)
    backend = Local(path)
    try:
        yield backend
    finally:
        await backend.close()


async def test_read_write_fua_flush(local: Local) -> None:
    assert local.size == 8 * MiB and not local.read_only
    assert await local.read(2 * MiB - 2, 4) == b"\0\0\x5a\x5a"
    await local.write(100, b"hello", fua=True)
    await local.write(MiB + 1, b"x" * 70000)  # unaligned, large: the pool path
    await local.flush()
    data = read_bytes(local.path)
    assert data[100:105] == b"hello" and data[MiB + 1 : MiB + 70001] == b"x" * 70000


async def test_inline_write_only_for_small_aligned_writes(local: Local) -> None:
    assert local.write_nowait(4096, b"a" * 4096)
    assert not local.write_nowait(4097, b"a" * 4096)  # unaligned: read-modify-write
    assert not local.write_nowait(0, b"a" * (128 * 1024))  # too large
    local.inline_writes = False
    assert not local.write_nowait(8192, b"a" * 4096)
    assert read_bytes(local.path, 4096, 4096) == b"a" * 4096


async def test_read_nowait_serves_the_page_cache(local: Local) -> None:
    await local.write(0, b"c" * 4096)
    assert local.read_nowait(0, 4096) == b"c" * 4096  # just written: cached
    assert local.read_nowait(0, 0) is None


async def test_block_status_from_seek_data_and_hole(local: Local) -> None:
    extents = await local.block_status(0, 8 * MiB)
    assert extents == [
        Extent(2 * MiB, hole=True, zero=True),
        Extent(MiB),
        Extent(5 * MiB, hole=True, zero=True),
    ]
    assert await local.block_status(2 * MiB + 4096, 4096) == [Extent(4096)]


async def test_the_chunks_wholly_in_holes_are_the_ones_that_read_zeroes(tmp_path: Path) -> None:
    """A fenced disk's holes, as bits of chunks (the switchover's hand-over): a chunk with any
    data is not one, the file's short last chunk is when it is a hole; a scan out of time
    says nothing; a block device has none known."""
    chunk = 64 << 10
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(10 * chunk + 1000)  # chunk 10: 1000 bytes
        f.seek(2 * chunk + 5)
        f.write(b"x")  # chunk 2
        f.seek(6 * chunk - 2)
        f.write(b"yyyy")  # chunks 5 and 6
    backend = Local(path)
    try:
        bits = await backend.zero_chunks(chunk, budget_s=1.0)
        assert bits_to_chunks(bits, 11) == [0, 1, 3, 4, 7, 8, 9, 10] and len(bits) == 2
        assert await backend.zero_chunks(chunk, budget_s=0) == bytes(2)
        backend._is_block = True
        assert await backend.zero_chunks(chunk, budget_s=1.0) == bytes(2)
    finally:
        await backend.close()


@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300))), st.integers(1, 300))
def test_span_bits_sets_the_chunks_of_each_span_and_no_other(
    spans: list[tuple[int, int]], chunks: int
) -> None:
    spans = [(first, min(stop, chunks)) for first, stop in spans]  # (some empty)
    bits = span_bits(spans, chunks)
    assert len(bits) == -(-chunks // 8)
    assert bits_to_chunks(bits, chunks) == sorted({c for a, b in spans for c in range(a, b)})


async def test_trim_and_write_zeroes_read_back_zero(local: Local) -> None:
    await local.trim(2 * MiB, MiB)
    assert await local.read(2 * MiB, 4096) == bytes(4096)
    assert (await local.block_status(2 * MiB, MiB))[0].hole
    await local.write(0, b"\xff" * 8192)
    await local.write_zeroes(0, 8192, may_trim=False)
    assert await local.read(0, 8192) == bytes(8192)
    assert not (await local.block_status(0, 8192))[0].hole  # NO_HOLE: still allocated
    await local.write(0, b"\xff" * 8192)
    await local.write_zeroes(0, 8192, may_trim=True)
    assert await local.read(0, 8192) == bytes(8192)


async def test_clear_punches_only_where_there_is_data(
    local: Local, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hole is left as it is (no fallocate: a journal transaction saved); a range
    holding data anywhere, at its end too, or data just written and not yet flushed, is
    punched and reads zeroes."""
    punches: list[tuple[int, int]] = []
    fallocate = backend_module._fallocate

    def counted(fd: int, mode: int, offset: int, length: int) -> None:
        punches.append((offset, length))
        fallocate(fd, mode, offset, length)

    monkeypatch.setattr(backend_module, "_fallocate", counted)
    await local.clear([(0, 2 * MiB), (4 * MiB, 8 * MiB)])  # holes, one to the file's end
    assert punches == []
    await local.write(5 * MiB, b"\xff" * 4096)  # in the page cache only
    # a hole; one whose last 4 KiB are data; one inside data; one with unflushed data
    ranges = [(0, MiB), (MiB, 2 * MiB + 4096), (3 * MiB - 8192, 3 * MiB - 4096)]
    await local.clear([*ranges, (4 * MiB, 6 * MiB)])
    assert punches == [(MiB, MiB + 4096), (3 * MiB - 8192, 4096), (4 * MiB, 2 * MiB)]
    assert await local.read(2 * MiB, 4096) == bytes(4096)
    assert await local.read(3 * MiB - 8192, 4096) == bytes(4096)
    assert await local.read(5 * MiB, 4096) == bytes(4096)
    assert await local.read(2 * MiB + 4096, 4096) == b"\x5a" * 4096
    punches.clear()

    def failing(fd: int, pos: int, how: int) -> int:
        raise OSError(errno_mod.EIO, "lseek failed")

    monkeypatch.setattr(backend_module.os, "lseek", failing)  # not known: punched to be sure
    await local.clear([(0, MiB)])
    assert punches == [(0, MiB)]


async def test_read_only_and_closed_backends_answer_with_errnos(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(4096))
    backend = Local(path, read_only=True)
    assert backend.read_only
    with pytest.raises(BackendError) as failed:
        await backend.write(0, b"x")
    assert failed.value.errno is Errno.EPERM
    await backend.close()
    with pytest.raises(BackendError) as closed:
        await backend.read(0, 512)
    assert closed.value.errno is Errno.ESHUTDOWN


def test_missing_file_is_a_backend_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="cannot open"):
        Local(tmp_path / "nope.img")


@pytest.mark.parametrize(
    ("err", "errno"),
    [
        (errno_mod.ENOSPC, Errno.ENOSPC),
        (errno_mod.EDQUOT, Errno.ENOSPC),
        (errno_mod.EROFS, Errno.EPERM),
        (errno_mod.EIO, Errno.EIO),
        (errno_mod.ENXIO, Errno.EIO),
    ],
)
def test_os_errors_map_to_nbd_errnos(err: int, errno: Errno) -> None:
    assert nbd_errno(OSError(err, os.strerror(err))) is errno


class NoRoom:
    """``os.pwritev`` failing with ``err`` for its first ``times`` calls (a full or
    read-only filesystem), then writing."""

    def __init__(self, err: int, times: int) -> None:
        self.err, self.left, self.calls = err, times, 0
        self.real = os.pwritev

    def __call__(self, fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        self.calls += 1
        if self.left > 0:
            self.left -= 1
            raise OSError(self.err, os.strerror(self.err))
        return self.real(fd, buffers, offset, flags)


@pytest.mark.parametrize("err", [errno_mod.ENOSPC, errno_mod.EROFS, errno_mod.EDQUOT])
async def test_a_write_with_no_room_is_held_until_there_is_room(
    local: Local, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, err: int
) -> None:
    monkeypatch.setattr(backend_module, "SPACE_RETRY_S", 0.01)
    no_room = NoRoom(err, times=3)
    monkeypatch.setattr(os, "pwritev", no_room)
    local.inline_writes = False
    await local.write(8192, b"\x5a" * 4096)  # no error: it waited for room
    monkeypatch.undo()
    assert no_room.calls == 4
    assert await local.read(8192, 4096) == b"\x5a" * 4096
    said = [r.getMessage() for r in caplog.records if r.name == "devagent.agent.space"]
    assert len(said) == 2  # once when the hold began, once when writes went on
    assert "holding writes until there is room again" in said[0]
    assert "writes go on" in said[1]


@pytest.mark.parametrize("hold_s", [0.1, 0.0])
async def test_a_write_held_past_its_bound_fails_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hold_s: float
) -> None:
    """After the I/O timeout; at once for a migration's target (``space_hold_s=0``)."""
    monkeypatch.setattr(backend_module, "SPACE_RETRY_S", 0.02)
    no_room = NoRoom(errno_mod.ENOSPC, times=10_000)
    monkeypatch.setattr(os, "pwritev", no_room)
    (tmp_path / "t.img").write_bytes(bytes(MiB))
    local = Local(tmp_path / "t.img", inline_writes=False, space_hold_s=hold_s)
    try:
        with pytest.raises(BackendError, match="No space left on device") as failed:
            await local.write(0, b"x" * 4096)
    finally:
        await local.close()
    assert failed.value.errno is Errno.ENOSPC
    assert (no_room.calls > 1) == (hold_s > 0)


async def test_other_write_errors_are_not_held(
    local: Local, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_room = NoRoom(errno_mod.EIO, times=1)
    monkeypatch.setattr(os, "pwritev", no_room)
    local.inline_writes = False
    with pytest.raises(BackendError, match="Input/output error"):
        await local.write(0, b"x" * 4096)
    assert no_room.calls == 1
