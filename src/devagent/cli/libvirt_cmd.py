"""``devagent libvirt``: the libvirt domains of a lab's hosts, as their daemons follow them
(each daemon started with ``--libvirt URI``; ``lab up --libvirt`` does that)."""

from __future__ import annotations

import click
from rich.table import Table

from devagent.api_types import Adopted, Libvirt
from devagent.cli.common import (
    endpoint_for,
    json_option,
    lab_endpoints,
    lab_option,
    out,
    print_json,
    run,
)
from devagent.client import DaemonClient
from devagent.wire import to_json


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
