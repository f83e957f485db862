"""The daemon's routes for the libvirt domains of its host (``devagentd --libvirt URI``;
:mod:`devagent.daemon.libvirt_link`). Every route of this table, no more
(``tests/test_routes.py`` checks it both ways)::

    GET    /v1/libvirt                        the host's libvirtd: URI, connected, domains
    POST   /v1/libvirt/{name}/adopt           serve the running domain's file disks by
                                              agents of this host (copy, then pivot)
"""

from __future__ import annotations

from aiohttp import web

from devagent.api_types import Adopted, AdoptedDisk, Libvirt
from devagent.control_api import answer
from devagent.daemon.agents import AgentProcess
from devagent.daemon.host import Host
from devagent.daemon.libvirt_adopt import adopt
from devagent.daemon.libvirt_link import LibvirtLink
from devagent.errors import PeerError, StateError


class LibvirtRoutes:
    def __init__(self, host: Host) -> None:
        self.host = host

    def add_to(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/libvirt", self.status)
        router.add_post("/v1/libvirt/{name}/adopt", self.adopt)

    def _link(self) -> LibvirtLink:
        if self.host.libvirt is None:
            raise StateError(f"host {self.host.name} runs without libvirt (devagentd --libvirt)")
        return self.host.libvirt

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
        run_dir = host.root / "domains" / name  # its agents' sockets and logs
        if name in host.adopted:
            raise StateError(f"domain {name} was adopted already on host {host.name}")
        served: list[tuple[AdoptedDisk, AgentProcess]] = []
        try:
            await adopt(self._link(), name, host.root / "disks", run_dir, host.address, served)
        finally:  # the disks that pivoted are the agents', whatever came after
            if served:
                host.adopted[name] = [agent for _disk, agent in served]
        return answer(Adopted(domain=name, disks=[disk for disk, _agent in served]), status=201)

    async def on_cleanup(self, _app: web.Application) -> None:
        if self.host.libvirt is not None:
            await self.host.libvirt.close()
