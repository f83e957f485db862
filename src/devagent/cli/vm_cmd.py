"""``devagent vm``: start, list, show and stop VMs on a lab's hosts."""

from __future__ import annotations

import click
from rich.table import Table

from devagent.api_types import Adopted, Removed, VmList, VmStatus
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
from devagent.client import DaemonClient, Endpoint
from devagent.orchestrate import Started, locate_vm, start_vm
from devagent.wire import to_json


@click.group("vm")
def vm_group() -> None:
    """Start, list, inspect and stop VMs."""


@vm_group.command("start")
@click.argument("name")
@click.option("--host", required=True, help="Host to start it on (a lab host name, or a URL).")
@click.option(
    "--disk-size", default="1G", show_default=True, help="Size of the probe guest's disk."
)
@click.option(
    "--data-disk",
    "data_disks",
    multiple=True,
    metavar="SIZE",
    help="Add a new disk of SIZE (repeatable: disk1, disk2, ...); the test guest's probe "
    "writes and verifies every disk at once.",
)
@click.option("--ram", default="256M", show_default=True, help="Guest RAM (M or G suffix).")
@click.option(
    "--workload",
    default="moderate",
    show_default=True,
    help="ioprobe profile: idle, moderate, heavy, optionally with overrides "
    "(moderate,rate=500,prefill=256M).",
)
@click.option(
    "--storage",
    type=click.Choice(["shared", "local"]),
    default="shared",
    show_default=True,
    help="Where the disk lives: the lab's shared folder or the host's own.",
)
@click.option(
    "--disk-host",
    help="Put the disk on this other host: the VM uses it over the network (remote access).",
)
@click.option(
    "--disk",
    "disk_images",
    multiple=True,
    metavar="IMG",
    help="Run your own guest from this image (raw or qcow2); repeat it for more disks, the "
    "first one boots.",
)
@click.option("--kernel", help="With --disk: boot this kernel directly instead of the firmware.")
@click.option("--initrd", help="With --kernel: the initrd.")
@click.option("--append", help="With --kernel: the kernel command line.")
@click.option(
    "--nic",
    count=True,
    help="Give it a NIC on the host's guest network (an address of the lab's subnet, a tap on "
    "the host's bridge, a net agent); repeat it for more (up to 4). The test guest serves "
    "echo on port 7 and lines on 19 on each.",
)
@click.option(
    "--no-wait", is_flag=True, help="Return once QEMU runs, without waiting for the probe."
)
@click.option(
    "--libvirt",
    is_flag=True,
    help="Start the test guest as a libvirt domain of the host's libvirtd instead (lab up "
    "--libvirt), its disk served by an agent from the start: migrate it as any VM.",
)
@json_option
@lab_option
def start(
    name: str,
    host: str,
    disk_size: str,
    data_disks: tuple[str, ...],
    ram: str,
    workload: str,
    storage: str,
    disk_host: str | None,
    disk_images: tuple[str, ...],
    kernel: str | None,
    initrd: str | None,
    append: str | None,
    nic: int,
    no_wait: bool,
    libvirt: bool,
    as_json: bool,
    lab_name: str,
) -> None:
    """Boot VM NAME on HOST: by default the test guest running ioprobe with WORKLOAD on
    each of its disks; with --disk, your own guest (which has no probe, so fewer
    measures). Its disks are disk0, disk1, ... in order (each its own device agent, the
    guest reads the node as the disk's serial), its NICs net0, net1, ..."""
    from devagent.vocab import parse_size

    if libvirt:
        if data_disks or disk_host or disk_images or nic:
            raise click.UsageError("--libvirt starts the test guest with one disk and no NIC")
        start_domain(name, host, parse_size(disk_size), parse_size(ram) >> 20, workload,
                     as_json, lab_name)  # fmt: skip
        return
    request: dict[str, object] = {
        "name": name,
        "ram_mb": parse_size(ram) >> 20,
        "storage": storage,
        "data_disks": [parse_size(size) for size in data_disks],
    }
    if nic:
        request["nics"] = nic
    if disk_images:
        request.update(disk=list(disk_images), kernel=kernel, initrd=initrd, append=append)
    else:
        request.update(workload=workload, disk_size=parse_size(disk_size))

    async def go() -> Started:
        endpoint = endpoint_for(host, lab_name)
        if disk_host is not None:
            request["disk_from"] = endpoint_for(disk_host, lab_name).to_json()
        with Spinner(f"starting {name} on {host}", enabled=not as_json) as spinner:
            return await start_vm(
                endpoint,
                request,
                wait=not no_wait,
                progress=lambda s: spinner.update(f"{name} on {host}: booting {s:.1f} s"),
            )

    started = run(go())
    status = started.status
    nics = "".join(f", NIC {n.node} {n.address} (tap {n.tap})" for n in status.nics)
    if as_json:
        print_json({**to_json(status), "boot_s": started.boot_s})
    elif started.boot_s is not None and status.probe:
        err.print(
            f"VM {name} runs on host {host}; probe's first heartbeat after {started.boot_s} s{nics}"
        )
    else:
        err.print(f"VM {name} runs on host {host} (no ioprobe: your own guest){nics}")


@vm_group.command("list")
@json_option
@lab_option
def list_vms(as_json: bool, lab_name: str) -> None:
    """Every VM on every host of the lab."""

    async def go() -> list[tuple[str, VmStatus]]:
        rows = []
        for endpoint in lab_endpoints(lab_name):
            async with DaemonClient(endpoint) as client:
                for vm in (await client.get_as("/v1/vms", VmList)).vms:
                    rows.append((endpoint.name, vm))
        return rows

    rows = run(go())
    if as_json:
        print_json([{"host": host, **to_json(vm)} for host, vm in rows])
        return
    table = Table("host", "vm", "state", "role", "ram", "storage", "ops total", "errors")
    for host, vm in rows:
        beat = vm.last_heartbeat
        table.add_row(
            host,
            vm.name,
            vm.state,
            vm.role,
            f"{vm.ram_mb}M",
            vm.storage,
            str(beat.ops_total) if beat else "—",
            str(beat.errors) if beat else "—",
        )
    out.print(table)


@vm_group.command("status")
@click.argument("name")
@json_option
@lab_option
def status(name: str, as_json: bool, lab_name: str) -> None:
    """Where VM NAME runs, its state and its probe's last heartbeat."""

    async def go() -> tuple[Endpoint, VmStatus]:
        return await locate_vm(lab_endpoints(lab_name), name)

    endpoint, vm = run(go())
    info = {"host": endpoint.name, **to_json(vm)}
    if as_json:
        print_json(info)
        return
    for key, value in info.items():
        out.print(f"{key:>20}: {value}")


@vm_group.command("stop")
@click.argument("name")
@json_option
@lab_option
def stop(name: str, as_json: bool, lab_name: str) -> None:
    """Stop VM NAME wherever it runs."""

    async def go() -> tuple[Endpoint, Removed]:
        endpoint, _ = await locate_vm(lab_endpoints(lab_name), name)
        async with DaemonClient(endpoint) as client:
            return endpoint, await client.delete_as(f"/v1/vms/{name}", Removed)

    endpoint, answer = run(go())
    if as_json:
        print_json({"host": endpoint.name, **to_json(answer)})
    else:
        err.print(f"VM {name} stopped on host {endpoint.name}")


def _vm_action(name: str, lab_name: str, verb: str, as_json: bool) -> VmStatus:
    """``POST /v1/vms/NAME/VERB`` on the host that runs VM NAME; says so, returns its
    status."""

    async def go() -> tuple[Endpoint, VmStatus]:
        endpoint, _ = await locate_vm(lab_endpoints(lab_name), name)
        async with DaemonClient(endpoint) as client:
            return endpoint, await client.post_as(f"/v1/vms/{name}/{verb}", VmStatus)

    endpoint, status = run(go())
    if as_json:
        print_json({"host": endpoint.name, **to_json(status)})
    else:
        err.print(f"VM {name} {verb.rstrip('e')}ed on host {endpoint.name}")
    return status


@vm_group.command("suspend")
@click.argument("name")
@json_option
@lab_option
def suspend(name: str, as_json: bool, lab_name: str) -> None:
    """Stop VM NAME's vCPUs where it runs (QMP stop): it does nothing, costs no CPU and keeps
    its devices; `vm resume` lets it go on. A suspended VM is not migrated."""
    _vm_action(name, lab_name, "suspend", as_json)


@vm_group.command("resume")
@click.argument("name")
@json_option
@lab_option
def resume(name: str, as_json: bool, lab_name: str) -> None:
    """Let a suspended VM NAME run again (QMP cont)."""
    _vm_action(name, lab_name, "resume", as_json)


@vm_group.command("restart")
@click.argument("name")
@json_option
@lab_option
def restart(name: str, as_json: bool, lab_name: str) -> None:
    """Boot VM NAME again where it was, after its QEMU died (a crash, a kill): the same
    devices, its disk as its agent serves it, with every write the guest saw acknowledged.
    The guest boots afresh: what it held in memory is gone."""
    _vm_action(name, lab_name, "restart", as_json)


def start_domain(
    name: str, host: str, size: int, ram_mb: int, workload: str, as_json: bool, lab_name: str
) -> None:
    """``vm start --libvirt``: the host's daemon serves a new disk and has libvirt define
    and start the test guest on it."""
    body = {"name": name, "disk_size": size, "ram_mb": ram_mb, "workload": workload}

    async def go() -> Adopted:
        async with DaemonClient(endpoint_for(host, lab_name)) as client:
            return await client.post_as("/v1/libvirt/domains", Adopted, body)

    with Spinner(f"libvirt starts {name} on {host}", enabled=not as_json):
        started = run(go())
    if as_json:
        print_json(to_json(started))
        return
    (disk,) = started.disks
    out.print(f"domain {name} runs on host {host} (libvirt), its disk {disk.node} served by "
              f"devagent at {disk.socket}; its probe runs {workload}")  # fmt: skip
