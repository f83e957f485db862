"""The daemon's routes for the libvirt domains of its host (``devagentd --libvirt URI``;
:mod:`devagent.libvirt_link`). Every route of this table, no more
(``tests/test_routes.py`` checks it both ways)::

    GET    /v1/libvirt                        the host's libvirtd: URI, connected, domains
    POST   /v1/libvirt/domains                define and start the test guest as a domain
                                              whose disk an agent serves (DomainStart)
    POST   /v1/libvirt/{name}/adopt           serve the running domain's file disks by
                                              agents of this host (copy, then pivot)
    GET    /v1/libvirt/{name}/disks           the domain's disks as their agents here say
    GET    /v1/libvirt/{name}/completions?since=T  guest I/O completions on those agents
    POST   /v1/libvirt/incoming               (peer) agents for a domain libvirt brings
                                              here (DomainIncoming)
    POST   /v1/libvirt/incoming/{name}/arrived  (peer) answers once libvirt's migration
                                              finished here (the guest paused)
    POST   /v1/libvirt/incoming/{name}/commit (peer) it arrived, paused: ready the disks,
                                              resume it (CommitRequest)
    DELETE /v1/libvirt/incoming/{name}        (peer) roll back: remove its agents

A domain's migration starts as a VM's does (``POST /v1/vms/{name}/migrate``,
:class:`~devagent.daemon.migration.routes.MigrationRoutes`), which hands an adopted
domain to :class:`~devagent.daemon.libvirt_migration.DomainMigration`.
"""

from __future__ import annotations

from aiohttp import web

from devagent.agent.messages import LocalStatus
from devagent.api_types import (
    Adopted,
    AdoptedDisk,
    Completions,
    DomainDisk,
    DomainDisks,
    DomainStart,
    Libvirt,
    Removed,
)
from devagent.control_api import answer, body_as, since_of
from devagent.daemon import libvirt_incoming, libvirt_start
from devagent.daemon.agents import AgentProcess
from devagent.daemon.auth import require_source
from devagent.daemon.host import Host
from devagent.daemon.libvirt_adopt import adopt
from devagent.daemon.migration.messages import Arrived, CommitRequest, DomainIncoming
from devagent.errors import NotFound, PeerError, StateError
from devagent.guest.workload import parse_workload
from devagent.libvirt_link import LibvirtLink


class LibvirtRoutes:
    def __init__(self, host: Host) -> None:
        self.host = host

    def add_to(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/libvirt", self.status)
        router.add_post("/v1/libvirt/domains", self.start_domain)
        router.add_post("/v1/libvirt/{name}/adopt", self.adopt)
        router.add_get("/v1/libvirt/{name}/disks", self.disks)
        router.add_get("/v1/libvirt/{name}/completions", self.completions)
        router.add_post("/v1/libvirt/incoming", self.prepare_incoming)
        router.add_post("/v1/libvirt/incoming/{name}/arrived", self.arrived)
        router.add_post("/v1/libvirt/incoming/{name}/commit", self.commit_incoming)
        router.add_delete("/v1/libvirt/incoming/{name}", self.abort_incoming)

    def _link(self) -> LibvirtLink:
        return self.host.require_libvirt()

    async def status(self, _request: web.Request) -> web.Response:
        link = self.host.libvirt
        if link is None:
            return answer(Libvirt(uri=None, connected=False, domains=[]))
        try:
            domains = await link.domains()
        except PeerError:  # not reachable now: say so, the call opens it again next time
            domains = []
        return answer(Libvirt(uri=link.uri, connected=link.connected, domains=domains))

    async def adopt(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        host = self.host
        run_dir = libvirt_incoming.run_dir(host, name)  # its agents' sockets and logs
        if name in host.adopted:
            raise StateError(f"domain {name} was adopted already on host {host.name}")
        served: list[tuple[AdoptedDisk, AgentProcess]] = []
        try:
            await adopt(self._link(), name, host.root / "disks", run_dir, host.address, served)
        finally:  # the disks that pivoted are the agents', whatever came after
            if served:
                host.serve_domain(name, [agent for _disk, agent in served])
        return answer(Adopted(domain=name, disks=[disk for disk, _agent in served]), status=201)

    async def start_domain(self, request: web.Request) -> web.Response:
        start = await body_as(request, DomainStart)
        host = self.host
        if start.name in host.adopted or start.name in host.incoming_domains:
            raise StateError(f"domain {start.name} is here already (host {host.name})")
        disk, agent = await libvirt_start.start_domain(
            self._link(), start.name, start.disk_size, parse_workload(start.workload),
            start.ram_mb, host.root / "disks", libvirt_incoming.run_dir(host, start.name),
            host.address,
        )  # fmt: skip
        host.serve_domain(start.name, [agent])
        return answer(Adopted(domain=start.name, disks=[disk]), status=201)

    def _served(self, name: str) -> list[AgentProcess]:
        agents = self.host.adopted.get(name)
        if agents is None:
            raise NotFound(f"devagent serves no disk of domain {name} on host {self.host.name}")
        return agents

    async def disks(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        agents, rows = self._served(name), []
        for agent in agents:
            status = await agent.status()
            if isinstance(status.backend_status, LocalStatus) and agent.backend is not None:
                agent.backend = None  # a fetched replica went Local: restarted so from now on
                self.host.serve_domain(name, agents)
            rows.append(DomainDisk(node=agent.node, image=agent.image,
                                   socket=str(agent.nbd_socket), status=status))  # fmt: skip
        return answer(DomainDisks(domain=name, disks=rows))

    async def completions(self, request: web.Request) -> web.Response:
        since, times = since_of(request), {}
        for agent in self._served(request.match_info["name"]):
            found = await agent.completions(since)
            if not found.complete:  # its journal no longer reaches back
                return answer(Completions(completions=None))
            times[agent.node] = sorted(found.completions)
        return answer(Completions(completions=sorted(t for ts in times.values() for t in ts),
                                  devices=times))  # fmt: skip

    async def prepare_incoming(self, request: web.Request) -> web.Response:
        incoming = await body_as(request, DomainIncoming)
        require_source(request, incoming.source, f"domain {incoming.domain} coming here")
        return answer(await libvirt_incoming.prepare(self.host, incoming), status=201)

    async def arrived(self, request: web.Request) -> web.Response:
        name = self._from_its_source(request, "waiting for")
        return answer(Arrived(at=await libvirt_incoming.arrived(self.host, name)))

    async def commit_incoming(self, request: web.Request) -> web.Response:
        commit = await body_as(request, CommitRequest)
        name = self._from_its_source(request, "committing")
        return answer(await libvirt_incoming.commit(self.host, name, commit))

    async def abort_incoming(self, request: web.Request) -> web.Response:
        name = self._from_its_source(request, "rolling back")
        await libvirt_incoming.remove(self.host, name)
        return answer(Removed(name=name, state="removed"))

    def _from_its_source(self, request: web.Request, what: str) -> str:
        """The incoming domain the peer route names; on TLS, the caller must be the host it
        comes from (one not here is left to the route: it answers that)."""
        name = request.match_info["name"]
        made = self.host.incoming_domains.get(name)
        if made is not None:
            require_source(request, made.source, f"{what} domain {name}")
        return name

    async def on_cleanup(self, _app: web.Application) -> None:
        if self.host.libvirt is not None:
            await self.host.libvirt.close()
