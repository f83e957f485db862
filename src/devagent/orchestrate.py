"""What the CLI, the demo and the tests do with daemons: start a VM and wait for its probe,
find which host runs a VM, run a migration and follow it to its report.

Everything here talks to daemons through :class:`DaemonClient` only; progress is reported
through a callback so that callers choose how to show it (rich bars, log lines, nothing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from devagent.client import DaemonClient, Endpoint
from devagent.errors import NotFound, PeerError
from devagent.report import MigrationReport

Progress = Callable[[dict[str, Any]], None]
BOOT_TIMEOUT_S = 120.0
MIGRATION_POLL_S = 0.2


def _quiet(_: dict[str, Any]) -> None:
    pass


async def start_vm(
    endpoint: Endpoint,
    request: dict[str, Any],
    *,
    wait: bool = True,
    timeout: float = BOOT_TIMEOUT_S,
    progress: Progress = _quiet,
) -> dict[str, Any]:
    """Start a VM; with ``wait``, return once its probe's first heartbeat arrived (or, for a
    guest without ioprobe, once QEMU runs). The answer carries ``boot_s``."""
    async with DaemonClient(endpoint) as client:
        status: dict[str, Any] = await client.post("/v1/vms", request)
        if not wait:
            return status
        name = status["name"]
        while status["probe"] and status["first_heartbeat_at"] is None:
            if status["state"] in ("failed", "stopped"):
                raise PeerError(f"VM {name} {status['state']} while booting")
            elapsed = time.time() - status["started_at"]
            if elapsed > timeout:
                raise PeerError(f"VM {name}: no probe heartbeat after {timeout:.0f} s")
            progress({"phase": "booting", "elapsed_s": elapsed})
            await asyncio.sleep(0.2)
            status = await client.get(f"/v1/vms/{name}")
        reached = status["first_heartbeat_at"] or time.time()
        status["boot_s"] = round(reached - status["started_at"], 2)
        return status


async def locate_vm(endpoints: Sequence[Endpoint], name: str) -> tuple[Endpoint, dict[str, Any]]:
    """The host that runs VM ``name`` (not as an incoming copy) and the VM's status."""
    for endpoint in endpoints:
        async with DaemonClient(endpoint) as client:
            try:
                status: dict[str, Any] = await client.get(f"/v1/vms/{name}")
            except NotFound:
                continue
            if status["role"] == "running":
                return endpoint, status
    raise NotFound(f"no host of the lab runs VM {name!r}")


async def wait_heartbeats(
    endpoint: Endpoint, name: str, count: int, *, with_io: bool = True, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Wait until VM ``name`` has ``count`` more heartbeats (with I/O, if ``with_io``)."""
    since = time.time()
    deadline = since + timeout
    async with DaemonClient(endpoint) as client:
        while True:
            answer = await client.get(f"/v1/vms/{name}/heartbeats", since=since)
            beats: list[dict[str, Any]] = [
                b for b in answer["heartbeats"] if b["ops"] > 0 or not with_io
            ]
            if len(beats) >= count:
                return beats
            if time.time() > deadline:
                raise PeerError(f"VM {name}: {len(beats)} of {count} heartbeats in {timeout:.0f} s")
            await asyncio.sleep(0.2)


async def migrate(
    source: Endpoint,
    destination: Endpoint,
    name: str,
    *,
    storage: str = "shared",
    link_rate_bps: int | None = None,
    downtime_limit_ms: int | None = None,
    progress: Progress = _quiet,
) -> MigrationReport:
    """Migrate VM ``name`` from ``source`` to ``destination`` and return the final report
    (status ``completed`` or ``failed``, with the error)."""
    body: dict[str, Any] = {"to": destination.to_json(), "storage": storage}
    if link_rate_bps:
        body["link_rate_bps"] = link_rate_bps
    if downtime_limit_ms:
        body["downtime_limit_ms"] = downtime_limit_ms
    async with DaemonClient(source) as client:
        job = await client.post(f"/v1/vms/{name}/migrate", body)
        return await follow_migration(client, job["id"], progress)


async def follow_migration(
    client: DaemonClient, job_id: str, progress: Progress = _quiet
) -> MigrationReport:
    while True:
        job: dict[str, Any] = await client.get(f"/v1/migrations/{job_id}")
        progress(job)
        if job["finished_at"] is not None:
            return MigrationReport.from_json(job["report"])
        await asyncio.sleep(MIGRATION_POLL_S)
