"""Who may call what on a daemon's API.

Two factors guard every route: the TLS client certificate from the deployment's CA (the
connection is refused without one) and the bearer token. The certificate's role decides the
routes:

- an **operator** (the CLI) may call every route but the peer routes;
- a **host** (another daemon) may read (every ``GET``) and call only what daemons ask of
  each other (:data:`HOST_ROUTES`); on a **peer route** (:data:`PEER_ROUTES`) its name must also be
  the host the request concerns: the source a ``/v1/incoming`` names, then the VM's recorded
  source for that VM's commit, abort, settle and keep-remote, and the source its start
  recorded for the wait until its QEMU listens (:func:`require_source`).

A daemon started with ``--insecure`` serves plain HTTP and checks the token only.
"""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from devagent.control_api import json_error
from devagent.errors import Forbidden
from devagent.tls import Peer, Role, Tls, peer_of_transport

#: Routes a daemon calls on its peers as a migration's source or a remote disk's user.
PEER_ROUTES = frozenset(
    {
        ("POST", "/v1/incoming"),
        ("POST", "/v1/incoming/{name}/listening"),
        ("POST", "/v1/incoming/{name}/receivers"),
        ("POST", "/v1/incoming/{name}/commit"),
        ("DELETE", "/v1/incoming/{name}"),
        ("POST", "/v1/baselines/incoming"),
        ("POST", "/v1/baselines/incoming/{name}/commit"),
        ("POST", "/v1/baselines/incoming/{name}/stream-done"),
        ("POST", "/v1/vms/{name}/devices/{node}/keep-remote"),
        ("POST", "/v1/vms/{name}/devices/{node}/settle"),
        ("POST", "/v1/libvirt/incoming"),
        ("POST", "/v1/libvirt/incoming/{name}/arrived"),
        ("POST", "/v1/libvirt/incoming/{name}/commit"),
        ("DELETE", "/v1/libvirt/incoming/{name}"),
    }
)
HOST_ROUTES = PEER_ROUTES | {
    ("POST", "/v1/exports"),  # a remote disk's home
    ("DELETE", "/v1/exports/{name}"),
    ("POST", "/v1/exports/{name}/digest"),
    ("POST", "/v1/vms/{name}/integrity"),  # a migration's report
    ("POST", "/v1/vms/{name}/announce"),  # the NICs' switchover
}


def route_of(request: web.Request) -> tuple[str, str]:
    resource = request.match_info.route.resource
    return request.method, resource.canonical if resource is not None else request.path


#: Whether the app's daemon has a certificate (set by ``build_app``): a peer route then
#: refuses a caller it cannot name, rather than take it for an --insecure one.
TLS_KEY = web.AppKey("tls", bool)


def auth_middleware(token: str, tls: Tls | None) -> Middleware:
    """The token, and with ``tls`` the caller's certificate, checked on every request (a
    host's must be one of ``tls.peers``, when the daemon names its peers)."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return json_error(401, "missing or wrong bearer token")
        if tls is not None:
            peer = peer_of_transport(request.transport)
            refusal = _refusal(peer, route_of(request), tls)
            if refusal is not None:
                return json_error(403, refusal)
        return await handler(request)

    return check


def _refusal(peer: Peer | None, route: tuple[str, str], tls: Tls) -> str | None:
    method, path = route
    if peer is None:
        return "the client certificate names no devagent host or operator"
    if peer.role is Role.HOST and tls.peers and peer.name not in tls.peers:
        return f"host {peer.name} is not among this host's peers"
    if peer.role is Role.OPERATOR and route in PEER_ROUTES:
        return f"{method} {path} is a peer route: only a host's certificate may call it"
    if peer.role is Role.HOST and method != "GET" and route not in HOST_ROUTES:
        return f"{method} {path} needs an operator's certificate, not {peer}'s"
    return None


def require_source(request: web.Request, source: str | None, what: str) -> None:
    """On a TLS daemon, the caller must be host ``source``: the one the peer route's request
    names, or the one the VM came from."""
    if not request.app[TLS_KEY]:  # --insecure
        return
    peer = peer_of_transport(request.transport)
    if peer is None:  # its connection is gone: nobody to act for
        raise Forbidden(f"{what}: the caller's connection closed before it was checked")
    if not source:
        raise Forbidden(f"{what}: no source host is named, so host {peer.name} may not act")
    if peer.name != source:
        raise Forbidden(f"{what} concerns host {source}, and the caller is {peer}")
