"""``devagent migrate``: live-migrate a VM to another host and print the report."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from devagent.api_types import Migrations
from devagent.cli.common import (
    click_errors,
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
from devagent.cli.render import devices_table, report_table
from devagent.client import DaemonClient
from devagent.errors import NotFound
from devagent.orchestrate import follow_migration, locate_source, migrate
from devagent.report import MigrationReport
from devagent.vocab import STRATEGIES, parse_rate


@click.command("migrate")
@click.argument("name")
@click.option("--to", "to_host", help="Destination host (lab host name or URL).")
@click.option(
    "--storage",
    type=click.Choice([s.value for s in STRATEGIES]),
    default="hybrid",
    show_default=True,
    help="How the disk moves: hybrid (pushed from the start, the rest fetched after the "
    "switchover), postcopy (fetched on demand and in the background after the switchover), "
    "precopy (mirrored before the switchover), shared (both hosts see one image: RAM only).",
)
@click.option(
    "--downtime-limit",
    type=int,
    help="QEMU's downtime limit in ms, kept for the whole migration. Without it: 20 ms, "
    "raised to QEMU's 300 ms once RAM has not converged after 5 dirty-page syncs or the "
    "guest's vCPUs are being throttled (devagent's own VMs; libvirt runs a domain's RAM).",
)
@click.option(
    "--link-rate",
    metavar="RATE",
    help="The link's rate between the two hosts, e.g. 1gbit, 100mbit: RAM and hybrid's push "
    "are paced to share it (README: how a migration runs). Default: the lab's shaped rate; "
    "on an unshaped lab there is none, and neither is paced.",
)
@click.option(
    "--watch",
    is_flag=True,
    help="Do not start a migration: follow the one VM NAME is in now, to its report.",
)
@click.option(
    "--plot",
    "plot_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw the timeline (phases, guest I/O rate and latency) into this PNG file.",
)
@json_option
@lab_option
def migrate_cmd(
    name: str,
    to_host: str | None,
    storage: str,
    downtime_limit: int | None,
    link_rate: str | None,
    watch: bool,
    plot_file: Path | None,
    as_json: bool,
    lab_name: str,
) -> None:
    """Live-migrate VM NAME to host TO while its guest keeps doing I/O, then print the
    measures: time to switchover, downtime, largest I/O gap, guest errors, and more.
    NAME may be a libvirt domain whose disks devagent serves (devagent libvirt adopt):
    libvirt then moves its RAM and definition, devagent its disks.
    With --watch, follow a migration of NAME that is already running instead."""
    if watch == (to_host is not None):
        raise click.UsageError("give --to HOST to migrate, or --watch to follow a migration")
    if watch and link_rate is not None:
        raise click.UsageError("--link-rate is for a migration to start, not one to --watch")
    with click_errors():  # a bad rate is refused before anything runs
        told = parse_rate(link_rate) if link_rate is not None else None

    async def go() -> MigrationReport:
        if watch:
            return await watch_migration(name, lab_name, enabled=not as_json)
        assert to_host is not None
        source = await locate_source(lab_endpoints(lab_name), name)
        destination = endpoint_for(to_host, lab_name)
        if destination.url == source.url:
            raise click.UsageError(f"VM {name} already runs on host {source.name}")
        with MigrationProgress(enabled=not as_json) as progress:
            return await migrate(
                source,
                destination,
                name,
                storage=storage,
                link_rate_bps=told if told is not None else lab_link_rate(lab_name),
                downtime_limit_ms=downtime_limit,
                progress=progress,
            )

    report = run(go())
    show_report(report, as_json)
    if plot_file is not None and report.timeline:
        from devagent.plot import plot_timeline

        plot_timeline(report, plot_file)
        err.print(f"timeline drawn into {plot_file}")
    if report.status != "completed":
        sys.exit(1)


async def watch_migration(name: str, lab_name: str, *, enabled: bool) -> MigrationReport:
    """Follow the running migration of VM ``name`` (found on whichever lab host runs it as
    the source) to its report."""
    for endpoint in lab_endpoints(lab_name):
        async with DaemonClient(endpoint) as client:
            jobs = (await client.get_as("/v1/migrations", Migrations)).migrations
            running = [j for j in jobs if j.vm == name and j.finished_at is None]
            if running:
                with MigrationProgress(enabled=enabled) as progress:
                    return await follow_migration(client, running[-1].id, progress)
    raise NotFound(f"VM {name} is not being migrated by any host of lab {lab_name!r}")


def show_report(report: MigrationReport, as_json: bool) -> None:
    if as_json:
        print_json(report.to_json())
        return
    out.print(report_table(report))
    if report.devices:
        out.print(devices_table(report))
    if report.error:
        err.print(f"[red]migration failed:[/red] {report.error}")
