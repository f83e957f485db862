"""The source's migration job, driven against fakes (tests/migration_fakes.py): every
strategy's steps in order, and a failure at every step, each checked against the rule:

* before the switchover, the VM runs on the source and nothing is left on the destination;
* after it, the VM runs on the destination, and the source is released once the disk is
  local.
"""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from devagent.agent.defaults import FETCH_CHUNK, MIRROR_CHUNK
from devagent.agent.messages import FlushAnswer, MirrorRequest, MirrorStarted
from devagent.daemon.migration import ram as ram_module
from devagent.daemon.migration import running as running_module
from devagent.daemon.migration.job import Phase
from devagent.daemon.migration.share import (
    BEGIN_SHARE,
    FIXED_SHARE,
    HEADROOM,
    START_SHARE,
    copy_batch,
    pushes_early,
)
from devagent.daemon.vms.request import DiskRequest, VmRequest
from devagent.errors import DevagentError, Forbidden, NotFound, PeerError, StateError, UsageError
from devagent.vocab import Step, Strategy
from migration_fakes import PUSH_LINK, FakeDiskAgent, FakeHost, FakeVm, make_job


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(running_module, "FORWARD_RETRY_PAUSE_S", 0.001)
    monkeypatch.setattr("devagent.daemon.migration.plans.POLL_S", 0.001)
    monkeypatch.setattr("devagent.daemon.migration.pushing.POLL_S", 0.001)


def rolled_back(vm: FakeVm, host: FakeHost) -> None:
    assert vm.vm.status == "running" and not vm.vm.exited, vm.vm.commands
    assert host.destination.vms == {}, host.destination.requests
    assert vm.name in host.vms  # nothing released here
    assert vm.role == "running"


def moved(vm: FakeVm, host: FakeHost) -> None:
    assert host.destination.vms == {vm.name: "running"}
    assert vm.name not in host.vms  # released here
    assert vm.role.startswith("migrated") and vm.vm.exited


@pytest.mark.parametrize("strategy", list(Strategy))
async def test_every_strategy_runs_its_steps_in_order(tmp_path: Path, strategy: Strategy) -> None:
    job, vm, host = make_job(tmp_path, strategy, link_rate_bps=PUSH_LINK)
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    moved(vm, host)
    order = [step.value for step in Step]
    timeline = job.report.timeline
    steps = [s for s in timeline if s in order and s != Step.DESTINATION_READY]  # (a push
    assert steps == sorted(steps, key=order.index), timeline  # may start before or after)
    assert timeline[Step.DESTINATION_READY] <= timeline[Step.RAM_STARTED]
    assert {Step.RAM_COMPLETED, Step.RESUMED, Step.RELEASED} <= set(steps)
    assert job.report.status == "completed" and job.report.downtime_ms == 42
    calls = vm.agents[0].calls if vm.agents else []
    if strategy in (Strategy.POSTCOPY, Strategy.HYBRID, Strategy.PRECOPY):
        assert "/fence" in calls and Step.SOURCE_FENCED in steps
    if strategy in (Strategy.POSTCOPY, Strategy.HYBRID):
        assert Step.DISK_LOCAL in steps
    if strategy is Strategy.HYBRID:
        assert calls.index("/mirror") < calls.index("/mirror/stop") < calls.index("/fence")
    if strategy is Strategy.PRECOPY:
        assert calls.index("/mirror") < calls.index("/mirror/cutover") < calls.index("/fence")
    if strategy.is_baseline:
        assert "migrate" in vm.vm.commands and not vm.agents
    if strategy in (Strategy.QEMU_MIRROR, Strategy.QEMU_MIRROR_ACTIVE):
        qmp = vm.vm.commands
        assert qmp.index("blockdev-mirror") < qmp.index("migrate") < qmp.index("block-job-cancel")
        assert qmp.index("block-job-cancel") < qmp.index("migrate-continue")


@pytest.mark.parametrize(
    ("strategy", "where", "what"),
    [
        (Strategy.HYBRID, "prepare", "POST /v1/incoming"),
        (Strategy.HYBRID, "mirror start", "/mirror"),
        (Strategy.PRECOPY, "the destination's start", "POST /v1/incoming/v1/listening"),
        (Strategy.PRECOPY, "mirror start", "/mirror"),
        (Strategy.HYBRID, "flush", "/flush"),
        (Strategy.POSTCOPY, "ram", "migrate"),
        (Strategy.QEMU_MIRROR, "pre-switchover", "block-job-cancel"),
        (Strategy.HYBRID, "switchover", "/mirror/stop"),
        (Strategy.PRECOPY, "switchover", "/mirror/cutover"),
        (Strategy.QEMU_COR_STREAM, "prepare", "POST /v1/baselines/incoming"),
    ],
)
async def test_a_failure_before_the_switchover_rolls_back(
    tmp_path: Path, strategy: Strategy, where: str, what: str
) -> None:
    job, vm, host = make_job(tmp_path, strategy, link_rate_bps=PUSH_LINK)
    error = PeerError(f"injected at {where}")
    if what.startswith("POST "):
        host.destination.failures[what] = error
    elif what.startswith("/"):
        vm.agents[0].failures[what] = error
    else:
        vm.vm.failures[what] = error
    await job.run()
    assert job.phase is Phase.FAILED and f"injected at {where}" in (job.report.error or "")
    rolled_back(vm, host)
    if vm.agents and where != "prepare":
        assert "/mirror/cancel" in vm.agents[0].calls
        assert "/fence" not in vm.agents[0].calls


@pytest.mark.parametrize("strategy", list(Strategy))
async def test_a_push_starts_while_the_destinations_qemu_starts(
    tmp_path: Path, strategy: Strategy
) -> None:
    """precopy's destination answers once its receivers serve, its QEMU still starting: the
    mirror starts then, RAM once that QEMU listens. The other strategies' destination
    (hybrid's too: its push beside QEMU's start delayed that QEMU) answers when it listens."""
    job, vm, host = make_job(tmp_path, strategy)
    log = host.destination.everything = vm.vm.commands  # the agents' calls and QMP's too
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    incoming = (
        "peer POST /v1/baselines/incoming" if strategy.is_baseline else "peer POST /v1/incoming"
    )
    listening = "peer POST /v1/incoming/v1/listening"
    timeline = job.report.timeline
    assert vm.vm.migrate_uri == "tcp:10.9.0.2:5000"  # (an early answer has none: the wait's)
    if strategy is Strategy.PRECOPY:
        assert host.destination.bodies["/v1/incoming"]["early"] is True
        assert log.index(incoming) < log.index("agent /mirror") < log.index(listening)
        assert log.index(listening) < log.index("migrate")
        assert timeline[Step.MIRROR_STARTED] <= timeline[Step.DESTINATION_READY]
        assert timeline[Step.DESTINATION_READY] <= timeline[Step.RAM_STARTED]
    else:
        assert listening not in log and log.index(incoming) < log.index("migrate")
        assert timeline[Step.DESTINATION_READY] <= timeline[Step.RAM_STARTED]


async def test_on_a_slow_link_the_push_has_it_while_the_destinations_qemu_starts(
    tmp_path: Path,
) -> None:
    """At 100 Mbit/s the link, not the CPU, bounds a migration: hybrid's push starts once
    the receivers serve, with the whole link, and is told RAM's first share once the
    destination's QEMU listens, before RAM starts."""
    link = 100 * 10**6
    job, vm, host = make_job(tmp_path, Strategy.HYBRID, link_rate_bps=link)
    log = host.destination.everything = vm.vm.commands
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    assert host.destination.bodies["/v1/incoming"]["early"] is True
    listening = "peer POST /v1/incoming/v1/listening"
    assert log.index("agent /mirror") < log.index(listening) < log.index("migrate")
    agent = vm.agents[0]
    assert agent.mirrors[0].rate_limit == pytest.approx(link / 8)
    assert agent.rates[0] == pytest.approx(link / 8 * START_SHARE)
    assert pushes_early(link) and not pushes_early(10**9) and not pushes_early(None)
    # its receiver started with the destination's QEMU: pushed to, never asked for later
    assert host.destination.bodies["/v1/incoming"]["disks"][0]["receive"] is True
    assert agent.mirrors[0].target.export == "receive-disk0"
    assert "POST /v1/incoming/v1/receivers" not in host.destination.requests


async def test_on_a_fast_link_the_push_never_starts_beside_a_ram_that_fills_it(
    tmp_path: Path,
) -> None:
    """At 1 Gbit/s RAM takes the link (QEMU's did, on two cores): hybrid's push does not
    start beside it, and every chunk is fetched after the switchover."""
    job, vm, host = make_job(tmp_path, Strategy.HYBRID)
    vm.vm.ram_for_s, vm.vm.ram_rate = 0.6, 110e6  # 110 of the link's 125 MB/s
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    calls = vm.agents[0].calls
    assert "/mirror" not in calls and "/mirror/stop" not in calls and "/fence" in calls
    assert not host.destination.bodies["/v1/incoming/v1/commit"]["fetches"]["disk0"].get("present")
    assert job.report.devices[0].bytes_pushed == 0
    assert Step.MIRROR_STARTED not in job.report.timeline
    # nor did the destination start a receiver for it: none asked at the prepare, nor later
    disks = host.destination.bodies["/v1/incoming"]["disks"]
    assert [d.get("receive", False) for d in disks] == [False]
    assert "POST /v1/incoming/v1/receivers" not in host.destination.requests


@pytest.mark.parametrize(
    ("strategy", "link", "carried"),
    [(Strategy.POSTCOPY, 10**9, True), (Strategy.HYBRID, 10**9, True),
     (Strategy.HYBRID, PUSH_LINK, False)],  # (the fake push's chunks: 256 KiB)
)  # fmt: skip
async def test_the_disks_holes_at_the_fence_go_with_the_commit(
    tmp_path: Path, strategy: Strategy, link: int, carried: bool
) -> None:
    """Each disk's holes, as its agent answered the fence (the disk can no longer change),
    go to the destination with its fetch: those chunks need no fetch there. Not where the
    hand-over counts other chunks than the fence's."""
    job, vm, host = make_job(tmp_path, strategy, vm=disk_set(tmp_path), link_rate_bps=link)
    for number, agent in enumerate(vm.agents):
        agent.zeroes = base64.b64encode(bytes([number + 1])).decode()
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    fetches = host.destination.bodies["/v1/incoming/v1/commit"]["fetches"]
    given = [fetches[node].get("zeroes", "") for node in SIZES]
    assert given == ([a.zeroes for a in vm.agents] if carried else ["", "", ""])
    assert (fetches["disk0"]["chunk_size"] == FETCH_CHUNK) is carried


async def test_on_a_fast_link_the_push_begins_once_ram_leaves_it_room(tmp_path: Path) -> None:
    """A RAM stream that leaves the link free (a guest of few pages to move) lets the push
    begin beside it, at what RAM leaves less the headroom; it is stopped at the
    switchover and hands over what it landed."""
    link = 10**9
    job, vm, host = make_job(tmp_path, Strategy.HYBRID, link_rate_bps=link)
    log = vm.agents[0].everything = host.destination.everything = vm.vm.commands
    vm.vm.ram_for_s, vm.vm.ram_rate = 0.6, 1e6  # 1 of the link's 125 MB/s
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    assert log.index("migrate") < log.index("agent /mirror") < log.index("agent /mirror/stop")
    assert log.index("agent /mirror/stop") < log.index("agent /fence")
    # its receiver, which the prepare did not start, asked for as it began, and pushed to
    assert not host.destination.bodies["/v1/incoming"]["disks"][0].get("receive", False)
    assert host.destination.bodies["/v1/incoming/v1/receivers"] == {"nodes": ["disk0"]}
    assert log.index("peer POST /v1/incoming/v1/receivers") < log.index("agent /mirror")
    assert vm.agents[0].mirrors[0].target.export == "receive-disk0"
    rate = vm.agents[0].mirrors[0].rate_limit or 0
    assert link / 8 * BEGIN_SHARE <= rate <= link / 8 * (1 - HEADROOM)
    timeline = job.report.timeline
    assert timeline[Step.RAM_STARTED] <= timeline[Step.RECEIVERS_STARTED]
    assert timeline[Step.RECEIVERS_STARTED] <= timeline[Step.MIRROR_STARTED]
    assert timeline[Step.MIRROR_STARTED] <= timeline[Step.MIRROR_ENDED]
    assert host.destination.bodies["/v1/incoming/v1/commit"]["fetches"]["disk0"]["present"]


async def test_a_push_still_starting_at_the_switchover_is_waited_for_then_stopped(
    tmp_path: Path,
) -> None:
    """RAM completes while the push it left room for is still starting: the switchover
    waits for that start to end, then stops the push and hands over what it landed."""
    job, vm, host = make_job(tmp_path, Strategy.HYBRID)
    vm.vm.ram_for_s, vm.vm.ram_rate = 1.0, 1e6
    agent = vm.agents[0]
    start_mirror = agent.mirror

    async def slow_mirror(request: MirrorRequest) -> MirrorStarted:
        started = await start_mirror(request)
        await asyncio.sleep(1.5)  # begun about 0.4 s into RAM: still starting at its end
        return started

    agent.mirror = slow_mirror  # type: ignore[method-assign]
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    timeline = job.report.timeline
    assert timeline[Step.RAM_COMPLETED] < timeline[Step.MIRROR_STARTED]
    assert timeline[Step.MIRROR_STARTED] <= timeline[Step.MIRROR_ENDED]
    assert agent.calls.index("/mirror/stop") < agent.calls.index("/fence")
    assert host.destination.bodies["/v1/incoming/v1/commit"]["fetches"]["disk0"]["present"]


@pytest.mark.parametrize(
    "refusal",
    [NotFound("host b: HTTP 404"),  # of the version before the route
     Forbidden("host b: POST /v1/incoming/{name}/receivers needs an operator's certificate"),
     PeerError("host b: receive-disk0 exited at start")],
)  # fmt: skip
async def test_a_destination_that_starts_no_receivers_gets_no_push(
    tmp_path: Path, refusal: DevagentError
) -> None:
    """The push that would begin beside RAM asks for its receivers; a destination that
    starts none (one of the version before the route says 404, or 403 where TLS checks
    routes) gets no push, and no rate is told to a push that never ran: every chunk is
    fetched after the switchover, the migration goes on."""
    job, vm, host = make_job(tmp_path, Strategy.HYBRID)
    vm.vm.ram_for_s, vm.vm.ram_rate = 0.6, 1e6  # room for a push
    host.destination.failures["POST /v1/incoming/v1/receivers"] = refusal
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    assert "POST /v1/incoming/v1/receivers" in host.destination.requests
    calls = vm.agents[0].calls
    assert "/fence" in calls
    assert not {"/mirror", "/mirror/rate", "/mirror/stop"} & set(calls)
    assert not host.destination.bodies["/v1/incoming/v1/commit"]["fetches"]["disk0"].get("present")
    assert job.report.devices[0].bytes_pushed == 0
    assert Step.RECEIVERS_STARTED not in job.report.timeline


async def test_a_push_that_fails_as_it_begins_beside_ram_rolls_back(tmp_path: Path) -> None:
    job, vm, host = make_job(tmp_path, Strategy.HYBRID)
    vm.vm.ram_for_s, vm.vm.ram_rate = 0.6, 1e6
    vm.agents[0].failures["/mirror"] = PeerError("injected as the push began")
    await job.run()
    assert job.phase is Phase.FAILED and "as the push began" in (job.report.error or "")
    rolled_back(vm, host)
    calls = vm.agents[0].calls
    assert "/mirror/cancel" in calls and "/fence" not in calls
    assert "migrate_cancel" in vm.vm.commands  # before RAM ended
    assert "DELETE /v1/incoming/v1" in host.destination.requests  # (its receivers with it)


@pytest.mark.parametrize("knows_early", [False, None])
async def test_a_destination_that_answers_once_qemu_listens_is_asked_no_more(
    tmp_path: Path, knows_early: bool | None
) -> None:
    """A destination of the version before the early answer refuses the field: asked again
    without it; one that answers once its QEMU listens is not asked to wait."""
    job, vm, host = make_job(tmp_path, Strategy.PRECOPY)
    host.destination.knows_early = knows_early
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    asked = host.destination.requests
    assert asked.count("POST /v1/incoming") == (2 if knows_early is False else 1)
    assert "POST /v1/incoming/v1/listening" not in asked
    assert vm.vm.migrate_uri == "tcp:10.9.0.2:5000"


@pytest.mark.parametrize("knows_early", [True, None])
async def test_a_push_that_does_not_follow_ram_keeps_its_fixed_share(
    tmp_path: Path, knows_early: bool | None
) -> None:
    """A job that does not follow QEMU's RAM figures (libvirt's) pushes at its fixed share
    from its start to the switchover, an early answer or not."""
    job, vm, host = make_job(tmp_path, Strategy.HYBRID)
    job.follows_ram = False  # type: ignore[misc]
    host.destination.knows_early = knows_early
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    agent = vm.agents[0]
    assert agent.mirrors[0].rate_limit == pytest.approx(10**9 / 8 * FIXED_SHARE)
    assert agent.rates == []


@pytest.mark.parametrize("strategy", [Strategy.SHARED, Strategy.POSTCOPY, Strategy.HYBRID])
async def test_the_disks_flush_once_ram_moves_and_a_hung_flush_holds_nothing(
    tmp_path: Path, strategy: Strategy
) -> None:
    """The disks' flush beside RAM only spares QEMU's flush at the stop: it is asked once,
    when QEMU left its setup (RAM's start does not wait for it, nor is the guest's stall
    as RAM starts made longer by it); one that still runs at the switchover is cancelled,
    not waited for (the guest is stopped then, and QEMU's flush made the disk durable)."""
    job, vm, _ = make_job(tmp_path, strategy)
    vm.vm.statuses = ("setup", "setup", "active", "active", "completed")
    agent = vm.agents[0]
    asked_at: list[str] = []
    cancelled: list[bool] = []

    async def flush(*, timeout: float = 60.0) -> FlushAnswer:
        agent.calls.append("/flush")
        asked_at.append(vm.vm.current)
        try:
            await asyncio.sleep(3600)  # hung
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return FlushAnswer(flushed_in_s=3600)

    agent.flush = flush  # type: ignore[method-assign]
    await asyncio.wait_for(job.run(), 30)
    assert job.phase is Phase.COMPLETED, job.report.error
    assert asked_at == ["active"], "asked once, as RAM moved"
    assert cancelled == [True]


SIZES = {"disk0": 4 << 20, "disk1": 8 << 20, "disk2": 2 << 20}


def disk_set(tmp_path: Path) -> FakeVm:
    """A VM of three disks of three sizes, each with its agent."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    agents = [FakeDiskAgent(node, size) for node, size in SIZES.items()]
    vm = FakeVm(image=image, run_dir=tmp_path, agents=agents)
    vm.request = vm.request.replace(disks=vm.request.disks * len(SIZES))
    return vm


@pytest.mark.parametrize(
    "strategy", [Strategy.SHARED, Strategy.POSTCOPY, Strategy.PRECOPY, Strategy.HYBRID]
)
async def test_a_set_of_disks_moves_as_one(tmp_path: Path, strategy: Strategy) -> None:
    """Every disk is prepared on the destination, pushed or mirrored to its own target,
    fenced at the switchover and fetched; the hybrid push shares its part of the link among
    the disks by their size."""
    link = PUSH_LINK if strategy is Strategy.HYBRID else 10**9
    job, vm, host = make_job(tmp_path, strategy, vm=disk_set(tmp_path), link_rate_bps=link)
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    moved(vm, host)
    incoming = host.destination.bodies["/v1/incoming"]["disks"]
    assert [d["node"] for d in incoming] == list(SIZES)
    rows = job.report.devices
    assert [(r.node, r.kind) for r in rows] == [(node, "disk") for node in SIZES]
    if strategy in (Strategy.HYBRID, Strategy.PRECOPY):
        assert all(r.bytes_pushed for r in rows)
        assert (job.report.disk_bytes_moved or 0) >= sum(r.bytes_pushed or 0 for r in rows)
    if strategy in (Strategy.HYBRID, Strategy.POSTCOPY):  # each replica fetched
        assert all(r.bytes_fetched is not None for r in rows), rows
    if strategy is not Strategy.SHARED:  # each let go, once whole
        assert all(r.local_after_s for r in rows), rows
        assert host.destination.settled == set(SIZES)
    if strategy is Strategy.SHARED:
        assert all(d["image"] for d in incoming) and not any(a.fenced for a in vm.agents)
        return
    assert [d["size"] for d in incoming] == list(SIZES.values())
    assert [d["backend"]["export"] for d in incoming] == list(SIZES)
    assert all(a.fenced for a in vm.agents)
    commit = host.destination.bodies["/v1/incoming/v1/commit"]
    assert list(commit["fetches"]) == list(SIZES)
    assert [f["remote"]["export"] for f in commit["fetches"].values()] == list(SIZES)
    if strategy is Strategy.PRECOPY:  # each replica whole: every chunk present
        for node, size in SIZES.items():
            bits = base64.b64decode(commit["fetches"][node]["present"])
            chunks = -(-size // FETCH_CHUNK)
            assert sum(bin(b).count("1") for b in bits) == chunks and len(bits) == -(-chunks // 8)
    if strategy is Strategy.PRECOPY:  # copies sized for each disk's part of the link
        batch = copy_batch(10**9 // len(SIZES), MIRROR_CHUNK)
        assert batch < 1 << 20 and all(a.mirrors[0].max_copy == batch for a in vm.agents)
    if strategy in (Strategy.PRECOPY, Strategy.HYBRID):
        targets = [a.mirrors[0].target for a in vm.agents]
        assert [getattr(t, "export", None) for t in targets] == [f"receive-{n}" for n in SIZES]
    if strategy is Strategy.HYBRID:
        rates = [a.mirrors[0].rate_limit or 0 for a in vm.agents]
        assert sum(rates) == pytest.approx(link / 8)  # the whole link while QEMU starts there
        assert rates[1] == pytest.approx(2 * rates[0]) and rates[0] == pytest.approx(2 * rates[2])
        told = [a.rates[0] or 0 for a in vm.agents]  # RAM's start: RAM first
        assert sum(told) == pytest.approx(link / 8 * START_SHARE)
        assert told[1] == pytest.approx(2 * told[0]) and told[0] == pytest.approx(2 * told[2])
        present = commit["fetches"]
        assert all(present[n]["present"] for n in SIZES)  # what each push landed


async def test_each_disk_has_its_own_row_of_figures(tmp_path: Path) -> None:
    """Its largest I/O gap from its own agents' journals (the aggregate gap, over all the
    disks' I/O together, hides one disk's pause while another's I/O goes on), and its own
    integrity."""
    vm = disk_set(tmp_path)
    vm.request = VmRequest(name="v1", disks=(DiskRequest(size=4 << 20),) * 3)  # the test guest
    vm.io_pauses = {"disk0": 0.05, "disk1": 0.7, "disk2": 0.2}
    job, vm, _ = make_job(tmp_path, Strategy.HYBRID, vm=vm)
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    gaps = {r.node: r.max_io_gap_ms for r in job.report.devices}
    assert gaps == pytest.approx({"disk0": 60, "disk1": 710, "disk2": 210}, abs=1)
    assert [r.integrity for r in job.report.devices] == ["ok"] * 3


async def test_a_disk_whose_replica_space_went_read_only_stays_on_the_source(
    tmp_path: Path,
) -> None:
    """After the switchover disk1's replica cannot be written, for good: disk1 is kept on
    the source as an export the destination uses by remote access; the others come home;
    the migration completes, and says where disk1 is and how to bring it home."""
    job, vm, host = make_job(tmp_path, Strategy.HYBRID, vm=disk_set(tmp_path))
    host.destination.read_only = {"disk1"}
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    moved(vm, host)
    assert host.kept == [("v1", "disk1")]
    body = host.destination.bodies["/v1/vms/v1/devices/disk1/keep-remote"]
    assert body == {"peer": {"url": "http://a", "token": "", "name": "a"}, "export": "v1-disk1"}
    rows = {r.node: r for r in job.report.devices}
    assert rows["disk1"].kept_on == "a" and rows["disk1"].local_after_s is None
    assert rows["disk0"].kept_on is None and rows["disk0"].local_after_s is not None
    [warning] = job.report.warnings
    assert "disk1 stays on host a" in warning and "device swap v1 disk1" in warning


@pytest.mark.parametrize("strategy", [Strategy.PRECOPY, Strategy.POSTCOPY])
async def test_a_replica_space_read_only_as_the_source_lets_go_keeps_that_disk(
    tmp_path: Path, strategy: Strategy
) -> None:
    """Every replica is whole; the source lets each go (``settle``), and the destination
    refuses disk2's: its space went read-only. Its replica spills from then on: disk2 stays
    on the source; the others are served alone there (the settle is the point of no
    return), and only then is the VM released here."""
    job, vm, host = make_job(tmp_path, strategy, vm=disk_set(tmp_path))
    host.destination.read_only_at_settle = {"disk2"}
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    moved(vm, host)
    assert host.kept == [("v1", "disk2")]
    assert host.destination.settled == {"disk0", "disk1"}
    asked = host.destination.requests
    refused = asked.index("POST /v1/vms/v1/devices/disk2/settle")
    assert asked.index("POST /v1/vms/v1/devices/disk2/keep-remote") > refused
    assert job.report.timeline[Step.DISK_LOCAL] <= job.report.timeline[Step.RELEASED]
    rows = {r.node: r for r in job.report.devices}
    assert rows["disk2"].kept_on == "a" and rows["disk0"].local_after_s is not None


async def test_a_precopy_whose_guest_outran_its_mirror_says_so(tmp_path: Path) -> None:
    """disk1's mirror reports that the guest's writes went to both sides before it
    converged: the report's timeline has that step, between the mirror's start and its
    convergence; a mirror that converged unhurried leaves it out."""
    job, vm, _ = make_job(tmp_path, Strategy.PRECOPY, vm=disk_set(tmp_path))
    vm.agents[1].writes_paced = True
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    timeline = job.report.timeline
    assert timeline[Step.MIRROR_STARTED] <= timeline[Step.DISK_WRITES_PACED]
    assert timeline[Step.DISK_WRITES_PACED] <= timeline[Step.DISK_CONVERGED]

    calm, _, _ = make_job(tmp_path, Strategy.PRECOPY, vm=disk_set(tmp_path))
    await calm.run()
    assert Step.DISK_CONVERGED in calm.report.timeline
    assert Step.DISK_WRITES_PACED not in calm.report.timeline


async def test_the_downtime_limit_starts_tight_and_relaxes_if_ram_does_not_converge(
    tmp_path: Path,
) -> None:
    """QEMU is asked for a 20 ms pause; still migrating after TIGHT_SYNCS dirty-page syncs,
    it gets its own default, and only once; a migration that completes sooner keeps the
    tight limit; a limit the request names is left alone."""
    slow = ("active",) * (ram_module.TIGHT_SYNCS + 3) + ("completed",)
    job, vm, _ = make_job(tmp_path, Strategy.POSTCOPY)
    vm.vm.statuses = slow
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    limits = [p["downtime-limit"] for p in vm.vm.parameters]
    assert limits == [ram_module.DOWNTIME_TIGHT_MS, ram_module.DOWNTIME_RELAXED_MS]

    quick, vm, _ = make_job(tmp_path, Strategy.POSTCOPY)
    await quick.run()
    assert [p["downtime-limit"] for p in vm.vm.parameters] == [ram_module.DOWNTIME_TIGHT_MS]

    named, vm, _ = make_job(tmp_path, Strategy.POSTCOPY)
    named.request = msgspec.structs.replace(named.request, downtime_limit_ms=100)
    vm.vm.statuses = slow
    await named.run()
    assert [p["downtime-limit"] for p in vm.vm.parameters] == [100]


async def test_auto_converge_throttling_the_guest_relaxes_the_downtime_limit_at_once(
    tmp_path: Path,
) -> None:
    """The guest's vCPUs throttled before TIGHT_SYNCS syncs: the tight limit was what kept
    RAM from converging, so QEMU gets its own at the first look."""
    job, vm, _ = make_job(tmp_path, Strategy.POSTCOPY)
    vm.vm.statuses = ("active", "active", "completed")
    vm.vm.throttle = 20
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    limits = [p["downtime-limit"] for p in vm.vm.parameters]
    assert limits == [ram_module.DOWNTIME_TIGHT_MS, ram_module.DOWNTIME_RELAXED_MS]


async def test_a_relax_that_fails_leaves_the_migration_going(tmp_path: Path) -> None:
    job, vm, _ = make_job(tmp_path, Strategy.POSTCOPY)
    vm.vm.statuses = ("active",) * (ram_module.TIGHT_SYNCS + 3) + ("completed",)
    qmp = vm.vm.qmp

    async def refusing(command: str, **args: Any) -> Any:
        if command == "migrate-set-parameters" and vm.vm.parameters:
            raise PeerError("QEMU refused the new parameters")
        return await qmp(command, **args)

    vm.vm.qmp = refusing  # type: ignore[method-assign]
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    assert [p["downtime-limit"] for p in vm.vm.parameters] == [ram_module.DOWNTIME_TIGHT_MS]


async def test_a_failure_of_one_disk_rolls_back_the_whole_set(tmp_path: Path) -> None:
    """disk1's mirror cannot start: every disk's mirror is cancelled, none is fenced, and
    the destination keeps nothing of any of them."""
    job, vm, host = make_job(tmp_path, Strategy.PRECOPY, vm=disk_set(tmp_path))
    vm.agents[1].failures["/mirror"] = PeerError("disk1's target is full")
    await job.run()
    assert job.phase is Phase.FAILED and "disk1's target is full" in (job.report.error or "")
    rolled_back(vm, host)
    assert all("/mirror/cancel" in a.calls and not a.fenced for a in vm.agents)


async def test_qemu_failing_the_ram_migration_rolls_back(tmp_path: Path) -> None:
    job, vm, host = make_job(tmp_path, Strategy.HYBRID)
    vm.vm.statuses = ("active", "failed")
    await job.run()
    assert job.phase is Phase.FAILED and "QEMU migration failed" in (job.report.error or "")
    rolled_back(vm, host)


async def test_a_flush_that_fails_as_ram_moves_rolls_back_before_ram_completes(
    tmp_path: Path,
) -> None:
    """The disks' flush (begun once RAM moves) failed: the job rolls back at RAM's next
    look, not at the switchover."""
    job, vm, host = make_job(tmp_path, Strategy.HYBRID)
    vm.agents[0].failures["/flush"] = PeerError("the disk went away")
    vm.vm.statuses = ("active",) * 200 + ("completed",)
    await job.run()
    assert job.phase is Phase.FAILED, job.report.timeline
    assert "the disk went away" in (job.report.error or "")
    assert Step.RAM_COMPLETED not in job.report.timeline
    assert vm.vm.commands.count("query-migrate") < 20
    rolled_back(vm, host)
    assert "migrate_cancel" in vm.vm.commands and "/mirror/cancel" in vm.agents[0].calls


async def test_qemu_set_up_for_ram_while_the_destination_is_prepared(tmp_path: Path) -> None:
    """Setting QEMU up for RAM runs beside the destination's preparation, and its failure
    rolls the migration back (the destination keeps nothing)."""
    job, vm, host = make_job(tmp_path, Strategy.POSTCOPY)
    vm.vm.failures["migrate-set-parameters"] = PeerError("QEMU refused the parameters")
    await job.run()
    assert job.phase is Phase.FAILED and "QEMU refused" in (job.report.error or "")
    assert "POST /v1/incoming" in host.destination.requests
    rolled_back(vm, host)
    assert "migrate" not in vm.vm.commands


async def test_a_destination_that_vanishes_during_ram_rolls_back(tmp_path: Path) -> None:
    job, vm, host = make_job(tmp_path, Strategy.POSTCOPY)
    vm.vm.statuses = ("active",) * 3  # never completes
    job_module_check = "GET /v1/health"
    host.destination.failures[job_module_check] = PeerError("connection refused")
    job._next_check = 0.0
    await job.run()
    assert job.phase is Phase.FAILED and "vanished" in (job.report.error or "")
    rolled_back(vm, host)


async def test_a_vm_a_strategy_cannot_move_is_refused_before_anything(tmp_path: Path) -> None:
    job, vm, host = make_job(tmp_path, Strategy.QEMU_MIRROR)
    vm.agents = make_job(tmp_path, Strategy.HYBRID)[1].agents  # the baselines need no agent
    await job.run()
    assert job.phase is Phase.FAILED and "device agent" in (job.report.error or "")
    assert host.destination.requests == [] and vm.vm.commands == []
    with pytest.raises(UsageError):
        job.plan.check(job)


@pytest.mark.parametrize(
    ("where", "fault"),
    [
        ("fence", "/fence"),
        ("commit", "POST /v1/incoming/v1/commit"),
        ("commit, its answer lost", "lost"),
        ("disk local", "GET /v1/vms/v1/devices"),
        ("release", "release"),
    ],
)
async def test_a_failure_after_the_switchover_goes_forward(
    tmp_path: Path, where: str, fault: str
) -> None:
    job, vm, host = make_job(tmp_path, Strategy.HYBRID)
    error = PeerError(f"passing fault at {where}")
    if fault == "/fence":
        vm.agents[0].failures[fault] = error  # lasting: the source's QEMU is killed instead
    elif fault == "release":
        host.failures["release"] = [error]
    elif fault == "lost":
        host.destination.commit_lands_before_failing = True
        host.destination.failures["POST /v1/incoming/v1/commit"] = [error]
    else:
        host.destination.failures[fault] = [error, error]
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    moved(vm, host)
    assert Step.DISK_LOCAL in job.report.timeline
    assert job.report.timeline[Step.DISK_LOCAL] <= job.report.timeline[Step.RELEASED]
    if fault == "/fence":
        assert vm.vm.killed and Step.SOURCE_FENCED in job.report.timeline


@pytest.mark.parametrize("strategy", [Strategy.HYBRID, Strategy.PRECOPY])
async def test_a_destination_qemu_that_dies_as_its_commit_begins_is_a_crash_there(
    tmp_path: Path, strategy: Strategy
) -> None:
    """Past the point of no return the guest lives on the destination: its QEMU's death
    there is a crash of the VM there (restarted there), and the source goes forward at
    once rather than leaving the guest paused here."""
    job, vm, host = make_job(tmp_path, strategy)
    host.destination.crash_as_commit_begins = True
    started = time.monotonic()
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    assert time.monotonic() - started < 30  # not the 120 s of asking again
    assert host.destination.vms == {vm.name: "crashed"}
    assert vm.name not in host.vms and vm.role.startswith("migrated")


async def test_a_source_agent_that_died_after_the_switchover_costs_a_figure_not_the_migration(
    tmp_path: Path,
) -> None:
    """Its journal is gone with it (a restarted agent starts a new one): the migration
    completes, the copy here is marked migrated, and the report says what it lacks."""
    job, vm, host = make_job(tmp_path, Strategy.HYBRID)
    vm.completions_error = PeerError("agent v1/disk0 unreachable")
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    moved(vm, host)
    assert vm.role.startswith("migrated")


@pytest.mark.parametrize("lasting", [False, True])
async def test_a_report_figure_the_destination_cannot_give_never_fails_the_migration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lasting: bool
) -> None:
    """After the release (its daemon restarting, say): asked again; a figure still missing
    then is said missing, and the migration stays completed."""
    monkeypatch.setattr(running_module, "FORWARD_RETRY_S", 0.2)
    monkeypatch.setattr(running_module, "FORWARD_RETRY_PAUSE_S", 0.01)
    image = tmp_path / "disk.img"
    vm = FakeVm(image=image, run_dir=tmp_path, request=VmRequest(name="v1"))  # the test guest
    job, vm, host = make_job(tmp_path, Strategy.HYBRID, vm=vm)
    error = PeerError("host b unreachable: connection refused")
    host.destination.failures["POST /v1/vms/v1/integrity"] = error if lasting else [error]
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    if lasting:
        assert job.report.integrity is None and "integrity" in job.report.missing
    else:
        assert job.report.integrity == "ok"


@pytest.mark.parametrize("strategy", [Strategy.POSTCOPY, Strategy.HYBRID, Strategy.PRECOPY])
async def test_a_commit_that_never_began_by_its_deadline_rolls_back_after_the_switchover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: Strategy
) -> None:
    """The destination's agent cannot reach the source's disk (a link cut at the
    switchover, longer than the commit's deadline): the guest never ran there, so the
    incoming VM is removed and the guest runs here again, its disk unfenced."""
    monkeypatch.setattr(running_module, "FORWARD_RETRY_S", 0.05)
    job, vm, host = make_job(tmp_path, strategy)
    host.destination.failures["POST /v1/incoming/v1/commit"] = PeerError("no NBD handshake")
    await job.run()
    assert job.phase is Phase.FAILED
    assert "rolled back after the switchover" in (job.report.error or ""), job.report.error
    rolled_back(vm, host)
    calls = vm.agents[0].calls
    assert calls.index("/fence") < calls.index("/unfence") and not vm.agents[0].fenced
    assert not (tmp_path / "migration.json").exists()  # settled


async def test_a_commit_that_began_when_its_answer_never_came_goes_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(running_module, "FORWARD_RETRY_S", 0.05)
    job, vm, host = make_job(tmp_path, Strategy.POSTCOPY)
    host.destination.failures["POST /v1/incoming/v1/commit"] = PeerError("connection reset")
    host.destination.commit_under_way = True  # the removal is refused: it began there
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    assert "/unfence" not in vm.agents[0].calls


async def test_a_destination_gone_at_the_commit_leaves_the_guest_paused_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(running_module, "FORWARD_RETRY_S", 0.05)
    job, vm, host = make_job(tmp_path, Strategy.POSTCOPY)
    host.destination.failures["POST /v1/incoming/v1/commit"] = PeerError("unreachable")
    host.destination.failures["DELETE /v1/incoming/v1"] = PeerError("unreachable")
    await job.run()
    assert job.phase is Phase.FAILED
    assert "stays paused on a until host b answers" in (job.report.error or ""), job.report.error
    assert vm.name in host.vms and vm.vm.status == "postmigrate"  # no second runner
    assert "/fence" in vm.agents[0].calls and "/unfence" not in vm.agents[0].calls
    assert (tmp_path / "migration.json").exists()  # a daemon restart asks again


async def test_a_second_migration_of_a_migrating_vm_is_refused(tmp_path: Path) -> None:
    job, vm, _ = make_job(tmp_path, Strategy.HYBRID)
    vm.vm.status = "paused"
    await job.run()
    assert job.phase is Phase.FAILED and "paused" in (job.report.error or "")
    with pytest.raises(StateError):
        job._move(Phase.COMPLETED)


async def test_a_release_that_failed_half_way_is_done_when_tried_again(tmp_path: Path) -> None:
    job, vm, host = make_job(tmp_path, Strategy.POSTCOPY)
    host.failures["release"] = [PeerError("the agent would not stop")]  # after leaving the table
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    moved(vm, host)


@pytest.mark.parametrize("strategy", [Strategy.HYBRID, Strategy.QEMU_MIRROR])
async def test_a_roll_back_ends_the_disk_copy_in_its_plan_s_order(
    tmp_path: Path, strategy: Strategy
) -> None:
    """devagent's mirror stops before QEMU's migration is cancelled (the guest then runs
    again, and none of its writes may go on towards the destination); QEMU's own mirror
    job ends after the migration it belongs to, as libvirt does."""
    job, vm, host = make_job(tmp_path, strategy)
    vm.vm.statuses = ("active", "failed")
    await job.run()
    assert job.phase is Phase.FAILED
    rolled_back(vm, host)
    log = vm.vm.commands
    if strategy is Strategy.HYBRID:
        assert log.index("agent /mirror/cancel") < log.index("migrate_cancel")
    else:
        assert log.index("migrate_cancel") < log.index("blockdev-del")


async def test_a_roll_back_that_cannot_resume_the_guest_says_so(tmp_path: Path) -> None:
    job, vm, host = make_job(tmp_path, Strategy.HYBRID, link_rate_bps=PUSH_LINK)
    vm.agents[0].failures["/mirror/stop"] = PeerError("agent gone")
    vm.vm.failures["cont"] = PeerError("QEMU said no")
    await job.run()
    assert job.phase is Phase.FAILED
    error = job.report.error or ""
    assert "agent gone" in error and "resuming the guest on the source failed" in error
    assert host.destination.vms == {}


async def test_a_slow_tail_is_waited_out_while_it_grows_and_not_once_it_stalls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("devagent.daemon.migration.plans.DISK_STALL_S", 0.05)
    monkeypatch.setattr("devagent.daemon.migration.plans.POLL_S", 0.01)
    job, vm, host = make_job(tmp_path, Strategy.HYBRID)
    host.destination.polls_until_local = 30  # 0.3 s in all: far past the stall limit
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    (tmp_path / "b").mkdir()
    stalled, vm, host = make_job(tmp_path / "b", Strategy.HYBRID)
    host.destination.polls_until_local = 30
    host.destination.replica_grows = False
    await stalled.run()
    assert stalled.phase is Phase.FAILED and "no progress" in (stalled.report.error or "")
    assert vm.name in host.vms  # the source still serves the disk: not released


async def test_a_removal_refused_while_a_commit_not_yet_begun_runs_is_asked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination's commit still runs (its answer lost), not begun: it refuses the
    removal, and its VM does not run yet; the source asks again until the commit settles
    (here it ends well: the migration completes)."""
    monkeypatch.setattr(running_module, "FORWARD_RETRY_S", 0.2)
    job, _, host = make_job(tmp_path, Strategy.POSTCOPY)
    dest = host.destination
    dest.failures["POST /v1/incoming/v1/commit"] = PeerError("connection reset")
    looks = 0
    get = dest.get

    async def refuse(path: str) -> None:
        dest._asked(f"DELETE {path}")
        raise StateError("host b: VM v1's commit is under way here: refusing to remove it")

    async def commit_ends_later(path: str, **params: object) -> object:
        nonlocal looks
        if path == "/v1/vms/v1":
            looks += 1
            if looks >= 3:
                dest.vms["v1"] = "running"
        return await get(path, **params)

    monkeypatch.setattr(dest, "delete", refuse)
    monkeypatch.setattr(dest, "get", commit_ends_later)
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    assert dest.requests.count("DELETE /v1/incoming/v1") >= 2


async def test_a_commit_never_done_leaves_the_incoming_vm_when_the_source_qemu_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fence failed, so the source's QEMU was killed: the incoming VM holds the only
    copy of the guest, and is never removed."""
    monkeypatch.setattr(running_module, "FORWARD_RETRY_S", 0.05)
    job, vm, host = make_job(tmp_path, Strategy.POSTCOPY)
    vm.agents[0].failures["/fence"] = PeerError("agent unreachable")
    host.destination.failures["POST /v1/incoming/v1/commit"] = PeerError("no NBD handshake")
    await job.run()
    assert job.phase is Phase.FAILED and vm.vm.exited
    assert host.destination.vms == {"v1": "incoming"}
    assert "the source's QEMU is gone" in (job.report.error or "")
    assert (tmp_path / "migration.json").exists()


async def test_a_destination_whose_qemu_died_before_the_commit_rolls_back_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its commit can never work (409, not a passing failure): no 120 s of asking again
    with the guest paused; the incoming VM is removed and the guest runs here again."""
    monkeypatch.setattr(running_module, "FORWARD_RETRY_S", 1000.0)
    job, vm, host = make_job(tmp_path, Strategy.HYBRID)
    host.destination.failures["POST /v1/incoming/v1/commit"] = StateError(
        "host b: VM v1's incoming QEMU exited: it cannot commit here"
    )
    await asyncio.wait_for(job.run(), 30)  # a hang guard, not a timing
    assert job.phase is Phase.FAILED and "rolled back" in (job.report.error or "")
    rolled_back(vm, host)


@pytest.mark.parametrize(("qemu", "activates"), [("7.2.19", False), ("10.0.2", True)])
async def test_cor_stream_activates_the_source_disk_again_on_qemu_10(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qemu: str, activates: bool
) -> None:
    """QEMU 10.0's export of an inactive node refuses block status, which the destination's
    block-stream asks for: the source activates its disk between RAM's end and the
    destination's commit; older QEMU serves it inactive (and has no blockdev-set-active)."""
    version = f"QEMU emulator version {qemu} (Debian)"
    monkeypatch.setattr("devagent.daemon.migration.qemu_plans.qemu_version", lambda: version)
    job, vm, host = make_job(tmp_path, Strategy.QEMU_COR_STREAM)
    log = host.destination.everything = vm.vm.commands
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    assert ("blockdev-set-active" in log) is activates
    if activates:
        commit = "peer POST /v1/baselines/incoming/v1/commit"
        assert log.index("migrate") < log.index("blockdev-set-active") < log.index(commit)
