"""The daemon's API refuses what it must: no token, bad JSON, bad fields, unknown VMs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from devagent.daemon.api import HOST_KEY, build_app
from devagent.daemon.host import Host
from devagent.daemon.vms import DiskRequest, ManagedVm, VmRequest, VmRole
from devagent.qemu.config import DiskSpec, VmConfig

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[object, object]]:
    host = Host(name="a", address="127.0.0.1", port=0, root=tmp_path, shared_dir=tmp_path)
    async with TestClient(TestServer(build_app(host, TOKEN))) as c:
        yield c


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}]
)
async def test_requests_without_the_token_get_401(
    client: TestClient[object, object], headers: dict[str, str]
) -> None:
    for method, path in (("GET", "/v1/health"), ("GET", "/v1/vms"), ("POST", "/v1/vms")):
        resp = await client.request(method, path, headers=headers, json={"name": "x"})
        assert resp.status == 401, (method, path)
        assert "token" in (await resp.json())["error"]


async def test_health_with_the_token(client: TestClient[object, object]) -> None:
    resp = await client.get("/v1/health", headers=AUTH)
    assert resp.status == 200
    assert (await resp.json())["host"] == "a"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"name": "Bad Name!"}', "'name'"),
        (b'{"name": "ok", "ram_mb": "lots"}', "'ram_mb'"),
        (b'{"name": "ok", "disk_size": "12Q"}', "size '12Q'"),
        (b'{"name": "ok", "storage": "cloud"}', "'storage'"),
        (b'{"name": "ok", "colour": "red"}', "unknown field"),
        (b'{"name": "ok", "kernel": "/vmlinuz"}', "give 'disk' too"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
async def test_bad_vm_requests_get_a_clear_400(
    client: TestClient[object, object], body: bytes, fragment: str
) -> None:
    resp = await client.post("/v1/vms", data=body, headers=AUTH)
    assert resp.status == 400
    assert fragment in (await resp.json())["error"]


async def test_unknown_vm_and_migration_get_404(client: TestClient[object, object]) -> None:
    for path in ("/v1/vms/ghost", "/v1/vms/ghost/heartbeats", "/v1/migrations/0000"):
        resp = await client.get(path, headers=AUTH)
        assert resp.status == 404, path
        assert "ghost" in (await resp.json())["error"] or "0000" in (await resp.json())["error"]
    resp = await client.post("/v1/vms/ghost/migrate", json={"to": {"url": "x"}}, headers=AUTH)
    assert resp.status == 404


async def test_bad_migration_requests(client: TestClient[object, object]) -> None:
    resp = await client.post("/v1/incoming", json={"request": {}}, headers=AUTH)
    assert resp.status == 400
    resp = await client.delete("/v1/incoming/ghost", headers=AUTH)
    assert resp.status == 404
    resp = await client.post("/v1/incoming/ghost/receivers", json={"nodes": "disk0"}, headers=AUTH)
    assert resp.status == 400 and "nodes" in (await resp.json())["error"]
    resp = await client.post(
        "/v1/incoming/ghost/receivers", json={"nodes": ["disk0"]}, headers=AUTH
    )
    assert resp.status == 404 and "ghost" in (await resp.json())["error"]


async def test_oversized_body_is_refused(client: TestClient[object, object]) -> None:
    resp = await client.post("/v1/vms", data=b"x" * (2 << 20), headers=AUTH)
    assert resp.status == 413


async def test_a_nic_on_a_host_without_a_guest_network_is_a_clear_400(
    client: TestClient[object, object], tmp_path: Path
) -> None:
    resp = await client.post("/v1/vms", json={"name": "n1", "nic": True}, headers=AUTH)
    assert resp.status == 400
    assert "no guest network" in (await resp.json())["error"]
    assert not list(tmp_path.rglob("n1*"))  # nothing made for it


async def test_a_bad_field_is_named_by_its_path(client: TestClient[object, object]) -> None:
    resp = await client.post("/v1/vms", json={"name": "ok", "ram_mb": 10}, headers=AUTH)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert "'ram_mb' must be an integer from 64 to 65536" in error and "$.ram_mb" in error
    for export, fragment in (
        ({"name": "Bad!"}, "$.name"),
        ({"name": "e1", "size": [1]}, "$.size"),
        ({"name": "e1", "size": "1K"}, "from 1M to 1T"),
    ):
        resp = await client.post("/v1/exports", json=export, headers=AUTH)
        assert resp.status == 400, export
        assert fragment in (await resp.json())["error"], export


async def test_device_and_probe_bodies_are_typed(
    client: TestClient[object, object], tmp_path: Path
) -> None:
    host: Host = client.app[HOST_KEY]  # type: ignore[index]
    request = VmRequest(name="v1", disks=(DiskRequest(image="/img"),))
    config = VmConfig(name="v1", disks=(DiskSpec(node="disk0", path="/img"),))
    host.vms.vms["v1"] = ManagedVm(
        request, config, tmp_path, VmRole.RUNNING, {"disk0": Path("/img")}
    )
    for path, sent, fragment in (
        ("/v1/vms/v1/devices/disk0/swap", {"to": 5}, "$.to"),
        ("/v1/vms/v1/devices/disk0/swap", {"to": "relative"}, "not an absolute path"),
        ("/v1/vms/v1/devices/disk0/swap", {"to": "/x", "rate_limit": 0}, "$.rate_limit"),
        ("/v1/vms/v1/devices/disk0/attach-remote", {"sync": True}, "field `from`"),
        ("/v1/vms/v1/probe", {"command": "dance"}, "$.command"),
    ):
        resp = await client.post(path, json=sent, headers=AUTH)
        assert resp.status == 400, (path, sent)
        assert fragment in (await resp.json())["error"], (path, sent)
