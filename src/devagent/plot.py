"""A migration's timeline as a picture: its phases as bands, the guest's I/O rate and
latency over time (from the probe's heartbeats on both hosts), the switchover marked.

Everything comes from a :class:`MigrationReport` (its ``timeline`` and ``io_series``), so
a report saved as JSON can be drawn again later. matplotlib is imported only here, and
only when a picture is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devagent.errors import UsageError
from devagent.report import MigrationReport

#: Bands: (label, the step that opens it, the steps that may close it, first found wins).
PHASES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("prepare destination", "", ("destination_ready",)),
    ("disk push / mirror", "mirror_started", ("mirror_ended",)),
    ("RAM", "ram_started", ("source_stopped", "ram_completed")),
    ("switchover", "source_stopped", ("resumed",)),
    ("disk fetched after", "resumed", ("disk_local",)),
    ("source released", "disk_local", ("released",)),
)
DISK_PHASES = frozenset({"disk push / mirror", "disk fetched after"})
COLOURS = ("#d9d9d9", "#9ecae1", "#fdd0a2", "#fc9272", "#a1d99b", "#dadaeb")
RATE_WINDOW_S = 0.5


def phase_bands(timeline: dict[str, float]) -> list[tuple[str, float, float]]:
    """(label, start, end) of each phase the timeline shows, in seconds."""
    bands = []
    for label, opens, closes in PHASES:
        start = 0.0 if not opens else timeline.get(opens)
        end = next((timeline[c] for c in closes if c in timeline), None)
        if start is not None and end is not None and end > start:
            bands.append((label, start, end))
    return bands


def io_rate(
    rows: Sequence[Sequence[Any]], window: float = RATE_WINDOW_S
) -> list[tuple[float, float]]:
    """Guest ops/s over time: the ops of the heartbeats in the last ``window`` seconds."""
    points = sorted((float(r[0]), int(r[2])) for r in rows)
    out = []
    for t, _ in points:
        ops = sum(n for u, n in points if t - window < u <= t)
        out.append((t, ops / window))
    return out


def plot_timeline(report: MigrationReport, path: Path) -> Path:
    """Draw ``report`` into the PNG file ``path``; returns it."""
    if not report.timeline:
        raise UsageError("the report has no timeline to draw (did the migration start?)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate_ax, lat_ax) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    for index, (label, start, end) in enumerate(phase_bands(report.timeline)):
        # The disk's own phases overlap the others: a strip along the top, not a band.
        low = 0.9 if label in DISK_PHASES else 0.0
        for ax in (rate_ax, lat_ax):
            ax.axvspan(start, end, ymin=low, color=COLOURS[index % len(COLOURS)], alpha=0.6, lw=0)
        rate_ax.text((start + end) / 2, 1.01, label, transform=rate_ax.get_xaxis_transform(),
                     ha="center", va="bottom", fontsize=7, rotation=20)  # fmt: skip
    if report.max_io_gap_ms and report.max_io_gap_at_s is not None:
        gap_end = report.max_io_gap_at_s + report.max_io_gap_ms / 1000
        rate_ax.axvspan(report.max_io_gap_at_s, gap_end, ymax=0.1, color="red", lw=0,
                        label="largest I/O gap")  # fmt: skip
    rows = report.io_series
    for host in sorted({str(r[1]) for r in rows}):
        mine = [r for r in rows if r[1] == host]
        rate = io_rate(mine)
        rate_ax.plot([t for t, _ in rate], [v for _, v in rate], label=f"on {host}")
        lat_ax.plot([r[0] for r in mine], [r[3] for r in mine], label=f"p99 on {host}")
        lat_ax.plot([r[0] for r in mine], [r[4] for r in mine], ":", label=f"max on {host}")
    switchover = report.timeline.get("resumed")
    for ax in (rate_ax, lat_ax):
        if switchover is not None:
            ax.axvline(switchover, color="black", lw=1)
        ax.grid(alpha=0.3)
        if rows:
            ax.legend(fontsize=7, loc="upper left")
    rate_ax.set_ylabel("guest I/O (ops/s)")
    lat_ax.set_ylabel("guest latency (ms)")
    lat_ax.set_xlabel("seconds after the migrate command (black line: the VM resumes)")
    gap = f", largest I/O gap {report.max_io_gap_ms} ms" if report.max_io_gap_ms else ""
    fig.suptitle(
        f"{report.vm}: {report.source} → {report.destination} ({report.storage}), "
        f"switchover {report.time_to_switchover_s} s, total {report.total_time_s} s{gap}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
