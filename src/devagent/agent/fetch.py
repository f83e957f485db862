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
  and a write of one chunk are ordered: a fetch can never overwrite a newer write.  While
  the replica takes writes, present chunks never go absent again, so requests on present
  chunks take no lock at all (a spill forgets chunks: then writes lock them all, below).
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
The background copier: :mod:`devagent.agent.copier`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from devagent.agent.backend import Backend, BackendError, Extent, NoRoom
from devagent.agent.chunks import (
    EarlyRead,
    log_lost_store,
)
from devagent.agent.copier import Copier
from devagent.agent.presence import HEADER_SIZE as HEADER_SIZE  # a lab test reads it here
from devagent.agent.presence import presence_path as presence_path  # the daemon's import
from devagent.agent.replica import FETCH_MAX, runs
from devagent.agent.spill import no_room
from devagent.errors import StateError


class NotWhole(StateError):
    """The replica cannot be served alone: chunks are absent, or it has no room."""


class Fetch(Copier):
    """A replica file filled from ``remote`` on demand and in the background."""

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
            not self.spill.fast
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
        if self.spill.fast and not self._absent(offset, length):
            try:
                with self.spill.fast_writes.counted():
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
                while self.spilling is None:  # (the spill may end while _spill waits)
                    try:
                        await self._write_replica(offset, length, op)
                        return
                    except NoRoom as err:
                        await self._spill(err)
                await self._write_remote(chunks, offset, length, op)  # counted at once

    async def _write_replica(
        self, offset: int, length: int, op: Callable[[Backend], Awaitable[None]]
    ) -> None:
        """(Locked.) Store the parts of partly covered absent chunks that ``op`` does not
        write, then run it on the replica."""
        still = [c for c in self._chunks(offset, length) if not self._map.is_present(c)]
        # All end before the locks go, failed or not: none may land late.
        stored = await asyncio.gather(
            *(
                self._store_uncovered(c, offset, length)
                for c in still
                if not self._covers(c, offset, length)
            ),
            return_exceptions=True,
        )
        for result in stored:
            if isinstance(result, BaseException):
                raise result
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
        with self.spill.spilled_writes.counted():
            # A lock-free write that began before the spill may still be landing in one of
            # these chunks: the write-back must read it.
            await self.spill.fast_writes.idle.wait()
            present = [c for c in chunks if self._map.is_present(c)]
            for start, end in self._byte_runs(present):
                for pos in range(start, end, FETCH_MAX):
                    stop = min(pos + FETCH_MAX, end)
                    data = await self._local.read(pos, stop - pos)
                    await self.remote.write(pos, bytes(data))
            self.spill.remote_unflushed = True
            self.spill.remote_writes += 1
            self._zeroes.forget()
            await op(self.remote)
            self.spill.remote_writes += 1  # a zero map asked during the write is old too
            self._zeroes.forget()
            if present:
                self._map.forget(present)
                self._unsynced.difference_update(present)
                self._all_present.clear()
            self.spill.bytes += length

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
            if not absent and self.spill.fast:
                with self.spill.fast_writes.counted():
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
            for first, last in runs(targets):
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
        async with self._remote_flush:  # a second FLUSH waits for the first's, then looks
            if self.spill.remote_unflushed:
                self.spill.remote_unflushed = False
                try:
                    await self.remote.flush()
                except BaseException:
                    self.spill.remote_unflushed = True
                    raise
        try:
            await self._sync_fetched(bitmap_too=True)
        except (BackendError, OSError) as err:
            if self.spilling is None:
                raise
            self.log.warning("replica %s: flush failed while spilling: %s", self.path, err)

    async def require_whole(self) -> None:
        """Raise :class:`NotWhole` unless the replica can be served alone, as ``Local``:
        every chunk present and its bit durable (a sync now, for chunks fetched since the
        last), none spilled, and room for a chunk beside it (a probe file). A filesystem
        found full or read-only before a write met it makes the Fetch spill now, saying why
        (a migration's source then waits for room, or keeps a read-only one's disk, rather
        than let it go)."""
        if self.spilling is not None:
            raise NotWhole(f"replica {self.path} is not whole: {self.spilling}")
        if not self.complete:
            raise NotWhole(f"replica {self.path} is not complete")
        problem = await asyncio.to_thread(no_room, self.path, self.chunk_size, "whole")
        if problem is not None:
            await self._spill(NoRoom(f"replica {self.path}: {problem.strerror}"))
            raise NotWhole(f"replica {self.path} is not whole: {self.spilling}")
        if self._unsynced:  # fetched lately: their bits wait for the next sync; now
            try:
                await self._sync_fetched()
            except BackendError as err:
                raise NotWhole(
                    f"replica {self.path}: its bits cannot be made durable: {err}"
                ) from err

    # -- spilling ----------------------------------------------------------------------------

    async def write_back(self) -> int:
        """(Spilling.) Every chunk the replica holds goes back to the remote and is
        forgotten, a run at a time under its chunks' locks (the guest's I/O goes on: while
        spilling it goes to the remote, and nothing becomes present): the remote then holds
        every byte, and the disk can be served from the remote alone. Returns the bytes
        written back."""
        if self.spilling is None:
            raise StateError(
                f"replica {self.path} takes writes: its chunks are handed back only while it "
                "spills (a replica with no room)"
            )
        moved = 0
        present = [c for c in range(self._map.n_chunks) if self._map.is_present(c)]
        batch = max(1, FETCH_MAX // self.chunk_size)
        for first, last in runs(present):
            for start in range(first, last + 1, batch):
                chunks = list(range(start, min(start + batch, last + 1)))
                moved += await self._guarded(self._write_back(chunks))
        await self.flush()  # the remote's copy made durable
        return moved

    async def _write_back(self, chunks: Sequence[int]) -> int:
        """(As a spilled write, :meth:`_write_remote`: counted, the zero map forgotten.)"""
        async with self._locks.hold(chunks):
            with self.spill.spilled_writes.counted():
                await self.spill.fast_writes.idle.wait()
                present = [c for c in chunks if self._map.is_present(c)]
                moved = 0
                self.spill.remote_writes += 1
                self._zeroes.forget()
                for start, end in self._byte_runs(present):
                    data = await self._local.read(start, end - start)
                    await self.remote.write(start, bytes(data))
                    moved += end - start
                self.spill.remote_writes += 1
                self._zeroes.forget()
                if present:
                    self.spill.remote_unflushed = True
                    self._map.forget(present)
                    self._unsynced.difference_update(present)
                    self._all_present.clear()
                return moved

    async def _spill(self, err: NoRoom) -> None:
        """The replica has no room: serve the guest from the remote until it has (see the
        module docstring and :mod:`.spill`)."""
        await self.spill.enter(err, self.remote, on_room=self._room_again)

    def _room_again(self) -> None:
        if self._copier is not None and self._copier.done() and not self.complete:
            self.start_copier()  # it had ended (the replica was complete) before the spill

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

    # -- closing -----------------------------------------------------------------------------

    async def close(self, *, remote_too: bool = True) -> None:
        """Stop the copier, let locked work end, persist what is synced, close everything
        (the remote too, unless ``remote_too`` is False: a Fetch given up before it served,
        whose remote is still its agent's backend)."""
        if self._closed:
            return
        self._closed = True
        self.spill.close()
        await self.stop_copier()
        if self.spill.remote_unflushed:  # spilled writes: durable on the remote before it goes
            try:
                await self.remote.flush()
            except BackendError as err:
                self.log.error("flushing the spilled writes on %r failed: %s", self.remote, err)
        if remote_too:  # pending fetches fail at once instead of waiting (else, a Fetch
            await self.remote.close()  # that never served, they are few: they end as usual)
        if self._jobs:
            await asyncio.gather(*list(self._jobs), return_exceptions=True)
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        if self._sync_task is not None:
            await asyncio.gather(self._sync_task, return_exceptions=True)
        try:
            await self._sync_fetched(bitmap_too=True)
        except (BackendError, OSError) as err:
            self.log.warning("final sync of %s failed: %s", self.path, err)
        await self._local.close()
        self._map.close()
        self.log.info("closed: %d of %d bytes present", self.present_bytes, self._size)
