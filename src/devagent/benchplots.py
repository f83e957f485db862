"""The benchmark's plots, drawn with matplotlib (imported only when plotting): per scenario,
bars of the three headline medians per strategy, and one timeline (guest I/O per heartbeat
on each host) per strategy, from its median run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devagent.benchstats import ALL_STRATEGIES
from devagent.vocab import BASELINES


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
