"""``devagent bench migrate``: every strategy, devagent's and QEMU's own, on one lab; the
tables, JSON and plots (the work is in :mod:`devagent.migbench`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import msgspec

from devagent.benchplots import plots
from devagent.benchstats import ALL_STRATEGIES, markdown, rederive, summarize, tls_markdown
from devagent.benchtypes import Plan, Rederived, Results, Run, read_results
from devagent.cli.common import err, json_option, print_json, run
from devagent.errors import UsageError
from devagent.migbench import FULL, QUICK, command_line, run_matrix
from devagent.wire import to_json


def _split(text: str | None) -> tuple[str, ...] | None:
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else None


@click.command("migrate")
@click.option("--quick", is_flag=True, help="The small subset (one run, a small VM, moderate).")
@click.option("--runs", type=click.IntRange(1, 20), help="Runs per scenario (median reported).")
@click.option("--links", help="Link rates, comma-separated (default 1gbit,100mbit).")
@click.option("--workloads", help="ioprobe profiles, comma-separated (idle,moderate,heavy).")
@click.option(
    "--disks",
    help="Disks of the guest per scenario, comma-separated (default 1): '1,3' adds a "
    "scenario whose guest has 3 disks, each of the plan's size, moved as one set by "
    "devagent's strategies; its total / limit is shown beside the one-disk scenario's.",
)
@click.option("--strategies", help=f"Comma-separated, among {', '.join(ALL_STRATEGIES)}.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write results.json, results.md and PNG plots here.")  # fmt: skip
@click.option("--from", "stored", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Run nothing: summarize the runs of a results.json or runs-so-far.jsonl "
              "again, their heartbeat figures worked out anew by this version.")  # fmt: skip
@click.option("--insecure", is_flag=True, help="A lab without certificates: plaintext links.")
@click.option(
    "--compare-tls",
    is_flag=True,
    help="Run the plan twice, with TLS and in plaintext (--insecure), and print the cost of "
    "TLS: each strategy's total time with TLS over its total without (tls.md with --out).",
)
@json_option
def migrate_bench_cmd(
    stored: Path | None,
    quick: bool,
    runs: int | None,
    links: str | None,
    workloads: str | None,
    disks: str | None,
    strategies: str | None,
    out_dir: Path | None,
    insecure: bool,
    compare_tls: bool,
    as_json: bool,
) -> None:
    """Migrate a fresh test guest with every strategy, per link rate and workload; print
    the medians, the best strategy's total_time_s / limit_s, and devagent's I/O gap against
    each QEMU baseline's. Makes its own lab and always removes it."""
    plan = QUICK if quick else FULL
    plan = msgspec.structs.replace(
        plan,
        runs=runs or plan.runs,
        links=_split(links) or plan.links,
        workloads=_split(workloads) or plan.workloads,
        disks=_disk_counts(disks) or plan.disks,
        strategies=_split(strategies) or plan.strategies,
        insecure=insecure,
    )
    if compare_tls:
        if insecure or stored is not None:
            raise click.UsageError("--compare-tls runs both halves itself: drop --insecure/--from")
        _compare_tls(plan, out_dir, as_json)
        return
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    result = _restored(stored) if stored is not None else _measured(plan, out_dir)
    table = markdown(result.summary)
    if out_dir is not None:
        (out_dir / "results.json").write_text(json.dumps(to_json(result), indent=1))
        (out_dir / "results.md").write_text(table)
        made = plots(result.summary, result.runs, out_dir)
        err.print(f"wrote {out_dir}/results.json, results.md and {len(made)} plots")
    if as_json:
        print_json(to_json(result))
    else:
        click.echo(table)
    lost = [
        r.report for r in result.runs
        if r.report.status == "completed" and (r.report.integrity != "ok" or r.report.damage())
    ]  # fmt: skip
    sys.exit(1 if lost else 0)


def _compare_tls(plan: Plan, out_dir: Path | None, as_json: bool) -> None:
    """The plan with TLS, then in plaintext; both results kept, the comparison printed."""
    halves = {}
    for name, insecure in (("tls", False), ("insecure", True)):
        folder = out_dir / name if out_dir is not None else None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        half = _measured(msgspec.structs.replace(plan, insecure=insecure), folder)
        if folder is not None:
            (folder / "results.json").write_text(json.dumps(to_json(half), indent=1))
            (folder / "results.md").write_text(markdown(half.summary))
        halves[name] = half
    table = tls_markdown(halves["tls"].summary, halves["insecure"].summary)
    if out_dir is not None:
        (out_dir / "tls.md").write_text(f"`{command_line()}`\n\n{table}")
        err.print(f"wrote {out_dir}/tls.md and each half's results")
    if as_json:
        print_json({name: to_json(half) for name, half in halves.items()})
    else:
        click.echo(table)


def _disk_counts(text: str | None) -> tuple[int, ...] | None:
    counts = _split(text)
    if counts is None:
        return None
    if not all(c.isdigit() and 1 <= int(c) <= 8 for c in counts):
        raise click.BadParameter(f"{text!r}: give disk counts from 1 to 8", param_hint="--disks")
    return tuple(int(c) for c in counts)


def _measured(plan: Plan, out_dir: Path | None) -> Results:
    partial = None
    if out_dir is not None:
        partial = out_dir / "runs-so-far.jsonl"
        partial.write_text("")

    def keep(one: Run) -> None:
        if partial is not None:
            with partial.open("ab") as f:
                f.write(msgspec.json.encode(one) + b"\n")

    def say(text: str) -> None:
        err.print(text, highlight=False, soft_wrap=True)

    result = run(run_matrix(plan, say=say, on_run=keep))
    result.command = command_line()
    return result


def _restored(path: Path) -> Results:
    """A stored matrix (results.json) or its runs so far (runs-so-far.jsonl), each run's
    heartbeat figures worked out again, summarized anew."""
    try:
        result = read_results(path.read_bytes(), jsonl=path.suffix == ".jsonl", what=str(path))
    except (OSError, UsageError) as error:
        raise click.ClickException(f"not a bench migrate result: {error}") from error
    changed = {}
    for one in result.runs:
        names = rederive(one)
        if names:
            changed[one.vm] = names
    result.summary = summarize(result.runs)
    result.rederived = Rederived(source=str(path), command=command_line(), changed=changed)
    err.print(f"{len(result.runs)} runs from {path}; figures worked out anew in {len(changed)}")
    return result
