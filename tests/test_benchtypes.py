"""The bench's records read back: files an older bench wrote (the stored matrix under
docs/bench-migrate, a small sample in the first format), and what this one writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner

from devagent.benchstats import rederive, summarize
from devagent.benchtypes import Plan, Results, Run, TimelinePoint, read_results, upgrade_run
from devagent.cli import main
from devagent.errors import UsageError
from devagent.report import MigrationReport
from devagent.wire import to_json

STORED = Path(__file__).resolve().parents[1] / "docs" / "bench-migrate" / "results.json"

#: A matrix as the first bench migrate wrote it: no boot_s, ratio or wall_s in a run; a
#: report without the measures added since; the bench's own failure a bare status and
#: error; a summary of that day's shape (which is dropped); a note.
OLD: dict[str, Any] = {
    "plan": {"links": ["1gbit"], "workloads": ["moderate"], "strategies": ["shared", "hybrid"],
             "runs": 1, "disk_size": "1G", "ram_mb": 128, "prefill": "64M", "span": None},
    "machine": {"os": "Debian GNU/Linux 12 (bookworm)", "kernel": "6.1", "cpus": 2,
                "cpu": "AMD EPYC", "qemu": "QEMU emulator version 7.2.22", "python": "3.11.7",
                "load_average": [0.5, 0.4, 0.5]},
    "runs": [
        {"link": "1gbit", "workload": "moderate", "strategy": "shared", "run": 0, "vm": "bn1",
         "report": {"vm": "bn1", "source": "a", "destination": "b", "storage": "shared",
                    "status": "completed", "error": None, "time_to_switchover_s": 1.2,
                    "total_time_s": 1.5, "limit_s": 1.0, "max_io_gap_ms": 310.0,
                    "integrity": "ok", "guest_io_errors": 0, "guest_verify_failures": 0,
                    "bytes_between_hosts": 66091298, "missing": {}},
         "timeline": [[-0.1, 4, "a"], [0.0, 3, "a"], [0.3, 5, "b"], [0.4, 5, "b"]],
         "hb_gap_ms": 300.0},
        {"link": "1gbit", "workload": "moderate", "strategy": "hybrid", "run": 0, "vm": "bn2",
         "report": {"status": "failed", "error": "bench: booting the guest: no room"},
         "timeline": [], "hb_gap_ms": None},
    ],
    "summary": [{"link": "1gbit", "workload": "moderate", "strategies": {"shared": {}}}],
    "command": "devagent bench migrate --out /tmp/bn",
    "note": "heartbeat timelines kept",
}  # fmt: skip


def test_an_old_matrix_reads_as_typed_runs() -> None:
    result = read_results(json.dumps(OLD).encode(), jsonl=False, what="old.json")
    assert result.plan == Plan(("1gbit",), ("moderate",), ("shared", "hybrid"), 1, "1G", 128,
                               "64M")  # fmt: skip
    assert result.machine is not None and result.machine.duration_s is None
    assert (result.command, result.note, result.summary) == (OLD["command"], OLD["note"], [])
    shared, hybrid = result.runs
    assert (shared.boot_s, shared.ratio, shared.wall_s) == (None, None, None)
    assert shared.report.vm_pause_ms is None and shared.report.net_frames_lost is None
    assert shared.timeline is not None
    assert shared.timeline[2] == TimelinePoint(t=0.3, ops=5, host="b")
    # The bench's own failure, once a bare status and error, is a whole report now.
    assert hybrid.report == MigrationReport(
        vm="bn2", source="", destination="", storage="hybrid", status="failed",
        error="bench: booting the guest: no room",
    )  # fmt: skip
    [scenario] = summarize(result.runs)
    assert scenario.strategies["hybrid"].errors == ["bench: booting the guest: no room"]
    assert scenario.strategies["shared"].hb_gap_ms == 300.0


def test_old_runs_so_far_read_line_by_line() -> None:
    raw = b"".join(json.dumps(run).encode() + b"\n" for run in OLD["runs"]) + b"\n"
    result = read_results(raw, jsonl=True, what="runs-so-far.jsonl")
    assert [r.vm for r in result.runs] == ["bn1", "bn2"]
    assert result.plan is None and result.runs[1].report.status == "failed"


def test_a_report_that_is_whole_is_left_as_it_is() -> None:
    run = {"vm": "bn1", "strategy": "hybrid", "report": {"vm": "x", "status": "completed"}}
    assert upgrade_run(run) is run
    assert upgrade_run([1]) == [1]


def test_what_the_bench_writes_reads_back_the_same() -> None:
    result = read_results(json.dumps(OLD).encode(), jsonl=False, what="old.json")
    result.summary = summarize(result.runs)
    written = json.dumps(to_json(result), indent=1).encode()
    again = read_results(written, jsonl=False, what="results.json")
    assert again.runs == result.runs and again.plan == result.plan
    assert again.summary == []  # a stored summary is for the runs to say again
    line = msgspec.json.encode(result.runs[0])
    assert read_results(line, jsonl=True, what="runs-so-far.jsonl").runs == result.runs[:1]
    assert json.loads(line)["timeline"][0] == [-0.1, 4, "a"]  # a heartbeat: [t, ops, host]


def test_a_run_that_does_not_fit_names_its_field() -> None:
    bad = {**OLD, "runs": [{**OLD["runs"][0], "run": "first"}]}
    with pytest.raises(
        UsageError, match=r"old.json: Expected `int`, got `str` - at `\$.runs\[0\].run`"
    ):
        read_results(json.dumps(bad).encode(), jsonl=False, what="old.json")


def test_the_stored_matrix_reads_as_typed_runs() -> None:
    result = read_results(STORED.read_bytes(), jsonl=False, what=str(STORED))
    assert len(result.runs) == 126 and result.plan is not None and result.plan.runs == 3
    assert all(isinstance(run, Run) for run in result.runs)
    failed = [run for run in result.runs if run.report.status != "completed"]
    assert len(failed) == 7 and all(run.report.error for run in failed)
    assert all(run.timeline is None for run in result.runs)  # left out of the stored copy
    assert isinstance(result, Results) and result.rederived is not None


def test_the_stored_matrix_summarized_anew_is_its_stored_summary() -> None:
    """Its runs keep no heartbeats: --from must leave their figures as they were."""
    stored = json.loads(STORED.read_text())["summary"]
    result = read_results(STORED.read_bytes(), jsonl=False, what=str(STORED))
    assert [rederive(run) for run in result.runs] == [[]] * len(result.runs)
    assert to_json(summarize(result.runs)) == stored


def test_bench_migrate_from_an_old_matrix(tmp_path: Path) -> None:
    stored = tmp_path / "old.json"
    stored.write_text(json.dumps(OLD))
    out = tmp_path / "out"
    done = CliRunner().invoke(main, ["bench", "migrate", "--from", str(stored), "--out",
                                     str(out)])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "| `shared` | 1/1 |" in done.output and "`hybrid` failed: bench: booting" in done.output
    written = json.loads((out / "results.json").read_text())
    assert written["note"] == OLD["note"] and written["rederived"]["from"] == str(stored)
    assert written["runs"][1]["report"]["storage"] == "hybrid"
    assert read_results((out / "results.json").read_bytes(), jsonl=False, what="again").runs
