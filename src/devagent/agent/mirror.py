"""Mirror: push a live device to another backend (pre-copy storage migration, device swap).

:class:`Mirrored` is a backend the agent swaps in under a running guest, served by ``source``;
every write-class request marks its chunks in a dirty :class:`Bitmap`; ``run`` pushes dirty
chunks to ``target`` until few are left; ``finish`` (I/O quiesced) pushes the rest and flushes
the target (:func:`cutover`: quiesce, finish, point the agent at the target, resume).

The dirty bitmap means "the target may lack these bytes": all set at first (or as handed
over); the first pass clears the chunks the source reports as zero, **the target assumed
zero-filled** (``target_zeroed=False``: those ranges get ``write_zeroes`` there instead).

Ordering rules (each one is what makes a copy never leave a stale byte on the target):

1. A guest write marks its chunks dirty *after* the source has it (and also before, so an
   exported bitmap is conservative).  A copy clears a chunk's bit *before* it reads the
   source.  So a write either completed before the clear (the read sees it) or marks the
   chunk again after the clear (the next pass copies it again).
2. At most one copy of a chunk is in flight (``_copying``): two copies of one chunk could
   land on the target in the wrong order, the older bytes last.
3. Write-through (``sync=True``, an active ``run`` once converged or outrun, and every mode
   from ``finish`` on): a guest write waits for
   a copy in flight on its chunks, then holds them (``_writing``; the copier skips held
   chunks) while it writes source and target concurrently.  The copier can then never put
   older bytes on top of the guest's newer ones, and the dirty set only shrinks.  A TRIM is
   done as ``write_zeroes(may_trim=True)`` on both sides (zeroes are a valid result of a
   trim), so both read back the same.
4. Overlapping write-through requests run one after another: two in flight at once could
   land in one order on the source and in the other on the target (the guest cannot tell
   which order it gets, but both copies must get the same).
5. Flush/FUA: the target's durability is promised only by ``finish``, which flushes it after
   the last copy and before it reports FINISHED.  In write-through mode a guest FUA write is
   FUA on both sides and a guest FLUSH flushes both, so an acknowledged durable write is
   durable on both copies.

Failures: an error on the target (or reading the source for a copy) fails the *job* (FAILED,
``run``/``finish`` raise :class:`MirrorFailed`, the bitmap says what the target lacks); the
guest goes on, served by the source.  Except with ``sync=True`` (a write is acknowledged once
both copies have it): a write whose target half failed is answered EIO, unless the mirror was
abandoned (a cancel).  A write whose *source* half failed answers the source's error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable

from devagent.agent.backend import Backend, BackendError, Extent
from devagent.agent.chunks import chunk_runs, put_sparsely, zero_ranges
from devagent.agent.dirty import DirtySet
from devagent.agent.messages import MirrorStats
from devagent.agent.mirror_states import (
    TRANSITIONS,
    MirrorEvent,
    MirrorFailed,
    MirrorLog,
    MirrorState,
    MirrorStateError,
)
from devagent.agent.pace import Pace
from devagent.agent.state import Bitmap, DeviceState
from devagent.errors import StateError, UsageError
from devagent.nbd.proto import Errno

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 64 * 1024
#: Most bytes one copy moves: neighbouring dirty chunks are read and written in one request.
MAX_COPY = 1024 * 1024
#: The first pass asks ``block_status`` about this many bytes at a time.
SWEEP_WINDOW = 64 * 1024 * 1024
#: Name of the dirty bitmap in an exported :class:`DeviceState`.
DIRTY_BITMAP = "mirror-dirty"
#: An active run judges a pass behind only once it has copied this much (a pass's first
#: copies say little of the guest's write rate).
BEHIND_AFTER = 8 * 1024 * 1024


class Mirrored(Backend):
    """Serves ``source`` and mirrors it to ``target`` (see the module docstring)."""

    def __init__(
        self,
        source: Backend,
        target: Backend,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        sync: bool = False,
        parallel: int = 4,
        rate_limit: float | None = None,
        max_copy: int = MAX_COPY,
        target_zeroed: bool = True,
        dirty: Bitmap | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if source.size != target.size:
            raise UsageError(f"mirror target is {target.size} bytes, the source {source.size}")
        if parallel < 1:
            raise UsageError(f"parallel copies must be at least 1, not {parallel}")
        self.source = source
        self.target = target
        self.chunk_size = chunk_size
        self.sync = sync
        self.parallel = parallel
        #: How fast the background copy may move (``finish`` ignores it); set again live.
        self.pace = Pace(rate_limit, clock, sleep)
        self._dirty = DirtySet(source.size, chunk_size, dirty)  # checks chunk_size
        self.n_chunks = self._dirty.n_chunks
        self._max_run = max(1, max_copy // chunk_size)
        self._target_zeroed = target_zeroed
        self._clock = clock
        self._sleep = sleep
        self._swept = dirty is not None  # a handed-over set already says what the target lacks
        self._copying: set[int] = set()
        self._writing: Counter[int] = Counter()
        self._through_ranges: dict[int, tuple[int, int]] = {}  # write-through writes in flight
        self._through_seq = 0
        self._untracked_writes = 0  # source-only writes in flight (they mark after landing)
        self._through = sync  # write-through: guest writes go to both sides
        self._abandoned = False  # given up on purpose: the target's errors fail no guest write
        self._pulse = asyncio.Event()
        self._settled = asyncio.Event()
        self._sweep_lock = asyncio.Lock()
        self._running = False
        self.state = MirrorState.COPYING
        self.history: list[MirrorState] = [self.state]
        self.error: BaseException | None = None
        self.copied_bytes = 0  # the chunks copied; of them, as data (the rest as zeroes):
        self.sent_bytes = 0
        self.zeroed_bytes = 0
        self.passes = 0
        #: An active run went write-through before converging (the guest dirtied faster
        #: than the copy went, or its passes ran out): its writes go to both sides since, at
        #: the link's pace. It stays set for the job's life.
        self.writes_paced = False
        self._watch: tuple[int, int] | None = None  # a watched pass's (copied, redirtied)
        #: Set by :func:`cutover`: the agent now owns the target, ``close`` leaves it open.
        self.handed_over = False
        self.log = MirrorLog(log, {"mirror": f"{source!r} -> {target!r}"})

    def __repr__(self) -> str:
        return f"Mirrored({self.source!r} -> {self.target!r}, {self.state.value})"

    # -- state -----------------------------------------------------------------------------

    def _transition(self, event: MirrorEvent) -> None:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise MirrorStateError(f"mirror {self.state.value}: no transition on {event.value}")
        self.log.info("%s --%s--> %s", self.state.value, event.value, new.value)
        self.state = new
        self.history.append(new)
        if new is MirrorState.COPYING:
            self._settled.clear()
        else:
            self._settled.set()

    def _is(self, *states: MirrorState) -> bool:
        """``self.state in states``, read afresh (after an await the state may have moved)."""
        return self.state in states

    def _fail(self, err: BaseException, level: int = logging.ERROR) -> None:
        if self.state is MirrorState.FAILED:
            return
        self.error = err
        self._through = False  # the target is abandoned: serve the source alone
        self.log.log(level, "mirror failed: %s", err)
        self._transition(MirrorEvent.FAIL)

    def _failed_error(self) -> MirrorFailed:
        failed = MirrorFailed(f"mirror failed: {self.error}")
        failed.__cause__ = self.error
        return failed

    async def wait_converged(self) -> None:
        """Return once the job is CONVERGED or FINISHED; raise MirrorFailed if it FAILED."""
        while True:
            await self._settled.wait()
            if self.state is MirrorState.FAILED:
                raise self._failed_error()
            if self.state is not MirrorState.COPYING:
                return

    def _wake(self) -> None:
        """Wake everyone waiting for a copy or a write to end."""
        self._pulse.set()
        self._pulse = asyncio.Event()

    # -- the dirty set ---------------------------------------------------------------------

    def dirty_bitmap(self) -> Bitmap:
        """A copy of the chunks the target may lack (copies in flight count as dirty)."""
        return self._dirty.with_(self._copying)

    @property
    def dirty_bytes(self) -> int:
        return self._dirty.bytes_of(self.dirty_bitmap())

    @property
    def redirtied_bytes(self) -> int:
        """Bytes of chunks guest writes turned from clean to dirty: what the copy redoes."""
        return self._dirty.redirtied_bytes

    def export_state(self) -> DeviceState:
        """The dirty set and counters as a :class:`DeviceState` (bitmap ``mirror-dirty``)."""
        state = DeviceState(self.size, self.chunk_size)
        state.bitmaps[DIRTY_BITMAP] = self.dirty_bitmap()
        state.counters.update(
            {"mirror_copied_bytes": self.copied_bytes, "mirror_passes": self.passes}
        )
        return state

    def stats(self) -> MirrorStats:
        """A summary, as the control API shows it."""
        return MirrorStats(
            state=self.state.value,
            sync=self.sync,
            rate_limit=self.pace.rate,
            copied_bytes=self.copied_bytes,
            sent_bytes=self.sent_bytes,
            zeroed_bytes=self.zeroed_bytes,
            dirty_bytes=self.dirty_bytes,
            passes=self.passes,
            error=None if self.error is None else str(self.error),
            writes_paced=self.writes_paced,
        )

    # -- the guest's side: the Backend interface ---------------------------------------------

    @property
    def size(self) -> int:
        return self.source.size

    @property
    def read_only(self) -> bool:
        return self.source.read_only

    def read_nowait(self, offset: int, length: int) -> bytes | bytearray | None:
        return self.source.read_nowait(offset, length)

    def write_nowait(self, offset: int, data: bytes) -> bool:
        if self._through:
            return False
        if not self.source.write_nowait(offset, data):
            return False
        self._dirty.mark_written(self._dirty.chunks(offset, len(data)))  # landed: rule 1
        return True

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        return await self.source.read(offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.source.block_status(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        chunks = self._dirty.chunks(offset, len(data))
        if self._through:
            await self._write_both(offset, len(data), lambda b: b.write(offset, data, fua))
        else:
            await self._write_source(chunks, self.source.write(offset, data, fua))

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        chunks = self._dirty.chunks(offset, length)
        if self._through:
            await self._write_both(
                offset, length, lambda b: b.write_zeroes(offset, length, may_trim)
            )
        else:
            await self._write_source(chunks, self.source.write_zeroes(offset, length, may_trim))

    async def trim(self, offset: int, length: int) -> None:
        chunks = self._dirty.chunks(offset, length)
        if self._through:  # rule 3: zeroes, so both sides read back the same
            await self._write_both(offset, length, lambda b: b.write_zeroes(offset, length, True))
        else:
            await self._write_source(chunks, self.source.trim(offset, length))

    async def flush(self) -> None:
        if not self._through:
            await self.source.flush()
            return
        source, target = await asyncio.gather(
            self.source.flush(), self.target.flush(), return_exceptions=True
        )
        self._settle_both(source, target, range(0))

    async def _write_source(self, chunks: range, op: Awaitable[None]) -> None:
        self._dirty.mark_written(chunks)
        self._untracked_writes += 1
        try:
            await op
        finally:  # even a failed write may have changed part of the source
            self._dirty.mark_written(chunks)  # rule 1: after the source has it
            self._untracked_writes -= 1
            self._wake()

    async def _write_both(
        self, offset: int, length: int, op: Callable[[Backend], Awaitable[None]]
    ) -> None:
        chunks = self._dirty.chunks(offset, length)
        end = offset + length
        while any(chunk in self._copying for chunk in chunks) or any(
            start < end and offset < stop for start, stop in self._through_ranges.values()
        ):  # rules 3 and 4
            await self._pulse.wait()
        if not self._through:  # the job failed while we waited
            await self._write_source(chunks, op(self.source))
            return
        self._through_seq += 1
        token = self._through_seq
        self._through_ranges[token] = (offset, end)
        self._writing.update(chunks)
        try:
            source, target = await asyncio.gather(
                op(self.source), op(self.target), return_exceptions=True
            )
        finally:
            del self._through_ranges[token]
            self._writing.subtract(chunks)
            self._writing = +self._writing
            self._wake()
        self._settle_both(source, target, chunks)

    def _settle_both(self, source: object, target: object, chunks: range) -> None:
        """The source's error wins; a target error fails the job (and in sync mode the write)."""
        if isinstance(source, BaseException):
            if not isinstance(target, BaseException):
                self._dirty.mark(chunks)  # the target has bytes the source may not
            raise source
        if isinstance(target, asyncio.CancelledError):
            raise target
        if isinstance(target, BaseException):
            self._dirty.mark(chunks)
            self._fail(target)
            if self.sync and not self._abandoned:
                raise BackendError(f"mirror target failed: {target}", Errno.EIO) from target

    def abandon(self) -> None:
        """Given up (a cancel): the target's errors fail no guest write, even in sync mode."""
        self._abandoned = True
        self._fail(StateError("the mirror was cancelled"), logging.INFO)

    async def close(self) -> None:
        """Close the source, and the target unless :func:`cutover` handed it to the agent.
        A job not FINISHED is FAILED by this."""
        if self.state is not MirrorState.FINISHED:
            self._fail(StateError("the mirror was closed before it finished"), logging.WARNING)
        await self.source.close()
        if not self.handed_over:
            await self.target.close()

    # -- the copy job ------------------------------------------------------------------------

    async def run(
        self, *, converge_bytes: int = 0, max_passes: int = 10, active: bool = False
    ) -> bool:
        """Copy until the dirty set is at most ``converge_bytes`` (zero in sync mode).

        The first pass copies every chunk that holds data; each later pass copies what was
        dirtied meanwhile.  Returns True once CONVERGED, False if this call's ``max_passes``
        ran out (the state stays COPYING; call ``run`` again, or ``finish``).  ``passes``
        counts the passes of every call.  Raises MirrorFailed.

        ``active``: once the dirty set is that small (or the passes ran out, or a pass fell
        behind: write-through always converges), guest writes go to both sides, the last
        dirty chunks are copied and the target flushed, without holding the guest's I/O;
        only then CONVERGED. So ``finish`` has only the writes since to flush: a short hold
        whatever the disk's size. A pass falls behind when the guest dirtied over half of
        what it copied: passes would each copy half as much again; write-through, once.
        An active pass judges that as it goes (from :data:`BEHIND_AFTER` bytes copied): the
        guest's writes go through from the moment it outruns the copy, not a whole pass
        later, so it does not dirty the disk over again meanwhile.  ``writes_paced`` says
        that the guest's writes went through before the copy converged.
        """
        self._begin_run()
        limit = 0 if self.sync else converge_bytes
        self._running = True
        try:
            await self._guard(self._sweep())
            done, behind = 0, False
            while self.state is MirrorState.COPYING:
                converged = done > 0 and self.dirty_bytes <= limit
                if converged or done >= max_passes or behind:
                    if not converged:
                        self.log.info(
                            "no convergence after %d passes%s", done,
                            " (the guest dirties faster than a pass copies)" if behind else "",
                        )  # fmt: skip
                        if not active:
                            return False
                        self.writes_paced = True
                    # Write-through converges whatever the guest's write rate: the dirty set
                    # only shrinks (the guest writes at the pace of the slower copy).
                    if active:
                        await self._guard(self._drain(throttle=converged))
                        if self._is(MirrorState.FAILED):
                            break
                    self._transition(MirrorEvent.CONVERGE)
                    return True
                done += 1
                copied = await self._pass(watch=active)
                behind = active and (self.writes_paced or self.dirty_bytes * 2 > copied)
            if self._is(MirrorState.FAILED):
                raise self._failed_error()
            return not self._is(MirrorState.COPYING)
        finally:
            self._running = False

    def _begin_run(self) -> None:
        if self.state is MirrorState.FAILED:
            raise self._failed_error()
        if self._running:
            raise MirrorStateError("the mirror job is already running")
        if self.state is MirrorState.CONVERGED:
            self._transition(MirrorEvent.RECOPY)
        elif self.state is not MirrorState.COPYING:
            raise MirrorStateError(f"cannot run a mirror that is {self.state.value}")

    async def _pass(self, *, watch: bool = False) -> int:
        """Copy what is dirty once; the bytes that took.  ``watch``: go write-through as
        soon as the guest outruns the copy (:meth:`_check_pace`)."""
        self.passes, before = self.passes + 1, self.copied_bytes
        if watch and not self._through:
            self._watch = (before, self.redirtied_bytes)
        try:
            await self._guard(self._copy_pass(self._dirty.listed(), throttle=True))
        finally:
            self._watch = None
        self.log.debug("pass %d: %d bytes copied, %d dirty", self.passes, self.copied_bytes,
                       self.dirty_bytes)  # fmt: skip
        return self.copied_bytes - before

    def _check_pace(self) -> None:
        """In a watched pass: once the guest has dirtied anew over half of what the pass
        copied, its writes go to both sides from now on, at the link's pace."""
        if self._watch is None:
            return
        copied = self.copied_bytes - self._watch[0]
        dirtied = self.redirtied_bytes - self._watch[1]
        if copied < BEHIND_AFTER or dirtied * 2 <= copied:
            return
        self._watch = None
        self._through = True
        self.writes_paced = True
        self.log.info(
            "the guest dirtied %d bytes anew while the pass copied %d: its writes go to both"
            " sides from now on", dirtied, copied,
        )  # fmt: skip

    async def finish(self) -> None:
        """Make target == source and flush the target; then state FINISHED.

        Call it with the guest's I/O quiesced (see :func:`cutover`).  From its start every
        guest write goes to both sides, so the dirty set only shrinks even if some I/O still
        arrives.  After it the agent may switch to the target at any time.
        """
        if self.state is MirrorState.FAILED:
            raise self._failed_error()
        if self.state is MirrorState.FINISHED:
            return
        self._through = True
        await self._guard(self._sweep())
        await self._guard(self._drain(throttle=False))
        if self._is(MirrorState.FAILED):
            raise self._failed_error()
        self._transition(MirrorEvent.FINISH)
        self.log.info("finished: %d bytes copied in %d passes", self.copied_bytes, self.passes)

    async def _drain(self, *, throttle: bool) -> None:
        """Go write-through, copy every dirty chunk, flush the target: then target ==
        source, and stays so while writes go to both sides."""
        self._through = True
        while not self._is(MirrorState.FAILED):
            busy = self._copying.union(self._writing)
            ready = [c for c in self._dirty.listed() if c not in busy]
            if ready:
                await self._copy_pass(ready, throttle=throttle)
            elif self._copying or self._writing or self._untracked_writes:
                await self._pulse.wait()
            else:
                break
        if not self._is(MirrorState.FAILED):
            await self.target.flush()

    async def _guard(self, job: Awaitable[None]) -> None:
        """Run a piece of the job; any error fails the job and leaves as MirrorFailed."""
        try:
            await job
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._fail(err)
            raise self._failed_error() from err

    async def _sweep(self) -> None:
        """Clear the chunks the source holds as zeroes (the target starts zeroed), or zero
        them on the target.  Per window: claim the chunks and clear their bits, then ask
        ``block_status``; a write that lands after the claim marks its chunk again."""
        async with self._sweep_lock:
            if self._swept:
                return
            window = max(self.chunk_size, SWEEP_WINDOW // self.chunk_size * self.chunk_size)
            for start in range(0, self.size, window):
                length = min(window, self.size - start)
                claimed = [c for c in self._dirty.chunks(start, length) if c not in self._copying]
                self._copying.update(claimed)
                for chunk in claimed:
                    self._dirty.clear(chunk)
                try:
                    zero = await zero_ranges(self.source, start, length)
                    zero_chunks = self._dirty.within(zero)
                    self._dirty.mark(c for c in claimed if c not in zero_chunks)
                    if not self._target_zeroed:
                        for first, count in chunk_runs(sorted(zero_chunks & set(claimed))):
                            offset, n = self._dirty.span(first, count)
                            await self.target.write_zeroes(offset, n, True)
                            self.zeroed_bytes += n
                except BaseException:
                    self._dirty.mark(claimed)
                    raise
                finally:
                    self._copying.difference_update(claimed)
                    self._wake()
            self._swept = True

    async def _copy_pass(self, chunks: Iterable[int], *, throttle: bool) -> None:
        """Copy ``chunks`` (if still dirty) with ``parallel`` copies in flight."""
        todo = iter(chunks)

        async def worker() -> None:
            for chunk in todo:
                if self.state is MirrorState.FAILED:
                    return
                if throttle:
                    await self.pace.wait()
                claimed = self._claim(chunk)
                if claimed is not None:
                    await self._copy(*claimed, throttle=throttle)

        tasks = [asyncio.create_task(worker()) for _ in range(self.parallel)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                error = task.exception()
                if error is not None:
                    raise error
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _claim(self, chunk: int) -> tuple[int, int] | None:
        """Take ``chunk`` and the dirty free chunks after it (at most ``max_copy`` bytes)."""
        if not self._free_dirty(chunk):
            return None
        count = 1
        while count < self._max_run and self._free_dirty(chunk + count):
            count += 1
        self._copying.update(range(chunk, chunk + count))
        return chunk, count

    def _free_dirty(self, chunk: int) -> bool:
        return (
            chunk < self.n_chunks
            and self._dirty[chunk]
            and chunk not in self._copying
            and chunk not in self._writing
        )

    async def _copy(self, first: int, count: int, *, throttle: bool) -> None:
        chunks = range(first, first + count)
        offset, length = self._dirty.span(first, count)
        if throttle:
            self.pace.charge(length)
        sent: int | None = None
        try:
            for chunk in chunks:  # rule 1: clear before the read
                self._dirty.clear(chunk)
            sent = await put_sparsely(self.target, offset, await self.source.read(offset, length))
        finally:
            if sent is None:
                self._dirty.mark(chunks)
            self._copying.difference_update(chunks)
            self._wake()
        if throttle:  # its zero blocks went as a few bytes each
            self.pace.charge(sent - length)
        self.copied_bytes += length
        self.sent_bytes += sent
        self._check_pace()
