"""The daemon's view of its host: name, address, folders, its VMs and exports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from devagent.client import Endpoint
from devagent.daemon.agents import AgentProcess
from devagent.daemon.exports import ExportManager
from devagent.daemon.libvirt_domains import IncomingDomain, forget_domain, save_domain
from devagent.daemon.migration.messages import DomainCommitAnswer
from devagent.daemon.nics import NicAgent
from devagent.daemon.vms import VmManager
from devagent.errors import StateError
from devagent.guestnet import GuestNetwork
from devagent.libvirt_link import LibvirtLink
from devagent.tls import Tls


@dataclass
class Host:
    name: str
    address: str
    port: int
    root: Path
    shared_dir: Path | None = None
    network: GuestNetwork | None = None  # where VM NICs go (a lab host's bridge, addresses)
    token: str = ""  # the API's bearer token (peers that call back this host use it)
    tls: Tls | None = None  # its certificate; None: --insecure, plain HTTP and NBD
    libvirt: LibvirtLink | None = None  # its libvirtd (devagentd --libvirt URI)
    #: How this host's libvirtd reaches a peer's for a migration ("{address}": the peer's).
    libvirt_peer_uri: str = "qemu+tls://{address}/system"
    #: The agents serving the disks of the libvirt domains served here, by domain (adopted,
    #: started or migrated here; recorded: :meth:`serve_domain`).
    adopted: dict[str, list[AgentProcess]] = field(default_factory=dict)
    #: The libvirt domains on their way here, by name (their agents made, not committed).
    incoming_domains: dict[str, IncomingDomain] = field(default_factory=dict)
    #: The last commit of each domain that came here, for a repeat whose answer was lost.
    domain_commits: dict[str, DomainCommitAnswer] = field(default_factory=dict)
    vms: VmManager = field(init=False)
    exports: ExportManager = field(init=False)

    def __post_init__(self) -> None:
        self.vms = VmManager(self.name, self.root, self.shared_dir, self.address, self.network)
        self.exports = ExportManager(self.name, self.root, self.address)

    def serve_domain(self, name: str, agents: list[AgentProcess]) -> None:
        """Domain ``name``'s disks are this host's from now on, served by ``agents``
        (recorded: a restarted daemon takes them up again)."""
        self.adopted[name] = agents
        save_domain(self.root, name, agents)

    def release_domain(self, name: str) -> list[AgentProcess]:
        """Domain ``name``'s disks are no longer this host's: its agents, to stop."""
        forget_domain(self.root, name)
        return self.adopted.pop(name, [])

    def require_libvirt(self) -> LibvirtLink:
        if self.libvirt is None:
            raise StateError(f"host {self.name} runs without libvirt (devagentd --libvirt)")
        return self.libvirt

    def endpoint(self) -> Endpoint:
        """How peers reach this host's daemon."""
        scheme = "http" if self.tls is None else "https"
        return Endpoint(url=f"{scheme}://{self.address}:{self.port}", token=self.token,
                        name=self.name)  # fmt: skip

    def agent_pids(self) -> list[int]:
        """Every running agent process of this host (its VMs' disks and NICs, receivers,
        exports) that has made its control socket: it catches SIGHUP from then on (before,
        the signal would end it)."""
        agents: list[AgentProcess | NicAgent] = [*self.exports.exports.values()]
        agents += [agent for served in self.adopted.values() for agent in served]
        for incoming in self.incoming_domains.values():
            agents += [*incoming.agents.values(), *incoming.receivers.values()]
        for managed in self.vms.vms.values():
            agents += [*managed.agents, *managed.receivers.values(), *managed.nics]
        return [
            a.pid for a in agents
            if a.pid is not None and a.alive and a.control_socket.exists()
        ]  # fmt: skip

    @property
    def loopback(self) -> bool:
        """A loopback lab: every host shares the machine's one network stack."""
        return self.address.startswith("127.")
