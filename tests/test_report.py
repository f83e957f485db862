"""The measures computed from heartbeats."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from devagent.daemon.netstat import parse_proc_net_dev
from devagent.report import (
    MigrationReport,
    fill_io_measures,
    gap_before,
    limit_seconds,
    max_io_gap_s,
    ops_lost,
    ops_rate,
)


@dataclass(frozen=True)
class B:
    host_time: float
    ops: int = 10
    errors: int = 0
    verify_failures: int = 0
    lat_max_us: int = 1000
    lat_p99_us: int = 800
    ops_total: int = 0


def beats(times: list[float], **kw: int) -> list[B]:
    return [B(t, **kw) for t in times]


def test_gap_is_the_largest_between_beats_with_io() -> None:
    series = beats([0.9, 1.0, 1.1, 1.2, 1.9, 2.0])
    assert abs((max_io_gap_s(series, 1.0, 2.0) or 0) - 0.7) < 1e-9


def test_gap_counts_from_the_last_beat_before_the_window() -> None:
    series = beats([0.1, 1.5, 1.6])
    assert abs((max_io_gap_s(series, 1.0, 2.0) or 0) - 1.4) < 1e-9


def test_a_gap_the_window_ends_in_counts_to_its_first_beat_after() -> None:
    """A baseline's migration can be declared over (source released) before the guest's
    first heartbeat on the destination: the pause still counts whole."""
    series = beats([1.0, 1.1, 1.2, 2.3, 2.4])
    assert abs((max_io_gap_s(series, 1.0, 2.0) or 0) - 1.1) < 1e-9
    assert abs((max_io_gap_s(beats([1.0, 1.1, 5.0]), 1.0, 1.15) or 0) - 3.9) < 1e-9
    assert abs((max_io_gap_s(beats([1.0, 1.1, 5.0]), 1.0, 1.05) or 0) - 0.1) < 1e-9


def test_beats_without_io_do_not_close_a_gap() -> None:
    series = [B(1.0), B(1.1, ops=0), B(1.2, ops=0), B(1.5)]
    assert abs((max_io_gap_s(series, 1.0, 2.0) or 0) - 0.5) < 1e-9


def test_no_io_gives_no_gap() -> None:
    assert max_io_gap_s(beats([1.0, 1.1], ops=0), 1.0, 2.0) is None


def test_rate_and_ratio() -> None:
    series = beats([0.5, 1.0, 1.5, 2.0], ops=10) + beats([2.5, 3.0], ops=5)
    assert ops_rate(series, 0.0, 2.0) == 20.0
    report = MigrationReport(vm="v", source="a", destination="b", storage="shared")
    fill_io_measures(report, series, start=2.0, end=3.0, baseline_start=0.0)
    assert report.io_rate_ratio == 0.5
    assert report.max_io_gap_ms == 500.0
    assert report.guest_io_errors == 0


def test_errors_come_from_the_last_beat() -> None:
    series = [B(1.0), B(2.0, errors=3, verify_failures=1)]
    report = MigrationReport(vm="v", source="a", destination="b", storage="shared")
    fill_io_measures(report, series, start=1.5, end=2.5, baseline_start=0.0)
    assert (report.guest_io_errors, report.guest_verify_failures) == (3, 1)


def test_no_beats_marks_measures_missing() -> None:
    report = MigrationReport(vm="v", source="a", destination="b", storage="shared")
    fill_io_measures(report, [], start=0, end=1, baseline_start=0)
    assert report.max_io_gap_ms is None
    assert "ioprobe" in report.missing["max_io_gap_ms"]


def test_limit() -> None:
    assert limit_seconds(125_000_000, 1_000_000_000) == 1.0
    assert limit_seconds(1, None) is None


def test_report_round_trips_json() -> None:
    report = MigrationReport(vm="v", source="a", destination="b", storage="shared", downtime_ms=3)
    assert MigrationReport.from_json(report.to_json() | {"future_field": 1}) == report


def test_proc_net_dev() -> None:
    text = (
        "Inter-|   Receive |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes ...\n"
        "    lo:     100       1    0    0    0     0          0         0"
        "      100       1    0    0    0     0       0          0\n"
        "  eth0:    5000      10    0    0    0     0          0         0"
        "     7000      12    0    0    0     0       0          0\n"
    )
    assert parse_proc_net_dev(text) == {"lo": (100, 100), "eth0": (5000, 7000)}


def test_agent_completions_make_the_gap_exact() -> None:
    series = beats([0.5, 1.0, 1.1, 1.2, 1.3, 2.0])  # heartbeats would say 700 ms
    done = [0.99, 1.001, 1.002, 1.25, 1.31, 1.32, 1.9]
    report = MigrationReport(vm="v", source="a", destination="b", storage="shared")
    fill_io_measures(report, series, start=1.0, end=2.0, baseline_start=0.0, completions=done)
    assert report.max_io_gap_ms == 580.0
    assert report.io_gap_source == "agent journals"


def test_an_idle_guest_has_no_io_gap_even_with_journal_completions() -> None:
    """The journals of an idle guest hold only QEMU's flushes: no gap is made of them."""
    report = MigrationReport(vm="v", source="a", destination="b", storage="hybrid")
    idle = beats([t / 10 for t in range(40)], ops=0)
    fill_io_measures(report, idle, start=2.0, end=3.0, baseline_start=0.0,
                     completions=[0.5, 2.9])  # fmt: skip
    assert report.max_io_gap_ms is None
    assert "idle" in report.missing["max_io_gap_ms"]
    busy = MigrationReport(vm="v", source="a", destination="b", storage="hybrid")
    fill_io_measures(busy, beats([t / 10 for t in range(40)]), start=2.0, end=3.0,
                     baseline_start=0.0, completions=[1.9, 2.1, 2.5, 2.6])  # fmt: skip
    assert busy.max_io_gap_ms == 400.0 and busy.max_io_gap_at_s == 0.1


def test_the_gap_excess_is_the_migrations_gap_less_the_guests_own_just_before() -> None:
    """Same instrument both sides: a guest whose own I/O stops for 300 ms now and then, a
    migration whose largest gap is 450 ms, adds 150 ms."""
    done = [0.0, 0.1, 0.4, 0.6, 0.8, 1.0, 1.05, 1.5, 1.6, 2.0]  # own gap 0.1→0.4: 300 ms
    report = MigrationReport(vm="v", source="a", destination="b", storage="hybrid")
    fill_io_measures(report, beats([t / 10 for t in range(25)]), start=1.0, end=2.0,
                     baseline_start=0.0, completions=done)  # fmt: skip
    assert report.max_io_gap_ms == 450.0
    assert report.io_gap_excess_ms == 150.0


def test_the_window_before_is_as_long_as_the_migration_within_the_baseline() -> None:
    times = [0.0, 0.8, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    assert gap_before(times, 1.5, 2.0, earliest=0.0) == pytest.approx(0.1)  # [1.0, 1.5]
    assert gap_before(times, 1.5, 3.0, earliest=0.0) == pytest.approx(0.8)  # [0.0, 1.5]
    assert gap_before(times, 1.5, 3.0, earliest=0.5) == pytest.approx(0.2)  # [0.5, 1.5]
    assert gap_before([1.4], 1.5, 2.0, earliest=0.0) is None


def test_a_guest_whose_own_gaps_are_longer_has_a_negative_excess() -> None:
    series = beats([0.0, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0])
    report = MigrationReport(vm="v", source="a", destination="b", storage="shared")
    fill_io_measures(report, series, start=1.0, end=2.0, baseline_start=0.0)
    assert report.io_gap_source == "probe heartbeats"
    assert report.io_gap_excess_ms == pytest.approx(100.0 - 900.0)


def test_no_io_before_the_migration_leaves_the_excess_missing() -> None:
    report = MigrationReport(vm="v", source="a", destination="b", storage="hybrid")
    fill_io_measures(report, [], start=1.0, end=2.0, baseline_start=0.0,
                     completions=[0.5, 1.2, 1.9])  # fmt: skip
    assert report.max_io_gap_ms == 700.0
    assert report.io_gap_excess_ms is None
    assert "before the migration" in report.missing["io_gap_excess_ms"]
    idle = MigrationReport(vm="v", source="a", destination="b", storage="hybrid")
    fill_io_measures(idle, beats([0.5, 1.5], ops=0), start=1.0, end=2.0, baseline_start=0.0)
    assert "idle" in idle.missing["io_gap_excess_ms"]


def test_ops_lost_is_how_far_the_guest_went_back_across_the_switchover() -> None:
    source = [B(1.0, ops_total=100), B(1.1, ops_total=140)]
    assert ops_lost(source, [B(1.5, ops_total=141), B(1.6, ops_total=150)]) == 0
    assert ops_lost(source, [B(1.5, ops_total=140)]) == 0  # no op in between: not lost
    assert ops_lost(source, [B(1.5, ops_total=137), B(1.6, ops_total=150)]) == 3
    assert ops_lost(source, []) is None and ops_lost([], source) is None
