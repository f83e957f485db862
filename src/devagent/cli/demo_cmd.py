"""``devagent demo``: the main job end to end, in one command.

Makes a 2-host lab, boots the test guest with ioprobe on host a, lets it settle, live-migrates
it to host b while ioprobe writes and verifies, prints the report, and removes the lab — also
when a step fails.
"""

from __future__ import annotations

import asyncio
import sys

import click

from devagent.cli.common import err, json_option, run
from devagent.cli.migrate_cmd import show_report
from devagent.cli.progress import MigrationProgress, Spinner
from devagent.client import Endpoint
from devagent.daemon.migration import STRATEGIES
from devagent.daemon.vms import parse_size
from devagent.orchestrate import migrate, start_vm, wait_heartbeats
from devagent.report import MigrationReport

DEMO_LAB = "demo"
DEMO_VM = "demo-vm"
BASELINE_BEATS = 30  # three seconds of steady guest I/O before migrating


@click.command("demo")
@click.option(
    "--storage",
    type=click.Choice(STRATEGIES),
    default="hybrid",
    show_default=True,
    help="Migration strategy: hybrid (push from the start, fetch the rest after the "
    "switchover), postcopy, precopy, or shared (both hosts see one image; RAM only).",
)
@click.option("--link-rate", default="1gbit", show_default=True, help="Shape the hosts' links.")
@click.option("--disk-size", default="1G", show_default=True)
@click.option("--ram", default="256M", show_default=True)
@click.option(
    "--workload",
    default="moderate,prefill=256M",
    show_default=True,
    help="ioprobe profile; prefill writes that much of the disk before the migration.",
)
@click.option("--loopback", is_flag=True, help="Hosts on 127.0.0.1 instead of namespaces.")
@json_option
def demo_cmd(
    storage: str,
    link_rate: str,
    disk_size: str,
    ram: str,
    workload: str,
    loopback: bool,
    as_json: bool,
) -> None:
    """Run devagent's main job end to end on a fresh 2-host lab and print its report."""
    report = run(
        run_demo(
            storage=storage,
            link_rate=None if loopback else link_rate,
            disk_size=disk_size,
            ram=ram,
            workload=workload,
            loopback=loopback,
            verbose=not as_json,
        )
    )
    show_report(report, as_json)
    healthy = (
        report.status == "completed"
        and report.guest_io_errors == 0
        and report.guest_verify_failures == 0
        and report.integrity == "ok"
    )
    sys.exit(0 if healthy else 1)


async def run_demo(
    *,
    storage: str,
    link_rate: str | None,
    disk_size: str,
    ram: str,
    workload: str,
    loopback: bool,
    verbose: bool,
) -> MigrationReport:
    from devagent.lab.lab import Lab

    def say(text: str) -> None:
        if verbose:
            err.print(text)

    if DEMO_LAB in Lab.list():
        say(f"removing the lab {DEMO_LAB!r} a previous run left")
        await asyncio.to_thread(Lab.load(DEMO_LAB).down)
    say(f"making a 2-host lab (link {link_rate or 'unshaped'})")
    lab = await asyncio.to_thread(
        Lab.up, name=DEMO_LAB, hosts=2, link_rate=link_rate, loopback=loopback
    )
    try:
        a, b = (Endpoint(url=h.url, token=lab.token, name=h.name) for h in lab.hosts[:2])
        request = {
            "name": DEMO_VM,
            "ram_mb": parse_size(ram) >> 20,
            "disk_size": parse_size(disk_size),
            "workload": workload,
            # 'shared' needs the disk where both hosts see it; the others move it from a's own
            "storage": "shared" if storage == "shared" else "local",
        }
        with Spinner(f"booting {DEMO_VM} on host {a.name}", enabled=verbose) as spinner:
            status = await start_vm(
                a,
                request,
                progress=lambda p: spinner.update(f"booting {DEMO_VM}: {p['elapsed_s']:.1f} s"),
            )
            say(
                f"{DEMO_VM} runs ioprobe ({workload}) on host {a.name}: first heartbeat after "
                f"{status['boot_s']} s"
            )
            while (beat := (await wait_heartbeats(a, DEMO_VM, 1, with_io=False))[-1])[
                "phase"
            ] == "prefill":
                written = beat["written_blocks"] * 4096
                spinner.update(f"ioprobe prefilling the disk: {written >> 20} MiB written")
            spinner.update("steady-state guest I/O before migrating")
            await wait_heartbeats(
                a, DEMO_VM, BASELINE_BEATS, with_io=not workload.startswith("idle")
            )
        say(f"migrating {DEMO_VM} {a.name} → {b.name} ({storage})")
        with MigrationProgress(enabled=verbose) as progress:
            return await migrate(
                a,
                b,
                DEMO_VM,
                storage=storage,
                link_rate_bps=getattr(lab, "link_rate_bps", None),
                progress=progress,
            )
    finally:
        say(f"removing the lab {DEMO_LAB!r}")
        await asyncio.to_thread(lab.down)
