"""A new libvirt domain whose disk devagent serves from the start (``devagent vm start
--libvirt``): the test guest, its probe running a workload on its disk ``vda``, which an
agent of this host serves from a new replica; libvirt defines and starts it (persistent),
and the domain is the host's to migrate as an adopted one is.
"""

from __future__ import annotations

import logging
from pathlib import Path

from devagent.api_types import AdoptedDisk
from devagent.daemon.agents import AgentProcess
from devagent.daemon.libvirt_adopt import replica_path, serve_replica
from devagent.errors import DevagentError, StateError
from devagent.guest.domain import nbd_disk, probe_guest_domain
from devagent.guest.workload import Workload
from devagent.libvirt_link import LibvirtLink

log = logging.getLogger(__name__)


async def start_domain(
    link: LibvirtLink,
    name: str,
    size: int,
    workload: Workload,
    ram_mb: int,
    disks_dir: Path,
    run_dir: Path,
    address: str,
) -> tuple[AdoptedDisk, AgentProcess]:
    """Serve a new disk of ``size`` bytes, then define and start domain ``name`` on it.
    A failure leaves nothing: the definition, the agent and the replica go."""
    known = {d.name for d in await link.domains()}
    if name in known:
        raise StateError(f"libvirt already has a domain {name}")
    run_dir.mkdir(parents=True, exist_ok=True)
    agent = await serve_replica(name, "vda", size, disks_dir, run_dir, address)
    try:
        xml = probe_guest_domain(name, nbd_disk(agent.export, str(agent.nbd_socket)), workload,
                                 ram_mb)  # fmt: skip
        dom = await link.call("defineXML", xml)
        try:
            await link.run(dom, "create")
        except DevagentError:
            await link.run(dom, "undefine")
            raise
    except BaseException:
        await agent.kill()
        replica_path(disks_dir, name, "vda").unlink(missing_ok=True)
        raise
    log.info("domain %s started, its disk served by agent %s", name, agent.nbd_socket)
    disk = AdoptedDisk(
        node="vda", original="", image=agent.image, socket=str(agent.nbd_socket),
        export=agent.export, tcp_address=agent.tcp_address,
    )  # fmt: skip
    return disk, agent
