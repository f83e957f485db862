"""After a chaos run: where the VM is, and whether every invariant held.

* the VM runs on exactly one host, and answers: probe heartbeats, a ping and an echo over
  its NIC from the third host;
* the guest saw no I/O error and no verify failure;
* the other host holds nothing of it: no VM, process, replica, tap or folder.

Each check returns the violations it found, as sentences.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from pathlib import Path

from devagent.api_types import Integrity, VmStatus
from devagent.chaos.record import Outcome
from devagent.client import DaemonClient, Endpoint
from devagent.errors import DevagentError, NotFound
from devagent.guestnet import tap_name
from devagent.lab import procs
from devagent.lab.lab import Lab
from devagent.lab.traffic import EchoStream, wait_for_ping
from devagent.orchestrate import wait_heartbeats
from devagent.report import MigrationReport
from devagent.wait import WaitTimeout, wait_until

SETTLE_S = 60.0  # how long the hosts may take to reach a steady state after a run
ECHO_S = 1.0


async def vm_on(endpoint: Endpoint, name: str) -> VmStatus | None:
    """The VM's status on one host, None when that host has no such VM."""
    async with DaemonClient(endpoint) as client:
        try:
            return await client.get_as(f"/v1/vms/{name}", VmStatus)
        except NotFound:
            return None


def kept_images(host_dir: Path) -> set[str]:
    """The images this host serves as exports (a disk kept for a VM on another host)."""
    kept = set()
    for record in host_dir.glob("exports/*/export.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            kept.add(Path(json.loads(record.read_text())["image"]).name)
    return kept


def leftovers(lab: Lab, host: str, name: str, readonly: bool = False) -> list[str]:
    """What a host still holds of VM ``name``: processes, files, its tap. On a replica space
    gone ``readonly`` a replica cannot be removed: it is not counted (it goes with the
    space's replacement); a disk the host keeps as an export for the VM (its replica space
    elsewhere went read-only) is the VM's disk, not a leftover."""
    found: list[str] = []
    where = lab.host(host)
    folder = where.dir / "vms" / name
    pids = procs.under_path(folder)
    if pids:
        found.append(f"processes {sorted(pids)} run from {folder}")
    if folder.exists():
        found.append(f"{folder} exists")
    kept = kept_images(where.dir)
    images = sorted(
        p.name for p in (where.dir / "disks").glob(f"{name}*.img*") if p.name not in kept
    )
    if images and not readonly:
        found.append(f"replica files {images}")
    if where.netns is not None:
        tap = tap_name(name, "net0")
        shown = subprocess.run(["ip", "-n", where.netns, "link", "show", tap], capture_output=True)
        if shown.returncode == 0:
            found.append(f"tap {tap}")
    return found


async def settle(
    lab: Lab,
    endpoints: dict[str, Endpoint],
    name: str,
    source: str,
    destination: str,
    readonly: frozenset[str] = frozenset(),
) -> tuple[str, list[str]]:
    """Wait until the VM runs on one of ``source``/``destination`` and the other holds
    nothing of it (``readonly``: hosts whose replica space went read-only); the outcome
    that shows, and what still is wrong after :data:`SETTLE_S`."""
    problems: list[str] = []

    async def steady() -> str | None:
        problems.clear()
        seen = {}
        for host in (source, destination):
            try:
                seen[host] = await vm_on(endpoints[host], name)
            except DevagentError as err:
                problems.append(f"host {host} does not answer: {err}")
                return None
        running = [h for h, s in seen.items() if s is not None and s.role == "running"]
        if len(running) != 1:
            problems.append(f"VM runs on {running or 'no host'}: {_roles(seen)}")
            return None
        here = running[0]
        other = destination if here == source else source
        if seen[other] is not None:
            problems.append(f"host {other} still has the VM ({_roles(seen)})")
        left = leftovers(lab, other, name, readonly=other in readonly)
        problems.extend(f"host {other}: {thing}" for thing in left)
        state = seen[here]
        assert state is not None
        if state.state != "running":
            problems.append(f"the VM is {state.state} on {here}")
        if problems:
            return None
        return Outcome.COMPLETED if here == destination else Outcome.ROLLED_BACK

    try:
        outcome = await wait_until(steady, timeout=SETTLE_S, what="a steady state", interval=0.5)
    except WaitTimeout:
        return Outcome.UNKNOWN, list(problems)
    return outcome, []


def _roles(seen: dict[str, VmStatus | None]) -> str:
    return ", ".join(
        f"{h}: {'none' if s is None else f'{s.role}/{s.state}'}" for h, s in seen.items()
    )


async def answers(lab: Lab, at: Endpoint, name: str, client_host: str) -> list[str]:
    """The VM's probe goes on without an error, its disk holds what the guest last wrote,
    and its NIC answers a ping and an echo from ``client_host``."""
    found: list[str] = []
    try:
        beats = await wait_heartbeats(at, name, 10, timeout=30)
    except DevagentError as err:
        return [f"the probe is silent on {at.name}: {err}"]
    last = beats[-1]
    if last.errors or last.verify_failures:
        found.append(f"guest I/O errors {last.errors}, verify failures {last.verify_failures}")
    try:
        async with DaemonClient(at) as client:
            checked = await client.post_as(f"/v1/vms/{name}/integrity", Integrity)
        if checked.integrity != "ok":
            found.append(f"integrity on {at.name}: {checked.integrity}")
    except DevagentError as err:
        found.append(f"integrity on {at.name} could not be checked: {err}")
    status = await vm_on(at, name)
    if status is None or not status.nics:
        return [*found, f"VM {name} has no NIC on {at.name}"]
    address = status.nics[0].address.split("/")[0]
    netns = lab.host(client_host).netns
    assert netns is not None
    try:
        await asyncio.to_thread(wait_for_ping, netns, address, 20.0)
        found.extend(await asyncio.to_thread(_echo, netns, address))
    except DevagentError as err:
        found.append(f"the NIC does not answer: {err}")
    return found


def _echo(netns: str, address: str) -> list[str]:
    stream = EchoStream(netns, address, seed=7, rate=1 << 20)
    with stream:
        subprocess.run(["sleep", str(ECHO_S)])
        echoed = stream.finish(timeout=30.0)
    return [] if echoed.intact else [f"the echo over the NIC is not intact: {echoed}"]


def report_violations(label: str, report: MigrationReport) -> list[str]:
    """What a migration's report shows the guest lost (:meth:`MigrationReport.damage`)."""
    return [f"{label}: {what}" for what in report.damage()]


def space_of(lab: Lab, host: str) -> Path:
    return lab.host(host).dir / "disks"
