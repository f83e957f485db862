"""The benchmark's pure part: what a set of migration runs says.

Per scenario (link rate, workload): each strategy's medians over its completed runs, the best
disk-moving strategy by median ``total_time_s / limit_s``, devagent's heartbeat gap against
each QEMU baseline's (:func:`summarize`), and the markdown tables (:func:`markdown`).
:func:`rederive` works out a stored run's heartbeat figures again with this code's
definitions. No I/O: every function takes runs (:class:`devagent.benchtypes.Run`, as
``results.json`` keeps them) and returns figures (a :class:`~devagent.benchtypes.Scenario`
per link and workload) or text, and is unit-tested on made-up runs.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence

from devagent.benchtypes import Run, Scenario, StrategyRow, TimelinePoint
from devagent.report import MigrationReport, largest_gap, largest_gap_at
from devagent.vocab import BASELINES, STRATEGIES

#: Every strategy, in the order tables and plots list them: the floor, QEMU's, devagent's.
ALL_STRATEGIES = ("shared", *BASELINES, *(s for s in STRATEGIES if s != "shared"))
DEVAGENT_MOVING = tuple(s for s in STRATEGIES if s != "shared")


def median(values: Iterable[float | int | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def run_ratio(report: MigrationReport) -> float | None:
    total, limit = report.total_time_s, report.limit_s
    if total is None or not limit:
        return None
    return round(total / limit, 3)


def heartbeat_gap_ms(
    timeline: Sequence[TimelinePoint], end: float, *, with_io: bool = True
) -> float | None:
    """Largest gap between heartbeats (with I/O, if ``with_io``; an idle guest's heartbeats
    alone show when it was paused) over [0, end], in times relative to the start."""
    gap = largest_gap((p.t for p in timeline if p.ops > 0 or not with_io), 0.0, end)
    return round(gap * 1000, 1) if gap is not None else None


def rederive(run: Run) -> list[str]:
    """Work out again, with this code's definitions, what a stored run's heartbeats give:
    its heartbeat gap, and ``max_io_gap_ms`` where its report took that from the heartbeats
    (the QEMU baselines, which have no agent journal). Returns the names that changed. A
    run whose heartbeats were not kept (a stored copy left them out) keeps its figures."""
    report, timeline = run.report, run.timeline
    run.ratio = run_ratio(report)
    if timeline is None:
        return []
    end = report.total_time_s
    changed = []
    if end is not None:
        gap = heartbeat_gap_ms(timeline, end, with_io=run.workload != "idle")
        if gap != run.hb_gap_ms:
            run.hb_gap_ms = gap
            changed.append("hb_gap_ms")
    if report.io_gap_source == "probe heartbeats" and report.max_io_gap_ms:
        window_end = max(end or 0.0, report.time_to_switchover_s or 0.0)
        found = largest_gap_at((p.t for p in timeline if p.ops > 0), 0.0, window_end)
        # (the timeline keeps ms: a difference under 1 ms is its rounding, not a change)
        if found is not None and abs(found[1] * 1000 - report.max_io_gap_ms) >= 1.0:
            report.max_io_gap_ms = round(found[1] * 1000, 1)
            report.max_io_gap_at_s = round(found[0], 3)
            changed.append("max_io_gap_ms")
    return changed


def summarize(runs: Sequence[Run]) -> list[Scenario]:
    """One entry per (link, workload, disks): each strategy's medians over its completed
    runs, the best disk-moving strategy by median ``total_time_s / limit_s`` (``shared``
    moves no disk: it is the floor, not a contender), and devagent's gap against each
    baseline's."""
    scenarios: dict[tuple[str, str, int], dict[str, list[Run]]] = {}
    for run in runs:
        key = (run.link, run.workload, run.disks)
        scenarios.setdefault(key, {}).setdefault(run.strategy, []).append(run)
    out = []
    for (link, workload, disks), by_strategy in scenarios.items():
        rows = {strategy: strategy_row(its) for strategy, its in by_strategy.items()}
        contenders = {
            s: r.ratio
            for s, r in rows.items()
            if s != "shared"
            and r.completed == r.runs
            and r.integrity_ok == r.runs
            and r.ratio is not None
        }
        best = min(contenders, key=lambda s: contenders[s], default=None)
        gaps: dict[str, dict[str, float | None]] = {}
        for mine in DEVAGENT_MOVING:
            if mine not in rows:
                continue
            gaps[mine] = {}
            for theirs in BASELINES:
                if theirs in rows:
                    gaps[mine][theirs] = _gap_ratio(rows[mine], rows[theirs])
        out.append(
            Scenario(
                link=link,
                workload=workload,
                disks=disks,
                strategies=rows,
                best=best,
                best_ratio=contenders[best] if best else None,
                gap_vs_qemu=gaps,
            )
        )
    return out


def beside_one_disk(scenario: Scenario, summary: Sequence[Scenario]) -> str:
    """A set of disks' total / limit for each strategy beside the same scenario's with one
    disk (its limit counts every disk's bytes, so the ratios compare)."""
    one = next(
        (s for s in summary
         if (s.link, s.workload, s.disks) == (scenario.link, scenario.workload, 1)),
        None,
    )  # fmt: skip
    cells = []
    for strategy, row in scenario.strategies.items():
        single = one.strategies.get(strategy) if one is not None else None
        cells.append(
            f"`{strategy}` {fmt(row.ratio)} with {scenario.disks} disks, "
            f"{fmt(single.ratio if single else None)} with one"
        )
    return "Total / limit beside one disk's: " + "; ".join(cells) + "."


def strategy_row(its: Sequence[Run]) -> StrategyRow:
    """One strategy's runs in one scenario: the medians over those that completed."""
    done = [r.report for r in its if r.report.status == "completed"]

    def med(measure: Callable[[MigrationReport], float | int | None]) -> float | None:
        return median(measure(report) for report in done)

    return StrategyRow(
        runs=len(its),
        completed=len(done),
        time_to_switchover_s=med(lambda r: r.time_to_switchover_s),
        total_time_s=med(lambda r: r.total_time_s),
        downtime_ms=med(lambda r: r.downtime_ms),
        max_io_gap_ms=med(lambda r: r.max_io_gap_ms),
        io_gap_excess_ms=med(lambda r: r.io_gap_excess_ms),
        guest_max_latency_ms=med(lambda r: r.guest_max_latency_ms),
        guest_p99_latency_ms=med(lambda r: r.guest_p99_latency_ms),
        io_rate_ratio=med(lambda r: r.io_rate_ratio),
        bytes_between_hosts=med(lambda r: r.bytes_between_hosts),
        limit_s=med(lambda r: r.limit_s),
        guest_io_errors=_most(r.guest_io_errors for r in done),
        guest_verify_failures=_most(r.guest_verify_failures for r in done),
        guest_ops_lost=_most(r.guest_ops_lost for r in done),
        net_frames_buffered=med(lambda r: r.net_frames_buffered),
        net_frames_forwarded=med(lambda r: r.net_frames_forwarded),
        net_frames_lost=med(lambda r: r.net_frames_lost),
        ping_max_gap_ms=med(lambda r: r.ping_max_gap_ms),
        ratio=med(run_ratio),
        hb_gap_ms=median(r.hb_gap_ms for r in its if r.report.status == "completed"),
        integrity_ok=sum(1 for r in done if r.integrity == "ok"),
        errors=sorted({r.report.error for r in its if r.report.error}),
    )


def _most(counts: Iterable[int | None]) -> int | None:
    return max((c for c in counts if c is not None), default=None)


def _gap_ratio(mine: StrategyRow, theirs: StrategyRow) -> float | None:
    """devagent's heartbeat gap ÷ the baseline's: the same instrument on both sides."""
    a, b = mine.hb_gap_ms, theirs.hb_gap_ms
    return round(a / b, 2) if a is not None and b else None


def fmt(value: float | int | str | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


TABLE_HEAD = (
    "| strategy | runs ok | switchover s | total s | `limit_s` | total / limit | downtime ms "
    "| `max_io_gap_ms` | `io_gap_excess_ms` | heartbeat gap ms | guest max lat ms "
    "| guest p99 ms | I/O rate ratio "
    "| MB on the link | errors / verify | integrity |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
)


def markdown(summary: Sequence[Scenario]) -> str:
    """A table per link and workload (medians), its best strategy, and the gap comparison."""
    parts = []
    for scenario in summary:
        rows = scenario.strategies
        disks = f", {scenario.disks} disks" if scenario.disks > 1 else ""
        lines = [f"### {scenario.link}, {scenario.workload}{disks}", "", TABLE_HEAD]
        for strategy in [s for s in ALL_STRATEGIES if s in rows] + sorted(
            set(rows) - set(ALL_STRATEGIES)
        ):
            r = rows[strategy]
            moved = r.bytes_between_hosts
            lines.append(
                f"| `{strategy}` | {r.completed}/{r.runs} "
                f"| {fmt(r.time_to_switchover_s)} | {fmt(r.total_time_s)} "
                f"| {fmt(r.limit_s)} | {fmt(r.ratio)} "
                f"| {fmt(r.downtime_ms, 0)} | {fmt(r.max_io_gap_ms, 0)} "
                f"| {fmt(r.io_gap_excess_ms, 0)} | {fmt(r.hb_gap_ms, 0)} "
                f"| {fmt(r.guest_max_latency_ms, 0)} "
                f"| {fmt(r.guest_p99_latency_ms, 0)} | {fmt(r.io_rate_ratio)} "
                f"| {fmt(moved / 1e6 if moved is not None else None, 0)} "
                f"| {fmt(r.guest_io_errors)} / {fmt(r.guest_verify_failures)} "
                f"| {r.integrity_ok}/{r.completed} ok"
                f"{f', {r.guest_ops_lost} guest ops lost' if r.guest_ops_lost else ''} |"
            )
        lines.append("")
        if scenario.best and scenario.best_ratio is not None:
            lines.append(
                f"Best strategy moving the disk: `{scenario.best}`, total / limit "
                f"{scenario.best_ratio:.2f} (median)."
            )
        else:
            lines.append("No strategy moving the disk completed every run intact.")
        if scenario.disks > 1:
            lines.append(beside_one_disk(scenario, summary))
        failed = {s: r.errors for s, r in rows.items() if r.errors}
        for strategy, errors in failed.items():
            lines.append(f"`{strategy}` failed: {'; '.join(errors)}")
        gaps = scenario.gap_vs_qemu
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
                    f"{fmt(rows[mine].hb_gap_ms, 0)} vs {fmt(rows[b].hb_gap_ms, 0)} ms "
                    f"({fmt(against.get(b))})"
                    for b in baselines
                )
                lines.append(f"| `{mine}` | {cells} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


TLS_HEAD = (
    "| link | workload | strategy | total, TLS (s) | total, plaintext (s) | TLS / plaintext "
    "| switchover, TLS (s) | switchover, plaintext (s) | max I/O gap, TLS (ms) "
    "| max I/O gap, plaintext (ms) |\n|---|---|---|---|---|---|---|---|---|---|"
)


def tls_ratio(secure: StrategyRow, plain: StrategyRow) -> float | None:
    """A strategy's median total time with TLS over its median total in plaintext."""
    if secure.total_time_s is None or not plain.total_time_s:
        return None
    return secure.total_time_s / plain.total_time_s


def tls_markdown(secure: Sequence[Scenario], plain: Sequence[Scenario]) -> str:
    """The cost of TLS: each scenario's strategies, with TLS and in plaintext, side by side."""
    lines = [TLS_HEAD]
    plain_by = {(s.link, s.workload, s.disks): s for s in plain}
    for scenario in secure:
        other = plain_by.get((scenario.link, scenario.workload, scenario.disks))
        if other is None:
            continue
        for strategy in [s for s in ALL_STRATEGIES if s in scenario.strategies]:
            a, b = scenario.strategies[strategy], other.strategies.get(strategy)
            if b is None:
                continue
            lines.append(
                f"| {scenario.link} | {scenario.workload} | `{strategy}` "
                f"| {fmt(a.total_time_s)} | {fmt(b.total_time_s)} | {fmt(tls_ratio(a, b))} "
                f"| {fmt(a.time_to_switchover_s)} | {fmt(b.time_to_switchover_s)} "
                f"| {fmt(a.max_io_gap_ms, 0)} | {fmt(b.max_io_gap_ms, 0)} |"
            )
    return "\n".join(lines) + "\n"
