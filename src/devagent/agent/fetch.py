"""``Fetch``: a local replica being filled from a remote device, served as it fills.

The replica is a sparse file the size of the remote device; a presence bitmap beside it
(``<replica>.present``, one bit per chunk) says which chunks the replica holds.  A present
chunk is served from the replica only; an absent one is first copied from the remote.
Nothing is written to the remote, except while the replica has no room (spilling, below).

Requests (while the replica takes writes):

- A read of absent chunks fetches them (one remote read per run of absent chunks), stores
  them, marks them present, then answers from the replica (copy-on-read).
- A write never loses the part of a chunk it does not cover: whole absent chunks are simply
  overwritten; an absent chunk the write covers only partly is fetched, and its uncovered
  head or tail stored, before the write.  WRITE_ZEROES likewise.  TRIM is advisory: it
  punches present chunks and whole absent chunks, and leaves partly covered absent chunks to
  the remote's data (which is as good an answer as any after a trim).
- Every chunk operation that may run while a chunk is absent holds that chunk's lock
  (taken in ascending order: no deadlock), and re-checks presence once it holds it.  So
  concurrent reads of one chunk fetch it once (the second finds it present), and a fetch
  and a write of one chunk are ordered: a fetch can never overwrite a newer write.  Present
  chunks never go absent again, so requests on present chunks take no lock at all.
- The locked part of a request runs as its own task, shielded from cancellation: the thread
  pool finishes a write whatever happens to the coroutine that asked for it, so a lock must
  not be released before the write is really done.

Spilling. A replica whose filesystem is full or went read-only (a write of the replica fails
with ENOSPC, EDQUOT or EROFS: :class:`NoRoom`) does not fail the guest, nor hold it: the
Fetch *spills*, serving the guest from the remote by remote access until there is room:

- the copier stops filling; present chunks are no longer served lock-free, and the mode
  changes once the lock-free writes in flight have ended;
- a write goes to the remote, its range locked: the present chunks it touches are written
  back to the remote first (the replica may hold newer bytes), then the write goes there,
  then those chunks are forgotten (absent again: read from the remote from now on);
- a read takes present chunks from the replica and absent ones from the remote, storing
  nothing; a TRIM is dropped (it is advisory); a FLUSH flushes the remote too;
- every second a probe file beside the replica asks for a chunk's room; once it gets it the
  Fetch fills again (after the spilled writes in flight end), and the chunks forgotten
  meanwhile are fetched back like any absent chunk.

So the guest never sees the full disk, and the remote always holds every byte the replica
does not.

Durability (what survives an agent kill, a host crash): :mod:`devagent.agent.presence`.
The background copier (``start_copier``) walks the absent chunks in order with a few workers
(``copy_workers`` batches of ``copy_batch`` bytes in flight: enough to fill a LAN link, few
enough that an on-demand fetch queued behind them on the same connection waits little),
yields to on-demand fetches (it waits while any is pending), keeps an optional rate limit,
and asks the remote's ``block_status`` which ranges are zeroes: those chunks are punched in
the replica (a no-op on a fresh sparse file; it also clears anything a crash left between a
data write and its bit) and marked present without any data crossing the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from devagent.agent.backend import Backend, BackendError, Extent, Local, NoRoom
from devagent.agent.chunks import (
    ChunkLocks,
    DemandGate,
    EarlyRead,
    Pacer,
    RemoteZeroes,
    log_lost_store,
)
from devagent.agent.messages import FetchStatus
from devagent.agent.presence import HEADER_SIZE as HEADER_SIZE  # a lab test reads it here
from devagent.agent.presence import PresenceMap
from devagent.agent.presence import presence_path as presence_path  # the daemon's import
from devagent.errors import UsageError

log = logging.getLogger(__name__)

T = TypeVar("T")

FETCH_MAX = 8 << 20
ROOM_PROBE_S = 1.0  # how often a spilling Fetch asks whether its replica has room again


def _runs(chunks: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Sorted chunk indexes as (first, last) runs of consecutive ones."""
    first = last = -2
    for index in sorted(chunks):
        if index != last + 1:
            if last >= 0:
                yield first, last
            first = index
        last = index
    if last >= 0:
        yield first, last


def _make_replica(path: Path, size: int) -> bool:
    """Create the sparse replica if it is new (True), else check its size (False)."""
    if not path.exists() or path.stat().st_size == 0:
        with path.open("wb") as f:
            f.truncate(size)
        return True
    if path.stat().st_size != size:
        raise UsageError(f"replica {path} is {path.stat().st_size} bytes, the remote {size}")
    return False


class _Count:
    """Operations in flight, and an event set while there are none."""

    def __init__(self) -> None:
        self.n = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        self.n += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.n -= 1
            if not self.n:
                self.idle.set()


class Fetch(Backend):
    """A replica file filled from ``remote`` on demand and in the background."""

    def __init__(
        self,
        replica_path: str | Path,
        remote: Backend,
        *,
        chunk_size: int = 64 * 1024,
        rate_limit: float | None = None,
        copy_workers: int = 2,
        copy_batch: int = 1 << 20,
        sync_batch: int = 256,
        sync_interval: float = 1.0,
        seed: Sequence[int] = (),
    ) -> None:
        if chunk_size < 4096 or chunk_size & (chunk_size - 1) or chunk_size > FETCH_MAX:
            raise UsageError(f"chunk size must be a power of two in 4 KiB..8 MiB: {chunk_size}")
        self.path = Path(replica_path)
        self.remote = remote
        self.chunk_size = chunk_size
        self._size = remote.size
        self.copy_workers = max(1, copy_workers)
        self._batch_chunks = max(1, copy_batch // chunk_size)
        self.sync_batch = sync_batch
        self.sync_interval = sync_interval
        self._pacer = Pacer(rate_limit) if rate_limit else None
        self.rate_limit = rate_limit
        fresh = _make_replica(self.path, self._size)
        self._map = PresenceMap(presence_path(self.path), self._size, chunk_size, fresh=fresh)
        self._local = Local(self.path, space_hold_s=0)  # no room: NoRoom at once (we spill)
        self._locks = ChunkLocks()
        self.demand = DemandGate()  # on-demand fetches first (its counts say who waits)
        self._unsynced: set[int] = set()
        self._sync_lock = asyncio.Lock()
        self._sync_task: asyncio.Task[None] | None = None
        self._sync_timer: asyncio.TimerHandle | None = None
        self._all_present = asyncio.Event()
        if self._map.count == self._map.n_chunks:
            self._all_present.set()
        self._jobs: set[asyncio.Task[Any]] = set()
        self._copier: asyncio.Task[None] | None = None
        self._cursor = 0
        self._zeroes = RemoteZeroes(remote)
        self._closed = False
        self.fetched_on_demand = 0
        self.fetched_in_background = 0
        self.skipped_as_zero = 0
        # Spilling (see the module docstring): why, since when, how much; the fast path's
        # writes in flight and the spilled ones, each counted so a mode change waits for them.
        self.spilling: str | None = None
        self.spilled_bytes = 0
        self._room = asyncio.Event()
        self._room.set()
        self._room_prober: asyncio.Task[None] | None = None
        self._fast = True  # present chunks served lock-free
        self._fast_writes = _Count()
        self._spill_writes = _Count()
        self._remote_unflushed = False
        self._remote_writes = 0  # spilled writes so far: a zero map asked before one is old
        self.log = log.getChild(self.path.name)
        self._seed(seed, fresh)

    def _seed(self, seed: Sequence[int], fresh: bool) -> None:
        if self._map.new and seed:
            # Chunks some other means put in the replica already (a mirror's push before a
            # switchover): present now, durable after the next sync, exactly like fetched
            # ones. Only into a new bitmap: a restarted agent trusts what its file says.
            self._mark_fetched([c for c in seed if 0 <= c < self._map.n_chunks])
        counts = (self._map.count, self._map.n_chunks, " (new)" if fresh else "")
        self.log.info(
            "replica %s of %r: %d of %d chunks present%s", self.path, self.remote, *counts
        )

    def __repr__(self) -> str:
        return f"Fetch({str(self.path)!r}, {self.remote!r})"

    # -- progress --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def complete(self) -> bool:
        return self._map.count == self._map.n_chunks

    @property
    def present_bytes(self) -> int:
        return self._map.present_bytes

    @property
    def copier_running(self) -> bool:
        return self._copier is not None and not self._copier.done()

    def lock_users(self, index: int) -> int:
        """Requests holding chunk ``index``'s lock or waiting for it."""
        return self._locks.users(index)

    async def settle(self) -> None:
        """Return once the locked work under way has ended (a read answered early may still
        be storing its chunks)."""
        while self._jobs:
            await asyncio.gather(*list(self._jobs), return_exceptions=True)

    async def wait_complete(self) -> None:
        """Return once every chunk is present and durable (replica and bitmap synced)."""
        await self._all_present.wait()
        await self.flush()

    def status(self) -> FetchStatus:
        remote_status = getattr(self.remote, "status", None)
        return FetchStatus(
            path=str(self.path),
            size=self._size,
            chunk_size=self.chunk_size,
            present_bytes=self.present_bytes,
            complete=self.complete,
            fetched_on_demand_bytes=self.fetched_on_demand,
            fetched_in_background_bytes=self.fetched_in_background,
            skipped_as_zero_bytes=self.skipped_as_zero,
            copier=self.copier_running,
            rate_limit=self.rate_limit,
            remote=remote_status() if callable(remote_status) else repr(self.remote),
            spilling=self.spilling,
            spilled_bytes=self.spilled_bytes,
        )

    # -- chunk arithmetic --------------------------------------------------------------------

    def _span(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self._size)

    def _chunks(self, offset: int, length: int) -> range:
        if length <= 0:
            return range(0)
        return range(offset // self.chunk_size, (offset + length - 1) // self.chunk_size + 1)

    def _absent(self, offset: int, length: int) -> list[int]:
        if self._all_present.is_set():
            return []
        return [c for c in self._chunks(offset, length) if not self._map.is_present(c)]

    def _covers(self, index: int, offset: int, length: int) -> bool:
        start, end = self._span(index)
        return offset <= start and end <= offset + length

    # -- marking -----------------------------------------------------------------------------

    def _mark_fetched(self, chunks: Sequence[int]) -> None:
        """Fetched data is in the replica: serve it now, persist its bits after a sync."""
        self._map.mark_present(chunks)
        self._unsynced.update(chunks)
        self._after_mark()
        if len(self._unsynced) >= self.sync_batch:
            self._kick_sync()
        elif self._sync_timer is None and self._unsynced:
            loop = asyncio.get_running_loop()
            self._sync_timer = loop.call_later(self.sync_interval, self._kick_sync)

    def _mark_written(self, chunks: Sequence[int]) -> None:
        """A guest write completed these chunks: persist their bits at once."""
        self._map.mark_present(chunks)
        self._persist(chunks)
        self._after_mark()

    def _persist(self, chunks: Sequence[int]) -> None:
        self._map.persist(chunks)
        self._unsynced.difference_update(chunks)

    def _persist_written(self, offset: int, length: int) -> None:
        """A write went to present chunks; any whose bit still waits for a sync gets it now."""
        if self._unsynced:
            waiting = [c for c in self._chunks(offset, length) if c in self._unsynced]
            if waiting:
                self._persist(waiting)

    def _after_mark(self) -> None:
        if self.complete and not self._all_present.is_set():
            self._all_present.set()
            self.log.info("replica %s is complete (%d bytes)", self.path, self._size)

    def _kick_sync(self) -> None:
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.create_task(self._sync_quietly())

    async def _sync_quietly(self) -> None:
        try:
            await self._sync_fetched()
        except BackendError as err:
            self.log.warning("syncing the replica failed: %s (will retry)", err)
            if self._sync_timer is None and not self._closed:
                loop = asyncio.get_running_loop()
                self._sync_timer = loop.call_later(self.sync_interval, self._kick_sync)

    async def _sync_fetched(self, *, bitmap_too: bool = False) -> None:
        """fdatasync the replica, then persist the bits of the chunks fetched before it."""
        async with self._sync_lock:
            pending = list(self._unsynced)
            if pending or bitmap_too:
                await self._local.flush()
                self._persist(pending)
            if bitmap_too:
                await asyncio.to_thread(self._map.sync)

    # -- running locked work safely ----------------------------------------------------------

    async def _guarded(self, work: Awaitable[T]) -> T:
        """Run ``work`` (which holds chunk locks) to its end even if our caller is cancelled."""
        task = asyncio.ensure_future(work)
        self._jobs.add(task)
        task.add_done_callback(self._job_done)
        return await asyncio.shield(task)

    def _job_done(self, task: asyncio.Task[Any]) -> None:
        self._jobs.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the awaiting caller, if any, got it too

    async def _fetch_store(self, chunks: Sequence[int], early: EarlyRead | None = None) -> int:
        """Copy ``chunks`` (locked, absent) from the remote into the replica; bytes moved.
        ``early`` gets its bytes as soon as a fetched piece holds them all."""

        async def one(start: int, end: int) -> int:
            data = await self.remote.read(start, end - start)
            if early is not None:
                early.offer(start, data)
            await self._local.write(start, bytes(data))
            return end - start

        pieces: list[tuple[int, int]] = []
        for first, last in _runs(chunks):
            start, end = self._span(first)[0], self._span(last)[1]
            for pos in range(start, end, FETCH_MAX):
                pieces.append((pos, min(pos + FETCH_MAX, end)))
        results = await asyncio.gather(*(one(s, e) for s, e in pieces), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return sum(r for r in results if isinstance(r, int))

    # -- requests ----------------------------------------------------------------------------

    def read_nowait(self, offset: int, length: int) -> bytes | bytearray | None:
        if self._absent(offset, length):
            return None
        return self._local.read_nowait(offset, length)

    def write_nowait(self, offset: int, data: bytes) -> bool:
        """Inline only where every chunk is present with its bit durable already (nothing to
        persist after the write)."""
        chunks = self._chunks(offset, len(data))
        if (
            not self._fast
            or self._absent(offset, len(data))
            or (self._unsynced and any(c in self._unsynced for c in chunks))
        ):
            return False
        return self._local.write_nowait(offset, data)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """Copy-on-read.  The answer leaves as soon as the remote's bytes are here: storing
        them goes on under the chunks' locks, so anything after this read is ordered after
        the store."""
        absent = self._absent(offset, length)
        if not absent:
            return await self._local.read(offset, length)
        if self.spilling is not None:
            return await self._guarded(self._read_through(offset, length))
        early = EarlyRead(offset, length)
        job = asyncio.ensure_future(self._guarded(self._fill(absent, early)))
        racing: set[asyncio.Future[Any]] = {early.future, job}
        try:
            await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            job.cancel()  # only our wait on the guarded work: the work itself goes on
            raise
        if early.future.done():
            job.add_done_callback(log_lost_store)
            return early.future.result()
        try:
            await job
        except NoRoom:  # the replica filled up meanwhile: spilling now
            return await self._guarded(self._read_through(offset, length))
        return await self._local.read(offset, length)

    async def _fill(self, chunks: Sequence[int], early: EarlyRead | None = None) -> None:
        with self.demand.counted():
            async with self._locks.hold(chunks):
                missing = [c for c in chunks if not self._map.is_present(c)]
                if missing:
                    if early is not None and len(missing) != len(chunks):
                        early = None  # part of the range is in the replica already
                    try:
                        moved = await self._fetch_store(missing, early)
                    except NoRoom as err:
                        await self._spill(err)
                        raise
                    self.fetched_on_demand += moved
                    self._mark_fetched(missing)

    async def _read_through(self, offset: int, length: int) -> bytes:
        """While spilling: present chunks from the replica, absent ones from the remote
        (their locks held: a fetch or a spilled write of one is ordered with this read)."""
        async with self._locks.hold(self._absent(offset, length)):
            parts = [
                await (self._local if present else self.remote).read(start, stop - start)
                for start, stop, present in self._pieces(offset, length)
            ]
        return b"".join(bytes(p) for p in parts)

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``[offset, offset+length)`` cut where presence changes: (start, stop, present)."""
        pieces: list[tuple[int, int, bool]] = []
        end = offset + length
        for index in self._chunks(offset, length):
            start, stop = max(offset, self._span(index)[0]), min(end, self._span(index)[1])
            present = self._map.is_present(index)
            if pieces and pieces[-1][2] == present and pieces[-1][1] == start:
                pieces[-1] = (pieces[-1][0], stop, present)
            else:
                pieces.append((start, stop, present))
        return pieces

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._write(offset, len(data), lambda to: to.write(offset, data))
        if fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        await self._write(offset, length, lambda to: to.write_zeroes(offset, length, may_trim))

    async def _write(
        self, offset: int, length: int, op: Callable[[Backend], Awaitable[None]]
    ) -> None:
        """``op`` writes [offset, offset+length) on the backend it is given: the replica
        when every chunk is present (lock-free), else under the chunks' locks
        (:meth:`_write_locked`); a replica with no room spills."""
        if self._fast and not self._absent(offset, length):
            try:
                with self._fast_writes.counted():
                    await op(self._local)
                self._persist_written(offset, length)
                return
            except NoRoom as err:
                await self._spill(err)
        await self._guarded(self._write_locked(offset, length, op))

    async def _write_locked(
        self, offset: int, length: int, op: Callable[[Backend], Awaitable[None]]
    ) -> None:
        chunks = list(self._chunks(offset, length))
        partial = [
            c for c in chunks if not self._map.is_present(c) and not self._covers(c, offset, length)
        ]
        counted = partial and self.spilling is None
        with self.demand.counted() if counted else contextlib.nullcontext():
            async with self._locks.hold(chunks):
                if self.spilling is None:
                    try:
                        await self._write_replica(offset, length, op)
                        return
                    except NoRoom as err:
                        await self._spill(err)
                await self._write_remote(chunks, offset, length, op)

    async def _write_replica(
        self, offset: int, length: int, op: Callable[[Backend], Awaitable[None]]
    ) -> None:
        """(Locked.) Store the parts of partly covered absent chunks that ``op`` does not
        write, then run it on the replica."""
        still = [c for c in self._chunks(offset, length) if not self._map.is_present(c)]
        await asyncio.gather(
            *(self._store_uncovered(c, offset, length)
              for c in still if not self._covers(c, offset, length))
        )  # fmt: skip
        await op(self._local)
        self._mark_written(still)
        self._persist_written(offset, length)

    async def _write_remote(
        self,
        chunks: Sequence[int],
        offset: int,
        length: int,
        op: Callable[[Backend], Awaitable[None]],
    ) -> None:
        """(Locked, spilling.) The present chunks go back to the remote, the write goes
        there, and those chunks are forgotten."""
        with self._spill_writes.counted():
            present = [c for c in chunks if self._map.is_present(c)]
            for first, last in _runs(present):
                start, end = self._span(first)[0], self._span(last)[1]
                for pos in range(start, end, FETCH_MAX):
                    stop = min(pos + FETCH_MAX, end)
                    data = await self._local.read(pos, stop - pos)
                    await self.remote.write(pos, bytes(data))
            self._remote_unflushed = True
            self._remote_writes += 1
            self._zeroes.forget()
            await op(self.remote)
            if present:
                self._map.forget(present)
                self._unsynced.difference_update(present)
                self._all_present.clear()
            self.spilled_bytes += length

    async def _store_uncovered(self, index: int, offset: int, length: int) -> None:
        start, end = self._span(index)
        data = await self.remote.read(start, end - start)
        self.fetched_on_demand += end - start
        if start < offset:
            await self._local.write(start, bytes(data[: offset - start]))
        if offset + length < end:
            await self._local.write(offset + length, bytes(data[offset + length - start :]))

    async def trim(self, offset: int, length: int) -> None:
        """Advisory: dropped while spilling, or when the replica has no room to punch."""
        if self.spilling is not None:
            return
        absent = self._absent(offset, length)
        try:
            if not absent and self._fast:
                with self._fast_writes.counted():
                    await self._local.trim(offset, length)
                self._persist_written(offset, length)
                return
            await self._guarded(self._trim_locked(offset, length, absent))
        except NoRoom as err:
            await self._spill(err)

    async def _trim_locked(self, offset: int, length: int, absent: Sequence[int]) -> None:
        async with self._locks.hold(absent):
            # punch present chunks and whole absent ones; partly covered absent ones keep
            # the remote's data (a trimmed range may read back as anything)
            targets = [
                c
                for c in self._chunks(offset, length)
                if self._map.is_present(c) or self._covers(c, offset, length)
            ]
            for first, last in _runs(targets):
                start = max(offset, self._span(first)[0])
                end = min(offset + length, self._span(last)[1])
                await self._local.trim(start, end - start)
            chosen = set(targets)
            whole = [c for c in absent if not self._map.is_present(c) and c in chosen]
            self._mark_written(whole)
            self._persist_written(offset, length)

    async def flush(self) -> None:
        """The replica and its bitmap synced; and the remote flushed when spilled writes
        went there. A replica that refuses while spilling (read-only) is logged: its
        bytes are the page cache's until there is room again."""
        if self._remote_unflushed:
            self._remote_unflushed = False
            try:
                await self.remote.flush()
            except BaseException:
                self._remote_unflushed = True
                raise
        try:
            await self._sync_fetched(bitmap_too=True)
        except (BackendError, OSError) as err:
            if self.spilling is None:
                raise
            self.log.warning("replica %s: flush failed while spilling: %s", self.path, err)

    # -- spilling ----------------------------------------------------------------------------

    async def _spill(self, err: NoRoom) -> None:
        """The replica has no room: serve the guest from the remote until it has (see the
        module docstring). Returns once no lock-free write is in flight."""
        if self.spilling is None:
            self.spilling = str(err)
            self._room.clear()
            self._fast = False
            self.log.warning(
                "replica %s has no room (%s): the guest's I/O goes to %r by remote access, "
                "and the replica stops filling, until there is room again "
                "(free some space, or remount the filesystem read-write)",
                self.path, err, self.remote,
            )  # fmt: skip
            if self._room_prober is None or self._room_prober.done():
                self._room_prober = asyncio.create_task(self._await_room())
        await self._fast_writes.idle.wait()

    async def _await_room(self) -> None:
        """Every :data:`ROOM_PROBE_S`, ask for a chunk's room beside the replica; once
        given, fill again (after the spilled writes in flight)."""
        began = time.monotonic()
        while not self._closed:
            await asyncio.sleep(ROOM_PROBE_S)
            if await asyncio.to_thread(self._has_room):
                break
        else:
            return
        self.spilling = None
        await self._spill_writes.idle.wait()
        self._fast = True
        self._room.set()
        if self._copier is not None and self._copier.done() and not self.complete:
            self.start_copier()  # it had ended (the replica was complete) before the spill
        self.log.warning(
            "replica %s has room again after %.1f s: it fills again (%d bytes spilled to the "
            "remote so far)", self.path, time.monotonic() - began, self.spilled_bytes,
        )  # fmt: skip

    def _has_room(self) -> bool:
        probe = self.path.with_name(f".{self.path.name}.room")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.chunk_size)
            finally:
                os.close(fd)
                probe.unlink()
        except OSError:
            return False
        return True

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """From the replica where present, from the remote where absent (possibly shorter
        than asked when the remote answers short)."""
        out: list[Extent] = []
        pos, end = offset, offset + length
        while pos < end:
            index = pos // self.chunk_size
            present = self._map.is_present(index)
            stop = self._span(index)[1]
            while stop < end and self._map.is_present(stop // self.chunk_size) == present:
                stop = self._span(stop // self.chunk_size)[1]
            stop = min(stop, end)
            source: Backend = self._local if present else self.remote
            extents = await source.block_status(pos, stop - pos)
            got = 0
            for extent in extents:
                take = min(extent.length, stop - pos - got)
                if take <= 0:
                    break
                out.append(Extent(take, extent.hole, extent.zero))
                got += take
            if got < stop - pos:
                break
            pos = stop
        return out

    # -- the background copier ---------------------------------------------------------------

    def start_copier(self) -> None:
        if self._closed or self.copier_running:
            return
        self._copier = asyncio.create_task(self._copy())

    async def stop_copier(self) -> None:
        copier, self._copier = self._copier, None
        if copier is not None and not copier.done():
            copier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await copier

    async def _copy(self) -> None:
        started = time.monotonic()
        before = self.fetched_in_background
        self._cursor = 0
        workers = [asyncio.create_task(self._copy_worker()) for _ in range(self.copy_workers)]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        await self._sync_fetched(bitmap_too=True)
        took = time.monotonic() - started
        moved = self.fetched_in_background - before
        self.log.info(
            "copier done in %.2f s: %d bytes fetched (%.1f MB/s), %d skipped as zero",
            took,
            moved,
            moved / took / 1e6 if took > 0 else 0.0,
            self.skipped_as_zero,
        )

    def _next_batch(self) -> list[int] | None:
        n = self._map.n_chunks
        index = self._cursor
        while index < n and self._map.is_present(index):
            index += 1
        batch: list[int] = []
        while index < n and len(batch) < self._batch_chunks and not self._map.is_present(index):
            batch.append(index)
            index += 1
        self._cursor = index
        return batch or None

    async def _copy_worker(self) -> None:
        while True:
            await self._room.wait()
            await self.demand.wait_idle()
            batch = self._next_batch()
            if batch is None:
                if self._room.is_set() and self.complete:
                    return
                self._cursor = 0  # chunks spilled behind the cursor: round again
                continue
            delay = 0.05
            while True:
                try:
                    await self._guarded(self._copy_batch(batch))
                    break
                except NoRoom as err:
                    await self._spill(err)
                    await self._room.wait()
                except BackendError as err:
                    self.log.warning(
                        "copier: chunks %d..%d: %s (retrying in %.2f s)",
                        batch[0],
                        batch[-1],
                        err,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    async def _copy_batch(self, batch: Sequence[int]) -> None:
        writes = self._remote_writes
        zero = set(await self._zeroes.chunks(batch, self._span))
        data_bytes = sum(
            self._span(c)[1] - self._span(c)[0]
            for c in batch
            if c not in zero and not self._map.is_present(c)
        )
        if self._pacer is not None and data_bytes:
            await self._pacer.take(data_bytes)
        await self.demand.wait_idle()
        async with self._locks.hold(batch):
            missing = [c for c in batch if not self._map.is_present(c)]
            if not missing:
                return
            if writes != self._remote_writes:  # a spilled write since: the zeroes are old
                zero = set()
            fetch = [c for c in missing if c not in zero]
            for first, last in _runs([c for c in missing if c in zero]):
                start, end = self._span(first)[0], self._span(last)[1]
                await self._local.write_zeroes(start, end - start, True)
                self.skipped_as_zero += end - start
            if fetch:
                moved = await self._fetch_store(fetch)
                self.fetched_in_background += moved
            self._mark_fetched(missing)

    # -- closing -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the copier, let locked work end, persist what is synced, close everything
        (the remote too)."""
        if self._closed:
            return
        self._closed = True
        if self._room_prober is not None:
            self._room_prober.cancel()
        await self.stop_copier()
        await self.remote.close()  # pending fetches fail at once instead of waiting
        if self._jobs:
            await asyncio.gather(*list(self._jobs), return_exceptions=True)
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        if self._sync_task is not None:
            await asyncio.gather(self._sync_task, return_exceptions=True)
        try:
            await self._sync_fetched(bitmap_too=True)
        except BackendError as err:
            self.log.warning("final sync of %s failed: %s", self.path, err)
        await self._local.close()
        self._map.close()
        self.log.info("closed: %d of %d bytes present", self.present_bytes, self._size)
