"""How a hybrid push shares the link with QEMU's RAM migration: RAM first, the push takes
what RAM leaves, measured as it goes.

The RAM decides the switchover, so it may take the whole link (its bandwidth is the link's
rate). On a link no faster than :data:`EARLY_PUSH_MAX_BPS` the push starts while the
destination's QEMU starts (an early prepare) and has the whole link until RAM starts: there
the link, not the two cores, bounds the migration, and it would idle. From RAM's start the
push has :data:`START_SHARE` of the link, and stays there until RAM has moved its first
bytes (before that nothing is known of it). On a faster link the push does not start
before RAM: it begins only once RAM leaves it :data:`BEGIN_SHARE` of the link
(:data:`BEGIN_LOOKS` looks in a row), and not at all if RAM fills the link until the
switchover (beside such a RAM stream a push gains nothing, and its start and its copies
cost RAM's phase more than the bytes they move). Every :data:`EVERY_S` the RAM's rate over
the last :data:`WINDOW_S` (``query-migrate``'s bytes transferred, which the RAM follower
keeps in the job's progress) sets the push to what is left, less
:data:`HEADROOM` of the link so that a RAM stream that could go faster finds room to, and
at least :data:`FLOOR_SHARE`. A RAM migration that moves less than half the link (its
guest dirties little, its pages are mostly zeroes) leaves the push what it does not use of
that half; one that reaches half the link leaves it the floor. The headroom is wide
because the push costs the RAM more than its bytes' time on the link: it takes CPU from
the QEMU that sends the RAM (reading, TLS on both ends). On two cores at 1 Gbit/s, RAM's
phase grew by about 20 ms for each MB pushed beside it. Each disk's push gets its part by
size (each as far along). A job that does not follow QEMU's RAM figures (libvirt's) keeps
the fixed :data:`FIXED_SHARE`.

Background copies on a shaped link ask for little at a time (:func:`copy_batch`): a guest
request behind them on the same connection waits for what is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from devagent.agent.defaults import COPY_BATCH, COPY_WORKERS
from devagent.daemon.migration.context import DiskAgentLink, DiskJob
from devagent.errors import DevagentError

log = logging.getLogger(__name__)

#: Of the link, for the push until the RAM's rate is known, and the least it gets: RAM
#: first. Beside a RAM stream that fills the link (QEMU's did at 1 Gbit/s, 120 MB/s) the
#: push's bytes gain nothing: they take the link's time all the same, before the
#: switchover instead of after it.
START_SHARE = 0.02
FLOOR_SHARE = 0.02
HEADROOM = 0.5  # of the link, left free for the RAM to grow into (and its CPU)
FIXED_SHARE = 0.25  # where the RAM's rate is not followed
#: Of the link, what RAM must leave before a push that did not start early begins. At
#: 1 Gbit/s on two cores QEMU's RAM took most of the 125 MB/s and the push had its 2 %
#: floor: 1.5-7 MB pushed, for a RAM phase about 45 ms longer and RAM's start 13-32 ms
#: later (the matrices of 2026-12-06). A push begun 0.22 s into an idle guest's RAM (one
#: look that saw room, RAM's count standing still as it started) moved 4 MB, and that RAM
#: phase was 45 ms longer than `postcopy`'s beside it.
BEGIN_SHARE = 0.25
#: Looks in a row (of :data:`EVERY_S`) that must each see that room: RAM's byte count
#: stands still a moment at times (its start's stall on QEMU 7.2), which is no room.
BEGIN_LOOKS = 3
#: The fastest link on which the push starts before the destination's QEMU listens. At
#: 1 Gbit/s it delayed that QEMU by 30-70 ms (CPU), and RAM with it; at 100 Mbit/s the link
#: idled those 0.08-0.14 s.
EARLY_PUSH_MAX_BPS = 250_000_000
EVERY_S = 0.1
WINDOW_S = 0.3
CHANGE = 0.1  # a new rate differing by less than this part of the old is not sent
COPY_BATCH_MAX = COPY_BATCH  # the most a background copy asks (the Fetch backend's default)
COPY_AHEAD_S = 0.03  # how much link time the copier keeps in flight, all workers


def pushes_early(link_rate_bps: int | None) -> bool:
    """Whether a hybrid push starts while the destination's QEMU starts (the link's rate
    known and no faster than :data:`EARLY_PUSH_MAX_BPS`)."""
    return link_rate_bps is not None and 0 < link_rate_bps <= EARLY_PUSH_MAX_BPS


def push_rate(link: float, ram_rate: float | None) -> float:
    """Bytes per second the push may take on a ``link`` bytes/s link beside a RAM stream
    moving ``ram_rate`` (None: not known yet)."""
    if ram_rate is None:
        return link * START_SHARE
    return min(link, max(link * FLOOR_SHARE, link * (1 - HEADROOM) - ram_rate))


class RateMeter:
    """A byte counter's rate over the last :data:`WINDOW_S`, from its readings."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: deque[tuple[float, int]] = deque()

    def read(self, count: int) -> float | None:
        """The rate, or None while nothing has moved yet (RAM not started) or too soon."""
        if count <= 0:
            return None
        now = self._clock()
        seen = self._seen
        seen.append((now, count))
        while len(seen) > 2 and now - seen[1][0] >= WINDOW_S:
            seen.popleft()
        first_at, first = seen[0]
        if now - first_at < EVERY_S / 2 or count < first:
            return None
        return (count - first) / (now - first_at)


class LinkShare:
    """The push's rate of each disk, kept to what RAM leaves while RAM migrates."""

    def __init__(
        self,
        job: DiskJob,
        link: float,
        follows_ram: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job = job
        self.meter = RateMeter(clock)
        self.link = link
        self.follows_ram = follows_ram
        total = sum(job.disk_sizes.values()) or 1
        self.parts = {node: size / total for node, size in job.disk_sizes.items()}
        self.rate = self._first_rate()
        self._task: asyncio.Task[None] | None = None
        self._begin: Callable[[], Coroutine[Any, Any, bool]] | None = None
        #: The start of a push that waited for room (:meth:`start`), once begun: True once
        #: the push runs, False if it could not begin (no receivers for it).
        self.begun: asyncio.Task[bool] | None = None
        self._roomy = 0  # looks in a row that saw room for it

    def _first_rate(self) -> float:
        return push_rate(self.link, None) if self.follows_ram else self.link * FIXED_SHARE

    async def restart(self) -> None:
        """Back to the first rate (a push that had the link to itself before RAM), each push
        told."""
        await self._set(self._first_rate())

    def of(self, node: str) -> float:
        """Disk ``node``'s push rate now, bytes per second."""
        return max(1.0, self.rate * self.parts.get(node, 0.0))

    @property
    def pushing(self) -> bool:
        """The push runs: started before RAM, or begun and started."""
        if self._begin is None:
            return True
        begun = self.begun
        return begun is not None and begun.done() and not begun.cancelled() and (
            begun.exception() is None and begun.result()
        )  # fmt: skip

    def start(self, begin: Callable[[], Coroutine[Any, Any, bool]] | None = None) -> None:
        """Follow RAM's rate (a job that follows it). With ``begin`` the push has not
        started: ``begin`` starts it (True; False: it could not), once, when RAM leaves it
        :data:`BEGIN_SHARE` of the link :data:`BEGIN_LOOKS` looks in a row (:attr:`begun`),
        and never if RAM fills the link until :meth:`stop`. A push that could not begin is
        told no rate."""
        self._begin = begin
        if self.follows_ram:
            self._task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        """No more changes; a push's start already begun, waited for (its failure is the
        caller's to read in :attr:`begun`)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.begun is not None:
            await asyncio.wait([self.begun])

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(EVERY_S)
            await self.adjust()

    async def adjust(self) -> None:
        """One look at the RAM's progress; each push told its new rate if it moved."""
        ram = self.meter.read(self.job.progress.ram_transferred or 0)
        wanted = push_rate(self.link, ram)
        if not self.pushing:
            room = ram is not None and wanted >= self.link * BEGIN_SHARE
            self._roomy = self._roomy + 1 if room else 0
            if self._roomy >= BEGIN_LOOKS and self._begin is not None and self.begun is None:
                self.rate = wanted  # what the push starts at
                self.begun = asyncio.get_running_loop().create_task(self._begin())
            return
        if abs(wanted - self.rate) < self.rate * CHANGE:
            return
        await self._set(wanted)

    async def _set(self, rate: float) -> None:
        """The pushes' rate from now on, each push told."""
        self.rate = rate
        await asyncio.gather(*(self._tell(a) for a in self.job.managed.agents))

    async def _tell(self, agent: DiskAgentLink) -> None:
        try:
            await agent.mirror_rate(self.of(agent.node))
        except DevagentError as err:  # the push keeps its last rate: a figure, not a fault
            log.warning("the push of %s kept its rate: %s", agent.node, err)


def disk_link_rate(job: DiskJob) -> int | None:
    """Each disk's part of the link, bits per second, as the disks copy at once (None: the
    link's rate is not known)."""
    rate = job.request.link_rate_bps
    return rate // len(job.source_disks) if rate else None


def copy_batch(link_rate_bps: int | None, chunk_size: int) -> int:
    """Bytes per background copy request after the switchover (and per copy of a
    pre-copy's mirror): what the link moves in ``COPY_AHEAD_S``, shared by the copy
    workers, so that a guest read fetched on demand (or a guest write going through) waits
    behind little of the copier's data (at 100 Mbit/s: 64 KiB, not 1 MiB)."""
    if not link_rate_bps:
        return COPY_BATCH_MAX
    wanted = int(link_rate_bps / 8 * COPY_AHEAD_S / COPY_WORKERS)
    batch = chunk_size
    while batch * 2 <= min(wanted, COPY_BATCH_MAX):
        batch *= 2
    return batch
