"""``devagent chaos``: migrations with one fault each, on a 3-host lab of its own.

Hosts ``a`` and ``b`` take turns as source and destination; ``c`` is where the NIC's ping
and echo come from. Each host's replica space is its own small filesystem
(:class:`~.faults.ReplicaSpace`). A test guest (ioprobe, one NIC) per workload is booted
when first needed and suspended between its runs; one that went wrong is removed, and the
next run of its workload boots a fresh one.

A run: resume the guest, shape the link, start the migration, wait for the drawn phase and
delay, do the fault (it lasts its while and ends), follow the migration to its end (through
a daemon that restarts), let the hosts settle, check every invariant (:mod:`.checks`), then
migrate the VM once more without a fault: that must succeed. A :class:`~.record.RunRecord`
per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from devagent.api_types import MigrationStatus
from devagent.chaos import checks
from devagent.chaos.draw import (
    PHASE_STEPS,
    Action,
    RunPlan,
    Target,
    past_no_return,
    phase_at,
)
from devagent.chaos.faults import Injected, Injector, ReplicaSpace
from devagent.chaos.record import Outcome, RunRecord, expected_outcomes
from devagent.client import DaemonClient, Endpoint
from devagent.errors import DevagentError, NotFound
from devagent.lab.lab import Lab
from devagent.orchestrate import (
    heartbeats_since,
    migrate,
    start_vm,
    wait_heartbeats,
    wait_past_phase,
)
from devagent.report import MigrationReport
from devagent.vocab import Step, parse_rate
from devagent.wait import WaitTimeout, wait_until

log = logging.getLogger(__name__)

LAB = "chaos"
RAM_MB = 128
RUN_TIMEOUT_S = 600.0  # a migration not ended by then is a violation of its own
POLL_S = 0.05
FOLLOW_UP_LINK = "1gbit"
LOST = "lost"  # what following a migration the source forgot gives
#: How long a QEMU killed (its VM crashed) may take to be seen by its daemon.
CRASH_SEEN_S = 5.0
Say = Callable[[str], None]


@dataclass(frozen=True)
class GuestShape:
    """The test guest's disk, and how much of it the probe writes before the runs."""

    disk: str = "512M"
    prefill: str = "192M"  # a post-copy tail or a mirror of seconds at either link rate


@dataclass
class Guest:
    name: str
    workload: str
    at: str  # the host it runs on


@dataclass
class Scene:
    """The chaos lab: its hosts' endpoints, the replica spaces, the guest under test."""

    lab: Lab
    endpoints: dict[str, Endpoint]
    injector: Injector
    say: Say
    shape: GuestShape = GuestShape()
    guests: dict[str, Guest] = field(default_factory=dict)  # by workload, suspended
    booted: int = 0
    spaces: dict[str, ReplicaSpace] = field(default_factory=dict)

    @classmethod
    def up(cls, say: Say) -> Scene:
        lab = Lab.up(name=LAB, hosts=3, link_rate="1gbit")
        spaces: dict[str, ReplicaSpace] = {}
        try:
            for host in ("a", "b"):
                space = ReplicaSpace(checks.space_of(lab, host), lab.dir / f"space-{host}.ext4")
                spaces[host] = space
                space.make()
            # A daemon runs in its host's namespaces, mounts included, made as it started
            # (``ip netns exec``): started again, it and all it starts see the spaces.
            for host in ("a", "b"):
                lab.restart_daemon(host)
        except BaseException:
            for space in spaces.values():
                space.remove()
            lab.down()
            raise
        endpoints = {h.name: Endpoint(url=h.url, token=lab.token, name=h.name) for h in lab.hosts}
        return cls(lab, endpoints, Injector(lab, spaces), say, spaces=spaces)

    def down(self) -> None:
        for space in self.spaces.values():  # detached at once, gone once its users are
            space.remove()
        self.lab.down()

    def refresh(self) -> None:
        """The endpoints again (a restarted daemon has a new pid, the same address)."""
        for host in self.lab.hosts:
            self.endpoints[host.name] = Endpoint(url=host.url, token=self.lab.token,
                                                 name=host.name)  # fmt: skip


async def guest_for(scene: Scene, plan: RunPlan) -> Guest:
    """The guest for ``plan``'s workload: resumed if one was kept, else booted."""
    guest = scene.guests.get(plan.workload)
    if guest is not None:
        async with DaemonClient(scene.endpoints[guest.at]) as client:
            await client.post(f"/v1/vms/{guest.name}/resume")
        await wait_heartbeats(scene.endpoints[guest.at], guest.name, 10)
        return guest
    scene.booted += 1
    name = f"cv{scene.booted}"
    scene.say(f"booting {name} ({plan.workload}) on host a")
    shape = scene.shape
    body = {"name": name, "ram_mb": RAM_MB, "disk_size": shape.disk, "storage": "local",
            "nic": True, "workload": f"{plan.workload},prefill={shape.prefill}"}  # fmt: skip
    await start_vm(scene.endpoints["a"], body)
    await wait_past_phase(scene.endpoints["a"], name, "prefill")
    await wait_heartbeats(scene.endpoints["a"], name, 20)
    guest = scene.guests[plan.workload] = Guest(name, plan.workload, "a")
    return guest


async def ensure_daemons(scene: Scene) -> None:
    """Every host's daemon up before a run, as a service manager keeps it (one that a run
    left down is started again; one that will not start ends the chaos: its error says
    why)."""
    for host in scene.lab.hosts:
        if not scene.lab.daemon_alive(host.name):
            scene.say(f"host {host.name}'s daemon is down: starting it again")
            await asyncio.to_thread(scene.lab.restart_daemon, host.name)
    scene.refresh()


async def replace_broken_spaces(scene: Scene) -> None:
    """A replica space that a fault left read-only is replaced, as an operator replaces a
    failed disk: the guests on that host are removed first (the next run of their workload
    boots a fresh one), and the host's daemon starts again to see the new filesystem."""
    for host, space in scene.spaces.items():
        if await asyncio.to_thread(space.writable):
            continue
        scene.say(f"host {host}'s replica space is read-only: replacing it")
        remote = []  # guests whose disks all live on another host: they go on there
        for guest in [g for g in scene.guests.values() if g.at == host]:
            status = await checks.vm_on(scene.endpoints[host], guest.name)
            if status is not None and all(d.endswith("(remote)") for d in status.disk.split(", ")):
                remote.append((guest, [a.node for a in status.agents]))
            else:
                await put_away(scene, guest, healthy=False)
        await asyncio.to_thread(space.replace)
        await asyncio.to_thread(scene.lab.restart_daemon, host)
        scene.refresh()
        for guest, nodes in remote:  # as the report said: bring each disk home
            await bring_home(scene, guest, host, nodes)


async def bring_home(scene: Scene, guest: Guest, host: str, nodes: list[str]) -> None:
    """``devagent device swap VM NODE --to PATH`` for each disk of ``guest`` that lives on
    another host, now that ``host`` can hold it again. The path is beside the replaced
    space, not in it: the VM's agent runs since before the replacement, in the mount
    namespace of the daemon that started it (``ip netns exec``), which the new filesystem
    does not reach here."""
    folder = scene.lab.host(host).dir / "home"
    folder.mkdir(exist_ok=True)
    async with DaemonClient(scene.endpoints[host]) as client:
        for node in nodes:
            suffix = "" if node == "disk0" else f"-{node}"
            home = folder / f"{guest.name}{suffix}.img"
            scene.say(f"bringing {guest.name}'s {node} home to host {host}")
            await client.post(
                f"/v1/vms/{guest.name}/devices/{node}/swap", {"to": str(home), "sync": True}
            )


async def put_away(scene: Scene, guest: Guest, healthy: bool) -> None:
    """After a run: a healthy guest is suspended for a later run of its workload (it costs
    no CPU meanwhile); any other is removed from every host."""
    if healthy:
        async with DaemonClient(scene.endpoints[guest.at]) as client:
            await client.post(f"/v1/vms/{guest.name}/suspend")
        return
    scene.guests.pop(guest.workload, None)
    for endpoint in scene.endpoints.values():
        with contextlib.suppress(DevagentError):
            async with DaemonClient(endpoint) as client:
                await client.delete(f"/v1/vms/{guest.name}")


async def one_run(scene: Scene, plan: RunPlan) -> RunRecord:
    began = time.time()
    await ensure_daemons(scene)
    guest = await guest_for(scene, plan)
    source, destination = guest.at, ("b" if guest.at == "a" else "a")
    record = RunRecord(plan=plan, vm=guest.name, source=source, destination=destination)
    try:
        await _run(scene, plan, guest, record)
    except DevagentError as err:
        record.violations.append(f"the run could not go on: {err}")
    record.wall_s = round(time.time() - began, 1)
    await replace_broken_spaces(scene)
    if guest.workload not in scene.guests:  # it lived on a broken space: gone with it
        return record
    try:
        await put_away(scene, guest, record.ok)
    except DevagentError as err:
        record.violations.append(f"the guest could not be suspended after the run: {err}")
        await put_away(scene, guest, False)
    return record


async def _run(scene: Scene, plan: RunPlan, guest: Guest, record: RunRecord) -> None:
    rate = parse_rate(plan.link)
    for host in ("a", "b"):
        await asyncio.to_thread(scene.lab.shape, host, rate)
    source, destination = scene.endpoints[record.source], scene.endpoints[record.destination]
    body = {"to": destination.to_json(), "storage": plan.strategy.value, "link_rate_bps": rate}
    started = time.time()
    async with DaemonClient(source) as client:
        job = await client.post_as(f"/v1/vms/{guest.name}/migrate", MigrationStatus, body)
    record.migration_id = job.id
    fault = asyncio.create_task(_fault(scene, plan, record, started))
    try:
        record.report = await _follow(scene, record)
    finally:
        injected = await fault
    scene.refresh()
    record.fault_detail, record.fault_error = injected.detail, injected.error
    if injected.at:
        record.fault_at_s = round(injected.at - started, 3)
        timeline = record.report.timeline if record.report else {}
        record.phase_hit = phase_at(timeline, record.fault_at_s, plan.strategy)
    if injected.at and injected.ended_at and injected.error is None:
        record.fault_s = round(injected.ended_at - injected.at, 3)
        record.io_resumed_s = await _io_resumed(scene, record, injected.ended_at)
    if plan.target is Target.DESTINATION_QEMU and plan.action is Action.KILL:
        await _restart_crashed(scene, record, killed=injected.error is None and bool(injected.at))
    await _check(scene, plan, guest, record)


async def _restart_crashed(scene: Scene, record: RunRecord, *, killed: bool) -> None:
    """A QEMU killed is a VM crash: where the VM's QEMU died, boot it again, as its
    operator would (``devagent vm restart``). Killed before the switchover, it was the
    incoming copy: the guest runs on at the source, and nothing is restarted. A kill that
    landed once the migration had ended is seen by the daemon a moment later: it is waited
    for (:data:`CRASH_SEEN_S` at most)."""
    deadline = time.monotonic() + (CRASH_SEEN_S if killed else 0.0)
    while True:
        for host in (record.destination, record.source):
            status = await checks.vm_on(scene.endpoints[host], record.vm)
            if status is not None and status.role == "running" and status.state == "failed":
                async with DaemonClient(scene.endpoints[host]) as client:
                    await client.post(f"/v1/vms/{record.vm}/restart")
                record.restarted_on = host
                await wait_past_phase(scene.endpoints[host], record.vm, "prefill")
                return
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(0.2)


async def _io_resumed(scene: Scene, record: RunRecord, since: float) -> float | None:
    """Seconds from ``since`` to the guest's first I/O after it, on either host."""
    first: float | None = None
    for host in (record.source, record.destination):
        with contextlib.suppress(DevagentError):
            async with DaemonClient(scene.endpoints[host]) as client:
                beats = await heartbeats_since(client, record.vm, since)
            with_io = [b.host_time for b in beats if b.ops]
            if with_io and (first is None or with_io[0] < first):
                first = with_io[0]
    return None if first is None else round(first - since, 3)


async def _fault(scene: Scene, plan: RunPlan, record: RunRecord, started: float) -> Injected:
    """Wait for the drawn phase (and delay), then do the fault; its record."""
    if plan.action is Action.NONE:
        return Injected(plan.fault, detail="no fault")
    try:
        await _until_phase(scene, record, PHASE_STEPS[plan.phase][0])
        await asyncio.sleep(plan.delay_s)
        pid = await _target_pid(scene, record, plan.target)
    except DevagentError as err:
        return Injected(plan.fault, error=f"the fault's moment never came: {err}")
    return await scene.injector.inject(plan, record.source, record.destination, pid)


async def _until_phase(scene: Scene, record: RunRecord, first: Step | None) -> None:
    """Until the migration's timeline has step ``first`` (or the migration ended)."""
    if first is None:
        return
    async with DaemonClient(scene.endpoints[record.source]) as client:

        async def reached() -> bool:
            now = await client.get_as(f"/v1/migrations/{record.migration_id}", MigrationStatus)
            return first in now.report.timeline or now.finished_at is not None

        await wait_until(reached, timeout=RUN_TIMEOUT_S, what=f"step {first}", interval=POLL_S)


async def _target_pid(scene: Scene, record: RunRecord, target: Target | None) -> int | None:
    """The target's process now (a destination's agent may still be starting: waited for)."""
    if target is None:
        return None
    if target in (Target.SOURCE_DAEMON, Target.DESTINATION_DAEMON):
        host = record.source if target is Target.SOURCE_DAEMON else record.destination
        return scene.lab.host(host).pid
    host = record.source if target.value.startswith("source") else record.destination

    async def found() -> int | None:
        status = await checks.vm_on(scene.endpoints[host], record.vm)
        if status is None:
            return None
        if target is Target.DESTINATION_QEMU:
            return status.pid
        rows = status.nics if target.value.endswith("-net") else status.agents
        return rows[0].pid if rows and rows[0].alive else None

    try:
        return await wait_until(found, timeout=5.0, what=f"the {target}", interval=0.02)
    except WaitTimeout:
        return None


async def _follow(scene: Scene, record: RunRecord) -> MigrationReport | None:
    """The migration's report once it ended; through a source daemon that restarts. None
    when the source lost it."""

    async def ended() -> MigrationReport | str | None:
        try:
            async with DaemonClient(scene.endpoints[record.source]) as client:
                now = await client.get_as(f"/v1/migrations/{record.migration_id}", MigrationStatus)
        except NotFound:
            return LOST  # a restarted daemon that does not know it
        except DevagentError:
            scene.refresh()
            return None  # a daemon that restarts or does not answer: ask again
        return now.report if now.finished_at is not None else None

    got = await wait_until(ended, timeout=RUN_TIMEOUT_S, what="the migration's end", interval=0.2)
    if got == LOST:
        record.violations.append(f"host {record.source} forgot migration {record.migration_id}")
        return None
    assert isinstance(got, MigrationReport)
    return got


async def _check(scene: Scene, plan: RunPlan, guest: Guest, record: RunRecord) -> None:
    readonly = frozenset(
        [h for h, space in scene.spaces.items() if not await asyncio.to_thread(space.writable)]
    )
    if readonly:
        record.notes.append(f"replica space read-only on {', '.join(sorted(readonly))}")
    outcome, problems = await checks.settle(
        scene.lab, scene.endpoints, guest.name, record.source, record.destination, readonly
    )
    record.outcome = outcome
    record.violations.extend(problems)
    if outcome == Outcome.UNKNOWN:
        return
    faulted = plan.action is not Action.NONE
    if outcome not in expected_outcomes(record.phase_hit, faulted=faulted):
        cause = f"a fault in phase {record.phase_hit}" if faulted else "a migration without fault"
        record.violations.append(f"{outcome} after {cause}")
    report = record.report
    if report is not None:
        said = Outcome.COMPLETED if report.status == "completed" else Outcome.ROLLED_BACK
        if said != outcome:
            record.violations.append(f"the report says {report.status}, the VM is {outcome}")
        record.violations.extend(checks.report_violations("migration", report))
    guest.at = record.destination if outcome == Outcome.COMPLETED else record.source
    if past_no_return(plan.action, record.phase_hit):
        record.notes.append(
            "the replica space went read-only once the replica was the VM's only disk: its "
            "writes fail as on any host whose disk fails (not a migration's fault)"
        )
        return  # the guest goes with the space (replace_broken_spaces)
    here = scene.endpoints[guest.at]
    record.violations.extend(await checks.answers(scene.lab, here, guest.name, "c"))
    if record.violations or not faulted:  # without a fault, the next run brings it back
        return
    await replace_broken_spaces(scene)  # as an operator would, before migrating there again
    if guest.workload not in scene.guests:
        return  # it lived on the broken space: gone with it
    here = scene.endpoints[guest.at]  # (a replaced space's daemon started again)
    other = scene.endpoints["b" if guest.at == "a" else "a"]
    for host in ("a", "b"):  # the next migration's link: the fast one (it only has to work)
        await asyncio.to_thread(scene.lab.shape, host, FOLLOW_UP_LINK)
    follow = await migrate(here, other, guest.name, storage=plan.strategy.value,
                           link_rate_bps=parse_rate(FOLLOW_UP_LINK))  # fmt: skip
    record.follow_up = follow
    if follow.status != "completed":
        record.violations.append(f"the next migration failed: {follow.error}")
        return
    guest.at = other.name
    record.violations.extend(checks.report_violations("next migration", follow))


def save_logs(lab: Lab, vm: str | None, into: Path) -> None:
    """Copy VM ``vm``'s logs from each host (its folder's, and those a host kept when it left
    it) into ``into/<host>/``; with no ``vm``, each host's daemon log. Best effort:
    the lab goes right after."""
    for host in ("a", "b", "c"):
        folder = lab.host(host).dir
        if vm is None:
            found = [folder / "devagentd.log"]
        else:
            found = [*(folder / "vms" / vm).glob("*.log"), *(folder / "logs").glob(f"{vm}-*/*")]
        for path in found:
            with contextlib.suppress(OSError):
                target = into / host / path.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)


async def run_chaos(
    plans: list[RunPlan],
    *,
    minutes: float | None,
    out: Path | None,
    say: Say,
    on_record: Callable[[RunRecord], None],
    shape: GuestShape = GuestShape(),
) -> list[RunRecord]:
    """Every run of ``plans`` (until ``minutes`` are up) on a lab of its own, removed after.
    Each record goes to ``on_record`` and, with ``out``, to ``out/runs.jsonl`` as it ends;
    a violated run's timeline is drawn there too."""
    import msgspec

    from devagent.plot import plot_timeline

    deadline = None if minutes is None else time.monotonic() + minutes * 60
    say(f"making the chaos lab ({LAB}: hosts a, b, c)")
    scene = await asyncio.to_thread(Scene.up, say)
    scene.shape = shape
    records: list[RunRecord] = []
    try:
        for plan in plans:
            if deadline is not None and time.monotonic() > deadline:
                say(f"{minutes:g} minutes are up: stopping after {len(records)} runs")
                break
            record = await one_run(scene, plan)
            records.append(record)
            on_record(record)
            if out is not None:
                with (out / "runs.jsonl").open("ab") as jsonl:
                    jsonl.write(msgspec.json.encode(record) + b"\n")
                if not record.ok and record.report is not None:
                    plot = out / f"run-{plan.index:03d}-{plan.fault}.png"
                    with contextlib.suppress(Exception):  # a plot never stops the runs
                        await asyncio.to_thread(plot_timeline, record.report, plot)
                if not record.ok:
                    where = out / f"run-{plan.index:03d}-logs"
                    await asyncio.to_thread(save_logs, scene.lab, record.vm, where)
    finally:
        if out is not None:  # each daemon's log, for a look at a violation afterwards
            await asyncio.to_thread(save_logs, scene.lab, None, out)
        say(f"removing the chaos lab {LAB!r}")
        await asyncio.to_thread(scene.down)
    return records
