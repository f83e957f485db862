"""What the CLI, the demo and the tests do with daemons: start a VM and wait for its probe,
find which host runs a VM, run a migration and follow it to its report.

Everything here talks to daemons through :class:`DaemonClient` only; progress is reported
through a callback so that callers choose how to show it (rich bars, log lines, nothing).
The daemons answer status, not events, so every wait here asks again through
:func:`devagent.wait.wait_until`: each has a deadline and says what did not happen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from devagent.api_types import Heartbeats, MigrationStatus, VmStatus
from devagent.client import DaemonClient, Endpoint
from devagent.errors import NotFound, PeerError
from devagent.guest.probe import Heartbeat
from devagent.report import MigrationReport
from devagent.wait import wait_until

#: A ``POST /v1/vms`` body (``devagent.daemon.vms.VmRequestBody``'s fields), sent as it is:
#: the daemon decodes and checks it.
VmBody = Mapping[str, object]
#: Shown the seconds a VM has been booting.
BootProgress = Callable[[float], None]
#: Shown each status of a migration job while it runs.
JobProgress = Callable[[MigrationStatus], None]
BOOT_TIMEOUT_S = 120.0
#: A prefill of the largest test disks under TCG, with room to spare.
PHASE_TIMEOUT_S = 900.0
#: A migration the daemon has not finished in this long is given up on by its follower
#: (the daemon's own job goes on; ``devagent migrate --watch`` follows it again).
MIGRATION_TIMEOUT_S = 6 * 3600.0
#: The daemons publish status, not events: how often we ask them again.
POLL_S = 0.2


def _quiet(_: object) -> None:
    pass


@dataclass(frozen=True)
class Started:
    """A VM started: its status, and how long its probe took to send its first heartbeat
    (None: not waited for, or a guest without ioprobe)."""

    status: VmStatus
    boot_s: float | None = None


async def start_vm(
    endpoint: Endpoint,
    request: VmBody,
    *,
    wait: bool = True,
    timeout: float = BOOT_TIMEOUT_S,
    progress: BootProgress = _quiet,
) -> Started:
    """Start a VM; with ``wait``, return once its probe's first heartbeat arrived (or, for a
    guest without ioprobe, once QEMU runs)."""
    async with DaemonClient(endpoint) as client:
        status = await client.post_as("/v1/vms", VmStatus, request)
        if not wait:
            return Started(status)
        name = status.name
        fresh = True  # the first look is at the answer to the POST

        async def booted() -> VmStatus | None:
            nonlocal status, fresh
            if not fresh:
                status = await client.get_as(f"/v1/vms/{name}", VmStatus)
            fresh = False
            if not status.probe or status.first_heartbeat_at is not None:
                return status
            if status.state in ("failed", "stopped"):
                raise PeerError(f"VM {name} {status.state} while booting")
            progress(time.time() - (status.started_at or time.time()))
            return None

        status = await wait_until(
            booted, timeout=timeout, what=f"VM {name}: the probe's first heartbeat", interval=POLL_S
        )
        reached = status.first_heartbeat_at or time.time()
        return Started(status, round(reached - (status.started_at or reached), 2))


async def locate_vm(endpoints: Sequence[Endpoint], name: str) -> tuple[Endpoint, VmStatus]:
    """The host that runs VM ``name`` (not as an incoming copy) and the VM's status."""
    for endpoint in endpoints:
        async with DaemonClient(endpoint) as client:
            try:
                status = await client.get_as(f"/v1/vms/{name}", VmStatus)
            except NotFound:
                continue
            if status.role == "running":
                return endpoint, status
    raise NotFound(f"no host of the lab runs VM {name!r}")


async def locate_source(endpoints: Sequence[Endpoint], name: str) -> Endpoint:
    """The host that runs VM ``name``, or whose agents serve libvirt domain ``name``'s
    disks (the host it runs on)."""
    try:
        return (await locate_vm(endpoints, name))[0]
    except NotFound:
        pass
    for endpoint in endpoints:
        async with DaemonClient(endpoint) as client:
            try:
                await client.get(f"/v1/libvirt/{name}/disks")
            except NotFound:
                continue
            return endpoint
    raise NotFound(f"no host of the lab runs VM {name!r} or serves a domain of that name")


async def heartbeats_since(client: DaemonClient, name: str, since: float) -> list[Heartbeat]:
    """VM ``name``'s probe heartbeats that arrived after ``since`` (host time)."""
    return (await client.get_as(f"/v1/vms/{name}/heartbeats", Heartbeats, since=since)).heartbeats


async def wait_heartbeats(
    endpoint: Endpoint, name: str, count: int, *, with_io: bool = True, timeout: float = 30.0
) -> list[Heartbeat]:
    """Wait until VM ``name`` has ``count`` more heartbeats (with I/O, if ``with_io``)."""
    since = time.time()
    seen = 0
    async with DaemonClient(endpoint) as client:

        async def enough() -> list[Heartbeat] | None:
            nonlocal seen
            beats = [b for b in await heartbeats_since(client, name, since) if b.ops or not with_io]
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
    on_beat: Callable[[Heartbeat], None] | None = None,
) -> Heartbeat:
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
    on_beat: Callable[[Heartbeat], None] | None = None,
) -> Heartbeat:
    """Wait for the first heartbeat of VM ``name``'s probe whose phase is ``reached`` and
    return it; ``on_beat`` sees the heartbeats before it. ``what`` names the phase awaited
    for the timeout's message."""
    since = time.time()
    async with DaemonClient(endpoint) as client:

        async def past() -> Heartbeat | None:
            nonlocal since
            for beat in await heartbeats_since(client, name, since):
                since = max(since, beat.host_time)
                if reached(beat.phase):
                    return beat
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
    progress: JobProgress = _quiet,
) -> MigrationReport:
    """Migrate VM ``name`` from ``source`` to ``destination`` and return the final report
    (status ``completed`` or ``failed``, with the error)."""
    body: dict[str, object] = {"to": destination.to_json(), "storage": storage}
    if link_rate_bps:
        body["link_rate_bps"] = link_rate_bps
    if downtime_limit_ms:
        body["downtime_limit_ms"] = downtime_limit_ms
    async with DaemonClient(source) as client:
        job = await client.post_as(f"/v1/vms/{name}/migrate", MigrationStatus, body)
        return await follow_migration(client, job.id, progress)


async def follow_migration(
    client: DaemonClient,
    job_id: str,
    progress: JobProgress = _quiet,
    *,
    timeout: float = MIGRATION_TIMEOUT_S,
) -> MigrationReport:
    """Follow migration job ``job_id`` (its status goes to ``progress``) to its report."""

    async def finished() -> MigrationReport | None:
        job = await client.get_as(f"/v1/migrations/{job_id}", MigrationStatus)
        progress(job)
        return None if job.finished_at is None else job.report

    return await wait_until(
        finished, timeout=timeout, what=f"migration {job_id}: its end", interval=POLL_S
    )
