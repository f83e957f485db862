"""The benchmark's plots, drawn with matplotlib (imported only when plotting): per scenario,
bars of the three headline medians per strategy, and one timeline (guest I/O per heartbeat
on each host) per strategy, from its median run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from devagent.benchstats import ALL_STRATEGIES
from devagent.benchtypes import Run, Scenario, StrategyRow, TimelinePoint
from devagent.vocab import BASELINES

#: The three bars per strategy: a measure's median, and its label.
BARS: tuple[tuple[Callable[[StrategyRow], float | None], str], ...] = (
    (lambda r: r.total_time_s, "total_time_s (s)"),
    (lambda r: r.time_to_switchover_s, "time_to_switchover_s (s)"),
    (lambda r: r.max_io_gap_ms, "max_io_gap_ms (ms)"),
)


def plots(summary: Sequence[Scenario], runs: Sequence[Run], out: Path) -> list[Path]:
    """Per scenario: bars of the three headline medians per strategy; and one timeline (guest
    ops per heartbeat on each host) per strategy, from its median run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for scenario in summary:
        disks = f", {scenario.disks} disks" if scenario.disks > 1 else ""
        tag = f"{scenario.link}-{scenario.workload}" + (
            f"-{scenario.disks}disks" if scenario.disks > 1 else ""
        )
        rows = scenario.strategies
        names = [s for s in ALL_STRATEGIES if s in rows]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for ax, (measure, label) in zip(axes, BARS, strict=True):
            values = [measure(rows[s]) or 0.0 for s in names]
            colors = ["tab:gray" if s == "shared" else "tab:orange" if s in BASELINES
                      else "tab:blue" for s in names]  # fmt: skip
            ax.bar(names, values, color=colors)
            if label == "total_time_s (s)":
                limits = [rows[s].limit_s for s in names]
                ax.scatter(names, [v or 0 for v in limits], marker="_", s=400, color="black",
                           label="limit_s", zorder=3)  # fmt: skip
                ax.legend()
            ax.set_title(label)
            ax.tick_params(axis="x", rotation=45)
        fig.suptitle(f"{scenario.link}, {scenario.workload}{disks} (median of runs)")
        fig.tight_layout()
        path = out / f"bars-{tag}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        made.append(path)
        for strategy in names:
            chosen = _median_run(runs, scenario, strategy)
            if chosen is None or chosen.timeline is None:
                continue  # no run completed, or its heartbeats were not kept
            path = out / f"timeline-{tag}-{strategy}.png"
            made.append(_timeline(plt, chosen, chosen.timeline, path))
    return made


def _median_run(runs: Sequence[Run], scenario: Scenario, strategy: str) -> Run | None:
    """The scenario's run of this strategy with the median ``total_time_s`` (the first of
    the two middle ones)."""
    key = (scenario.link, scenario.workload, scenario.disks, strategy)
    its = [(r.report.total_time_s, n) for n, r in enumerate(runs)
           if (r.link, r.workload, r.disks, r.strategy) == key
           and r.report.total_time_s is not None]  # fmt: skip
    if not its:
        return None
    its.sort()
    return runs[its[(len(its) - 1) // 2][1]]


def _timeline(plt: Any, run: Run, timeline: Sequence[TimelinePoint], path: Path) -> Path:
    report = run.report
    fig, ax = plt.subplots(figsize=(9, 3.2))
    for host, color in (("a", "tab:blue"), ("b", "tab:green")):
        points = [(p.t, p.ops) for p in timeline if p.host == host]
        if points:
            ax.plot(*zip(*points, strict=True), color=color, label=f"host {host}", lw=1)
    for key, at, style in (("time_to_switchover_s", report.time_to_switchover_s, "--"),
                           ("total_time_s", report.total_time_s, ":")):  # fmt: skip
        if at is not None:
            ax.axvline(at, color="black", ls=style, lw=1, label=key)
    ax.axvline(0, color="gray", lw=1)
    ax.set_xlabel("seconds since the migrate command")
    ax.set_ylabel("guest I/O per 100 ms")
    ax.set_title(f"{run.strategy}: {run.link}, {run.workload} (run {run.run + 1})")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
