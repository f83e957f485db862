"""``devagent chaos``: migrations with one fault each, every invariant checked after each
(the work is in :mod:`devagent.chaos`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import msgspec
from rich.table import Table

from devagent.chaos.draw import (
    FAULTS,
    LINKS,
    NO_FAULT,
    WORKLOADS,
    draw,
    parse_faults,
    parse_phases,
    parse_strategies,
)
from devagent.chaos.record import RunRecord, cell_text, columns, markdown, table
from devagent.cli.common import err, json_option, out, print_json, run
from devagent.errors import UsageError


@click.command("chaos")
@click.option("--runs", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="How many migrations, each with one fault.")  # fmt: skip
@click.option("--seed", type=int, default=1, show_default=True,
              help="The seed the runs are drawn from: the same seed, the same runs.")  # fmt: skip
@click.option("--faults", help="Comma-separated fault names or prefixes (kill, stop-source, "
              f"link-down, …); default all: {', '.join(FAULTS)}. 'none' alone: "
              "migrations without a fault, back and forth (a ping-pong), each checked "
              "the same way.")  # fmt: skip
@click.option("--strategies", help="Comma-separated, among hybrid, postcopy, precopy "
              "(default all three).")  # fmt: skip
@click.option("--phases", help="Comma-separated phases the faults are aimed at, among "
              "prepare, mirror, ram, switchover, tail, release (default all).")  # fmt: skip
@click.option("--links", type=click.Choice(["100mbit", "1gbit", "both"]), default="both",
              show_default=True, help="The link rate(s) drawn from.")  # fmt: skip
@click.option("--workloads", type=click.Choice(["moderate", "heavy", "both"]), default="both",
              show_default=True, help="The guest workload(s) drawn from.")  # fmt: skip
@click.option("--minutes", type=float, help="Stop starting runs after this many minutes.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write runs.jsonl, table.md and a plot per violation here.")  # fmt: skip
@json_option
def chaos_cmd(
    runs: int,
    seed: int,
    faults: str | None,
    strategies: str | None,
    phases: str | None,
    links: str,
    workloads: str,
    minutes: float | None,
    out_dir: Path | None,
    as_json: bool,
) -> None:
    """Migrate a test guest (ioprobe, one NIC) back and forth on a 3-host lab of its own,
    with one fault per migration, drawn from SEED: a SIGKILL or a 10 s SIGSTOP of an agent,
    a daemon (restarted after 2 s) or the destination's QEMU, the link down for 1-30 s, or
    the destination's replica space full or read-only for a while, at a random moment of a
    random phase (prepare, mirror, RAM, switchover, post-copy tail, release).

    After each run it checks that the VM runs on exactly one host and answers (heartbeats,
    ping, echo), with no guest I/O error or verify failure and its disk intact; that the
    other host holds nothing of it; that the outcome is one the phase allows (after the
    switchover, only "completed"); and that the next migration, without a fault,
    succeeds. Prints the table of fault by phase; exits 1 if any run violated an
    invariant. The lab is removed at the end."""
    from devagent.chaos.runner import run_chaos

    try:
        plans = draw(
            seed, runs, parse_faults(faults), parse_strategies(strategies),
            links=LINKS if links == "both" else (links,),
            workloads=WORKLOADS if workloads == "both" else (workloads,),
            phases=parse_phases(phases),
        )  # fmt: skip
    except UsageError as error:
        raise click.UsageError(str(error)) from error
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "runs.jsonl").write_text("")

    def say(text: str) -> None:
        err.print(text, highlight=False, soft_wrap=True)

    def show(record: RunRecord) -> None:
        say(describe(record))

    began = time.monotonic()
    records = run(run_chaos(plans, minutes=minutes, out=out_dir, say=say, on_record=show))
    took = time.monotonic() - began
    text = markdown(records) + f"\nThe runs took {took / 60:.1f} min.\n"
    if out_dir is not None:
        (out_dir / "table.md").write_text(text)
    if as_json:
        print_json({"runs": msgspec.to_builtins(records), "minutes": round(took / 60, 1)})
    else:
        out.print(rich_table(records))
        out.print(f"{len(records)} runs in {took / 60:.1f} min")
    sys.exit(0 if all(r.ok for r in records) else 1)


def describe(record: RunRecord) -> str:
    plan = record.plan
    what = (
        "no fault" if plan.fault == NO_FAULT else
        f"{plan.fault} in {record.phase_hit or plan.phase} "
        f"({record.fault_detail or record.fault_error})"
    )  # fmt: skip
    head = (
        f"run {plan.index}: {plan.strategy} {plan.link} {plan.workload} "
        f"{record.source}→{record.destination}, {what}: {record.outcome}, {record.wall_s} s"
    )
    if record.ok:
        return head
    return head + "\n  [red]" + "\n  ".join(record.violations) + "[/red]"


def rich_table(records: list[RunRecord]) -> Table:
    cells = table(records)
    cols = columns(cells)
    shown = Table(title="runs per fault by phase (violations in red)")
    shown.add_column("fault")
    for col in cols:
        shown.add_column(col, justify="right")
    for fault in sorted(cells):
        row = cells[fault]
        texts = []
        for col in cols:
            cell = row.get(col)
            text = cell_text(cell) if cell else ""
            texts.append(f"[red]{text}[/red]" if cell and cell.violations else text)
        shown.add_row(fault, *texts)
    return shown
