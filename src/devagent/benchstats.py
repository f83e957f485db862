"""The benchmark's pure part: what a set of migration runs says.

Per scenario (link rate, workload): each strategy's medians over its completed runs, the best
disk-moving strategy by median ``total_time_s / limit_s``, devagent's heartbeat gap against
each QEMU baseline's (:func:`summarize`), and the markdown tables (:func:`markdown`).
:func:`rederive` works out a stored run's heartbeat figures again with this code's
definitions. No I/O: every function takes runs (dicts, as ``results.json`` keeps them) and
returns figures or text, and is unit-tested on made-up runs.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from devagent.report import MEASURES, largest_gap, largest_gap_at
from devagent.vocab import BASELINES, STRATEGIES

#: Every strategy, in the order tables and plots list them: the floor, QEMU's, devagent's.
ALL_STRATEGIES = ("shared", *BASELINES, *(s for s in STRATEGIES if s != "shared"))
DEVAGENT_MOVING = tuple(s for s in STRATEGIES if s != "shared")
NUMERIC = (*(m for m in MEASURES if m != "integrity"), "ratio", "hb_gap_ms")


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


def fmt(value: Any, digits: int = 2) -> str:
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
                f"| {fmt(r['time_to_switchover_s'])} | {fmt(r['total_time_s'])} "
                f"| {fmt(r['limit_s'])} | {fmt(r['ratio'])} "
                f"| {fmt(r['downtime_ms'], 0)} | {fmt(r['max_io_gap_ms'], 0)} "
                f"| {fmt(r['hb_gap_ms'], 0)} | {fmt(r['guest_max_latency_ms'], 0)} "
                f"| {fmt(r['guest_p99_latency_ms'], 0)} | {fmt(r['io_rate_ratio'])} "
                f"| {fmt(moved / 1e6 if moved is not None else None, 0)} "
                f"| {fmt(r['guest_io_errors'])} / {fmt(r['guest_verify_failures'])} "
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
                    f"{fmt(rows[mine]['hb_gap_ms'], 0)} vs {fmt(rows[b]['hb_gap_ms'], 0)} ms "
                    f"({fmt(against.get(b))})"
                    for b in baselines
                )
                lines.append(f"| `{mine}` | {cells} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
