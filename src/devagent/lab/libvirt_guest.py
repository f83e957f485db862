"""The test guest as a libvirt domain of a lab host (``lab up --libvirt``), its probe read
and commanded through its console: what ``demo --libvirt`` and the tests run.

The domain (:mod:`devagent.guest.domain`) boots the test guest's kernel and initrd, its
probe writing and checking its raw file disk ``vda``. Its console's socket and log are in
libvirt's folders, which in a lab are each host's own folders
(:data:`devagent.lab.libvirt.MOUNTS`). The daemon does not read a libvirt guest's probe:
the lab does, here (its heartbeats from both hosts' logs, its digest through the
console).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from devagent.api_types import DomainDisks
from devagent.client import DaemonClient, Endpoint
from devagent.errors import PeerError
from devagent.guest.domain import console, console_log, file_disk, probe_guest_domain
from devagent.guest.probe import (
    ConsoleParser,
    Heartbeat,
    Paused,
    ProbeError,
    ProbeEvent,
    Started,
    VerifyFailure,
    disk_digest,
)
from devagent.guest.workload import Workload
from devagent.lab import libvirt
from devagent.lab.layout import LabHost
from devagent.wait import wait_until

PROBE_TIMEOUT_S = 30.0


def in_host(host: LabHost, path: str) -> Path:
    """A path of a host's libvirt folders as this machine sees it."""
    for sub, target in libvirt.MOUNTS.items():
        if path.startswith(target + "/"):
            return libvirt.root(host) / sub / path.removeprefix(target + "/")
    raise ValueError(f"{path} is in none of libvirt's folders")


def define_and_start(
    host: LabHost, name: str, size: int, workload: Workload, ram_mb: int = 128
) -> Path:
    """Domain ``name`` defined and started on ``host``, a new sparse disk of ``size``
    bytes in the host's folder; returns the disk's file."""
    image = host.dir / f"{name}.img"
    with image.open("xb") as out:
        out.truncate(size)
    definition = host.dir / f"{name}.xml"
    definition.write_text(probe_guest_domain(name, file_disk(image), workload, ram_mb))
    libvirt.virsh(host, "define", str(definition))
    libvirt.virsh(host, "start", name)
    return image


def probe_events(hosts: list[LabHost], name: str) -> list[ProbeEvent]:
    """Every probe event of domain ``name`` in its console logs on ``hosts``."""
    events: list[ProbeEvent] = []
    for host in hosts:
        log = in_host(host, console_log(name))
        if log.exists():
            events += ConsoleParser().feed(log.read_bytes() + b"\n", time.time())
    return events


@dataclass(frozen=True)
class GuestErrors:
    """What the probe reported wrong, on every host the domain ran on."""

    io_errors: int
    verify_failures: int
    heartbeats: int

    @classmethod
    def of(cls, events: list[ProbeEvent]) -> GuestErrors:
        beats = [e for e in events if isinstance(e, Heartbeat)]
        errors = max(sum(b.errors for b in beats), sum(isinstance(e, ProbeError) for e in events))
        failures = max(
            sum(b.verify_failures for b in beats),
            sum(isinstance(e, VerifyFailure) for e in events),
        )
        return cls(io_errors=errors, verify_failures=failures, heartbeats=len(beats))


def io_beats(hosts: list[LabHost], name: str) -> int:
    """How many of the probe's heartbeats so far saw it write or read (wherever the domain
    ran): a count that grows while the guest does I/O. (An event's ``host_time`` here is
    when the log was read, not when the guest wrote it: no use to tell old from new.)"""
    return sum(
        isinstance(e, Heartbeat) and e.phase == "run" and e.ops > 0
        for e in probe_events(hosts, name)
    )


async def wait_io(hosts: list[LabHost], name: str, *, beats: int = 3, timeout: float = 60) -> None:
    """Return once the probe has shown I/O in ``beats`` more heartbeats from now."""
    before = io_beats(hosts, name)
    await wait_until(
        lambda: io_beats(hosts, name) >= before + beats, timeout=timeout, interval=0.2,
        what=f"{name}'s probe to do I/O",
    )  # fmt: skip


async def probe_command(host: LabHost, name: str, command: str) -> Paused | None:
    """``command`` to the probe through the console of domain ``name`` on ``host``;
    ``pause`` waits for its answer."""
    path = in_host(host, console(name))
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(f"{command}\n".encode())
        await writer.drain()
        if command != "pause":
            return None
        parser = ConsoleParser()
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            while data := await reader.read(4096):
                for event in parser.feed(data, time.time()):
                    if isinstance(event, Paused):
                        return event
        raise PeerError(f"domain {name}'s console on {host.name} closed")
    except TimeoutError:
        raise PeerError(f"domain {name}'s probe did not answer {command!r}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def served_image(endpoint: Endpoint, name: str) -> Path:
    """The replica that host ``endpoint``'s agent serves as domain ``name``'s one disk."""
    async with DaemonClient(endpoint) as client:
        disks = await client.get_as(f"/v1/libvirt/{name}/disks", DomainDisks)
    (disk,) = disks.disks
    return Path(disk.image)


async def integrity(hosts: list[LabHost], host: LabHost, name: str, image: Path) -> str:
    """Pause the probe of domain ``name`` on ``host`` (one of ``hosts``, where it may have
    run), compare its digest with ``image``'s (the disk as that host holds it), let it go
    on: ``ok``, or what differs and how often the probe started on each host."""
    paused = await probe_command(host, name, "pause")
    assert paused is not None
    try:
        found = await asyncio.to_thread(disk_digest, image)
    finally:
        await probe_command(host, name, "resume")
    if found.digest == paused.digest:
        return "ok"
    starts = {
        other.name: sum(isinstance(e, Started) for e in probe_events([other], name))
        for other in hosts
    }
    return (
        f"mismatch: the guest last wrote digest {paused.digest} ({paused.written_blocks} "
        f"blocks written, {paused.ops_total} ops, table digest {paused.table_digest}), the "
        f"disk holds {found.digest}; the probe started {starts} times by host"
    )
