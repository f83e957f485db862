"""The background copier of a :class:`~devagent.agent.fetch.Fetch` (``start_copier``).

It walks the absent chunks in order with a few workers (``copy_workers`` batches of
``copy_batch`` bytes in flight: enough to fill a LAN link, few enough that an on-demand
fetch queued behind them on the same connection waits little), yields to on-demand fetches
(it waits while any is pending), keeps an optional rate limit, and asks the remote's
``block_status`` which ranges are zeroes: those chunks are cleared in the replica (nothing
done where the replica has a hole already, as a fresh sparse file has; else punched, which
clears anything a crash left between a data write and its bit) and marked present without
any data crossing the network, a whole hole in a few big batches; of a chunk only partly
zero, only the data is read (the rest stored as zeroes).

A disk the guest wrote 4 KiB of here and there is mostly such chunks. From a remote that
answers reads sparsely (its server sends holes as hole chunks: devagent's agent and QEMU
do; the copier learns it once, reading a few zeroes), a batch takes as many chunks as
hold ``copy_batch`` bytes of data, spanning up to :data:`SPARSE_SPAN`, and reads each run of
them in one request: a per-piece read, lock and store cost more than the link's time for
the piece.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

from devagent.agent.backend import BackendError, NoRoom
from devagent.agent.chunks import data_parts
from devagent.agent.replica import Replica, runs
from devagent.wait import all_of

#: The most chunks the copier takes at once where the remote reads zeroes (256 MiB of
#: 64 KiB chunks): each batch is a clear, a mark and a share of the syncs, and a 1 GiB disk
#: holding 64 MiB of data is mostly such chunks.
ZERO_RUN_CHUNKS = 4096
#: The most bytes one batch of a copy from a remote that answers reads sparsely spans (64
#: chunks of 64 KiB; a bigger chunk alone): a guest request on any of them waits for it.
SPARSE_SPAN = 4 << 20
SPARSE_PROBE = 64 * 1024  # zeroes read once to learn whether the remote answers sparsely


class Copier(Replica):
    """A replica with a background copier; :class:`~devagent.agent.fetch.Fetch` adds the
    requests and the spill."""

    async def _spill(self, err: NoRoom) -> None:
        """The replica has no room: serve by remote access until it has (Fetch's)."""
        raise NotImplementedError

    # -- copying -----------------------------------------------------------------------------

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
            "copier done in %.2f s: %d bytes fetched (%.1f MB/s), %d skipped as zero; "
            "%d fetched on demand, %.2f s of the %d workers' time spent waiting for them",
            took,
            moved,
            moved / took / 1e6 if took > 0 else 0.0,
            self.skipped_as_zero,
            self.fetched_on_demand,
            self.demand.yielded_s,
            self.copy_workers,
        )

    def _next_batch(self) -> tuple[list[int], bool] | None:
        """The next absent chunks from the cursor, and whether they are a hole: where the
        remote's last answer says they read zeroes, up to :data:`ZERO_RUN_CHUNKS` (one
        clear and one mark for a whole hole, not one per batch); else ``copy_batch`` bytes
        of them, or, from a remote that answers reads sparsely, as many as hold
        ``copy_batch`` bytes of data, spanning up to :data:`SPARSE_SPAN`. A batch steps
        over present chunks within its span: a region where a hybrid push or the guest made
        every other chunk present is copied in batches of many, not one chunk at a time."""
        n = self._map.n_chunks
        index = self._cursor
        while index < n and self._map.is_present(index):
            index += 1
        most, hole, budget = self._batch_chunks, False, None
        if index < n:
            start = self._span(index)[0]
            zero_chunks = (self._zeroes.zero_until(start) - start) // self.chunk_size
            if zero_chunks > most:
                most, hole = min(ZERO_RUN_CHUNKS, zero_chunks), True
            elif self._sparse:
                most = max(1, SPARSE_SPAN // self.chunk_size)
                budget = self._batch_chunks * self.chunk_size
        batch: list[int] = []
        end = min(n, index + most)
        while index < end:
            if not self._map.is_present(index):
                if budget is not None:
                    budget -= self._data_bytes(index)
                    if batch and budget < 0:
                        break
                batch.append(index)
            index += 1
        self._cursor = index
        return (batch, hole) if batch else None

    def _data_bytes(self, index: int) -> int:
        """What chunk ``index`` holds besides zeroes, by the remote's last answer."""
        return self._data_in(*self._span(index))

    def _data_in(self, start: int, end: int) -> int:
        """What ``start``..``end`` holds besides zeroes, by the remote's last answer."""
        return sum(e - s for s, e in data_parts(start, end, self._zeroes.zeroes_within(start, end)))

    async def _copy_worker(self) -> None:
        while True:
            await self.spill.room.wait()
            await self.demand.wait_idle()
            batch = self._next_batch()
            if batch is None:
                if self.spill.room.is_set() and self.complete:
                    return
                self._cursor = 0  # chunks spilled behind the cursor: round again
                continue
            delay = 0.05
            while True:
                try:
                    await self._guarded(self._copy_batch(*batch))
                    break
                except NoRoom as err:
                    await self._spill(err)
                    await self.spill.room.wait()
                except BackendError as err:
                    self.log.warning(
                        "copier: chunks %d..%d: %s (retrying in %.2f s)",
                        batch[0][0],
                        batch[0][-1],
                        err,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    async def _copy_batch(self, batch: Sequence[int], hole: bool = False) -> None:
        writes = self.spill.remote_writes
        zero = set(await self._zeroes.chunks(batch, self._span))
        if self._pacer is not None:
            data = sum(self._data_in(start, end) for start, end in self._byte_runs(batch))
            if data:  # (a hole's batch waits for nobody)
                await self._pacer.take(data)
        if self._sparse is None:
            await self._learn_sparse(batch)
        await self.demand.wait_idle()
        async with self._locks.hold(batch):
            missing = [c for c in batch if not self._map.is_present(c)]
            if not missing:
                return
            known = writes == self.spill.remote_writes  # else a spilled write made them old
            if not known:
                zero = set()
            fetch = [c for c in missing if c not in zero]
            if hole and fetch:  # a hole no more: its data are fetched on the next round
                missing = [c for c in missing if c in zero]
                fetch = []
            spans = self._spans(missing, fetch) if known and self._sparse else []
            inside = {c for first, last in spans for c in range(first, last + 1)}
            zeroed = self._byte_runs([c for c in missing if c in zero and c not in inside])
            await self._local.clear(zeroed + [self._run_span(*span) for span in spans])
            self.skipped_as_zero += sum(end - start for start, end in zeroed)
            if spans:
                for moved, length in await all_of(*(self._fetch_span(*s) for s in spans)):
                    self.fetched_in_background += moved
                    self.skipped_as_zero += length - moved
            elif fetch:
                partly = self._zeroes.zeroes_within if known else None
                moved = await self._fetch_store(fetch, known_zero=partly)
                self.fetched_in_background += moved
                self.skipped_as_zero += sum(b - a for a, b in map(self._span, fetch)) - moved
            self._mark_fetched(missing)

    async def _learn_sparse(self, batch: Sequence[int]) -> None:
        """Once, at the copy's first zeroes: does the remote answer a read's holes as hole
        chunks? A read of :data:`SPARSE_PROBE` of them tells (at worst they cross)."""
        start, end = self._run_span(batch[0], batch[-1])
        for first, last in self._zeroes.zeroes_within(start, end):
            if last - first >= SPARSE_PROBE:
                self._sparse = False  # while the one probe is out
                try:
                    await self.remote.read_pieces(first, SPARSE_PROBE)
                except BackendError:
                    self._sparse = None  # no answer: a later batch asks again
                    return
                self._sparse = self.remote.answers_sparsely
                self.log.info("the remote answers reads sparsely: %s", self._sparse)
                return

    def _spans(self, missing: Sequence[int], fetch: Sequence[int]) -> list[tuple[int, int]]:
        """Where a batch holding chunks only partly data is read whole from a remote that
        answers reads sparsely: one request per run of its missing chunks (first and last
        chunk to fetch of each); none where every chunk to fetch is all data."""
        if not fetch or all(self._data_bytes(c) == self.chunk_size for c in fetch):
            return []
        wanted = set(fetch)
        spans = []
        for first, last in runs(missing):
            inner = [c for c in range(first, last + 1) if c in wanted]
            if inner:
                spans.append((inner[0], inner[-1]))
        return spans
