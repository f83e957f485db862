"""The Local backend on a real file: I/O, durability paths, allocation map, errors."""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_fakes import read_bytes
from devagent.agent.backend import BackendError, Extent, Local, nbd_errno
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
