"""``devagent device``: the devices of VMs and the agents that serve them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

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
from devagent.cli.progress import Spinner
from devagent.client import DaemonClient
from devagent.errors import UsageError
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
    table = Table("host", "vm", "device", "backend", "present", "peer", "in flight", "completed")
    for row in rows:
        agent = row.get("agent", {})
        if row.get("kind") == "nic":
            counters = agent.get("counters", {})
            frames = f"{counters.get('from_vm_frames', '—')} out"
            frames += f" / {counters.get('to_vm_frames', '—')} in"
            table.add_row(
                row["host"],
                row["vm"],
                row["device"],
                f"nic {row['address']} tap {row['tap']} ({row['state']})",
                "—",
                str((agent.get("forward") or {}).get("peer") or "—"),
                str((agent.get("hold") or {}).get("frames", "—")),
                frames,
            )
            continue
        journal = agent.get("journal", {})
        backend = agent.get("backend_status", {})
        table.add_row(
            row["host"],
            row["vm"],
            row["device"],
            str(backend.get("kind", row["state"])),
            _present(backend),
            str(backend.get("peer") or backend.get("remote", {}).get("peer") or "—"),
            str(journal.get("in_flight", "—")),
            str(journal.get("completed", "—")),
        )
    out.print(table)


LONG_S = 3600.0  # a mirror of a large disk takes as long as the copy


def _show_exchange(result: dict[str, Any], as_json: bool, what: str) -> None:
    if as_json:
        print_json(result)
        return
    gap = result.get("io_gap_ms")
    err.print(
        f"{result['vm']}/{result['device']}: {what} in {result['duration_s']} s "
        f"({result['copied_bytes']:,} bytes copied); guest I/O held {result['held_ms']} ms, "
        f"largest I/O gap around the pivot {gap if gap is not None else '—'} ms"
    )
    err.print(f"the old image {result['old_image']} is no longer used")


def _present(backend: dict[str, Any]) -> str:
    """Bytes present of a replica being filled, or what a mirror has copied."""
    if "present_bytes" in backend and backend.get("size"):
        return f"{backend['present_bytes'] / backend['size']:.0%}"
    if backend.get("kind") == "mirror":
        return f"{backend['copied_bytes']:,} copied, {backend['dirty_bytes']:,} dirty"
    return "100%" if backend.get("kind") == "local" else "—"


@device_group.command("swap")
@click.argument("vm")
@click.argument("device")
@click.option(
    "--to",
    "to_path",
    required=True,
    help="File or block device on the VM's host; for a NIC (net0), a tap on the VM's host.",
)
@click.option("--sync", is_flag=True, help="Mirror with synchronous writes (always converges).")
@json_option
@lab_option
def swap(vm: str, device: str, to_path: str, sync: bool, as_json: bool, lab_name: str) -> None:
    """Device dynamic exchange: mirror VM's live DEVICE onto TO, then pivot the VM onto it,
    while the guest runs and without failing a request.  For a NIC, TO is a tap (on a
    bridge) of the VM's host that becomes its uplink without a frame lost."""
    if device.startswith("net"):
        run(_swap_nic(vm, device, to_path, as_json, lab_name))
        return
    path = str(Path(to_path).absolute())

    async def go() -> dict[str, Any]:
        endpoint, _ = await locate_vm(lab_endpoints(lab_name), vm)
        with Spinner(f"mirroring {vm}/{device} to {path}", enabled=not as_json):
            async with DaemonClient(endpoint, timeout=LONG_S) as client:
                result: dict[str, Any] = await client.post(
                    f"/v1/vms/{vm}/devices/{device}/swap", {"to": path, "sync": sync}
                )
                return result

    _show_exchange(run(go()), as_json, f"now on {path}")


async def _swap_nic(vm: str, device: str, tap: str, as_json: bool, lab_name: str) -> None:
    endpoint, _ = await locate_vm(lab_endpoints(lab_name), vm)
    async with DaemonClient(endpoint) as client:
        result: dict[str, Any] = await client.post(
            f"/v1/vms/{vm}/devices/{device}/swap", {"to": tap}
        )
    if as_json:
        print_json(result)
    else:
        err.print(
            f"{vm}/{device}: uplink {result['old_tap']} → {result['tap']} in "
            f"{result['duration_s']} s, {result['net_frames_lost']} frames lost"
        )


@device_group.command("attach-remote")
@click.argument("vm")
@click.argument("device")
@click.option("--from", "from_host", required=True, help="Host the disk is to live on.")
@click.option("--sync", is_flag=True, help="Mirror with synchronous writes (always converges).")
@json_option
@lab_option
def attach_remote(
    vm: str, device: str, from_host: str, sync: bool, as_json: bool, lab_name: str
) -> None:
    """Remote device access: move VM's DEVICE to host FROM and keep using it from where the
    VM runs, over the network, while the guest runs."""

    async def go() -> dict[str, Any]:
        endpoint, _ = await locate_vm(lab_endpoints(lab_name), vm)
        peer = endpoint_for(from_host, lab_name)
        if peer.url == endpoint.url:
            raise UsageError(f"VM {vm} runs on host {from_host}: pick another host")
        with Spinner(f"moving {vm}/{device} to host {from_host}", enabled=not as_json):
            async with DaemonClient(endpoint, timeout=LONG_S) as client:
                result: dict[str, Any] = await client.post(
                    f"/v1/vms/{vm}/devices/{device}/attach-remote",
                    {"from": peer.to_json(), "sync": sync},
                )
                return result

    _show_exchange(run(go()), as_json, f"now lives on host {from_host}")
