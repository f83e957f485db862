"""The daemon's HTTP JSON API (aiohttp).

Every route requires ``Authorization: Bearer TOKEN`` (401 otherwise) and, on HTTPS, a client
certificate of the deployment's CA whose role allows the route (403 otherwise; see
:mod:`devagent.daemon.auth`). Errors are JSON objects
``{"error": message}``: a bad request 400, an unknown VM or migration 404, an operation the
object's state forbids 409, a failing peer or QEMU 502, a bug 500 (logged with its trace).
Each answer is a type of :mod:`devagent.api_types`, encoded once (:func:`answer`).

The table below is every route :func:`build_app` registers, no more, no less
(``tests/test_routes.py`` checks it both ways; the migration routes are
:class:`~devagent.daemon.migration.routes.MigrationRoutes`; their own table is checked too).

    GET    /v1/health                         host name and address
    GET    /v1/vms                            every VM of this host
    POST   /v1/vms                            start a VM (VmRequest; "nic": true gives it a NIC)
    GET    /v1/vms/{name}                     one VM's state and last heartbeat
    DELETE /v1/vms/{name}                     stop a VM
    GET    /v1/vms/{name}/heartbeats?since=T  probe heartbeats that arrived after T
    GET    /v1/vms/{name}/devices             each disk's agent: backend, in flight, journal;
                                              each NIC's: address, tap, hold, forward, counters
    GET    /v1/vms/{name}/completions?since=T completion times of guest I/O on the agents
    POST   /v1/vms/{name}/devices/{node}/swap {"to": PATH}: move the live disk onto PATH;
                                              for a NIC {"to": TAP}: make TAP its uplink
    POST   /v1/vms/{name}/devices/{node}/attach-remote {"from": PEER}: move it to a peer host
    POST   /v1/vms/{name}/devices/{node}/keep-remote {"peer": PEER, "export": NAME}: (peer) a
                                              migration's source keeps the disk (its replica
                                              here cannot be written): serve it from there
    POST   /v1/vms/{name}/devices/{node}/settle  (peer) a migration's source lets the disk
                                              go: the complete replica here is the disk
    POST   /v1/vms/{name}/probe               {"command": "pause"|"resume"|"verify"}
    POST   /v1/vms/{name}/suspend             stop the guest's vCPUs (QMP stop)
    POST   /v1/vms/{name}/resume              let a suspended guest run again (QMP cont)
    POST   /v1/vms/{name}/restart             boot a VM whose QEMU died again, on its disk
    POST   /v1/vms/{name}/announce            QEMU announces the guest's MACs (RARP)
    POST   /v1/vms/{name}/integrity           disk equals what the guest last wrote?
    POST   /v1/vms/{name}/migrate             start a migration (MigrateRequest) → 202
    GET    /v1/migrations[/{id}]              migrations this host ran as the source
    GET    /v1/exports                        disks of this host served to other hosts
    POST   /v1/exports                        {"name", "size"}: a new disk, served on TCP
    DELETE /v1/exports/{name}                 remove an export and its disk
    POST   /v1/exports/{name}/digest          the probe's digest of an export's disk
    POST   /v1/incoming                       (peer) prepare an incoming VM → {"uri"}; with
                                              "nics", each NIC's agent, held → "nic_peers"
                                              "early": once a push's receivers serve and
                                              the NICs are up → "listening": false, no uri
    POST   /v1/incoming/{name}/listening      (peer) once its QEMU listens → {"uri"}
    POST   /v1/incoming/{name}/receivers      (peer) {"nodes"}: receivers for a push that
                                              begins beside RAM → {"disk_targets"}
    POST   /v1/incoming/{name}/commit         (peer) the VM arrived: keep it
    DELETE /v1/incoming/{name}                (peer) roll back: remove it
    POST   /v1/baselines/incoming             (peer) the same for a QEMU-only strategy
    POST   /v1/baselines/incoming/{name}/commit       (peer) the RAM arrived: run the guest
    POST   /v1/baselines/incoming/{name}/stream-done  (peer) wait for its block-stream
    GET    /v1/libvirt                        the host's libvirtd and its domains
    POST   /v1/libvirt/domains                the test guest as a domain, disk served
    POST   /v1/libvirt/{name}/adopt           serve a running domain's disks by agents
    GET    /v1/libvirt/{name}/disks           the domain's disks as their agents say
    GET    /v1/libvirt/{name}/completions?since=T  guest I/O completions on those agents
    POST   /v1/libvirt/incoming               (peer) agents for a domain coming here
    POST   /v1/libvirt/incoming/{name}/arrived  (peer) answers once libvirt moved it here
    POST   /v1/libvirt/incoming/{name}/commit (peer) it arrived paused: ready, resume it
    DELETE /v1/libvirt/incoming/{name}        (peer) roll back: remove its agents
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from devagent.api_types import (
    Announced,
    Completions,
    Devices,
    Exports,
    Health,
    Heartbeats,
    PauseAnswer,
    ProbeAnswer,
    Removed,
    ResumeAnswer,
    VerifyAnswer,
    VmList,
)
from devagent.control_api import STATUS, answer, json_error, since_of
from devagent.daemon.auth import TLS_KEY, auth_middleware, require_source
from devagent.daemon.exports import ExportManager, parse_export_request
from devagent.daemon.host import Host
from devagent.daemon.libvirt_routes import LibvirtRoutes
from devagent.daemon.migration.routes import MigrationRoutes
from devagent.daemon.vms import exchange
from devagent.daemon.vms.arrival import announce
from devagent.daemon.vms.request import (
    ATTACH_RULES,
    KEEP_RULES,
    PROBE_RULES,
    SWAP_RULES,
    AttachRemoteBody,
    ProbeBody,
    RemoteHome,
    SwapBody,
    decode,
    decode_vm_request,
)
from devagent.errors import DevagentError, Forbidden, NotFound, UsageError
from devagent.guest.probe import Heartbeat, Paused, ProbeEvent, Verified, disk_digest

log = logging.getLogger(__name__)

HOST_KEY = web.AppKey("host", Host)
MAX_BODY = 1 << 20


class BodyTooLarge(UsageError):
    """A request body over :data:`MAX_BODY` bytes."""


#: The agents' statuses, and the daemon's own two kinds (a too large body before the
#: usage errors it is one of).
_STATUS: tuple[tuple[type[DevagentError], int], ...] = (
    (BodyTooLarge, 413),
    (Forbidden, 403),
    (NotFound, 404),
    *STATUS,
)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as http:
        if http.status >= 400:
            return json_error(http.status, http.reason or "error")
        raise
    except DevagentError as err:
        status = next((code for kind, code in _STATUS if isinstance(err, kind)), 500)
        log.info("%s %s -> %d: %s", request.method, request.path, status, err)
        return json_error(status, str(err))
    except Exception as err:
        log.exception("%s %s crashed", request.method, request.path)
        return json_error(500, f"internal error: {err!r}")


async def raw_body(request: web.Request) -> bytes:
    """The request's body, for a typed decode (``devagent.daemon.vms.request.decode``)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise BodyTooLarge(f"request body over {MAX_BODY} bytes")
    return await request.read()


def host_of(request: web.Request) -> Host:
    return request.app[HOST_KEY]


async def health(request: web.Request) -> web.Response:
    host = host_of(request)
    return answer(Health(host=host.name, address=host.address, port=host.port))


async def list_vms(request: web.Request) -> web.Response:
    vms = host_of(request).vms.vms.values()
    return answer(VmList(vms=[m.api_status() for m in vms]))


async def start_vm(request: web.Request) -> web.Response:
    vm_request = decode_vm_request(await raw_body(request))
    managed = await host_of(request).vms.start(vm_request)
    return answer(managed.api_status(), status=201)


async def get_vm(request: web.Request) -> web.Response:
    return answer(host_of(request).vms.get(request.match_info["name"]).api_status())


async def stop_vm(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await host_of(request).vms.remove(name)
    return answer(Removed(name=name, state="stopped"))


async def heartbeats(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    return answer(Heartbeats(heartbeats=managed.heartbeats_since(since_of(request))))


async def devices(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    return answer(Devices(devices=await managed.devices()))


async def swap_device(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    swap = decode(await raw_body(request), SwapBody, SWAP_RULES)
    node = request.match_info["node"]
    if any(nic.node == node for nic in managed.nics):
        return answer(await exchange.swap_nic(managed, node, swap.to))
    if not swap.to.startswith("/"):
        raise UsageError(f"{SWAP_RULES['to']} (at $.to: not an absolute path)")
    result = await exchange.swap_disk(
        managed, node, Path(swap.to), sync=swap.sync, rate_limit=swap.rate_limit
    )
    return answer(result)


async def attach_remote(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    attach = decode(await raw_body(request), AttachRemoteBody, ATTACH_RULES)
    node = request.match_info["node"]
    return answer(await exchange.attach_remote(managed, node, attach.endpoint(), sync=attach.sync))


async def keep_remote(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    home = decode(await raw_body(request), RemoteHome, KEEP_RULES)
    require_source(request, managed.source_host, f"keeping VM {managed.name}'s disk")
    return answer(await exchange.keep_remote(managed, request.match_info["node"], home))


async def settle(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    require_source(request, managed.source_host, f"settling VM {managed.name}'s disk")
    return answer(await exchange.settle(managed, request.match_info["node"]))


async def completions(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    by_disk = await managed.completions_by_disk(since_of(request))
    merged = sorted(t for times in by_disk.values() for t in times) if by_disk else None
    return answer(Completions(completions=merged, devices=by_disk))


def probe_answer(event: ProbeEvent) -> ProbeAnswer:
    """The answer to a probe command, tagged by the command its event answers."""
    if isinstance(event, Paused):
        return PauseAnswer(event=event)
    if isinstance(event, Verified):
        return VerifyAnswer(event=event)
    if isinstance(event, Heartbeat):
        return ResumeAnswer(event=event)
    raise TypeError(f"no probe command is answered by {event!r}")


async def probe_command(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    probe = decode(await raw_body(request), ProbeBody, PROBE_RULES)
    return answer(probe_answer(await managed.probe_command(probe.command)))


async def suspend_vm(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    await managed.set_suspended(True)
    return answer(managed.api_status())


async def resume_vm(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    await managed.set_suspended(False)
    return answer(managed.api_status())


async def restart_vm(request: web.Request) -> web.Response:
    managed = await host_of(request).vms.restart(request.match_info["name"])
    return answer(managed.api_status())


async def announce_vm(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    if not managed.nics:
        raise UsageError(f"VM {managed.name} has no NIC to announce")
    return answer(Announced(announced_at=await announce(managed)))


async def integrity(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    return answer(await managed.check_integrity())


async def create_export(request: web.Request) -> web.Response:
    name, size = parse_export_request(await raw_body(request))
    agent = await host_of(request).exports.create(name, size)
    return answer(ExportManager.status(agent), status=201)


async def list_exports(request: web.Request) -> web.Response:
    exports = host_of(request).exports.exports.values()
    return answer(Exports(exports=[ExportManager.status(a) for a in exports]))


async def export_digest(request: web.Request) -> web.Response:
    """The probe digest of an export's disk (for the integrity of a remote disk)."""
    agent = host_of(request).exports.get(request.match_info["name"])
    return answer(await asyncio.to_thread(disk_digest, Path(agent.image)))


async def delete_export(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await host_of(request).exports.remove(name)
    return answer(Removed(name=name, state="removed"))


def build_app(host: Host, token: str) -> web.Application:
    """The API of ``host``: with its TLS identity, callers are checked by certificate too
    (:mod:`devagent.daemon.auth`)."""
    auth = auth_middleware(token, host.tls)
    app = web.Application(middlewares=[auth, error_middleware], client_max_size=MAX_BODY)
    app[TLS_KEY] = host.tls is not None
    app[HOST_KEY] = host
    host.token = token
    r = app.router
    r.add_get("/v1/health", health)
    r.add_get("/v1/vms", list_vms)
    r.add_post("/v1/vms", start_vm)
    r.add_get("/v1/vms/{name}", get_vm)
    r.add_delete("/v1/vms/{name}", stop_vm)
    r.add_get("/v1/vms/{name}/heartbeats", heartbeats)
    r.add_get("/v1/vms/{name}/devices", devices)
    r.add_get("/v1/vms/{name}/completions", completions)
    r.add_post("/v1/vms/{name}/devices/{node}/swap", swap_device)
    r.add_post("/v1/vms/{name}/devices/{node}/attach-remote", attach_remote)
    r.add_post("/v1/vms/{name}/devices/{node}/keep-remote", keep_remote)
    r.add_post("/v1/vms/{name}/devices/{node}/settle", settle)
    r.add_post("/v1/vms/{name}/probe", probe_command)
    r.add_post("/v1/vms/{name}/suspend", suspend_vm)
    r.add_post("/v1/vms/{name}/resume", resume_vm)
    r.add_post("/v1/vms/{name}/restart", restart_vm)
    r.add_post("/v1/vms/{name}/announce", announce_vm)
    r.add_post("/v1/vms/{name}/integrity", integrity)
    r.add_get("/v1/exports", list_exports)
    r.add_post("/v1/exports", create_export)
    r.add_delete("/v1/exports/{name}", delete_export)
    r.add_post("/v1/exports/{name}/digest", export_digest)
    migrations = MigrationRoutes(host)
    migrations.add_to(r)  # migrate, migrations, incoming, baselines
    app.on_startup.append(migrations.on_startup)  # unsettled migrations taken up again
    libvirt = LibvirtRoutes(host)
    libvirt.add_to(r)
    app.on_cleanup.append(libvirt.on_cleanup)
    return app
