"""Taking over a running libvirt domain's disks (``devagent libvirt adopt DOMAIN``), the
guest running all along.

For each of the domain's raw file disks, an agent of this host starts serving a new
replica (a sparse file in the host's disks folder, the size of the disk), on a unix socket
for the domain's QEMU and on TCP for peers. libvirt then copies the disk onto the agent's
export and pivots to it (``virDomainBlockCopy`` to an NBD network disk, the destination
reused as it is, a transient job; then ``virDomainBlockJobAbort`` with ``PIVOT`` once the
copy is ``ready``): QEMU's mirror carries the guest's writes made during the copy, and the
pivot is atomic for the guest. libvirt's live definition names the network disk from then
on, and the persistent one is redefined to match, so that libvirt moves the domain without
copying its disk (it counts an NBD disk as safe).

A disk is copied, not served in place: an agent serving the very file QEMU's mirror writes
to would race the mirror's copy against the guest's own writes. The original file is left
as it was at the pivot; devagent never deletes it.

A copy that fails (the job fails or is cancelled, the agent dies, no ``ready`` within
:data:`COPY_TIMEOUT_S`) is cancelled without pivot: the domain keeps its file disk, and
the agent and its replica are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devagent.agent.messages import BackendSpec
from devagent.api_types import AdoptedDisk
from devagent.daemon.agents import AgentProcess
from devagent.errors import DevagentError, PeerError, StateError, UsageError
from devagent.libvirt_link import (
    BLOCK_COPY_REUSE_EXT,
    BLOCK_COPY_TRANSIENT_JOB,
    BLOCK_JOB_ABORT_PIVOT,
    XML_INACTIVE,
    DomainEvent,
    LibvirtLink,
)

log = logging.getLogger(__name__)

COPY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class FileDisk:
    """A disk of a domain's definition that devagent can take over."""

    target: str  # the guest's device name ("vda"), libvirt's name of the disk
    path: Path


def _disks(root: ET.Element) -> Iterator[tuple[str, ET.Element]]:
    """Each ``<disk>`` of a domain's XML that has a target, with that target ("vda")."""
    for disk in root.iterfind("./devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev is not None:
            yield dev, disk


def file_disks(domain_xml: str, name: str) -> list[FileDisk]:
    """The raw file disks of a domain's XML; other disks are refused by name (a qcow2
    image, a disk that is already a network disk, a CD-ROM are left alone)."""
    found = []
    for dev, disk in _disks(ET.fromstring(domain_xml)):
        if disk.get("device", "disk") != "disk":
            continue
        driver = disk.find("driver")
        kind = driver.get("type", "raw") if driver is not None else "raw"
        source = disk.find("source")
        if disk.get("type") != "file" or source is None or source.get("file") is None:
            log.info("domain %s: disk %s is not a file disk: left alone", name, dev)
            continue
        if kind != "raw":
            raise UsageError(
                f"domain {name}: disk {dev} is a {kind} image; devagent takes over raw "
                "disks only (convert it with qemu-img convert -O raw)"
            )
        found.append(FileDisk(target=dev, path=Path(str(source.get("file")))))
    if not found:
        raise UsageError(f"domain {name} has no raw file disk to take over")
    return found


@dataclass(frozen=True)
class NbdSource:
    """An agent's export on its unix socket: what a domain's network disk names."""

    export: str
    socket: str

    @classmethod
    def of(cls, agent: AgentProcess) -> NbdSource:
        return cls(export=agent.export, socket=str(agent.nbd_socket))


def network_disk(source: NbdSource) -> ET.Element:
    """The ``<disk>`` that reaches ``source``."""
    disk = ET.Element("disk", type="network", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw")
    nbd = ET.SubElement(disk, "source", protocol="nbd", name=source.export)
    ET.SubElement(nbd, "host", transport="unix", socket=source.socket)
    return disk


def redefined(domain_xml: str, sources: dict[str, NbdSource]) -> str:
    """``domain_xml`` with each disk of ``sources`` (by target) served by its agent, the
    rest of each ``<disk>`` (its driver's options, target, bus, serial, address) kept."""
    root = ET.fromstring(domain_xml)
    for dev, disk in _disks(root):
        source = sources.get(dev)
        if source is None:
            continue
        served = network_disk(source)
        disk.set("type", "network")
        old = disk.find("source")
        if old is not None:
            disk.remove(old)
        disk.insert(0, served.find("source"))  # type: ignore[arg-type]
        driver = disk.find("driver")
        if driver is None:
            disk.insert(0, served.find("driver"))  # type: ignore[arg-type]
        else:  # its cache, io, discard… kept, as the live definition keeps them
            driver.set("type", "raw")
    return ET.tostring(root, encoding="unicode")


async def adopt(
    link: LibvirtLink,
    name: str,
    disks_dir: Path,
    run_dir: Path,
    address: str,
    served: list[tuple[AdoptedDisk, AgentProcess]],
) -> None:
    """Take over domain ``name``'s raw file disks; see the module's description. Each disk
    whose pivot is done is added to ``served`` at once, with its agent: a failure on a later
    disk leaves the earlier ones served (the guest uses them), and says so."""
    dom = await link.call("lookupByName", name)
    if not await link.run(dom, "isActive"):
        raise StateError(f"domain {name} is not running: start it, then adopt it")
    disks = file_disks(await link.run(dom, "XMLDesc", 0), name)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        for disk in disks:
            size = (await link.run(dom, "blockInfo", disk.target))[0]  # as libvirt's QEMU sees it
            agent = await serve_replica(name, disk.target, size, disks_dir, run_dir, address)
            if not await _copy_and_pivot(link, dom, name, disk, agent):
                await agent.stop()
                Path(agent.image).unlink(missing_ok=True)
                raise PeerError(f"domain {name}: disk {disk.target} could not pivot to its agent")
            served.append((AdoptedDisk(
                node=disk.target, original=str(disk.path), image=agent.image,
                socket=str(agent.nbd_socket), export=agent.export, tcp_address=agent.tcp_address,
            ), agent))  # fmt: skip
        if await link.run(dom, "isPersistent"):
            inactive = await link.run(dom, "XMLDesc", XML_INACTIVE)
            sources = {row.node: NbdSource.of(agent) for row, agent in served}
            await link.call("defineXML", redefined(inactive, sources))
    except DevagentError as err:
        if served:
            nodes = ", ".join(row.node for row, _agent in served)
            raise PeerError(f"{err} (disks {nodes} are served by their agents already)") from err
        raise
    log.info("domain %s: disks %s served by agents", name, ", ".join(r.node for r, _ in served))


def replica_path(disks_dir: Path, name: str, node: str) -> Path:
    """Where domain ``name``'s disk ``node`` is kept on a host."""
    return disks_dir / f"{name}-{node}.img"


async def serve_replica(
    name: str,
    node: str,
    size: int,
    disks_dir: Path,
    run_dir: Path,
    address: str,
    backend: BackendSpec | None = None,
) -> AgentProcess:
    """A new sparse replica of ``size`` bytes for domain ``name``'s disk ``node``, served by
    an agent (as ``backend`` says; none: the replica as it is), on TCP at ``address`` too."""
    replica = replica_path(disks_dir, name, node)
    try:
        disks_dir.mkdir(parents=True, exist_ok=True)
        with replica.open("xb") as out:  # never over a file already there
            out.truncate(size)
    except FileExistsError:
        raise StateError(f"domain {name}: {replica} exists already") from None
    except OSError as err:
        raise PeerError(f"domain {name}: disk {node}: {err}") from err
    agent = AgentProcess(
        vm=name, node=node, image=str(replica), run_dir=str(run_dir), listen_address=address,
        backend=backend,
    )  # fmt: skip
    try:
        await agent.start()
    except BaseException:
        replica.unlink(missing_ok=True)
        raise
    return agent


async def _copy_and_pivot(
    link: LibvirtLink, dom: Any, name: str, disk: FileDisk, agent: AgentProcess
) -> bool:
    """Copy the disk onto ``agent`` and pivot to it. True once the domain's disk is the
    agent's; False when it is still the file (the copy failed, cancelled). An error of the
    pivot call itself is checked against the live definition: the pivot may have happened
    (the guest then writes to the agent, which must stay)."""

    def ends(event: DomainEvent) -> bool:
        return event.domain == name and event.event == "block-job" and event.disk == disk.target

    ended = asyncio.ensure_future(link.wait_event(ends, COPY_TIMEOUT_S, f"copy of {disk.target}"))
    await asyncio.sleep(0)  # the waiter is in place before libvirt can answer
    try:
        target_xml = ET.tostring(network_disk(NbdSource.of(agent)), encoding="unicode")
        flags = BLOCK_COPY_REUSE_EXT | BLOCK_COPY_TRANSIENT_JOB
        await link.run(dom, "blockCopy", disk.target, target_xml, {}, flags)
        log.info("domain %s: copying %s onto agent %s", name, disk.path, agent.nbd_socket)
        event = await ended
        if event.detail != "ready":
            log.error("domain %s: the copy of disk %s ended %s", name, disk.target, event.detail)
            return False
        await link.run(dom, "blockJobAbort", disk.target, BLOCK_JOB_ABORT_PIVOT)
        return True
    except BaseException:
        ended.cancel()
        if await _uses(link, dom, disk.target, agent):
            raise PeerError(f"domain {name}: disk {disk.target} pivoted to its agent, then: "
                            "an error (see the daemon's log)") from None  # fmt: skip
        with contextlib.suppress(Exception):  # no job, or one already over
            await link.run(dom, "blockJobAbort", disk.target, 0)
        raise


async def _uses(link: LibvirtLink, dom: Any, target: str, agent: AgentProcess) -> bool:
    """Whether the live definition's disk ``target`` is ``agent``'s socket (unknown: yes,
    the agent is kept: a replica kept by mistake costs space, one deleted the guest's data)."""
    try:
        live = ET.fromstring(await link.run(dom, "XMLDesc", 0))
    except (DevagentError, ET.ParseError):
        return True
    for dev, disk in _disks(live):
        if dev == target:
            host = disk.find("source/host")
            return host is not None and host.get("socket") == str(agent.nbd_socket)
    return True
