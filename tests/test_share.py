"""A hybrid push on what RAM leaves of the link (:mod:`devagent.daemon.migration.share`):
the rule, the rate meter, and the follower telling each disk's agent its part."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devagent.daemon.migration import share
from devagent.daemon.migration.share import LinkShare, RateMeter, push_rate
from migration_fakes import FakeDiskAgent

LINK = 125e6  # 1 Gbit/s in bytes


def test_the_push_takes_what_ram_leaves_less_a_headroom() -> None:
    assert push_rate(LINK, None) == pytest.approx(LINK * share.START_SHARE)
    assert push_rate(LINK, 0.0) == pytest.approx(LINK * (1 - share.HEADROOM))
    assert push_rate(LINK, 40e6) == pytest.approx(LINK * (1 - share.HEADROOM) - 40e6)
    assert push_rate(LINK, LINK) == pytest.approx(LINK * share.FLOOR_SHARE)


@given(st.floats(min_value=0, max_value=10 * LINK, allow_nan=False))
def test_the_push_stays_between_its_floor_and_the_link(ram: float) -> None:
    rate = push_rate(LINK, ram)
    assert LINK * share.FLOOR_SHARE <= rate <= LINK
    assert rate + ram <= max(LINK, ram + LINK * share.FLOOR_SHARE) + 1e-6


def test_the_meter_gives_the_rate_over_its_window() -> None:
    now = [0.0]
    meter = RateMeter(clock=lambda: now[0])
    assert meter.read(0) is None  # RAM has not moved yet
    assert meter.read(10_000_000) is None  # one reading says nothing
    now[0] = 0.0
    for step in range(1, 11):  # 10 MB every 0.1 s: 100 MB/s
        now[0] = step * 0.1
        rate = meter.read(step * 10_000_000)
    assert rate == pytest.approx(100e6)
    now[0] += 0.1
    assert meter.read(100_000_000) == pytest.approx(200e6 / 3, rel=0.01)  # stalled a tick


@dataclass
class Progress:
    ram_transferred: int = 0


@dataclass
class Owner:
    agents: list[FakeDiskAgent]


@dataclass
class Job:
    """What the share reads of a job: its disks, their sizes and the RAM's progress."""

    managed: Owner
    disk_sizes: dict[str, int]
    progress: Progress = field(default_factory=Progress)


async def test_each_disk_gets_its_part_of_what_ram_leaves() -> None:
    now = [0.0]
    agents = [FakeDiskAgent("disk0"), FakeDiskAgent("disk1")]
    job = Job(managed=Owner(agents), disk_sizes={"disk0": 1 << 30, "disk1": 3 << 30})
    linked = LinkShare(job, LINK, follows_ram=True, clock=lambda: now[0])  # type: ignore[arg-type]
    assert linked.of("disk1") == pytest.approx(3 * linked.of("disk0"))
    for _ in range(5):  # RAM moving 20 MB/s: the push may take the rest, less the headroom
        await linked.adjust()
        now[0] += share.EVERY_S
        job.progress.ram_transferred += int(20e6 * share.EVERY_S)
    await linked.adjust()
    wanted = LINK * (1 - share.HEADROOM) - 20e6
    assert agents[0].rates[-1] + agents[1].rates[-1] == pytest.approx(wanted)  # type: ignore[operator]
    assert agents[1].rates[-1] == pytest.approx(3 * agents[0].rates[-1])  # type: ignore[operator]
    told = len(agents[0].rates)
    await linked.adjust()  # the same rate: nobody told again
    now[0] += share.EVERY_S
    job.progress.ram_transferred += int(110e6 * share.EVERY_S)  # RAM takes the link now
    await linked.adjust()
    assert len(agents[0].rates) == told + 1
    assert sum(a.rates[-1] or 0 for a in agents) < wanted


async def test_a_job_that_does_not_follow_ram_keeps_a_fixed_share() -> None:
    agent = FakeDiskAgent("disk0")
    job = Job(managed=Owner([agent]), disk_sizes={"disk0": 1 << 30})
    linked = LinkShare(job, LINK, follows_ram=False)  # type: ignore[arg-type]
    linked.start()
    await asyncio.sleep(0.3)
    await linked.stop()
    assert linked.of("disk0") == pytest.approx(LINK * share.FIXED_SHARE)
    assert agent.rates == []


async def test_a_push_that_waits_for_room_begins_once_ram_leaves_it_and_only_once() -> None:
    """On a fast link the push starts only once RAM leaves it :data:`share.BEGIN_SHARE` of
    the link: not before RAM moves, not beside a RAM stream that fills the link; then at
    what RAM leaves, and the agents are told its changes only once it has started."""
    now = [0.0]
    agent = FakeDiskAgent("disk0")
    job = Job(managed=Owner([agent]), disk_sizes={"disk0": 1 << 30})
    linked = LinkShare(job, LINK, follows_ram=True, clock=lambda: now[0])  # type: ignore[arg-type]
    started: list[float] = []
    going = asyncio.Event()

    async def begin() -> bool:
        started.append(linked.of("disk0"))
        await going.wait()
        return True

    linked.start(begin)
    await linked.stop()  # its follower stopped: the test takes each look itself

    async def tick(ram_rate: float) -> None:
        await linked.adjust()
        await asyncio.sleep(0)  # a start begun runs
        now[0] += share.EVERY_S
        job.progress.ram_transferred += int(ram_rate * share.EVERY_S)

    await tick(0)  # RAM has not moved: its rate unknown
    for _ in range(5):  # RAM takes 110 of the 125 MB/s
        await tick(110e6)
    assert started == [] and not linked.pushing and linked.begun is None
    for _ in range(7):  # RAM slows to 10 MB/s: room for the push
        await tick(10e6)
    assert len(started) == 1  # once BEGIN_LOOKS looks in a row saw room: what RAM left then
    assert LINK * share.BEGIN_SHARE <= started[0] <= LINK * (1 - share.HEADROOM) - 10e6
    assert not linked.pushing  # still starting: nobody told a rate
    await tick(110e6)
    await tick(110e6)
    assert agent.rates == [] and len(started) == 1
    stopping = asyncio.create_task(linked.stop())
    await asyncio.sleep(0.01)
    assert not stopping.done()  # the stop waits for the start begun
    going.set()
    await stopping
    assert linked.pushing and len(started) == 1
    for _ in range(4):  # started: told what RAM leaves from now on
        await tick(10e6)
    assert agent.rates[-1] == pytest.approx(LINK * (1 - share.HEADROOM) - 10e6)
    assert len(started) == 1


async def test_a_push_that_could_not_begin_is_told_no_rate() -> None:
    """Its start said False (the destination started no receivers for it): no push runs,
    so none is told RAM's changes, and none begins again."""
    now = [0.0]
    agent = FakeDiskAgent("disk0")
    job = Job(managed=Owner([agent]), disk_sizes={"disk0": 1 << 30})
    linked = LinkShare(job, LINK, follows_ram=True, clock=lambda: now[0])  # type: ignore[arg-type]
    begun: list[float] = []

    async def begin() -> bool:
        begun.append(now[0])
        return False

    linked.start(begin)
    await linked.stop()  # the test takes each look itself
    for rate in [10e6] * 6 + [60e6, 5e6] * 4:  # room, then a RAM rate that keeps moving
        await linked.adjust()
        await asyncio.sleep(0)
        now[0] += share.EVERY_S
        job.progress.ram_transferred += int(rate * share.EVERY_S)
    assert len(begun) == 1 and not linked.pushing
    assert agent.rates == []


async def test_a_ram_count_standing_still_a_moment_is_no_room() -> None:
    """RAM's byte count stands still a look or two as RAM starts (QEMU 7.2's stall): a rate
    of zero for a moment, which is not room for the push."""
    now = [0.0]
    job = Job(managed=Owner([FakeDiskAgent("disk0")]), disk_sizes={"disk0": 1 << 30})
    linked = LinkShare(job, LINK, follows_ram=True, clock=lambda: now[0])  # type: ignore[arg-type]
    started: list[float] = []

    async def begin() -> None:
        started.append(linked.rate)

    linked.start(begin)
    await linked.stop()  # the test takes each look itself
    job.progress.ram_transferred = 1 << 20
    for _ in range(share.BEGIN_LOOKS):  # the first reading, then the count still
        await linked.adjust()
        now[0] += share.EVERY_S
    for _ in range(5):  # then RAM takes 110 of the 125 MB/s
        job.progress.ram_transferred += int(110e6 * share.EVERY_S)
        await linked.adjust()
        now[0] += share.EVERY_S
    await asyncio.sleep(0)
    assert started == [] and linked.begun is None
