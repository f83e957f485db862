"""``devagent device``: the devices of VMs and the agents that serve them."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from devagent.agent.messages import (
    BackendStatus,
    FetchStatus,
    LocalStatus,
    MirrorStatus,
    RemoteStatus,
)
from devagent.api_types import DeviceRow, Devices, DiskExchange, DiskRow, NicRow, NicSwap, VmList
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
from devagent.wire import to_json


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

    async def go() -> list[tuple[str, DeviceRow]]:
        endpoints = lab_endpoints(lab_name)
        if vm is not None:
            endpoint, _ = await locate_vm(endpoints, vm)
            endpoints = [endpoint]
        rows: list[tuple[str, DeviceRow]] = []
        for endpoint in endpoints:
            async with DaemonClient(endpoint) as client:
                vms = [vm] if vm else [v.name for v in (await client.get_as("/v1/vms", VmList)).vms]
                for name in vms:
                    devices = await client.get_as(f"/v1/vms/{name}/devices", Devices)
                    rows += [(endpoint.name, device) for device in devices.devices]
        return rows

    rows = run(go())
    if as_json:
        print_json([{"host": host, **to_json(row)} for host, row in rows])
        return
    table = Table("host", "vm", "device", "backend", "present", "peer", "in flight", "completed")
    for host, row in rows:
        table.add_row(host, row.vm, row.device, *(_nic_cells(row) if isinstance(row, NicRow)
                                                   else _disk_cells(row)))  # fmt: skip
    out.print(table)


def _nic_cells(row: NicRow) -> tuple[str, str, str, str, str]:
    """backend, present, peer, in flight (held frames), completed (frames each way)."""
    agent = row.agent
    frames = "—"
    if agent is not None:
        counters = agent.counters
        frames = (
            f"{counters.get('from_vm_frames', '—')} out / {counters.get('to_vm_frames', '—')} in"
        )
    forward = agent.forward if agent else None
    hold = agent.hold if agent else None
    return (
        f"nic {row.address} tap {row.tap} ({row.state})",
        "—",
        forward.peer if forward else "—",
        str(hold.frames) if hold else "—",
        frames,
    )


def _disk_cells(row: DiskRow) -> tuple[str, str, str, str, str]:
    """backend, present, peer, in flight, completed."""
    if row.agent is None:
        return row.state, "—", "—", "—", "—"
    backend, journal = row.agent.backend_status, row.agent.journal
    peer = "—"
    if isinstance(backend, RemoteStatus):
        peer = backend.peer
    elif isinstance(backend, FetchStatus) and isinstance(backend.remote, RemoteStatus):
        peer = backend.remote.peer
    return (
        str(backend.__struct_config__.tag),  # its kind: local, remote, fetch, mirror
        _present(backend),
        peer,
        str(journal.in_flight),
        str(journal.completed),
    )


LONG_S = 3600.0  # a mirror of a large disk takes as long as the copy


def _show_exchange(result: DiskExchange, as_json: bool, what: str) -> None:
    if as_json:
        print_json(to_json(result))
        return
    gap = result.io_gap_ms
    copied = f" ({result.copied_bytes:,} bytes copied)" if result.copied_bytes is not None else ""
    err.print(
        f"{result.vm}/{result.device}: {what} in {result.duration_s} s{copied}; guest I/O "
        f"held {result.held_ms} ms, largest I/O gap around the pivot "
        f"{gap if gap is not None else '—'} ms"
    )
    if result.old_image is not None:
        err.print(f"the old image {result.old_image} is no longer used")
    if result.released is not None:
        err.print(f"host {result.released} no longer serves it")


def _present(backend: BackendStatus) -> str:
    """Bytes present of a replica being filled, or what a mirror has copied."""
    if isinstance(backend, FetchStatus) and backend.size:
        return f"{backend.present_bytes / backend.size:.0%}"
    if isinstance(backend, MirrorStatus):
        return f"{backend.copied_bytes:,} copied, {backend.dirty_bytes:,} dirty"
    return "100%" if isinstance(backend, LocalStatus) else "—"


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

    async def go() -> DiskExchange:
        endpoint, _ = await locate_vm(lab_endpoints(lab_name), vm)
        with Spinner(f"mirroring {vm}/{device} to {path}", enabled=not as_json):
            async with DaemonClient(endpoint, timeout=LONG_S) as client:
                return await client.post_as(
                    f"/v1/vms/{vm}/devices/{device}/swap",
                    DiskExchange,
                    {"to": path, "sync": sync},
                )

    _show_exchange(run(go()), as_json, f"now on {path}")


async def _swap_nic(vm: str, device: str, tap: str, as_json: bool, lab_name: str) -> None:
    endpoint, _ = await locate_vm(lab_endpoints(lab_name), vm)
    async with DaemonClient(endpoint) as client:
        result = await client.post_as(f"/v1/vms/{vm}/devices/{device}/swap", NicSwap, {"to": tap})
    if as_json:
        print_json(to_json(result))
    else:
        err.print(
            f"{vm}/{device}: uplink {result.old_tap} → {result.tap} in "
            f"{result.duration_s} s, {result.net_frames_lost} frames lost"
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

    async def go() -> DiskExchange:
        endpoint, _ = await locate_vm(lab_endpoints(lab_name), vm)
        peer = endpoint_for(from_host, lab_name)
        if peer.url == endpoint.url:
            raise UsageError(f"VM {vm} runs on host {from_host}: pick another host")
        with Spinner(f"moving {vm}/{device} to host {from_host}", enabled=not as_json):
            async with DaemonClient(endpoint, timeout=LONG_S) as client:
                return await client.post_as(
                    f"/v1/vms/{vm}/devices/{device}/attach-remote",
                    DiskExchange,
                    {"from": peer.to_json(), "sync": sync},
                )

    _show_exchange(run(go()), as_json, f"now lives on host {from_host}")
