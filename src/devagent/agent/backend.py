"""Backends: where a device's bytes really go.

``Backend`` is the small interface the agent drives (and tests fake); ``Local`` puts the bytes
in a file or block device on this host.

Where the I/O runs, and why:

* Reads are first tried on the event loop with ``preadv2(RWF_NOWAIT)``: the kernel answers
  only from the page cache and otherwise refuses with EAGAIN, so this never blocks.  What it
  cannot serve goes to a thread pool.
* Small (<= 64 KiB) page-aligned writes without FUA are done on the loop (``write_nowait``):
  they only copy into the page cache.  They can still block (dirty-page throttling, the
  filesystem journal), so one that takes over 10 ms turns inline writes off for 2 s; a slow
  device costs the loop at most one short stall per cooldown.  Measured on this 2-core host,
  the thread hop it saves halves the 4 KiB write rate (``RWF_NOWAIT`` buffered writes, which
  would make this exact, are refused by ext4 here).  ``Local(inline_writes=False)`` turns it
  off.
* Everything else runs in the pool: other writes, FUA writes (``RWF_DSYNC``: durable before
  the reply), flushes (``fdatasync``), hole punching, ``SEEK_DATA``/``SEEK_HOLE`` scans.
  Calls made in one loop iteration share a pool job, so a burst costs one thread hop.

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
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from devagent.agent.presence import span_bits
from devagent.agent.space import HOLD_S as SPACE_HOLD_S
from devagent.agent.space import RETRY_S as SPACE_RETRY_S
from devagent.agent.space import SpaceHold, is_space_error
from devagent.errors import DevagentError, StateError
from devagent.nbd.proto import Errno

log = logging.getLogger(__name__)

T = TypeVar("T")
_Future = asyncio.Future[Any]
_Job = tuple[str, Callable[[], Any], _Future]
#: Most calls one pool job runs; a larger burst is spread over several workers.
BATCH_MAX = 8


def _settle(results: list[tuple[_Future, Any, BaseException | None]]) -> None:
    for future, value, error in results:
        if future.cancelled():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
#: Largest write done inline on the event loop (see ``Local.write_nowait``).
INLINE_MAX = 64 * 1024
#: An inline write slower than this turns inline writes off for INLINE_COOLDOWN seconds.
INLINE_STALL = 0.010
INLINE_COOLDOWN = 2.0
#: Zero buffer size for write_zeroes when the kernel cannot zero a range itself.
ZERO_CHUNK = 1024 * 1024


class BackendError(DevagentError):
    """A backend operation failed; ``errno`` is the NBD error to reply with."""

    def __init__(self, message: str, errno: Errno = Errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno


class NoRoom(BackendError):
    """A write found the disk under a backend full or read-only (ENOSPC, EDQUOT, EROFS)
    and was not held (``space_hold_s`` 0, or held that long already)."""


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


def cannot_open(path: Path, err: OSError) -> DevagentError:
    """Why a backend's file cannot be opened. A filesystem full or read-only is a state of
    this host (:class:`StateError`, a 409: asking again at once will not help, and a
    migration's commit rolls back at once rather than retry); anything else a backend
    error."""
    if is_space_error(err):
        return StateError(f"cannot open {path}: {err.strerror}")
    return BackendError(f"cannot open {path}: {err.strerror}", nbd_errno(err))


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

    @property
    def answers_sparsely(self) -> bool:
        """A remote whose server sends a read's zeroes as hole chunks: reading a range that
        is mostly zeroes costs only its data (:meth:`read_pieces`)."""
        return False

    def read_nowait(self, offset: int, length: int) -> bytes | bytearray | None:
        """The bytes at once if they can be had without blocking, else None (then use read)."""
        return None

    def write_nowait(self, offset: int, data: bytes) -> bool:
        """Write at once if that cannot block for long; False if not done (then start_write)."""
        return False

    def start_write(self, offset: int, data: bytes, fua: bool = False) -> asyncio.Future[Any]:
        """Start a write; the future is done when ``write`` would have returned.

        A backend with its own completion machinery overrides this to spare a task per
        request; the default wraps ``write`` in one.
        """
        return asyncio.ensure_future(self.write(offset, data, fua))

    @abstractmethod
    async def read(self, offset: int, length: int) -> bytes | bytearray: ...

    async def read_pieces(self, offset: int, length: int) -> list[tuple[int, bytes]]:
        """A read as its data pieces (offset, bytes), in order, disjoint; what reads zeroes
        may be left out (from a remote that answers sparsely it is)."""
        return [(offset, bytes(await self.read(offset, length)))]

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

    def __init__(
        self,
        path: str | Path,
        *,
        read_only: bool = False,
        workers: int = 4,
        inline_writes: bool = True,
        space_hold_s: float = SPACE_HOLD_S,
    ) -> None:
        self.path = Path(path)
        self._read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags)
        except OSError as err:
            raise cannot_open(self.path, err) from err
        self._is_block = stat.S_ISBLK(os.fstat(self._fd).st_mode)
        self._size = os.lseek(self._fd, 0, os.SEEK_END)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="local-io")
        self._closed = False
        self._batch: list[_Job] = []
        self.inline_writes = inline_writes
        self._inline_off_until = 0.0
        self._space = SpaceHold(str(self.path), space_hold_s)  # writes waiting for room

    def __repr__(self) -> str:
        return f"Local({str(self.path)!r})"

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    def _submit(self, what: str, fn: Callable[[], Any], *, alone: bool = False) -> _Future:
        """Run ``fn`` in the pool; the future fails with BackendError.  Calls made in one loop
        iteration share one pool job (one thread hop for a burst of requests); ``alone``
        keeps a slow call (fdatasync, FUA) from holding up a batch."""
        loop = asyncio.get_running_loop()
        future: _Future = loop.create_future()
        if self._closed:
            future.set_exception(BackendError(f"{self!r} is closed", Errno.ESHUTDOWN))
        elif alone:
            self._pool.submit(self._run_batch, loop, [(what, fn, future)])
        else:
            self._batch.append((what, fn, future))
            if len(self._batch) == 1:
                loop.call_soon(self._dispatch, loop)
        return future

    async def _run(self, what: str, fn: Callable[[], T], *, alone: bool = False) -> T:
        result: T = await self._submit(what, fn, alone=alone)
        return result

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._batch = self._batch, []
        if self._closed:  # closed between the call and this callback
            closed = BackendError(f"{self!r} is closed", Errno.ESHUTDOWN)
            _settle([(future, None, closed) for _, _, future in batch])
            return
        for start in range(0, len(batch), BATCH_MAX):
            self._pool.submit(self._run_batch, loop, batch[start : start + BATCH_MAX])

    def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        """In a pool thread: run the calls, then settle their futures in one loop wake-up.
        A call that failed for want of room is held (:mod:`.space`), not failed."""
        results: list[tuple[_Future, Any, BaseException | None]] = []
        for job in batch:
            what, fn, future = job
            try:
                results.append((future, fn(), None))
            except OSError as err:
                if is_space_error(err) and not self._read_only:
                    loop.call_soon_threadsafe(self._hold, loop, job, err)
                    continue
                failed = BackendError(f"{what} on {self.path}: {err.strerror}", nbd_errno(err))
                results.append((future, None, failed))
            except Exception as err:
                results.append((future, None, err))
        loop.call_soon_threadsafe(self._settle, results)

    def _settle(self, results: list[tuple[_Future, Any, BaseException | None]]) -> None:
        if self._space.holding:
            for future, _, _ in results:
                self._space.done(id(future))
        _settle(results)

    def _hold(self, loop: asyncio.AbstractEventLoop, job: _Job, err: OSError) -> None:
        """On the loop: try ``job`` again in a while, or fail it once held too long."""
        what, _, future = job
        if future.cancelled() or self._closed:
            self._space.done(id(future))
            _settle([(future, None, BackendError(f"{self!r} is closed", Errno.ESHUTDOWN))])
        elif self._space.failed(id(future), err):
            loop.call_later(SPACE_RETRY_S, self._retry, loop, job)
        else:
            message = f"{what} on {self.path}: {err.strerror}"
            _settle([(future, None, NoRoom(message, nbd_errno(err)))])

    def _retry(self, loop: asyncio.AbstractEventLoop, job: _Job) -> None:
        if self._closed:
            self._hold(loop, job, OSError(errno_mod.ESHUTDOWN, "closed"))
        else:
            self._pool.submit(self._run_batch, loop, [job])

    def read_nowait(self, offset: int, length: int) -> bytearray | None:
        """The bytes if the page cache holds them all (never blocks), else None."""
        if self._closed or not length:
            return None
        buf = bytearray(length)
        try:
            done = os.preadv(self._fd, [buf], offset, os.RWF_NOWAIT)
        except OSError:
            return None
        return buf if done == length else None

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        if self._closed:  # never touch the fd number: it may belong to another file now
            raise BackendError(f"{self!r} is closed", Errno.ESHUTDOWN)
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

    def write_nowait(self, offset: int, data: bytes) -> bool:
        """A small page-aligned buffered write, inline, while inline writes stay fast.

        Such a write only copies into the page cache (full pages: no read-modify-write).  It
        can still block, on dirty-page throttling or the filesystem journal: a write that
        takes over ``INLINE_STALL`` turns inline writes off for ``INLINE_COOLDOWN`` seconds,
        so a slow device costs the loop at most one short stall per cooldown.
        """
        n = len(data)
        if not self.inline_writes or self._closed or self._read_only or n > INLINE_MAX:
            return False
        start = time.monotonic()
        if (offset | n) & 4095 or start < self._inline_off_until:
            return False
        try:
            done = os.pwrite(self._fd, data, offset)
        except OSError:
            return False  # let the pool path redo it and report the error
        took = time.monotonic() - start
        if took > INLINE_STALL:
            self._inline_off_until = start + took + INLINE_COOLDOWN
            log.info(
                "%r: inline write took %.1f ms; inline writes off for %.0f s",
                self,
                took * 1000,
                INLINE_COOLDOWN,
            )
        return done == n  # a short write is finished by the pool path

    def _require_writable(self, what: str) -> None:
        if self._read_only:
            raise BackendError(f"{what} on read-only {self.path}", Errno.EPERM)

    def start_write(self, offset: int, data: bytes, fua: bool = False) -> asyncio.Future[Any]:
        """The write as a pool job, without a task: the agent's fast path for WRITE."""
        if self._read_only:
            future: _Future = asyncio.get_running_loop().create_future()
            future.set_exception(BackendError(f"write on read-only {self.path}", Errno.EPERM))
            return future
        flags = os.RWF_DSYNC if fua else 0

        def write_all() -> None:
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwritev(self._fd, [view[done:]], offset + done, flags)

        return self._submit("write", write_all, alone=fua)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self.start_write(offset, data, fua)

    async def flush(self) -> None:
        await self._run("flush", lambda: os.fdatasync(self._fd), alone=True)

    async def trim(self, offset: int, length: int) -> None:
        self._require_writable("trim")

        def punch() -> None:
            try:
                _fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as err:  # trim is a hint: a device that cannot discard ignores it
                if err.errno not in (errno_mod.EOPNOTSUPP, errno_mod.ENOSYS):
                    raise

        await self._run("trim", punch)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        self._require_writable("write_zeroes")
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

    async def clear(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Make each (start, end) range read zeroes, doing nothing where it is a hole already
        (a fresh sparse replica's absent chunks are): a punch is a journal transaction, and
        on ext4 it waits for any commit under way (an ``fdatasync``'s), up to 100 ms here.
        One look at the file for all of them (one hop to the I/O thread), then a punch of
        each range holding data. Nothing may write the ranges meanwhile (the caller holds
        their chunks' locks). It trusts ``SEEK_DATA`` to see data still in the page cache,
        as ext4, xfs, btrfs and tmpfs do."""
        self._require_writable("clear")
        if not ranges:
            return
        holding = await self._run(
            "clear", lambda: [(s, e) for s, e in ranges if not self._is_hole(s, e - s)]
        )
        for start, end in holding:
            await self.write_zeroes(start, end - start, True)

    def _is_hole(self, offset: int, length: int) -> bool:
        """(In a pool thread.) Whether the range is all hole (False: not known)."""
        if self._is_block:
            return False
        try:
            return os.lseek(self._fd, offset, os.SEEK_DATA) >= offset + length
        except OSError as err:  # ENXIO: no data after offset; any other: punch to be sure
            return err.errno == errno_mod.ENXIO

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if self._is_block:
            return [Extent(length)]
        return await self._run("block_status", lambda: self._scan(offset, length))

    async def zero_chunks(self, chunk_size: int, budget_s: float) -> bytes:
        """Bits (chunk ``i``: bit ``i & 7`` of byte ``i >> 3``) of the ``chunk_size`` chunks
        wholly in a hole of the file: they read zeroes. The file's extents are walked from
        its start for ``budget_s`` at most (past it, in a file of very many extents,
        nothing more is set: not known); none of a block device."""
        chunks = -(-self._size // chunk_size)
        deadline = time.monotonic() + budget_s
        return await self._run("zero_chunks", lambda: span_bits(
            self.hole_chunks(0, self._size, chunk_size, deadline), chunks
        ))  # fmt: skip

    def hole_chunks(
        self, offset: int, length: int, chunk_size: int, deadline: float | None = None
    ) -> list[tuple[int, int]]:
        """The ``[first, stop)`` spans of the ``chunk_size`` chunks of the range that lie
        wholly in a hole of the file (its short last chunk too), as far as the walk got by
        ``deadline`` (``time.monotonic()``; None: the whole range); none of a block device.
        It blocks (an ``lseek`` or two per extent): in a pool thread, or a few at a
        replica's start."""
        if self._is_block:
            return []
        spans, pos = [], offset
        for extent in self._scan(offset, length, deadline):
            end = pos + extent.length
            if extent.hole:
                stop = -(-end // chunk_size) if end == self._size else end // chunk_size
                spans.append((-(-pos // chunk_size), stop))
            pos = end
        return spans

    def _scan(self, offset: int, length: int, deadline: float | None = None) -> list[Extent]:
        """The range's extents, in order; past ``deadline`` those found so far."""
        end = offset + length
        extents: list[Extent] = []
        pos = offset
        while pos < end and (deadline is None or time.monotonic() < deadline):
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
        # Jobs already queued (a last fdatasync) finish first; wait off the loop.
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        os.close(self._fd)
