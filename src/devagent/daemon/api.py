"""The daemon's HTTP JSON API (aiohttp).

Every route requires ``Authorization: Bearer TOKEN`` (401 otherwise). Errors are JSON objects
``{"error": message}``: a bad request 400, an unknown VM or migration 404, an operation the
object's state forbids 409, a failing peer or QEMU 502, a bug 500 (logged with its trace).

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
    POST   /v1/vms/{name}/probe               {"command": "pause"|"resume"|"verify"}
    POST   /v1/vms/{name}/integrity           disk equals what the guest last wrote?
    POST   /v1/vms/{name}/migrate             start a migration (MigrationRequest) → 202
    GET    /v1/migrations[/{id}]              migrations this host ran as the source
    GET    /v1/exports                        disks of this host served to other hosts
    POST   /v1/exports                        {"name", "size"}: a new disk, served on TCP
    DELETE /v1/exports/{name}                 remove an export and its disk
    POST   /v1/incoming                       (peer) prepare an incoming VM → {"uri"}; with
                                              "nics", each NIC's agent, held → "nic_peers"
    POST   /v1/incoming/{name}/commit         (peer) the VM arrived: keep it
    DELETE /v1/incoming/{name}                (peer) roll back: remove it
    POST   /v1/baselines/incoming             (peer) the same for a QEMU-only strategy
    POST   /v1/baselines/incoming/{name}/commit       (peer) the RAM arrived: run the guest
    POST   /v1/baselines/incoming/{name}/stream-done  (peer) wait for its block-stream
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from devagent.agent.spec import check_spec
from devagent.control_api import STATUS, json_error
from devagent.daemon import baselines
from devagent.daemon.exports import ExportManager, parse_export_request
from devagent.daemon.host import Host
from devagent.daemon.migration import MigrationJob, MigrationRequest
from devagent.daemon.vms import VmRequest, exchange
from devagent.daemon.vms.request import (
    ATTACH_RULES,
    PROBE_RULES,
    SWAP_RULES,
    AttachRemoteBody,
    ProbeBody,
    SwapBody,
    decode,
    decode_vm_request,
)
from devagent.errors import DevagentError, NotFound, StateError, UsageError
from devagent.guest.probe import disk_digest
from devagent.qemu.config import VmConfig
from devagent.qemu.vm import VmState
from devagent.vocab import BASELINES

log = logging.getLogger(__name__)

HOST_KEY = web.AppKey("host", Host)
MAX_BODY = 1 << 20


class BodyTooLarge(UsageError):
    """A request body over :data:`MAX_BODY` bytes."""


#: The agents' statuses, and the daemon's own two kinds (a too large body before the
#: usage errors it is one of).
_STATUS: tuple[tuple[type[DevagentError], int], ...] = (
    (BodyTooLarge, 413),
    (NotFound, 404),
    *STATUS,
)


def token_middleware(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return json_error(401, "missing or wrong bearer token")
        return await handler(request)

    return check


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


async def body(request: web.Request) -> Any:
    raw = await raw_body(request)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"request body is not valid JSON: {err}") from err


def host_of(request: web.Request) -> Host:
    return request.app[HOST_KEY]


async def health(request: web.Request) -> web.Response:
    host = host_of(request)
    return web.json_response({"host": host.name, "address": host.address, "port": host.port})


async def list_vms(request: web.Request) -> web.Response:
    vms = host_of(request).vms.vms.values()
    return web.json_response({"vms": [m.status() for m in vms]})


async def start_vm(request: web.Request) -> web.Response:
    vm_request = decode_vm_request(await raw_body(request))
    managed = await host_of(request).vms.start(vm_request)
    return web.json_response(managed.status(), status=201)


async def get_vm(request: web.Request) -> web.Response:
    return web.json_response(host_of(request).vms.get(request.match_info["name"]).status())


async def stop_vm(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await host_of(request).vms.remove(name)
    return web.json_response({"name": name, "state": "stopped"})


async def heartbeats(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    try:
        since = float(request.query.get("since", "0"))
    except ValueError:
        raise UsageError("'since' must be a number (host time in seconds)") from None
    beats = [asdict(b) for b in managed.heartbeats_since(since)]
    return web.json_response({"heartbeats": beats})


async def devices(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    return web.json_response({"devices": await managed.devices()})


async def swap_device(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    swap = decode(await raw_body(request), SwapBody, SWAP_RULES)
    node = request.match_info["node"]
    if any(nic.node == node for nic in managed.nics):
        return web.json_response(await exchange.swap_nic(managed, node, swap.to))
    if not swap.to.startswith("/"):
        raise UsageError(f"{SWAP_RULES['to']} (at $.to: not an absolute path)")
    result = await exchange.swap_disk(
        managed, node, Path(swap.to), sync=swap.sync, rate_limit=swap.rate_limit
    )
    return web.json_response(result)


async def attach_remote(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    attach = decode(await raw_body(request), AttachRemoteBody, ATTACH_RULES)
    node = request.match_info["node"]
    result = await exchange.attach_remote(managed, node, attach.endpoint(), sync=attach.sync)
    return web.json_response(result)


async def completions(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    try:
        since = float(request.query.get("since", "0"))
    except ValueError:
        raise UsageError("'since' must be a number (host time in seconds)") from None
    return web.json_response({"completions": await managed.completions_since(since)})


async def probe_command(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    probe = decode(await raw_body(request), ProbeBody, PROBE_RULES)
    event = await managed.probe_command(probe.command)
    return web.json_response({"event": asdict(event)})


async def suspend_vm(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    await managed.set_suspended(True)
    return web.json_response(managed.status())


async def resume_vm(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    await managed.set_suspended(False)
    return web.json_response(managed.status())


async def integrity(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    return web.json_response({"integrity": await managed.check_integrity()})


async def migrate(request: web.Request) -> web.Response:
    host = host_of(request)
    managed = host.vms.get(request.match_info["name"])
    migration = MigrationRequest.from_json(await body(request))
    busy = [j for j in host.migrations.values() if j.managed is managed and j.finished_at is None]
    if busy:
        raise StateError(f"VM {managed.name} is already migrating (job {busy[0].id})")
    managed.vm.require(VmState.RUNNING)
    kind = baselines.BaselineJob if migration.storage in BASELINES else MigrationJob
    job = kind(host, managed, migration)
    host.migrations[job.id] = job
    job.start()
    return web.json_response(job.status(), status=202)


async def list_migrations(request: web.Request) -> web.Response:
    jobs = host_of(request).migrations.values()
    return web.json_response({"migrations": [j.status() for j in jobs]})


async def get_migration(request: web.Request) -> web.Response:
    job_id = request.match_info["id"]
    job = host_of(request).migrations.get(job_id)
    if job is None:
        raise NotFound(f"no migration {job_id!r} on host {host_of(request).name}")
    return web.json_response(job.status())


async def create_export(request: web.Request) -> web.Response:
    name, size = parse_export_request(await raw_body(request))
    agent = await host_of(request).exports.create(name, size)
    return web.json_response(ExportManager.status(agent), status=201)


async def list_exports(request: web.Request) -> web.Response:
    exports = host_of(request).exports.exports.values()
    return web.json_response({"exports": [ExportManager.status(a) for a in exports]})


async def export_digest(request: web.Request) -> web.Response:
    """The probe digest of an export's disk (for the integrity of a remote disk)."""
    agent = host_of(request).exports.get(request.match_info["name"])
    found = await asyncio.to_thread(disk_digest, Path(agent.image))
    return web.json_response(asdict(found))


async def delete_export(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await host_of(request).exports.remove(name)
    return web.json_response({"name": name, "state": "removed"})


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        port: int = s.getsockname()[1]
        return port


async def prepare_incoming(request: web.Request) -> web.Response:
    host = host_of(request)
    payload = await body(request)
    if not isinstance(payload, dict) or "request" not in payload or "config" not in payload:
        raise UsageError(
            "body must be {'request': VmRequest, 'config': VmConfig, and 'image' (shared "
            "storage) or 'size' with an optional 'backend' (the disk moves)}"
        )
    vm_request = VmRequest.from_json(payload["request"])
    config = VmConfig.from_json(payload["config"])
    image = payload.get("image")
    size = payload.get("size", 0)
    if image is not None and not isinstance(image, str):
        raise UsageError("'image' must be the disk image's path on this host")
    if image is None and (not isinstance(size, int) or size <= 0):
        raise UsageError("without 'image', give the disk's 'size' in bytes")
    backend = payload.get("backend")
    if backend is not None:
        check_spec(backend)
    receive = bool(payload.get("receive", False))
    nics = payload.get("nics", [])
    if not isinstance(nics, list) or not all(
        isinstance(n, dict) and {"node", "address", "mac"} <= set(n) for n in nics
    ):
        raise UsageError("'nics' must be a list of {'node', 'address', 'mac'}")
    managed = await host.vms.prepare_incoming(
        vm_request,
        config,
        Path(image) if image else None,
        size=size,
        backend=backend,
        receive=receive,
        nics=nics,
    )
    uri = f"tcp:{host.address}:{free_port(host.address)}"
    try:
        await managed.vm.qmp("migrate-incoming", uri=uri)
    except BaseException:
        await host.vms.remove(managed.name)
        raise
    receiver = managed.receiver or (managed.agents[0] if managed.agents else None)
    answer = {
        "uri": uri,
        "disk_address": receiver.tcp_address if receiver else None,
        "disk_export": receiver.export if receiver else None,
        "nic_peers": {nic.node: nic.peer_address for nic in managed.nics},
        "vm": managed.status(),
    }
    return web.json_response(answer, status=201)


async def commit_incoming(request: web.Request) -> web.Response:
    host = host_of(request)
    managed = host.vms.get(request.match_info["name"])
    if managed.role != "incoming":
        raise StateError(f"VM {managed.name} is not an incoming VM")
    payload = await body(request)
    fetch = payload.get("fetch") if isinstance(payload, dict) else None
    if fetch is not None:
        if not isinstance(fetch, dict) or "remote" not in fetch:
            raise UsageError("'fetch' must be {'remote': SPEC, 'present': BASE64, 'chunk_size'}")
        check_spec(fetch["remote"])
    local = bool(payload.get("local", False)) if isinstance(payload, dict) else False
    steps = await managed.commit_incoming(fetch, local=local)
    resumed_at = steps.pop("resumed_at")
    return web.json_response({"resumed_at": resumed_at, "steps": steps, "vm": managed.status()})


async def abort_incoming(request: web.Request) -> web.Response:
    host = host_of(request)
    name = request.match_info["name"]
    managed = host.vms.get(name)
    if managed.role != "incoming":
        raise StateError(f"VM {name} is not an incoming VM: refusing to remove it")
    await host.vms.remove(name)
    return web.json_response({"name": name, "state": "removed"})


# --- the QEMU-only baselines (devagent.daemon.baselines), destination side --------------


async def prepare_baseline(request: web.Request) -> web.Response:
    answer = await baselines.prepare_incoming(host_of(request), await body(request))
    return web.json_response(answer, status=201)


async def commit_baseline(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    resumed_at = await baselines.commit_incoming(managed)
    return web.json_response({"resumed_at": resumed_at, "vm": managed.status()})


async def baseline_stream_done(request: web.Request) -> web.Response:
    managed = host_of(request).vms.get(request.match_info["name"])
    return web.json_response(await baselines.stream_done(managed))


def build_app(host: Host, token: str) -> web.Application:
    app = web.Application(
        middlewares=[token_middleware(token), error_middleware], client_max_size=MAX_BODY
    )
    app[HOST_KEY] = host
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
    r.add_post("/v1/vms/{name}/probe", probe_command)
    r.add_post("/v1/vms/{name}/suspend", suspend_vm)
    r.add_post("/v1/vms/{name}/resume", resume_vm)
    r.add_post("/v1/vms/{name}/integrity", integrity)
    r.add_post("/v1/vms/{name}/migrate", migrate)
    r.add_get("/v1/migrations", list_migrations)
    r.add_get("/v1/migrations/{id}", get_migration)
    r.add_get("/v1/exports", list_exports)
    r.add_post("/v1/exports", create_export)
    r.add_delete("/v1/exports/{name}", delete_export)
    r.add_post("/v1/exports/{name}/digest", export_digest)
    r.add_post("/v1/incoming", prepare_incoming)
    r.add_post("/v1/incoming/{name}/commit", commit_incoming)
    r.add_delete("/v1/incoming/{name}", abort_incoming)
    r.add_post("/v1/baselines/incoming", prepare_baseline)
    r.add_post("/v1/baselines/incoming/{name}/commit", commit_baseline)
    r.add_post("/v1/baselines/incoming/{name}/stream-done", baseline_stream_done)
    return app
