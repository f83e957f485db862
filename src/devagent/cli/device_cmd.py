"""``devagent device``: the devices of VMs and the agents that serve them."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from devagent.cli.common import json_option, lab_endpoints, lab_option, out, print_json, run
from devagent.client import DaemonClient
from devagent.orchestrate import locate_vm


@click.group("device")
def device_group() -> None:
    """Inspect VM devices and their agents."""


@device_group.command("status")
@click.argument("vm", required=False)
@json_option
@lab_option
def status(vm: str | None, as_json: bool, lab_name: str) -> None:
    """Each disk of VM (or of every VM): its agent, backend, requests in flight, and the
    journal's figures."""

    async def go() -> list[dict[str, Any]]:
        endpoints = lab_endpoints(lab_name)
        if vm is not None:
            endpoint, _ = await locate_vm(endpoints, vm)
            endpoints = [endpoint]
        rows: list[dict[str, Any]] = []
        for endpoint in endpoints:
            async with DaemonClient(endpoint) as client:
                names = [vm] if vm else [v["name"] for v in (await client.get("/v1/vms"))["vms"]]
                for name in names:
                    for device in (await client.get(f"/v1/vms/{name}/devices"))["devices"]:
                        rows.append({"host": endpoint.name, **device})
        return rows

    rows = run(go())
    if as_json:
        print_json(rows)
        return
    table = Table("host", "vm", "device", "state", "backend", "in flight", "completed", "max gap")
    for row in rows:
        agent = row.get("agent", {})
        journal = agent.get("journal", {})
        gap = journal.get("max_gap_ms")
        table.add_row(
            row["host"],
            row["vm"],
            row["device"],
            row["state"],
            str(agent.get("backend", "—")),
            str(journal.get("in_flight", "—")),
            str(journal.get("completed", "—")),
            f"{gap:.1f} ms" if isinstance(gap, (int, float)) else "—",
        )
    out.print(table)
