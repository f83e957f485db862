"""``devagent demo``: the main job end to end, in one command.

Makes a 2-host lab, boots the test guest with ioprobe on host a, lets it settle, live-migrates
it to host b while ioprobe writes and verifies, prints the report, and removes the lab — also
when a step fails. ``--migrations N`` moves it back and forth N times in a row (a→b, b→a, …),
each verified, and prints one row per migration.

``--disks N --nics M`` gives the guest N disks (its probe writes them all) and M NICs, all
moved as one set; the report gains a row per device.

``--net`` runs the NIC's scenario on a 3-host lab instead: the guest with a NIC on host a,
from host c a TCP echo stream checked byte for byte and a ping every 10 ms, through a live
migration a → b; the report gains the NIC's figures and the longest gap in the pings.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from devagent.cli.common import err, json_option, out, print_json, run
from devagent.cli.demo_common import fresh_lab, healthy
from devagent.cli.migrate_cmd import show_report
from devagent.cli.progress import MigrationProgress, Spinner
from devagent.client import Endpoint
from devagent.orchestrate import migrate, start_vm, wait_heartbeats, wait_past_phase
from devagent.report import MigrationReport
from devagent.vocab import STRATEGIES, parse_size
from devagent.wire import to_json

if TYPE_CHECKING:
    from devagent.lab.traffic import EchoResult

DEMO_LAB = "demo"
DEMO_VM = "demo-vm"
NET_DEMO_LAB = "ntdemo"
NET_BASELINE_S = 3.0  # stream and pings under way before migrating
NET_AFTER_S = 2.0  # and after, from the destination
BASELINE_BEATS = 30  # three seconds of steady guest I/O before migrating


@click.command("demo")
@click.option(
    "--storage",
    type=click.Choice([s.value for s in STRATEGIES]),
    default="hybrid",
    show_default=True,
    help="Migration strategy: hybrid (push from the start, fetch the rest after the "
    "switchover), postcopy, precopy, or shared (both hosts see one image; RAM only).",
)
@click.option("--link-rate", default="1gbit", show_default=True, help="Shape the hosts' links.")
@click.option("--disk-size", default="1G", show_default=True, help="Size of each disk.")
@click.option(
    "--disks",
    default=1,
    show_default=True,
    type=click.IntRange(1, 8),
    help="Give the guest this many disks (disk0, disk1, ...): its probe writes every one, "
    "the migration moves them as one set, the report has a row for each.",
)
@click.option(
    "--nics",
    default=0,
    show_default=True,
    type=click.IntRange(0, 4),
    help="Give the guest this many NICs (net0, ...) on the hosts' guest network, moved with it.",
)
@click.option("--ram", default="256M", show_default=True)
@click.option(
    "--workload",
    default="moderate,prefill=256M",
    show_default=True,
    help="ioprobe profile; prefill writes that much of the disk before the migration.",
)
@click.option("--loopback", is_flag=True, help="Hosts on 127.0.0.1 instead of namespaces.")
@click.option(
    "--migrations",
    default=1,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Migrate back and forth this many times in a row (a→b, b→a, …), each verified.",
)
@click.option(
    "--plot",
    "plot_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Draw the (last) migration's timeline into this PNG file.",
)
@click.option(
    "--net",
    is_flag=True,
    help="The NIC's scenario on 3 hosts: a TCP stream and a 10 ms ping from host c to the "
    "guest, checked through the migration a → b.",
)
@click.option(
    "--libvirt",
    is_flag=True,
    help="The main job on a libvirt domain: a libvirtd in each host; the guest defined and "
    "started by libvirt, its file disk adopted live, then migrated (libvirt moves the RAM, "
    "devagent the disk).",
)
@json_option
def demo_cmd(
    storage: str,
    link_rate: str,
    disk_size: str,
    disks: int,
    nics: int,
    ram: str,
    workload: str,
    loopback: bool,
    migrations: int,
    plot_file: Path | None,
    net: bool,
    libvirt: bool,
    as_json: bool,
) -> None:
    """Run devagent's main job end to end on a fresh 2-host lab and print its report."""
    if loopback and (net or nics or libvirt):
        raise click.UsageError("NICs and libvirt need a namespace lab")
    if libvirt and (net or nics or disks > 1 or storage == "shared"):
        raise click.UsageError("--libvirt runs a guest of one disk, no NIC, moved by "
                               "hybrid, postcopy or precopy")  # fmt: skip
    if net:
        if disks > 1 or nics:
            raise click.UsageError("--net has its own guest (one disk, one NIC)")
        report, stream = run(
            run_net_demo(
                storage=storage, link_rate=link_rate, disk_size=disk_size, ram=ram,
                workload=workload, verbose=not as_json,
            )
        )  # fmt: skip
        if as_json:
            print_json({**report.to_json(), "stream": to_json(stream)})
        else:
            show_report(report, False)
            err.print(
                f"TCP stream from host c: {stream.sent:,} bytes sent, {stream.received:,} "
                f"echoed back, {'intact' if stream.intact else 'NOT intact'}, "
                f"{'reset' if stream.reset else 'no reset'}"
            )
        sys.exit(0 if net_healthy(report, stream) else 1)
    if libvirt:
        from devagent.cli.libvirt_demo import run_libvirt_demo

        say = err.print if not as_json else (lambda _text: None)
        reports = run(run_libvirt_demo(
            storage=storage, link_rate=link_rate, disk_size=disk_size, ram=ram,
            workload=workload, migrations=migrations, say=say, verbose=not as_json,
        ))  # fmt: skip
        show_reports(reports, migrations, plot_file, as_json)
        return
    reports = run(
        run_demo(
            storage=storage,
            link_rate=None if loopback else link_rate,
            disk_size=disk_size,
            ram=ram,
            workload=workload,
            loopback=loopback,
            verbose=not as_json,
            migrations=migrations,
            disks=disks,
            nics=nics,
        )
    )
    show_reports(reports, migrations, plot_file, as_json)


def show_reports(
    reports: list[MigrationReport], migrations: int, plot_file: Path | None, as_json: bool
) -> None:
    """The report (one row per migration for several), the plot; the exit status says
    whether every migration asked for was healthy."""
    if migrations == 1:
        show_report(reports[0], as_json)
    elif as_json:
        print_json({"migrations": [r.to_json() for r in reports], "healthy": healthy(reports)})
    else:
        out.print(round_trip_table(reports))
    if plot_file is not None and reports[-1].timeline:
        from devagent.plot import plot_timeline

        plot_timeline(reports[-1], plot_file)
        err.print(f"timeline drawn into {plot_file}")
    sys.exit(0 if healthy(reports) and len(reports) == migrations else 1)


def net_healthy(report: MigrationReport, stream: EchoResult) -> bool:
    """The NIC's scenario went through: the migration healthy, the stream intact and never
    reset, no frame lost."""
    return healthy([report]) and stream.intact and not stream.reset and report.net_frames_lost == 0


async def run_net_demo(
    *, storage: str, link_rate: str, disk_size: str, ram: str, workload: str, verbose: bool
) -> tuple[MigrationReport, EchoResult]:
    """The NIC's scenario; the migration's report (with ``ping_max_gap_ms``) and the
    stream's figures."""
    from devagent.lab.traffic import EchoStream, Pinger, ping_max_gap, wait_for_ping

    def say(text: str) -> None:
        if verbose:
            err.print(text)

    lab = await fresh_lab(NET_DEMO_LAB, 3, link_rate, loopback=False, say=say)
    try:
        a, b, _ = (Endpoint(url=h.url, token=lab.token, name=h.name) for h in lab.hosts[:3])
        netns_c = lab.host("c").netns
        assert netns_c is not None
        request = {
            "name": DEMO_VM,
            "ram_mb": parse_size(ram) >> 20,
            "disk_size": parse_size(disk_size),
            "workload": workload,
            "storage": "shared" if storage == "shared" else "local",
            "nic": True,
        }
        with Spinner(f"booting {DEMO_VM} with a NIC on host {a.name}", enabled=verbose) as spin:
            booted = await start_vm(a, request)
            address = booted.status.nics[0].address.split("/")[0]
            await asyncio.to_thread(wait_for_ping, netns_c, address)
            await wait_past_phase(
                a,
                DEMO_VM,
                "prefill",
                on_beat=lambda beat: spin.update(
                    f"ioprobe prefilling the disk: {beat.written_blocks >> 8} MiB"
                ),
            )
            spin.update("steady-state guest I/O before migrating")
            await wait_heartbeats(
                a, DEMO_VM, BASELINE_BEATS, with_io=not workload.startswith("idle")
            )
        say(f"{DEMO_VM} answers on {address}; from host c: ping every 10 ms, TCP echo stream")
        with (
            Pinger(netns_c, address, lab.dir / "ping.log") as pinger,
            EchoStream(netns_c, address) as stream,
        ):
            await asyncio.sleep(NET_BASELINE_S)
            say(f"migrating {DEMO_VM} {a.name} → {b.name} ({storage}) under the stream")
            started = time.time()
            with MigrationProgress(enabled=verbose) as progress:
                report = await migrate(
                    a,
                    b,
                    DEMO_VM,
                    storage=storage,
                    link_rate_bps=lab.link_rate_bps,
                    progress=progress,
                )
            ended = time.time()
            await asyncio.sleep(NET_AFTER_S)
            echoed = await asyncio.to_thread(stream.finish)
            answers = pinger.stop()
        gap = ping_max_gap(answers, started, ended)
        if gap is not None:
            report.ping_max_gap_ms = round(gap[1] * 1000, 1)
            report.missing.pop("ping_max_gap_ms", None)
        else:
            report.missing["ping_max_gap_ms"] = "the guest answered no ping during the migration"
        return report, echoed
    finally:
        say(f"removing the lab {NET_DEMO_LAB!r}")
        await asyncio.to_thread(lab.down)


def round_trip_table(reports: list[MigrationReport]) -> Table:
    table = Table(title=f"{len(reports)} migrations in a row", title_justify="left")
    for column in ("#", "from → to", "status", "switchover s", "total s", "limit s",
                   "downtime ms", "max I/O gap ms", "gap excess ms", "errors / verify",
                   "integrity"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("from → to", "status") else "right")
    for index, r in enumerate(reports, 1):
        table.add_row(
            str(index),
            f"{r.source} → {r.destination}",
            r.status if r.status == "completed" else f"[red]{r.status}: {r.error}[/]",
            str(r.time_to_switchover_s),
            str(r.total_time_s),
            str(r.limit_s),
            str(r.downtime_ms),
            str(r.max_io_gap_ms),
            str(r.io_gap_excess_ms),
            f"{r.guest_io_errors} / {r.guest_verify_failures}",
            str(r.integrity),
        )
    return table


async def run_demo(
    *,
    storage: str,
    link_rate: str | None,
    disk_size: str,
    ram: str,
    workload: str,
    loopback: bool,
    verbose: bool,
    migrations: int = 1,
    disks: int = 1,
    nics: int = 0,
) -> list[MigrationReport]:
    """Every migration's report, in order; it stops after the first that is not healthy."""

    def say(text: str) -> None:
        if verbose:
            err.print(text)

    lab = await fresh_lab(DEMO_LAB, 2, link_rate, loopback=loopback, say=say)
    try:
        a, b = (Endpoint(url=h.url, token=lab.token, name=h.name) for h in lab.hosts[:2])
        request = {
            "name": DEMO_VM,
            "ram_mb": parse_size(ram) >> 20,
            "disk_size": parse_size(disk_size),
            "workload": workload,
            # 'shared' needs the disk where both hosts see it; the others move it from a's own
            "storage": "shared" if storage == "shared" else "local",
            "data_disks": [parse_size(disk_size)] * (disks - 1),
            "nics": nics,
        }
        devices = f"{disks} disk{'s' if disks > 1 else ''}" + (f", {nics} NIC(s)" if nics else "")
        with Spinner(f"booting {DEMO_VM} ({devices}) on host {a.name}", enabled=verbose) as spinner:
            booted = await start_vm(
                a,
                request,
                progress=lambda s: spinner.update(f"booting {DEMO_VM}: {s:.1f} s"),
            )
            say(
                f"{DEMO_VM} runs ioprobe ({workload}) on host {a.name}: first heartbeat after "
                f"{booted.boot_s} s"
            )
            await wait_past_phase(
                a,
                DEMO_VM,
                "prefill",
                on_beat=lambda beat: spinner.update(
                    f"ioprobe prefilling the disk: {beat.written_blocks * 4096 >> 20} MiB written"
                ),
            )
            spinner.update("steady-state guest I/O before migrating")
            await wait_heartbeats(
                a, DEMO_VM, BASELINE_BEATS, with_io=not workload.startswith("idle")
            )
        reports: list[MigrationReport] = []
        source, destination = a, b
        for index in range(migrations):
            if index:  # the baseline of the next one: steady I/O on its source
                await wait_heartbeats(
                    source, DEMO_VM, BASELINE_BEATS, with_io=not workload.startswith("idle")
                )
            count = f" ({index + 1} of {migrations})" if migrations > 1 else ""
            say(f"migrating {DEMO_VM} {source.name} → {destination.name} ({storage}){count}")
            with MigrationProgress(enabled=verbose) as progress:
                report = await migrate(
                    source,
                    destination,
                    DEMO_VM,
                    storage=storage,
                    link_rate_bps=getattr(lab, "link_rate_bps", None),
                    progress=progress,
                )
            reports.append(report)
            if migrations > 1:
                say(
                    f"  {report.status}: switchover {report.time_to_switchover_s} s, total "
                    f"{report.total_time_s} s, max I/O gap {report.max_io_gap_ms} ms "
                    f"({report.io_gap_excess_ms} ms over the guest's own), "
                    f"errors {report.guest_io_errors}/{report.guest_verify_failures}, "
                    f"integrity {report.integrity}"
                )
            if not healthy([report]):
                break
            source, destination = destination, source
        return reports
    finally:
        say(f"removing the lab {DEMO_LAB!r}")
        await asyncio.to_thread(lab.down)
