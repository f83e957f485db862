"""``devagent bench migrate --quick`` end to end, as a user runs it: every strategy on its
own lab, one table per link and workload with a row per strategy, every run intact, and
nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devagent.benchstats import ALL_STRATEGIES
from devagent.guest.build import GuestImage
from devagent.migbench import QUICK
from tests.conftest import namespaces, processes_mentioning

pytestmark = [pytest.mark.vm, pytest.mark.lab]

DEVAGENT = str(Path(sys.executable).with_name("devagent"))


@pytest.mark.timeout(900)
def test_the_quick_bench_runs_every_strategy_intact(
    state_dir: Path, guest: GuestImage, tmp_path: Path
) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [DEVAGENT, "bench", "migrate", "--quick", "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=840,
    )  # fmt: skip
    print(done.stderr[-3000:])
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert processes_mentioning(str(state_dir)) == []
    assert not [ns for ns in namespaces() if ns.startswith("da-bnch")]

    runs = result["runs"]
    assert len(runs) == QUICK.count
    for run in runs:
        report = run["report"]
        assert report["status"] == "completed", (run["strategy"], report["error"])
        assert report["integrity"] == "ok", run["strategy"]
        assert (report["guest_io_errors"], report["guest_verify_failures"]) == (0, 0)
        assert report["limit_s"] and report["total_time_s"]

    summary = result["summary"]
    assert [(s["link"], s["workload"]) for s in summary] == [
        (link, w) for link in QUICK.links for w in QUICK.workloads
    ]
    table = (out / "results.md").read_text()
    for scenario in summary:
        assert set(scenario["strategies"]) == set(ALL_STRATEGIES)
        assert scenario["best"] in ALL_STRATEGIES and scenario["best"] != "shared"
        assert scenario["best_ratio"] > 0
        section = table.split(f"### {scenario['link']}, {scenario['workload']}")[1]
        section = section.split("### ")[0]
        rows = [line for line in section.splitlines() if line.startswith("| `")]
        assert len(rows) == len(ALL_STRATEGIES) + 3  # + devagent's rows of the gap table
        assert f"Best strategy moving the disk: `{scenario['best']}`" in section
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == len(summary) * (1 + len(ALL_STRATEGIES))
