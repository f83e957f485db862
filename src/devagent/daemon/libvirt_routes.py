"""The daemon's routes for the libvirt domains of its host (``devagentd --libvirt URI``;
:mod:`devagent.daemon.libvirt_link`). Every route of this table, no more
(``tests/test_routes.py`` checks it both ways)::

    GET    /v1/libvirt                        the host's libvirtd: URI, connected, domains
"""

from __future__ import annotations

from aiohttp import web

from devagent.api_types import Libvirt
from devagent.control_api import answer
from devagent.daemon.host import Host
from devagent.errors import PeerError


class LibvirtRoutes:
    def __init__(self, host: Host) -> None:
        self.host = host

    def add_to(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/libvirt", self.status)

    async def status(self, _request: web.Request) -> web.Response:
        link = self.host.libvirt
        if link is None:
            return answer(Libvirt(uri=None, connected=False, domains=[]))
        try:
            domains = await link.domains()
        except PeerError:  # not reachable now: say so, the call opens it again next time
            domains = []
        return answer(Libvirt(uri=link.uri, connected=link.connected, domains=domains))

    async def on_cleanup(self, _app: web.Application) -> None:
        if self.host.libvirt is not None:
            await self.host.libvirt.close()
