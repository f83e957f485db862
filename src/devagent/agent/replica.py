"""The replica side of a :class:`~devagent.agent.fetch.Fetch`: the sparse file, its presence
bitmap (:mod:`devagent.agent.presence`), the chunk arithmetic, marking chunks present and
syncing their bits, running locked work to its end, and the spill's state
(:mod:`devagent.agent.spill`). The copier is :mod:`devagent.agent.copier`'s; the requests
and what a spill does to them are :class:`~devagent.agent.fetch.Fetch`'s own."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from devagent.agent.backend import Backend, BackendError, Local
from devagent.agent.chunks import (
    ChunkLocks,
    DemandGate,
    EarlyRead,
    Pacer,
    RemoteZeroes,
    data_parts,
)
from devagent.agent.defaults import COPY_BATCH, COPY_WORKERS
from devagent.agent.messages import FetchStatus
from devagent.agent.presence import PresenceMap, bits_to_chunks, presence_path, span_bits
from devagent.agent.spill import Spill
from devagent.errors import UsageError
from devagent.wait import all_of

log = logging.getLogger("devagent.agent.fetch")

T = TypeVar("T")

FETCH_MAX = 8 << 20
#: The longest a new replica looks for its own holes at its start (the guest, paused, waits
#: for it): a fresh sparse file is one hole, a pushed one a hole between each pushed run.
ZERO_CHECK_S = 0.02


def runs(chunks: Sequence[int]) -> Iterator[tuple[int, int]]:
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


def _int(bits: bytes | bytearray, n_bytes: int) -> int:
    """The first ``n_bytes`` of ``bits`` (padded with zeroes) as one integer, chunk 0 its
    lowest bit."""
    return int.from_bytes(bits[:n_bytes].ljust(n_bytes, b"\0"), "little")


class Replica(Backend):
    """A replica file filled from ``remote``: the state :class:`Fetch` serves from."""

    def __init__(
        self,
        replica_path: str | Path,
        remote: Backend,
        *,
        chunk_size: int = 64 * 1024,
        rate_limit: float | None = None,
        copy_workers: int = COPY_WORKERS,
        copy_batch: int = COPY_BATCH,
        sync_batch: int = 256,
        sync_interval: float = 1.0,
        seed: Sequence[int] | bytes = (),
        zeroes: bytes = b"",
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
        self._sparse: bool | None = None  # the remote answers reads sparsely (None: not seen)
        self._closed = False
        self.fetched_on_demand = 0
        self.fetched_in_background = 0
        self.skipped_as_zero = 0
        self.log = log.getChild(self.path.name)
        self.spill = Spill(self.path, chunk_size, self.log)  # the state while it has no room
        self._remote_flush = asyncio.Lock()  # one flush of spilled writes at a time
        self._seed(seed, fresh, zeroes)

    def _seed(self, seed: Sequence[int] | bytes, fresh: bool, zeroes: bytes) -> None:
        """Only into a new bitmap (a restarted agent trusts what its file says): the chunks
        that read zeroes on both sides (``zeroes``, the remote's holes, where the replica
        has a hole too), present and durable at once; then those some other means put in
        the replica already (``seed``: a mirror's push before a switchover), present now
        and durable after the next sync, exactly like fetched ones. All bits at once, in
        whole bytes: the guest waits for this."""
        n_chunks, n_bytes, zero_count = self._map.n_chunks, len(self._map.present), 0
        if self._map.new and zeroes:
            deadline = time.monotonic() + ZERO_CHECK_S  # (past it: fetched, as before)
            here = self._local.hole_chunks(0, self._size, self.chunk_size, deadline)
            both = _int(zeroes, n_bytes) & _int(span_bits(here, n_chunks), n_bytes)
            zero_count = both.bit_count()
            self._map.mark_present_bits(both.to_bytes(n_bytes, "little"))
            self._map.persist_present()
            self._after_mark()  # (complete already, for a disk that is all hole)
        if self._map.new and seed:
            bits = seed if isinstance(seed, bytes) else span_bits(
                ((c, c + 1) for c in seed if 0 <= c < n_chunks), n_chunks
            )  # fmt: skip
            new = _int(bits, n_bytes) & ~_int(self._map.present, n_bytes)
            self._map.mark_present_bits(bits)
            self._fetched(bits_to_chunks(new.to_bytes(n_bytes, "little"), n_chunks))
        counts = (self._map.count, n_chunks, zero_count, " (new)" if fresh else "")
        self.log.info(
            "replica %s of %r: %d of %d chunks present (%d as zeroes on both sides)%s",
            self.path, self.remote, *counts,
        )  # fmt: skip

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
    def spilling(self) -> str | None:
        """Why the replica takes no writes now (None: it takes them)."""
        return self.spill.reason

    @property
    def spilled_bytes(self) -> int:
        return self.spill.bytes

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

    def _run_span(self, first: int, last: int) -> tuple[int, int]:
        """The bytes of chunks ``first``..``last``."""
        return self._span(first)[0], self._span(last)[1]

    def _byte_runs(self, chunks: Sequence[int]) -> list[tuple[int, int]]:
        """The bytes of each run of consecutive chunks among ``chunks``."""
        return [self._run_span(first, last) for first, last in runs(chunks)]

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
        self._fetched(chunks)

    def _fetched(self, chunks: Sequence[int]) -> None:
        """(Marked present already.) Their bits persisted after a sync."""
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

    async def _fetch_span(self, first: int, last: int) -> tuple[int, int]:
        """Copy chunks ``first``..``last`` (locked, absent) in one read from a remote that
        answers reads sparsely: a few KiB of data here and there over many chunks cross as
        themselves and hole chunks, one request, not one per piece. The caller cleared the
        span (:meth:`Local.clear`): its data are written. The bytes of data, and the
        span's."""
        start, end = self._run_span(first, last)
        pieces = await self.remote.read_pieces(start, end - start)
        moved = sum(len(data) for _, data in pieces)  # (disjoint: the client saw to it)
        await all_of(*(self._local.write(at, data) for at, data in pieces))
        return moved, end - start

    async def _fetch_store(
        self,
        chunks: Sequence[int],
        early: EarlyRead | None = None,
        known_zero: Callable[[int, int], list[tuple[int, int]]] | None = None,
    ) -> int:
        """Copy ``chunks`` (locked, absent) from the remote into the replica; bytes read
        from the remote. ``early`` gets its bytes as soon as a fetched piece holds them all.
        The ranges ``known_zero(start, end)`` names are not read: stored as zeroes (a chunk
        the guest wrote 4 KiB of on a sparse disk crosses the link as 4 KiB)."""

        async def one(start: int, end: int) -> int:
            parts = [(start, end)]
            if known_zero is not None:
                parts = data_parts(start, end, known_zero(start, end))
            if parts == [(start, end)]:
                data = await self.remote.read(start, end - start)
                if early is not None:
                    early.offer(start, data)
                await self._local.write(start, bytes(data))
                return end - start
            piece = bytearray(end - start)
            reads = [self.remote.read(s, e - s) for s, e in parts]
            for (s, e), got in zip(parts, await all_of(*reads), strict=True):
                piece[s - start : e - start] = got
            await self._local.write(start, bytes(piece))
            return sum(e - s for s, e in parts)

        pieces: list[tuple[int, int]] = []
        for start, end in self._byte_runs(chunks):
            for pos in range(start, end, FETCH_MAX):
                pieces.append((pos, min(pos + FETCH_MAX, end)))
        return sum(await all_of(*(one(s, e) for s, e in pieces)))
