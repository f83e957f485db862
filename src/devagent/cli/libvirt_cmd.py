"""``devagent libvirt``: the libvirt domains of a lab's hosts, as their daemons follow them
(each daemon started with ``--libvirt URI``; ``lab up --libvirt`` does that)."""

from __future__ import annotations

import click
from rich.table import Table

from devagent.api_types import Libvirt
from devagent.cli.common import json_option, lab_endpoints, lab_option, out, print_json, run
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
