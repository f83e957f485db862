"""What the CLI, the demo and the tests do with daemons: start a VM and wait for its probe,
find which host runs a VM, run a migration and follow it to its report.

Everything here talks to daemons through :class:`DaemonClient` only; progress is reported
through a callback so that callers choose how to show it (rich bars, log lines, nothing).
The daemons answer status, not events, so every wait here asks again through
:func:`devagent.wait.wait_until`: each has a deadline and says what did not happen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from devagent.client import DaemonClient, Endpoint
from devagent.errors import NotFound, PeerError
from devagent.report import MigrationReport
from devagent.wait import wait_until

Progress = Callable[[dict[str, Any]], None]
BOOT_TIMEOUT_S = 120.0
#: A prefill of the largest test disks under TCG, with room to spare.
PHASE_TIMEOUT_S = 900.0
#: A migration the daemon has not finished in this long is given up on by its follower
#: (the daemon's own job goes on; ``devagent migrate --watch`` follows it again).
MIGRATION_TIMEOUT_S = 6 * 3600.0
#: The daemons publish status, not events: how often we ask them again.
POLL_S = 0.2


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
        fresh = True  # the first look is at the answer to the POST

        async def booted() -> dict[str, Any] | None:
            nonlocal status, fresh
            if not fresh:
                status = await client.get(f"/v1/vms/{name}")
            fresh = False
            if not status["probe"] or status["first_heartbeat_at"] is not None:
                return status
            if status["state"] in ("failed", "stopped"):
                raise PeerError(f"VM {name} {status['state']} while booting")
            progress({"phase": "booting", "elapsed_s": time.time() - status["started_at"]})
            return None

        status = await wait_until(
            booted, timeout=timeout, what=f"VM {name}: the probe's first heartbeat", interval=POLL_S
        )
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
    seen = 0
    async with DaemonClient(endpoint) as client:

        async def enough() -> list[dict[str, Any]] | None:
            nonlocal seen
            answer = await client.get(f"/v1/vms/{name}/heartbeats", since=since)
            beats: list[dict[str, Any]] = [
                b for b in answer["heartbeats"] if b["ops"] > 0 or not with_io
            ]
            seen = len(beats)
            return beats if seen >= count else None

        kind = "heartbeats with I/O" if with_io else "heartbeats"
        return await wait_until(
            enough,
            timeout=timeout,
            what=f"VM {name}: {count} {kind}",
            interval=POLL_S,
            detail=lambda: f"{seen} came",
        )


async def wait_past_phase(
    endpoint: Endpoint,
    name: str,
    phase: str,
    *,
    timeout: float = PHASE_TIMEOUT_S,
    on_beat: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Wait until VM ``name``'s probe reports a phase other than ``phase`` (the prefill is
    over, say) and return that heartbeat; ``on_beat`` sees each heartbeat still in
    ``phase`` (to show progress)."""
    return await wait_phase(
        endpoint,
        name,
        lambda seen: seen != phase,
        f"the end of its {phase}",
        timeout=timeout,
        on_beat=on_beat,
    )


async def wait_phase(
    endpoint: Endpoint,
    name: str,
    reached: Callable[[str], bool],
    what: str,
    *,
    timeout: float = PHASE_TIMEOUT_S,
    on_beat: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Wait for the first heartbeat of VM ``name``'s probe whose phase is ``reached`` and
    return it; ``on_beat`` sees the heartbeats before it. ``what`` names the phase awaited
    for the timeout's message."""
    since = time.time()
    async with DaemonClient(endpoint) as client:

        async def past() -> dict[str, Any] | None:
            nonlocal since
            answer = await client.get(f"/v1/vms/{name}/heartbeats", since=since)
            for beat in answer["heartbeats"]:
                since = max(since, float(beat["host_time"]))
                if reached(str(beat["phase"])):
                    return dict(beat)
                if on_beat is not None:
                    on_beat(beat)
            return None

        return await wait_until(past, timeout=timeout, what=f"VM {name}: {what}", interval=POLL_S)


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
    client: DaemonClient,
    job_id: str,
    progress: Progress = _quiet,
    *,
    timeout: float = MIGRATION_TIMEOUT_S,
) -> MigrationReport:
    """Follow migration job ``job_id`` (its status goes to ``progress``) to its report."""

    async def finished() -> MigrationReport | None:
        job: dict[str, Any] = await client.get(f"/v1/migrations/{job_id}")
        progress(job)
        if job["finished_at"] is None:
            return None
        return MigrationReport.from_json(job["report"])

    return await wait_until(
        finished, timeout=timeout, what=f"migration {job_id}: its end", interval=POLL_S
    )
