"""The timeline picture: phase bands from a report's steps, the I/O rate from heartbeats,
and a real PNG drawn from a report."""

from __future__ import annotations

from pathlib import Path

import pytest

from devagent.errors import UsageError
from devagent.plot import io_rate, phase_bands, plot_timeline
from devagent.report import MigrationReport

TIMELINE = {
    "destination_ready": 0.6,
    "mirror_started": 0.61,
    "ram_started": 0.7,
    "source_stopped": 1.4,
    "ram_completed": 1.45,
    "mirror_ended": 1.46,
    "resumed": 1.5,
    "disk_local": 3.9,
    "released": 4.1,
}


def test_phase_bands_follow_the_steps_and_skip_what_did_not_happen() -> None:
    bands = phase_bands(TIMELINE)
    assert [b[0] for b in bands] == [
        "prepare destination",
        "disk push / mirror",
        "RAM",
        "switchover",
        "disk fetched after",
        "source released",
    ]
    assert ("RAM", 0.7, 1.4) in bands and ("switchover", 1.4, 1.5) in bands
    shared = phase_bands({"destination_ready": 0.5, "ram_started": 0.5, "resumed": 1.0,
                          "ram_completed": 0.95, "released": 1.2})  # fmt: skip
    assert [b[0] for b in shared] == ["prepare destination", "RAM"]


def test_io_rate_counts_the_ops_of_the_last_window() -> None:
    rows = [[t / 10, "a", 20, 1.0, 2.0] for t in range(10)]  # 20 ops every 100 ms
    rate = dict(io_rate(rows, window=0.5))
    assert rate[0.9] == pytest.approx(200.0)  # 5 beats in the window: 100 ops / 0.5 s
    assert rate[0.0] == pytest.approx(40.0)  # only the first beat so far


def test_a_report_is_drawn_into_a_png(tmp_path: Path) -> None:
    report = MigrationReport(vm="m1", source="a", destination="b", storage="hybrid")
    report.timeline = TIMELINE
    report.time_to_switchover_s, report.total_time_s, report.max_io_gap_ms = 1.5, 4.1, 90.0
    report.max_io_gap_at_s = 1.42
    report.io_series = [[t / 10 - 3, "a", 20, 1.5, 4.0] for t in range(44)] + [
        [t / 10, "b", 20, 2.0, 6.0] for t in range(15, 45)
    ]
    out = plot_timeline(report, tmp_path / "plots" / "m1.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with pytest.raises(UsageError, match="no timeline"):
        plot_timeline(MigrationReport(vm="x", source="a", destination="b", storage="s"), out)
