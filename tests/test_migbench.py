"""The benchmark's pure part on made-up runs: medians, the best strategy's total/limit
ratio, devagent's heartbeat gap against each QEMU baseline's, the markdown and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
from click.testing import CliRunner

from devagent.benchplots import plots
from devagent.benchstats import (
    heartbeat_gap_ms,
    markdown,
    median,
    rederive,
    run_ratio,
    summarize,
    tls_markdown,
    tls_ratio,
)
from devagent.benchtypes import Run, StrategyRow
from devagent.benchtypes import TimelinePoint as P
from devagent.cli import main
from devagent.migbench import QUICK
from devagent.report import MEASURES, MigrationReport


def made_up(strategy: str, run: int, total: float, limit: float, gap: float,
            *, status: str = "completed", integrity: str = "ok") -> Run:  # fmt: skip
    report = MigrationReport(
        vm=f"bn{run}",
        source="a",
        destination="b",
        storage=strategy,
        status=status,
        error=None if status == "completed" else "boom",
        time_to_switchover_s=total / 2,
        total_time_s=total if status == "completed" else None,
        limit_s=limit,
        downtime_ms=10.0,
        max_io_gap_ms=gap,
        guest_io_errors=0,
        guest_verify_failures=0,
        integrity=integrity if status == "completed" else None,
        bytes_between_hosts=50_000_000,
    )
    timeline = [P(t / 10, 5, "a") for t in range(-30, 10)] + [
        P(0.9 + gap / 1000 + t / 10, 5, "b")
        for t in range(20)  # the gap after a's last
    ]
    return Run(link="1gbit", workload="moderate", strategy=strategy, run=run, vm=f"bn{run}",
               report=report, timeline=timeline, hb_gap_ms=gap)  # fmt: skip


def test_median_skips_missing_values_and_is_none_without_any() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([4, 1]) == 2.5
    assert median([None, None]) is None


def test_the_ratio_needs_both_figures() -> None:
    def report(total: float | None, limit: float | None) -> MigrationReport:
        return MigrationReport("bn1", "a", "b", "hybrid", total_time_s=total, limit_s=limit)

    assert run_ratio(report(3.0, 2.0)) == 1.5
    assert run_ratio(report(3.0, None)) is None
    assert run_ratio(report(None, 2.0)) is None


def test_the_heartbeat_gap_counts_from_the_last_beat_before_the_start() -> None:
    timeline = [P(-0.1, 3, "a"), P(0.05, 3, "a"), P(0.6, 3, "b"), P(0.7, 0, "b"), P(1.0, 3, "b")]
    assert heartbeat_gap_ms(timeline, 2.0) == 550.0
    assert heartbeat_gap_ms(timeline, 2.0, with_io=False) == 550.0
    assert heartbeat_gap_ms([P(0.5, 0, "a"), P(0.6, 0, "a")], 2.0) is None


def test_summary_medians_best_ratio_and_gap_comparison() -> None:
    runs = [
        made_up("shared", 0, 1.0, 2.0, 100), made_up("shared", 1, 1.2, 2.0, 100),
        made_up("qemu-mirror", 0, 4.0, 2.0, 500), made_up("qemu-mirror", 1, 6.0, 2.0, 300),
        made_up("qemu-mirror", 2, 5.0, 2.0, 400),
        made_up("hybrid", 0, 3.0, 2.0, 200), made_up("hybrid", 1, 3.4, 2.0, 200),
        made_up("hybrid", 2, 9.0, 2.0, 200),
        made_up("postcopy", 0, 2.2, 2.0, 100), made_up("postcopy", 1, 2.0, 2.0, 100,
                                                       status="failed"),
        made_up("precopy", 0, 2.6, 2.0, 800, integrity="mismatch: ..."),
    ]  # fmt: skip
    [scenario] = summarize(runs)
    rows = scenario.strategies
    assert rows["qemu-mirror"].total_time_s == 5.0
    assert rows["qemu-mirror"].ratio == 2.5
    assert rows["qemu-mirror"].hb_gap_ms == 400.0
    assert rows["qemu-mirror"].bytes_between_hosts == 50_000_000.0
    assert (rows["qemu-mirror"].guest_io_errors, rows["qemu-mirror"].net_frames_lost) == (0, None)
    assert rows["hybrid"].ratio == 1.7  # the median of 1.5, 1.7 and 4.5
    assert (rows["postcopy"].runs, rows["postcopy"].completed) == (2, 1)
    assert rows["postcopy"].errors == ["boom"]
    assert rows["precopy"].integrity_ok == 0
    # shared is the floor, not a contender; postcopy lost a run, precopy its integrity.
    assert (scenario.best, scenario.best_ratio) == ("hybrid", 1.7)
    assert scenario.gap_vs_qemu["hybrid"] == {"qemu-mirror": 0.5}
    assert scenario.gap_vs_qemu["precopy"] == {"qemu-mirror": 2.0}


def test_a_summary_row_has_every_numeric_measure_of_a_report() -> None:
    numeric = [m for m in MEASURES if m != "integrity"]
    assert set(numeric) <= set(StrategyRow.__struct_fields__)


def test_markdown_has_one_table_per_scenario_and_a_row_per_strategy() -> None:
    runs = [made_up(s, 0, 3.0, 2.0, 300) for s in ("shared", "qemu-cor-stream", "hybrid")]
    runs += [msgspec.structs.replace(made_up("hybrid", 0, 3.0, 2.0, 300), workload="heavy")]
    text = markdown(summarize(runs))
    assert text.count("### 1gbit, ") == 2
    moderate = text.split("### 1gbit, heavy")[0]
    rows = [line for line in moderate.splitlines() if line.startswith("| `")]
    assert [row.split("|")[1].strip() for row in rows[:3]] == [
        "`shared`", "`qemu-cor-stream`", "`hybrid`"]  # fmt: skip
    assert "| `hybrid` | 1/1 | 1.50 | 3.00 | 2.00 | 1.50 |" in moderate
    assert "Best strategy moving the disk: `qemu-cor-stream`, total / limit 1.50" in moderate
    assert "| `hybrid` | 300 vs 300 ms (1.00) |" in moderate
    assert "No strategy moving the disk" not in moderate


def test_a_scenario_of_three_disks_is_its_own_beside_the_one_disk_one(tmp_path: Path) -> None:
    """Runs of a guest with 3 disks make their own scenario (devagent's strategies only,
    QEMU's move one disk), its total / limit shown beside the one-disk scenario's."""
    one = [made_up(s, 0, 3.0, 2.0, 300) for s in ("qemu-mirror", "hybrid", "precopy")]
    three = [msgspec.structs.replace(made_up(s, 1, 8.0, 4.0, 300), disks=3)
             for s in ("hybrid", "precopy")]  # fmt: skip
    summary = summarize(one + three)
    assert [(s.disks, sorted(s.strategies)) for s in summary] == [
        (1, ["hybrid", "precopy", "qemu-mirror"]), (3, ["hybrid", "precopy"])]  # fmt: skip
    text = markdown(summary)
    assert "### 1gbit, moderate, 3 disks" in text
    assert ("Total / limit beside one disk's: `hybrid` 2.00 with 3 disks, 1.50 with one; "
            "`precopy` 2.00 with 3 disks, 1.50 with one.") in text  # fmt: skip
    made = plots(summary, one + three, tmp_path)
    assert "bars-1gbit-moderate-3disks.png" in [p.name for p in made]
    plan = msgspec.structs.replace(QUICK, disks=(1, 3))
    assert plan.strategies_for(3) == ("shared", "postcopy", "precopy", "hybrid")
    assert plan.count == 2 * (7 + 4)  # two links


def test_plots_are_pngs(tmp_path: Path) -> None:
    runs = [made_up(s, 0, 3.0, 2.0, 300) for s in ("shared", "qemu-mirror", "postcopy")]
    made = plots(summarize(runs), runs, tmp_path)
    assert sorted(p.name for p in made) == [
        "bars-1gbit-moderate.png",
        "timeline-1gbit-moderate-postcopy.png",
        "timeline-1gbit-moderate-qemu-mirror.png",
        "timeline-1gbit-moderate-shared.png",
    ]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in made)


def test_the_quick_plan_runs_every_strategy_once() -> None:
    assert QUICK.runs == 1 and len(QUICK.strategies) == 7
    assert QUICK.workload_spec("moderate") == "moderate,prefill=32M,span=64M"


def baseline_run_released_before_its_first_beat_there() -> Run:
    """A QEMU baseline's run as the bench stored it before the window fix: released 50 ms
    after the resume, the guest's first heartbeat on b 400 ms after the last on a."""
    run = made_up("qemu-mirror", 0, 1.05, 2.0, 0)
    run.timeline = [P(t / 10, 5, "a") for t in range(-30, 10)] + [
        P(1.3 + t / 10, 5, "b") for t in range(20)
    ]
    run.report.time_to_switchover_s = 1.0
    run.report.io_gap_source = "probe heartbeats"
    run.report.max_io_gap_ms = 100.0
    run.hb_gap_ms = 100.0
    return run


def test_rederive_counts_the_pause_the_release_fell_into() -> None:
    run = baseline_run_released_before_its_first_beat_there()
    assert rederive(run) == ["hb_gap_ms", "max_io_gap_ms"]
    assert run.hb_gap_ms == 400.0
    assert run.report.max_io_gap_ms == 400.0
    assert run.report.max_io_gap_at_s == 0.9
    assert rederive(run) == []  # worked out again: the same


def test_rederive_leaves_a_journal_gap_alone() -> None:
    run = baseline_run_released_before_its_first_beat_there()
    run.report.io_gap_source = "agent journals"
    rederive(run)
    assert run.report.max_io_gap_ms == 100.0  # exact: the heartbeats cannot better it
    assert run.hb_gap_ms == 400.0


def test_rederive_keeps_the_figures_of_a_run_whose_heartbeats_were_not_kept() -> None:
    run = baseline_run_released_before_its_first_beat_there()
    run.timeline = None  # as docs/bench-migrate keeps its runs
    run.ratio = None
    assert rederive(run) == []
    assert (run.hb_gap_ms, run.report.max_io_gap_ms, run.ratio) == (100.0, 100.0, 0.525)


def test_no_timeline_is_drawn_for_a_run_whose_heartbeats_were_not_kept(tmp_path: Path) -> None:
    runs = [made_up(s, 0, 3.0, 2.0, 300) for s in ("shared", "postcopy")]
    runs[1].timeline = None
    made = plots(summarize(runs), runs, tmp_path)
    assert sorted(p.name for p in made) == [
        "bars-1gbit-moderate.png", "timeline-1gbit-moderate-shared.png"]  # fmt: skip


def test_bench_migrate_from_stored_runs_summarizes_them_anew(tmp_path: Path) -> None:
    stored = tmp_path / "runs-so-far.jsonl"
    runs = [baseline_run_released_before_its_first_beat_there(),
            made_up("hybrid", 0, 3.0, 2.0, 300)]  # fmt: skip
    for n, run in enumerate(runs, 1):
        run.vm = f"bn{n}"
    stored.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in runs))
    out = tmp_path / "out"
    done = CliRunner().invoke(main, ["bench", "migrate", "--from", str(stored), "--out",
                                     str(out), "--json"])  # fmt: skip
    assert done.exit_code == 0, done.output
    result = json.loads((out / "results.json").read_text())
    assert result["rederived"]["changed"] == {"bn1": ["hb_gap_ms", "max_io_gap_ms"]}
    rows = result["summary"][0]["strategies"]
    assert rows["qemu-mirror"]["hb_gap_ms"] == 400.0
    assert result["summary"][0]["gap_vs_qemu"]["hybrid"]["qemu-mirror"] == 0.75
    assert (out / "results.md").read_text().startswith("### 1gbit, moderate")


def test_bench_migrate_from_refuses_what_is_no_result(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    for text, says in (
        ('{"runs": [1]}', "Expected `object`, got `int` - at `$.runs[0]`"),
        ('{"runs": [{"link": "1gbit"}]}', "missing required field `workload` - at `$.runs[0]`"),
        ("{oops", "JSON is malformed"),
    ):
        bad.write_text(text)
        done = CliRunner().invoke(main, ["bench", "migrate", "--from", str(bad)])
        assert done.exit_code == 1 and "not a bench migrate result" in done.output, text
        assert says in done.output, done.output
    bad = tmp_path / "runs-so-far.jsonl"
    bad.write_text('{"link": 1}\n')
    done = CliRunner().invoke(main, ["bench", "migrate", "--from", str(bad)])
    assert "runs-so-far.jsonl, line 1: Expected `str`, got `int` - at `$.link`" in done.output


def test_the_tls_table_sets_each_strategy_beside_itself_in_plaintext() -> None:
    secure = summarize([made_up("hybrid", 0, 10.5, 9.0, 150), made_up("postcopy", 1, 8, 9.0, 90)])
    plain = summarize([made_up("hybrid", 0, 10.0, 9.0, 140), made_up("precopy", 1, 9, 9.0, 80)])
    table = tls_markdown(secure, plain)
    rows = [line for line in table.splitlines() if line.startswith("| 1gbit")]
    assert rows == [
        "| 1gbit | moderate | `hybrid` | 10.50 | 10.00 | 1.05 | 5.25 | 5.00 | 150 | 140 |"
    ]
    assert tls_ratio(secure[0].strategies["hybrid"], plain[0].strategies["hybrid"]) == 1.05
