"""``devagent bench migrate``: every migration strategy, devagent's and QEMU's own, side by
side on one lab, one guest and the same measures.

:func:`run_matrix` makes its own 2-host lab (always torn down). For every link rate,
workload and run it boots a fresh test guest per strategy on host ``a``, two at a time, each
suspended once its prefill is done (:func:`boot_round`). Then, strategy after strategy, it
resumes that strategy's guest, waits for three seconds of steady I/O, migrates it to ``b``,
keeps the report and both hosts' probe heartbeats, and removes the VM. Strategies take turns
within each run index, so load from other jobs on the machine drifts over all of them alike.

The rest is pure and unit-tested on made-up reports: :func:`summarize` (medians per
scenario, the best strategy's ``total_time_s / limit_s``, devagent's I/O gap against each
QEMU baseline's), :func:`markdown` and :func:`plots`.

Two gaps are shown: ``max_io_gap_ms`` as the report has it (devagent's from the agents'
journals, exact; the baselines' from the probe's 100 ms heartbeats), and ``hb_gap_ms``,
from the heartbeats for every strategy: the one measured the same way for all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from devagent.client import DaemonClient, Endpoint
from devagent.errors import DevagentError, NotFound
from devagent.orchestrate import migrate, start_vm, wait_heartbeats, wait_past_phase
from devagent.report import MEASURES, largest_gap, largest_gap_at
from devagent.vocab import BASELINES, STRATEGIES, parse_rate
from devagent.wait import WaitTimeout, wait_until

LAB = "bnch"
ALL_STRATEGIES = ("shared", *BASELINES, *(s for s in STRATEGIES if s != "shared"))
DEVAGENT_MOVING = tuple(s for s in STRATEGIES if s != "shared")
BASELINE_BEATS = 30  # three seconds of steady guest I/O before migrating
BOOT_PARALLEL = 2  # guests booted at once before a round: the machine's two cores
RUN_TIMEOUT_S = 180.0  # a run longer than max(this, RUN_LIMITS x limit_s) is abandoned
RUN_LIMITS = 10.0
POLL_S = 0.2
COLLECT_SPARE_S = 60.0  # the heartbeat collector outlives a run's deadline by this much
NUMERIC = (*(m for m in MEASURES if m != "integrity"), "ratio", "hb_gap_ms")

Say = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    links: tuple[str, ...]
    workloads: tuple[str, ...]
    strategies: tuple[str, ...]
    runs: int
    disk_size: str
    ram_mb: int
    prefill: str
    span: str | None = None  # None: the profile's own

    def workload_spec(self, workload: str) -> str:
        spec = f"{workload},prefill={self.prefill}"
        return spec if self.span is None or workload == "idle" else f"{spec},span={self.span}"

    @property
    def count(self) -> int:
        return len(self.links) * len(self.workloads) * len(self.strategies) * self.runs


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


# --- the pure part: medians, tables, plots ---------------------------------------------


def median(values: Sequence[float | int | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def run_ratio(report: dict[str, Any]) -> float | None:
    total, limit = report.get("total_time_s"), report.get("limit_s")
    if total is None or not limit:
        return None
    return round(float(total) / float(limit), 3)


def heartbeat_gap_ms(
    timeline: Sequence[Sequence[Any]], end: float, *, with_io: bool = True
) -> float | None:
    """Largest gap between heartbeats (with I/O, if ``with_io``; an idle guest's heartbeats
    alone show when it was paused) over [0, end], in times relative to the start."""
    gap = largest_gap((t for t, ops, _ in timeline if ops > 0 or not with_io), 0.0, end)
    return round(gap * 1000, 1) if gap is not None else None


def rederive(run: dict[str, Any]) -> list[str]:
    """Work out again, with this code's definitions, what a stored run's heartbeats give:
    its heartbeat gap, and ``max_io_gap_ms`` where its report took that from the heartbeats
    (the QEMU baselines, which have no agent journal). Returns the names that changed."""
    report, timeline = run["report"], run.get("timeline") or []
    end = report.get("total_time_s")
    changed = []
    if end is not None:
        gap = heartbeat_gap_ms(timeline, end, with_io=run["workload"] != "idle")
        if gap != run.get("hb_gap_ms"):
            run["hb_gap_ms"] = gap
            changed.append("hb_gap_ms")
    if report.get("io_gap_source") == "probe heartbeats" and report.get("max_io_gap_ms"):
        window_end = max(end or 0.0, report.get("time_to_switchover_s") or 0.0)
        found = largest_gap_at((t for t, ops, _ in timeline if ops > 0), 0.0, window_end)
        # (the timeline keeps ms: a difference under 1 ms is its rounding, not a change)
        if found is not None and abs(found[1] * 1000 - report["max_io_gap_ms"]) >= 1.0:
            report["max_io_gap_ms"] = round(found[1] * 1000, 1)
            report["max_io_gap_at_s"] = round(found[0], 3)
            changed.append("max_io_gap_ms")
    run["ratio"] = run_ratio(report)
    return changed


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (link, workload): each strategy's medians over its completed runs, the
    best disk-moving strategy by median ``total_time_s / limit_s`` (``shared`` moves no
    disk: it is the floor, not a contender), and devagent's gap against each baseline's."""
    scenarios: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for run in runs:
        key = (run["link"], run["workload"])
        scenarios.setdefault(key, {}).setdefault(run["strategy"], []).append(run)
    out = []
    for (link, workload), by_strategy in scenarios.items():
        rows: dict[str, dict[str, Any]] = {}
        for strategy, its in by_strategy.items():
            done = [r for r in its if r["report"].get("status") == "completed"]
            row: dict[str, Any] = {"runs": len(its), "completed": len(done)}
            for name in NUMERIC:
                row[name] = median([_measure(r, name) for r in done])
            row["integrity_ok"] = sum(1 for r in done if r["report"].get("integrity") == "ok")
            errors = [r["report"].get("guest_io_errors") for r in done]
            fails = [r["report"].get("guest_verify_failures") for r in done]
            row["guest_io_errors"] = max((e for e in errors if e is not None), default=None)
            row["guest_verify_failures"] = max((f for f in fails if f is not None), default=None)
            row["errors"] = sorted({r["report"]["error"] for r in its if r["report"].get("error")})
            rows[strategy] = row
        contenders = {
            s: r
            for s, r in rows.items()
            if s != "shared"
            and r["completed"] == r["runs"]
            and r["integrity_ok"] == r["runs"]
            and r["ratio"] is not None
        }
        best = min(contenders, key=lambda s: contenders[s]["ratio"], default=None)
        gaps: dict[str, dict[str, float | None]] = {}
        for mine in DEVAGENT_MOVING:
            if mine not in rows:
                continue
            gaps[mine] = {}
            for theirs in BASELINES:
                if theirs in rows:
                    gaps[mine][theirs] = _gap_ratio(rows[mine], rows[theirs])
        out.append(
            {
                "link": link,
                "workload": workload,
                "strategies": rows,
                "best": best,
                "best_ratio": contenders[best]["ratio"] if best else None,
                "gap_vs_qemu": gaps,
            }
        )
    return out


def _measure(run: dict[str, Any], name: str) -> float | None:
    if name == "ratio":
        return run_ratio(run["report"])
    value = run.get(name) if name == "hb_gap_ms" else run["report"].get(name)
    return float(value) if isinstance(value, int | float) else None


def _gap_ratio(mine: dict[str, Any], theirs: dict[str, Any]) -> float | None:
    """devagent's heartbeat gap ÷ the baseline's: the same instrument on both sides."""
    a, b = mine.get("hb_gap_ms"), theirs.get("hb_gap_ms")
    return round(a / b, 2) if a is not None and b else None


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


TABLE_HEAD = (
    "| strategy | runs ok | switchover s | total s | `limit_s` | total / limit | downtime ms "
    "| `max_io_gap_ms` | heartbeat gap ms | guest max lat ms | guest p99 ms | I/O rate ratio "
    "| MB on the link | errors / verify | integrity |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
)


def markdown(summary: Sequence[dict[str, Any]]) -> str:
    """A table per link and workload (medians), its best strategy, and the gap comparison."""
    parts = []
    for scenario in summary:
        rows = scenario["strategies"]
        lines = [f"### {scenario['link']}, {scenario['workload']}", "", TABLE_HEAD]
        for strategy in [s for s in ALL_STRATEGIES if s in rows] + sorted(
            set(rows) - set(ALL_STRATEGIES)
        ):
            r = rows[strategy]
            moved = r["bytes_between_hosts"]
            lines.append(
                f"| `{strategy}` | {r['completed']}/{r['runs']} "
                f"| {_fmt(r['time_to_switchover_s'])} | {_fmt(r['total_time_s'])} "
                f"| {_fmt(r['limit_s'])} | {_fmt(r['ratio'])} "
                f"| {_fmt(r['downtime_ms'], 0)} | {_fmt(r['max_io_gap_ms'], 0)} "
                f"| {_fmt(r['hb_gap_ms'], 0)} | {_fmt(r['guest_max_latency_ms'], 0)} "
                f"| {_fmt(r['guest_p99_latency_ms'], 0)} | {_fmt(r['io_rate_ratio'])} "
                f"| {_fmt(moved / 1e6 if moved is not None else None, 0)} "
                f"| {_fmt(r['guest_io_errors'])} / {_fmt(r['guest_verify_failures'])} "
                f"| {r['integrity_ok']}/{r['completed']} ok |"
            )
        lines.append("")
        if scenario["best"]:
            lines.append(
                f"Best strategy moving the disk: `{scenario['best']}`, total / limit "
                f"{scenario['best_ratio']:.2f} (median)."
            )
        else:
            lines.append("No strategy moving the disk completed every run intact.")
        failed = {s: r["errors"] for s, r in rows.items() if r["errors"]}
        for strategy, errors in failed.items():
            lines.append(f"`{strategy}` failed: {'; '.join(errors)}")
        gaps = scenario["gap_vs_qemu"]
        baselines = [b for b in BASELINES if b in rows]
        if gaps and baselines:
            lines += [
                "",
                "devagent's heartbeat gap ÷ each QEMU baseline's (below 1: devagent's guest "
                "paused less):",
                "",
                "| devagent | " + " | ".join(f"`{b}`" for b in baselines) + " |",
                "|---|" + "---:|" * len(baselines),
            ]
            for mine, against in gaps.items():
                cells = " | ".join(
                    f"{_fmt(rows[mine]['hb_gap_ms'], 0)} vs {_fmt(rows[b]['hb_gap_ms'], 0)} ms "
                    f"({_fmt(against.get(b))})"
                    for b in baselines
                )
                lines.append(f"| `{mine}` | {cells} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def plots(
    summary: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]], out: Path
) -> list[Path]:
    """Per scenario: bars of the three headline medians per strategy; and one timeline (guest
    ops per heartbeat on each host) per strategy, from its median run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for scenario in summary:
        tag = f"{scenario['link']}-{scenario['workload']}"
        rows = scenario["strategies"]
        names = [s for s in ALL_STRATEGIES if s in rows]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for ax, (measure, label) in zip(
            axes,
            (
                ("total_time_s", "total_time_s (s)"),
                ("time_to_switchover_s", "time_to_switchover_s (s)"),
                ("max_io_gap_ms", "max_io_gap_ms (ms)"),
            ),
            strict=True,
        ):
            values = [rows[s][measure] or 0.0 for s in names]
            colors = ["tab:gray" if s == "shared" else "tab:orange" if s in BASELINES
                      else "tab:blue" for s in names]  # fmt: skip
            ax.bar(names, values, color=colors)
            if measure == "total_time_s":
                limits = [rows[s]["limit_s"] for s in names]
                ax.scatter(names, [v or 0 for v in limits], marker="_", s=400, color="black",
                           label="limit_s", zorder=3)  # fmt: skip
                ax.legend()
            ax.set_title(label)
            ax.tick_params(axis="x", rotation=45)
        fig.suptitle(f"{scenario['link']}, {scenario['workload']} (median of runs)")
        fig.tight_layout()
        path = out / f"bars-{tag}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        made.append(path)
        for strategy in names:
            chosen = _median_run(runs, scenario["link"], scenario["workload"], strategy)
            if chosen is None:
                continue
            made.append(_timeline(plt, chosen, out / f"timeline-{tag}-{strategy}.png"))
    return made


def _median_run(
    runs: Sequence[dict[str, Any]], link: str, workload: str, strategy: str
) -> dict[str, Any] | None:
    key = (link, workload, strategy)
    its = [r for r in runs if (r["link"], r["workload"], r["strategy"]) == key
           and r["report"].get("total_time_s") is not None]  # fmt: skip
    if not its:
        return None
    its.sort(key=lambda r: r["report"]["total_time_s"])
    return its[(len(its) - 1) // 2]


def _timeline(plt: Any, run: dict[str, Any], path: Path) -> Path:
    report = run["report"]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    for host, color in (("a", "tab:blue"), ("b", "tab:green")):
        points = [(t, ops) for t, ops, h in run["timeline"] if h == host]
        if points:
            ax.plot(*zip(*points, strict=True), color=color, label=f"host {host}", lw=1)
    for key, style in (("time_to_switchover_s", "--"), ("total_time_s", ":")):
        if report.get(key) is not None:
            ax.axvline(report[key], color="black", ls=style, lw=1, label=key)
    ax.axvline(0, color="gray", lw=1)
    ax.set_xlabel("seconds since the migrate command")
    ax.set_ylabel("guest I/O per 100 ms")
    ax.set_title(f"{run['strategy']}: {run['link']}, {run['workload']} (run {run['run'] + 1})")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --- the machine and the lab -----------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qemu = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return {
        "os": _os_release(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "qemu": qemu[0] if qemu else "unknown",
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _os_release() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.system()


async def run_matrix(
    plan: Plan, say: Say, on_run: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run ``plan`` on a fresh lab; returns ``{"plan", "machine", "runs", "summary"}``.
    ``on_run`` gets each run as it ends (to keep what a long matrix did so far)."""
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
    if LAB in Lab.list():
        say(f"removing the lab {LAB!r} a previous run left")
        await asyncio.to_thread(Lab.load(LAB).down)
    say(f"making a 2-host lab {LAB!r}; {plan.count} migrations to run")
    lab = await asyncio.to_thread(Lab.up, name=LAB, hosts=2, link_rate=plan.links[0])
    runs: list[dict[str, Any]] = []
    try:
        a, b = (Endpoint(url=h.url, token=lab.token, name=h.name) for h in lab.hosts[:2])
        for link in plan.links:
            for host in ("a", "b"):
                await asyncio.to_thread(lab.shape, host, link)
            rate = parse_rate(link)
            for workload in plan.workloads:
                for index in range(plan.runs):
                    first = len(runs) + 1
                    names = {s: f"bn{first + i}" for i, s in enumerate(plan.strategies)}
                    say(f"booting {len(names)} guests ({workload}) for run {index + 1} of "
                        f"{link}")  # fmt: skip
                    booted = await boot_round(a, plan, workload, names)
                    for strategy in plan.strategies:
                        n = len(runs) + 1
                        guest = booted[strategy]
                        run = await one_run(a, b, plan, link, rate, workload, strategy, index,
                                            guest)  # fmt: skip
                        runs.append(run)
                        say(f"[{n}/{plan.count}] {describe(run)}")
                        if on_run is not None:
                            on_run(run)
    finally:
        say(f"removing the lab {LAB!r}")
        await asyncio.to_thread(lab.down)
    meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["duration_s"] = round(time.time() - started, 1)
    return {"plan": asdict(plan), "machine": meta, "runs": runs, "summary": summarize(runs)}


def describe(run: dict[str, Any]) -> str:
    r = run["report"]
    head = f"{run['link']} {run['workload']} {run['strategy']} run {run['run'] + 1}: "
    if r.get("status") != "completed":
        return head + f"FAILED: {r.get('error')}"
    return head + (
        f"switchover {_fmt(r.get('time_to_switchover_s'))} s, total {_fmt(r.get('total_time_s'))}"
        f" s (limit {_fmt(r.get('limit_s'))} s), gap {_fmt(r.get('max_io_gap_ms'), 0)} ms, "
        f"heartbeat gap {_fmt(run.get('hb_gap_ms'), 0)} ms, integrity {r.get('integrity')}"
    )


@dataclass
class Guest:
    """A guest booted for one run: suspended once its prefill is done, or its boot's error."""

    name: str
    boot_s: float = 0.0
    error: str | None = None


def vm_request(plan: Plan, workload: str, strategy: str, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "ram_mb": plan.ram_mb,
        "disk_size": plan.disk_size,
        "workload": plan.workload_spec(workload),
        "storage": "shared" if strategy == "shared" else "local",
        "agent": strategy not in BASELINES,
    }


async def boot_round(
    a: Endpoint, plan: Plan, workload: str, names: dict[str, str]
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
                await start_vm(a, vm_request(plan, workload, strategy, name))
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
) -> dict[str, Any]:
    """Resume ``guest`` on ``a``, let it do three seconds of steady I/O, migrate it to ``b``
    with ``strategy``, remove it."""
    name = guest.name
    result: dict[str, Any] = {"link": link, "workload": workload, "strategy": strategy,
                              "run": index, "vm": name, "boot_s": guest.boot_s}  # fmt: skip
    beats: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    t0 = began = time.time()
    try:
        if guest.error is not None:
            raise DevagentError(guest.error)
        async with DaemonClient(a) as client:
            await client.post(f"/v1/vms/{name}/resume")
        await wait_heartbeats(a, name, BASELINE_BEATS, with_io=workload != "idle", timeout=60)
        t0 = time.time()
        result["setup_s"] = round(t0 - began, 1)  # the resume and the steady baseline
        run_timeout = max(RUN_TIMEOUT_S, RUN_LIMITS * _rough_limit(plan, rate))
        collector = asyncio.create_task(
            _collect(a, name, t0 - 3.0, beats["a"], run_timeout + COLLECT_SPARE_S)
        )
        try:
            report = await asyncio.wait_for(
                migrate(a, b, name, storage=strategy, link_rate_bps=rate), run_timeout
            )
            result["report"] = report.to_json()
        except TimeoutError:
            result["report"] = {"status": "failed", "error": "the migration did not finish "
                                "in time (the bench gave up on it)"}  # fmt: skip
        finally:
            result["migrate_s"] = round(time.time() - t0, 1)  # the migrate call, report and all
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
        with contextlib.suppress(DevagentError):
            async with DaemonClient(b) as client:
                got = await client.get(f"/v1/vms/{name}/heartbeats", since=t0 - 3.0)
            beats["b"] = got["heartbeats"]
    except DevagentError as err:
        result.setdefault("report", {"status": "failed", "error": f"bench: {err}"})
    finally:
        for host in (a, b):
            with contextlib.suppress(DevagentError):
                async with DaemonClient(host) as client:
                    await client.delete(f"/v1/vms/{name}")
    result["timeline"] = [
        [round(beat["host_time"] - t0, 3), beat["ops"], host]
        for host, its in beats.items()
        for beat in its
    ]
    result["timeline"].sort()
    result["ratio"] = run_ratio(result["report"])  # total_time_s / limit_s
    result["wall_s"] = round(time.time() - began, 1)  # resume to removal: what the run cost
    end = result["report"].get("total_time_s")
    with_io = workload != "idle"
    result["hb_gap_ms"] = (
        heartbeat_gap_ms(result["timeline"], end, with_io=with_io) if end else None
    )
    return result


def _rough_limit(plan: Plan, rate: int) -> float:
    from devagent.vocab import parse_size

    return (parse_size(plan.prefill) + (plan.ram_mb << 20)) * 8 / rate


async def _collect(
    at: Endpoint, name: str, since: float, into: list[dict[str, Any]], timeout: float
) -> None:
    """Keep the source's heartbeats as they come, until the VM is gone from the source
    (the run cancels this once its migration ended; ``timeout`` bounds it regardless)."""
    async with DaemonClient(at) as client:

        async def gone() -> bool:
            nonlocal since
            try:
                got = await client.get(f"/v1/vms/{name}/heartbeats", since=since)
            except NotFound:
                return True
            except DevagentError:
                return False  # a busy daemon: ask again
            for beat in got["heartbeats"]:
                into.append(beat)
                since = max(since, float(beat["host_time"]))
            return False

        with contextlib.suppress(WaitTimeout):
            await wait_until(
                gone, timeout=timeout, what=f"VM {name} gone from its source", interval=POLL_S
            )


def command_line() -> str:
    return " ".join(["devagent", *sys.argv[1:]])
