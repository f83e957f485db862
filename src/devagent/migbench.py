"""``devagent bench migrate``: every migration strategy, devagent's and QEMU's own, side by
side on one lab, one guest and the same measures.

:func:`run_matrix` makes its own 2-host lab (always torn down). For every link rate,
workload and run it boots a fresh test guest per strategy on host ``a``, two at a time, each
suspended once its prefill is done (:func:`boot_round`). Then, strategy after strategy, it
resumes that strategy's guest, waits for three seconds of steady I/O, migrates it to ``b``,
keeps the report and both hosts' probe heartbeats, and removes the VM. Strategies take turns
within each run index, so load from other jobs on the machine drifts over all of them alike.

This module owns the plan and the runs on the lab. What the runs say is worked out by the
pure :mod:`devagent.benchstats` (medians, the best strategy, the tables) and drawn by
:mod:`devagent.benchplots`.

Two gaps are shown: ``max_io_gap_ms`` as the report has it (devagent's from the agents'
journals, exact; the baselines' from the probe's 100 ms heartbeats), and ``hb_gap_ms``,
from the heartbeats for every strategy: the one measured the same way for all.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devagent.api_types import Heartbeats
from devagent.benchstats import ALL_STRATEGIES, fmt, heartbeat_gap_ms, run_ratio, summarize
from devagent.benchtypes import Machine, Plan, Results, Run, TimelinePoint
from devagent.client import DaemonClient, Endpoint
from devagent.errors import DevagentError, NotFound
from devagent.guest.probe import Heartbeat
from devagent.orchestrate import VmBody, migrate, start_vm, wait_heartbeats, wait_past_phase
from devagent.qemu.accel import qemu_version
from devagent.report import MigrationReport
from devagent.vocab import BASELINES, parse_rate
from devagent.wait import WaitTimeout, wait_until

LAB = "bnch"
LAB_INSECURE = "bnpl"  # the plaintext lab of a TLS comparison
BASELINE_BEATS = 30  # three seconds of steady guest I/O before migrating
BOOT_PARALLEL = 2  # guests booted at once before a round: the machine's two cores
RUN_TIMEOUT_S = 180.0  # a run longer than max(this, RUN_LIMITS x limit_s) is abandoned
RUN_LIMITS = 10.0
POLL_S = 0.2
COLLECT_SPARE_S = 60.0  # the heartbeat collector outlives a run's deadline by this much

Say = Callable[[str], None]


FULL = Plan(
    links=("1gbit", "100mbit"),
    workloads=("idle", "moderate", "heavy"),
    strategies=ALL_STRATEGIES,
    runs=3,
    disk_size="1G",
    ram_mb=128,
    prefill="64M",
)
QUICK = Plan(
    links=("1gbit", "100mbit"),
    workloads=("moderate",),
    strategies=ALL_STRATEGIES,
    runs=1,
    disk_size="128M",
    ram_mb=128,
    prefill="32M",
    span="64M",
)


# --- the machine and the lab -----------------------------------------------------------


def machine() -> Machine:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return Machine(
        os=_os_release(),
        kernel=platform.release(),
        cpus=os.cpu_count(),
        cpu=cpu,
        qemu=qemu_version(),
        python=platform.python_version(),
        load_average=[round(x, 2) for x in os.getloadavg()],
    )


def _os_release() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.system()


async def run_matrix(plan: Plan, say: Say, on_run: Callable[[Run], None] | None = None) -> Results:
    """Run ``plan`` on a fresh lab; returns its plan, the machine, the runs and their
    summary. ``on_run`` gets each run as it ends (to keep what a long matrix did so far)."""
    from devagent.lab.lab import Lab

    for strategy in plan.strategies:
        if strategy not in ALL_STRATEGIES:
            raise DevagentError(f"unknown strategy {strategy!r}: {', '.join(ALL_STRATEGIES)}")
    for link in plan.links:
        parse_rate(link)
    if shutil.which("qemu-system-x86_64") is None:
        raise DevagentError("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    started = time.time()
    meta = machine()
    name = LAB_INSECURE if plan.insecure else LAB
    if name in Lab.list():
        say(f"removing the lab {name!r} a previous run left")
        await asyncio.to_thread(Lab.load(name).down)
    security = "in plaintext (--insecure)" if plan.insecure else "with TLS"
    say(f"making a 2-host lab {name!r} {security}; {plan.count} migrations to run")
    lab = await asyncio.to_thread(
        Lab.up, name=name, hosts=2, link_rate=plan.links[0], insecure=plan.insecure
    )
    runs: list[Run] = []
    try:
        a, b = (Endpoint(url=h.url, token=lab.token, name=h.name) for h in lab.hosts[:2])
        for link in plan.links:
            for host in ("a", "b"):
                await asyncio.to_thread(lab.shape, host, link)
            rate = parse_rate(link)
            for workload, disks in itertools.product(plan.workloads, plan.disks):
                strategies = plan.strategies_for(disks)
                for index in range(plan.runs):
                    first = len(runs) + 1
                    names = {s: f"bn{first + i}" for i, s in enumerate(strategies)}
                    say(f"booting {len(names)} guests ({workload}, {disks} disk(s)) for run "
                        f"{index + 1} of {link}")  # fmt: skip
                    booted = await boot_round(a, plan, workload, names, disks)
                    for strategy in strategies:
                        n = len(runs) + 1
                        guest = booted[strategy]
                        run = await one_run(a, b, plan, link, rate, workload, strategy, index,
                                            guest, disks)  # fmt: skip
                        runs.append(run)
                        say(f"[{n}/{plan.count}] {describe(run)}")
                        if on_run is not None:
                            on_run(run)
    finally:
        say(f"removing the lab {name!r}")
        await asyncio.to_thread(lab.down)
    meta.load_average_end = [round(x, 2) for x in os.getloadavg()]
    meta.duration_s = round(time.time() - started, 1)
    return Results(plan=plan, machine=meta, runs=runs, summary=summarize(runs))


def describe(run: Run) -> str:
    r = run.report
    disks = f" {run.disks} disks" if run.disks > 1 else ""
    head = f"{run.link} {run.workload}{disks} {run.strategy} run {run.run + 1}: "
    if r.status != "completed":
        return head + f"FAILED: {r.error}"
    return head + (
        f"switchover {fmt(r.time_to_switchover_s)} s, total {fmt(r.total_time_s)}"
        f" s (limit {fmt(r.limit_s)} s), gap {fmt(r.max_io_gap_ms, 0)} ms "
        f"(excess {fmt(r.io_gap_excess_ms, 0)} ms), "
        f"heartbeat gap {fmt(run.hb_gap_ms, 0)} ms, integrity "
        + (r.integrity or f"unknown ({r.missing.get('integrity', 'not asked')})")
    )


@dataclass
class Guest:
    """A guest booted for one run: suspended once its prefill is done, or its boot's error."""

    name: str
    boot_s: float = 0.0
    error: str | None = None


def vm_request(plan: Plan, workload: str, strategy: str, name: str, disks: int = 1) -> VmBody:
    return {
        "name": name,
        "ram_mb": plan.ram_mb,
        "disk_size": plan.disk_size,
        "data_disks": [plan.disk_size] * (disks - 1),
        "workload": plan.workload_spec(workload),
        "storage": "shared" if strategy == "shared" else "local",
        "agent": strategy not in BASELINES,
    }


async def boot_round(
    a: Endpoint, plan: Plan, workload: str, names: dict[str, str], disks: int = 1
) -> dict[str, Guest]:
    """Boot one round's guests on ``a``, BOOT_PARALLEL at a time (booting under TCG is the
    runs' largest fixed cost), each suspended once its prefill is done: a suspended guest
    costs no CPU, so it cannot disturb the runs before its own."""
    gate = asyncio.Semaphore(BOOT_PARALLEL)

    async def boot(strategy: str, name: str) -> Guest:
        guest = Guest(name)
        began = time.time()
        async with gate:
            try:
                await start_vm(a, vm_request(plan, workload, strategy, name, disks))
                await wait_past_phase(a, name, "prefill")
                async with DaemonClient(a) as client:
                    await client.post(f"/v1/vms/{name}/suspend")
            except DevagentError as err:
                guest.error = f"booting the guest: {err}"
        guest.boot_s = round(time.time() - began, 1)
        return guest

    guests = await asyncio.gather(*(boot(s, n) for s, n in names.items()))
    return dict(zip(names, guests, strict=True))


async def one_run(
    a: Endpoint,
    b: Endpoint,
    plan: Plan,
    link: str,
    rate: int,
    workload: str,
    strategy: str,
    index: int,
    guest: Guest,
    disks: int = 1,
) -> Run:
    """Resume ``guest`` on ``a``, let it do three seconds of steady I/O, migrate it to ``b``
    with ``strategy``, remove it."""
    name = guest.name

    def failed(error: str) -> MigrationReport:
        """The report of a migration the bench itself could not run or gave up on."""
        return MigrationReport(vm=name, source=a.name, destination=b.name, storage=strategy,
                               status="failed", error=error)  # fmt: skip

    report: MigrationReport | None = None
    setup_s: float | None = None
    migrate_s: float | None = None
    beats: dict[str, list[Heartbeat]] = {"a": [], "b": []}
    t0 = began = time.time()
    try:
        if guest.error is not None:
            raise DevagentError(guest.error)
        async with DaemonClient(a) as client:
            await client.post(f"/v1/vms/{name}/resume")
        await wait_heartbeats(a, name, BASELINE_BEATS, with_io=workload != "idle", timeout=60)
        t0 = time.time()
        setup_s = round(t0 - began, 1)  # the resume and the steady baseline
        run_timeout = max(RUN_TIMEOUT_S, RUN_LIMITS * disks * _rough_limit(plan, rate))
        collector = asyncio.create_task(
            _collect(a, name, t0 - 3.0, beats["a"], run_timeout + COLLECT_SPARE_S)
        )
        try:
            report = await asyncio.wait_for(
                migrate(a, b, name, storage=strategy, link_rate_bps=rate), run_timeout
            )
        except TimeoutError:
            report = failed("the migration did not finish in time (the bench gave up on it)")
        finally:
            migrate_s = round(time.time() - t0, 1)  # the migrate call, report and all
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
        with contextlib.suppress(DevagentError):
            async with DaemonClient(b) as client:
                got = await client.get_as(f"/v1/vms/{name}/heartbeats", Heartbeats, since=t0 - 3.0)
            beats["b"] = got.heartbeats
    except DevagentError as err:
        if report is None:
            report = failed(f"bench: {err}")
    finally:
        for host in (a, b):
            with contextlib.suppress(DevagentError):
                async with DaemonClient(host) as client:
                    await client.delete(f"/v1/vms/{name}")
    timeline = sorted(
        (TimelinePoint(round(beat.host_time - t0, 3), beat.ops, host)
         for host, its in beats.items() for beat in its),
        key=lambda point: (point.t, point.ops, point.host),
    )  # fmt: skip
    end = report.total_time_s
    return Run(
        link=link,
        workload=workload,
        strategy=strategy,
        run=index,
        vm=name,
        disks=disks,
        boot_s=guest.boot_s,
        setup_s=setup_s,
        report=report,
        migrate_s=migrate_s,
        timeline=timeline,
        ratio=run_ratio(report),  # total_time_s / limit_s
        wall_s=round(time.time() - began, 1),  # resume to removal: what the run cost
        hb_gap_ms=heartbeat_gap_ms(timeline, end, with_io=workload != "idle") if end else None,
    )


def _rough_limit(plan: Plan, rate: int) -> float:
    from devagent.vocab import parse_size

    return (parse_size(plan.prefill) + (plan.ram_mb << 20)) * 8 / rate


async def _collect(
    at: Endpoint, name: str, since: float, into: list[Heartbeat], timeout: float
) -> None:
    """Keep the source's heartbeats as they come, until the VM is gone from the source
    (the run cancels this once its migration ended; ``timeout`` bounds it regardless)."""
    async with DaemonClient(at) as client:

        async def gone() -> bool:
            nonlocal since
            try:
                got = await client.get_as(f"/v1/vms/{name}/heartbeats", Heartbeats, since=since)
            except NotFound:
                return True
            except DevagentError:
                return False  # a busy daemon: ask again
            for beat in got.heartbeats:
                into.append(beat)
                since = max(since, beat.host_time)
            return False

        with contextlib.suppress(WaitTimeout):
            await wait_until(
                gone, timeout=timeout, what=f"VM {name} gone from its source", interval=POLL_S
            )


def command_line() -> str:
    return " ".join(["devagent", *sys.argv[1:]])
