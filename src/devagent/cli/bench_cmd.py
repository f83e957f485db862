"""``devagent bench migrate``: every strategy, devagent's and QEMU's own, on one lab; the
tables, JSON and plots (the work is in :mod:`devagent.migbench`)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from devagent.cli.common import err, json_option, print_json, run
from devagent.migbench import (
    ALL_STRATEGIES,
    FULL,
    QUICK,
    command_line,
    markdown,
    plots,
    run_matrix,
)


def _split(text: str | None) -> tuple[str, ...] | None:
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else None


@click.command("migrate")
@click.option("--quick", is_flag=True, help="The small subset (one run, a small VM, moderate).")
@click.option("--runs", type=click.IntRange(1, 20), help="Runs per scenario (median reported).")
@click.option("--links", help="Link rates, comma-separated (default 1gbit,100mbit).")
@click.option("--workloads", help="ioprobe profiles, comma-separated (idle,moderate,heavy).")
@click.option("--strategies", help=f"Comma-separated, among {', '.join(ALL_STRATEGIES)}.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write results.json, results.md and PNG plots here.")  # fmt: skip
@json_option
def migrate_bench_cmd(
    quick: bool,
    runs: int | None,
    links: str | None,
    workloads: str | None,
    strategies: str | None,
    out_dir: Path | None,
    as_json: bool,
) -> None:
    """Migrate a fresh test guest with every strategy, per link rate and workload; print
    the medians, the best strategy's total_time_s / limit_s, and devagent's I/O gap against
    each QEMU baseline's. Makes its own lab and always removes it."""
    plan = QUICK if quick else FULL
    plan = replace(
        plan,
        runs=runs or plan.runs,
        links=_split(links) or plan.links,
        workloads=_split(workloads) or plan.workloads,
        strategies=_split(strategies) or plan.strategies,
    )
    partial = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = out_dir / "runs-so-far.jsonl"
        partial.write_text("")

    def keep(one: dict[str, Any]) -> None:
        if partial is not None:
            with partial.open("a") as f:
                f.write(json.dumps(one) + "\n")

    def say(text: str) -> None:
        err.print(text, highlight=False, soft_wrap=True)

    result = run(run_matrix(plan, say=say, on_run=keep))
    result["command"] = command_line()
    table = markdown(result["summary"])
    if out_dir is not None:
        (out_dir / "results.json").write_text(json.dumps(result, indent=1))
        (out_dir / "results.md").write_text(table)
        made = plots(result["summary"], result["runs"], out_dir)
        err.print(f"wrote {out_dir}/results.json, results.md and {len(made)} plots")
    if as_json:
        print_json(result)
    else:
        click.echo(table)
    lost = [
        r for r in result["runs"]
        if r["report"].get("status") == "completed" and (
            r["report"].get("integrity") != "ok"
            or r["report"].get("guest_io_errors") or r["report"].get("guest_verify_failures"))
    ]  # fmt: skip
    sys.exit(1 if lost else 0)
