"""Backends: where a device's bytes really go.

``Backend`` is the small interface the agent drives (and tests fake); ``Local`` puts the bytes
in a file or block device on this host.

I/O stays off the event loop, with one exception that cannot block: a read is first tried
inline with ``preadv2(RWF_NOWAIT)``, which the kernel answers only from the page cache and
otherwise refuses with EAGAIN; whatever it could not serve goes to a thread pool.  Writes
(``RWF_NOWAIT`` buffered writes are not supported on every filesystem), FUA writes
(``RWF_DSYNC``: durable before the reply), flushes (``fdatasync``), hole punching and
``SEEK_DATA``/``SEEK_HOLE`` scans always run in the pool.

Errors leave a backend as :class:`BackendError` carrying the NBD errno to answer with.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno as errno_mod
import logging
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from devagent.errors import DevagentError
from devagent.nbd.proto import Errno

log = logging.getLogger(__name__)

T = TypeVar("T")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
#: Zero buffer size for write_zeroes when the kernel cannot zero a range itself.
ZERO_CHUNK = 1024 * 1024


class BackendError(DevagentError):
    """A backend operation failed; ``errno`` is the NBD error to reply with."""

    def __init__(self, message: str, errno: Errno = Errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno


_ERRNO_MAP = {
    errno_mod.EPERM: Errno.EPERM,
    errno_mod.EACCES: Errno.EPERM,
    errno_mod.EROFS: Errno.EPERM,
    errno_mod.ENOSPC: Errno.ENOSPC,
    errno_mod.EDQUOT: Errno.ENOSPC,
    errno_mod.EFBIG: Errno.ENOSPC,
    errno_mod.EINVAL: Errno.EINVAL,
    errno_mod.ENOMEM: Errno.ENOMEM,
    errno_mod.EOPNOTSUPP: Errno.ENOTSUP,
}


def nbd_errno(err: OSError) -> Errno:
    """The NBD errno that best tells a client about ``err`` (section "Error values")."""
    return _ERRNO_MAP.get(err.errno or 0, Errno.EIO)


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes with one allocation status (``base:allocation``)."""

    length: int
    hole: bool = False
    zero: bool = False

    @property
    def nbd_flags(self) -> int:
        return (1 if self.hole else 0) | (2 if self.zero else 0)


class Backend(ABC):
    """Where a device's bytes go.  All offsets and lengths are already checked against
    ``size`` by the caller."""

    @property
    @abstractmethod
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool:
        return False

    @abstractmethod
    async def read(self, offset: int, length: int) -> bytes | bytearray: ...

    @abstractmethod
    async def write(self, offset: int, data: bytes, fua: bool = False) -> None: ...

    @abstractmethod
    async def flush(self) -> None: ...

    @abstractmethod
    async def trim(self, offset: int, length: int) -> None: ...

    @abstractmethod
    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None: ...

    @abstractmethod
    async def block_status(self, offset: int, length: int) -> list[Extent]: ...

    @abstractmethod
    async def close(self) -> None: ...


_libc: ctypes.CDLL | None = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Local(Backend):
    """A file or block device on this host."""

    def __init__(self, path: str | Path, *, read_only: bool = False, workers: int = 4) -> None:
        self.path = Path(path)
        self._read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags)
        except OSError as err:
            raise BackendError(f"cannot open {self.path}: {err.strerror}", nbd_errno(err)) from err
        self._is_block = stat.S_ISBLK(os.fstat(self._fd).st_mode)
        self._size = os.lseek(self._fd, 0, os.SEEK_END)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="local-io")
        self._closed = False

    def __repr__(self) -> str:
        return f"Local({str(self.path)!r})"

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        if self._closed:
            raise BackendError(f"{self!r} is closed", Errno.ESHUTDOWN)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except OSError as err:
            raise BackendError(f"{what} on {self.path}: {err.strerror}", nbd_errno(err)) from err

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        buf = bytearray(length)
        done = 0
        if length:
            try:  # page-cache hit: served inline without blocking the loop
                done = os.preadv(self._fd, [buf], offset, os.RWF_NOWAIT)
            except BlockingIOError:
                done = 0
            except OSError as err:
                if err.errno != errno_mod.EOPNOTSUPP:
                    raise BackendError(
                        f"read on {self.path}: {err.strerror}", nbd_errno(err)
                    ) from err
        if done < length:
            view = memoryview(buf)[done:]

            def rest() -> int:
                got = done
                while got < length:
                    n = os.preadv(self._fd, [view[got - done :]], offset + got)
                    if n == 0:
                        raise OSError(errno_mod.EIO, "short read (device shrank?)")
                    got += n
                return got

            await self._run("read", rest)
        return buf

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        flags = os.RWF_DSYNC if fua else 0

        def write_all() -> None:
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwritev(self._fd, [view[done:]], offset + done, flags)

        await self._run("write", write_all)

    async def flush(self) -> None:
        await self._run("flush", lambda: os.fdatasync(self._fd))

    async def trim(self, offset: int, length: int) -> None:
        def punch() -> None:
            try:
                _fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as err:  # trim is a hint: a device that cannot discard ignores it
                if err.errno not in (errno_mod.EOPNOTSUPP, errno_mod.ENOSYS):
                    raise

        await self._run("trim", punch)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if may_trim else FALLOC_FL_ZERO_RANGE

        def zero() -> None:
            try:
                _fallocate(self._fd, mode, offset, length)
                return
            except OSError as err:
                if err.errno not in (errno_mod.EOPNOTSUPP, errno_mod.ENOSYS, errno_mod.EINVAL):
                    raise
            zeros = bytes(min(length, ZERO_CHUNK))
            done = 0
            while done < length:
                n = min(len(zeros), length - done)
                done += os.pwrite(self._fd, zeros[:n], offset + done)

        await self._run("write_zeroes", zero)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if self._is_block:
            return [Extent(length)]
        return await self._run("block_status", lambda: self._scan(offset, length))

    def _scan(self, offset: int, length: int) -> list[Extent]:
        end = offset + length
        extents: list[Extent] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno_mod.ENXIO:  # no data after pos: hole to the end
                    data = end
                elif err.errno in (errno_mod.EINVAL, errno_mod.EOPNOTSUPP):
                    return [Extent(length)]
                else:
                    raise
            if data > pos:
                stop = min(data, end)
                extents.append(Extent(stop - pos, hole=True, zero=True))
                pos = stop
                continue
            hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
            stop = min(hole, end)
            extents.append(Extent(stop - pos))
            pos = stop
        return extents

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        os.close(self._fd)
