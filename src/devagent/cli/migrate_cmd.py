"""``devagent migrate``: live-migrate a VM to another host and print the report."""

from __future__ import annotations

import sys

import click

from devagent.cli.common import (
    endpoint_for,
    err,
    json_option,
    lab_endpoints,
    lab_link_rate,
    lab_option,
    out,
    print_json,
    run,
)
from devagent.cli.progress import MigrationProgress
from devagent.cli.render import report_table
from devagent.daemon.migration import STRATEGIES
from devagent.orchestrate import locate_vm, migrate
from devagent.report import MigrationReport


@click.command("migrate")
@click.argument("name")
@click.option("--to", "to_host", required=True, help="Destination host (lab host name or URL).")
@click.option(
    "--storage",
    type=click.Choice(STRATEGIES),
    default="hybrid",
    show_default=True,
    help="How the disk moves: hybrid (pushed from the start, the rest fetched after the "
    "switchover), postcopy (fetched on demand and in the background after the switchover), "
    "precopy (mirrored before the switchover), shared (both hosts see one image: RAM only).",
)
@click.option("--downtime-limit", type=int, help="QEMU's downtime limit in ms.")
@json_option
@lab_option
def migrate_cmd(
    name: str,
    to_host: str,
    storage: str,
    downtime_limit: int | None,
    as_json: bool,
    lab_name: str,
) -> None:
    """Live-migrate VM NAME to host TO while its guest keeps doing I/O, then print the
    measures: time to switchover, downtime, largest I/O gap, guest errors, and more."""

    async def go() -> MigrationReport:
        source, _ = await locate_vm(lab_endpoints(lab_name), name)
        destination = endpoint_for(to_host, lab_name)
        if destination.url == source.url:
            raise click.UsageError(f"VM {name} already runs on host {source.name}")
        with MigrationProgress(enabled=not as_json) as progress:
            return await migrate(
                source,
                destination,
                name,
                storage=storage,
                link_rate_bps=lab_link_rate(lab_name),
                downtime_limit_ms=downtime_limit,
                progress=progress,
            )

    report = run(go())
    show_report(report, as_json)
    if report.status != "completed":
        sys.exit(1)


def show_report(report: MigrationReport, as_json: bool) -> None:
    if as_json:
        print_json(report.to_json())
        return
    out.print(report_table(report))
    if report.error:
        err.print(f"[red]migration failed:[/red] {report.error}")
