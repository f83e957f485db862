"""``devagent libvirt``: the libvirt domains of a lab's hosts, as their daemons follow them
(each daemon started with ``--libvirt URI``; ``lab up --libvirt`` does that); and
``devagent bench libvirt`` (:mod:`devagent.lab.libvirt_bench`)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import click
from rich.table import Table

from devagent.api_types import Adopted, Libvirt
from devagent.cli.common import (
    endpoint_for,
    err,
    json_option,
    lab_endpoints,
    lab_option,
    out,
    print_json,
    run,
)
from devagent.client import DaemonClient
from devagent.vocab import parse_size
from devagent.wire import to_json

BENCH_LAB = "lvb"


@click.group("libvirt")
def libvirt_group() -> None:
    """libvirt-managed VMs: the domains of each host's libvirtd, as devagent sees them."""


@libvirt_group.command("domains")
@json_option
@lab_option
def domains_cmd(as_json: bool, lab_name: str) -> None:
    """Every domain of every host's libvirtd: its state, and the last lifecycle event the
    host's daemon saw (e.g. resumed/migrated)."""

    async def go() -> list[tuple[str, Libvirt]]:
        rows = []
        for endpoint in lab_endpoints(lab_name):
            async with DaemonClient(endpoint) as client:
                rows.append((endpoint.name, await client.get_as("/v1/libvirt", Libvirt)))
        return rows

    rows = run(go())
    if as_json:
        print_json([{"host": host, **to_json(status)} for host, status in rows])
        return
    table = Table("host", "libvirt", "domain", "state", "persistent", "last event")
    for host, status in rows:
        link = "connected" if status.connected else ("not used" if status.uri is None else "down")
        if not status.domains:
            table.add_row(host, link, "—", "", "", "")
        for domain in status.domains:
            persistent = "yes" if domain.persistent else "no"
            last = domain.last_event or "—"
            table.add_row(host, link, domain.name, domain.state, persistent, last)
    out.print(table)


@libvirt_group.command("adopt")
@click.argument("domain")
@click.option("--host", required=True, help="The domain's host (a lab host name, or a URL).")
@json_option
@lab_option
def adopt_cmd(domain: str, host: str, as_json: bool, lab_name: str) -> None:
    """Serve the running DOMAIN's raw file disks by agents of its host, the guest running
    all along: each disk is copied onto a new replica its agent serves, then libvirt
    pivots the disk to the agent's NBD socket; the persistent definition follows. The
    original files are left as they were at the pivot."""

    async def go() -> Adopted:
        async with DaemonClient(endpoint_for(host, lab_name), timeout=660) as client:
            return await client.post_as(f"/v1/libvirt/{domain}/adopt", Adopted)

    adopted = run(go())
    if as_json:
        print_json(to_json(adopted))
        return
    table = Table("disk", "was", "now served from", "agent socket", "peers reach it at")
    for disk in adopted.disks:
        table.add_row(disk.node, disk.original, disk.image, disk.socket, disk.tcp_address or "—")
    out.print(f"domain {adopted.domain} on host {host}: its disks are served by devagent")
    out.print(table)


@click.command("libvirt")
@click.option("--runs", default=1, show_default=True, type=click.IntRange(1, 10),
              help="Migrations per method (medians reported).")  # fmt: skip
@click.option("--link-rate", default="1gbit", show_default=True, help="Shape the hosts' links.")
@click.option("--disk-size", default="1G", show_default=True)
@click.option("--ram", default="256M", show_default=True)
@click.option("--workload", default="moderate,prefill=256M", show_default=True,
              help="The guest's ioprobe profile.")  # fmt: skip
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write results.json (every migration) and results.md here.")  # fmt: skip
@json_option
def libvirt_bench_cmd(
    runs: int, link_rate: str, disk_size: str, ram: str, workload: str,
    out_dir: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """libvirt's own storage migration (virsh migrate --copy-storage-all, and with
    --copy-storage-synchronous-writes) against devagent under libvirt (hybrid, postcopy,
    precopy): the same guest, the same link, in one run, on a fresh 2-host lab with a
    libvirtd in each host. One row per method: medians of total time, total / limit, the
    guest's pause (libvirt's events), QEMU's downtime (libvirt's job info), guest errors,
    and the destination's disk against the guest's digest."""
    from devagent.cli.demo_common import fresh_lab
    from devagent.guest.workload import parse_workload
    from devagent.lab import libvirt_bench as bench

    def say(text: str) -> None:
        if not as_json:
            err.print(text)

    async def go() -> list[bench.BenchRow]:
        lab = await fresh_lab(BENCH_LAB, 2, link_rate, loopback=False, say=say, libvirt=True)
        try:
            return await bench.LibvirtBench(
                lab, parse_size(disk_size), parse_workload(workload), parse_size(ram) >> 20, say
            ).run(runs)
        finally:
            say(f"removing the lab {BENCH_LAB!r}")
            await asyncio.to_thread(lab.down)

    started = time.monotonic()
    rows = run(go())
    table = bench.median_rows(rows)
    results = {"link_rate": link_rate, "disk_size": disk_size, "ram": ram,
               "workload": workload, "runs": runs, "wall_s": round(time.monotonic() - started),
               "table": table, "migrations": [to_json(r) for r in rows]}  # fmt: skip
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (out_dir / "results.md").write_text(bench.markdown(table) + "\n")
    if as_json:
        print_json(results)
    else:
        out.print(bench.markdown(table))
    if any(r.error or r.guest_io_errors or r.guest_verify_failures for r in rows):
        sys.exit(1)
