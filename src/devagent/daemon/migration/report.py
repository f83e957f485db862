"""A migration's report, built the same way for every strategy: times from the timeline,
QEMU's own figures, the link's counters, and the guest's I/O from both hosts (the agents'
journals where the VM has agents, the probe's heartbeats always), then integrity."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from devagent.api_types import Completions, Integrity
from devagent.daemon.migration.context import JobView
from devagent.daemon.migration.messages import CommitAnswer
from devagent.daemon.migration.net import NET_MEASURES
from devagent.errors import DevagentError, PeerError
from devagent.guest.probe import Heartbeat
from devagent.qemu.answers import MigrationInfo
from devagent.report import (
    fill_io_measures,
    fill_link_measures,
    io_series,
    largest_gap,
    ops_lost,
)
from devagent.vocab import Step
from devagent.wait import WaitTimeout, wait_until
from devagent.wire import from_peer

BASELINE_S = 3.0  # steady-state window before the migration, for io_rate_ratio
SETTLE_BEATS = 5  # heartbeats with I/O the destination must show before the report closes
SETTLE_TIMEOUT_S = 10.0


async def finish_report(
    job: JobView,
    committed: CommitAnswer,
    done: MigrationInfo,
    source_done: dict[str, list[float]] | None,
    allocated: int,
) -> None:
    """Fill ``job.report`` once the source is released."""
    report, vm, t0 = job.report, job.managed, job.started_at
    resumed_at = committed.resumed_at
    released_at = t0 + report.timeline[Step.RELEASED]
    bytes_after = job.host.link_bytes()
    dest_beats = await settle(job, resumed_at)
    by_disk = await _completions(job, source_done)
    completions = sorted(t for times in by_disk.values() for t in times) if by_disk else None
    report.time_to_switchover_s = round(resumed_at - t0, 3)
    report.total_time_s = round(released_at - t0, 3)
    report.downtime_ms = done.downtime
    stopped = report.timeline.get(Step.SOURCE_STOPPED)
    if stopped is not None:
        report.vm_pause_ms = round((resumed_at - t0 - stopped) * 1000, 1)
    else:
        report.missing["vm_pause_ms"] = "QEMU sent no STOP event for the switchover"
    report.ram_bytes = vm.config.ram_mb << 20
    report.ram_transferred_bytes = done.ram.transferred if done.ram is not None else None
    moved = job.plan.disk_bytes_moved(job)
    if moved is None:
        report.missing["disk_bytes_moved"] = (
            "QEMU's block jobs count holes as progress: see bytes_between_hosts"
        )
    else:
        report.disk_bytes_moved = moved
    fill_link_measures(
        report, job.bytes_before, bytes_after, allocated + report.ram_bytes,
        job.request.link_rate_bps,
    )  # fmt: skip
    _fill_io(job, dest_beats, resumed_at, released_at, completions)
    _fill_disks(job, by_disk, end=max(released_at, resumed_at))
    if job.net is None:
        report.mark_missing("the VM has no NIC", *NET_MEASURES)
    report.mark_missing("no pinger ran (devagent demo --net runs one)", "ping_max_gap_ms")
    if vm.request.has_probe:
        what = "the destination's integrity check"
        try:
            raw = await job.forward(
                lambda: job.peer.post(f"/v1/vms/{vm.name}/integrity"), what=what
            )
            checked = from_peer(raw, Integrity, what=what)
            report.integrity = checked.integrity
            for node, verdict in (checked.disks or {}).items():
                report.device(node, "disk").integrity = verdict
        except DevagentError as err:  # a figure never fails a migration that completed
            job.log.warning("migration %s: %s failed: %s", job.id, what, err)
            report.missing["integrity"] = f"{what} could not be had: {err}"
    else:
        report.missing["integrity"] = "no ioprobe in the guest to say what it last wrote"


async def _completions(
    job: JobView, source_done: dict[str, list[float]] | None
) -> dict[str, list[float]] | None:
    """Each disk's completions on both hosts, by node; None when a host cannot say."""
    if source_done is None:
        return None
    name, since = job.managed.name, job.started_at - BASELINE_S
    raw = await _ask(job, lambda: job.peer.get(f"/v1/vms/{name}/completions", since=since),
                     "the destination's completions")  # fmt: skip
    if raw is None:
        return None
    answer = from_peer(raw, Completions, what="the destination's completions")
    if answer.completions is None:
        return None
    there = answer.devices or {}
    return {node: [*times, *there.get(node, [])] for node, times in source_done.items()}


def _fill_disks(job: JobView, by_disk: dict[str, list[float]] | None, *, end: float) -> None:
    """Each disk's row: its own largest I/O gap (when it was let go, ``local_after_s``,
    the wait for it wrote)."""
    report, t0 = job.report, job.started_at
    for node in job.managed.images:
        row = report.device(node, "disk")
        found = largest_gap(by_disk[node], t0, end) if by_disk and node in by_disk else None
        if found is not None:
            row.max_io_gap_ms = round(found * 1000, 1)


async def _ask(
    job: JobView, call: Callable[[], Awaitable[dict[str, Any]]], what: str
) -> dict[str, Any] | None:
    """A figure from the destination once the source is released: asked again while its
    daemon restarts; None (logged) when it cannot be had. A figure never fails a
    migration that has completed."""
    try:
        return await job.forward(call, what=what)
    except DevagentError as err:
        job.log.warning("migration %s: %s failed: %s", job.id, what, err)
        return None


def _fill_io(
    job: JobView,
    dest_beats: list[Heartbeat],
    resumed_at: float,
    released_at: float,
    completions: list[float] | None,
) -> None:
    report, t0 = job.report, job.started_at
    source_beats = list(job.managed.heartbeats)
    end = max(released_at, resumed_at)
    report.io_series = io_series(
        [
            *((job.host.name, b) for b in source_beats),
            *((report.destination, b) for b in dest_beats),
        ],
        t0 - BASELINE_S,
        end + 1.0,
        t0,
    )
    report.guest_ops_lost = ops_lost(source_beats, dest_beats)
    if report.guest_ops_lost is None:
        report.missing["guest_ops_lost"] = (
            "no heartbeats from one of the hosts" if job.managed.request.has_probe
            else "no ioprobe in the guest"
        )  # fmt: skip
    fill_io_measures(
        report,
        [*source_beats, *dest_beats],
        start=t0,
        end=end,
        baseline_start=t0 - BASELINE_S,
        completions=completions,
    )


async def settle(job: JobView, resumed_at: float) -> list[Heartbeat]:
    """Wait until the destination's probe shows steady I/O, and return its heartbeats."""
    vm = job.managed
    if not vm.request.has_probe:
        return []
    # As the guest was just before the migration (an idle guest's prefill did I/O).
    since = job.started_at - BASELINE_S
    wants_io = any(b.ops > 0 for b in vm.heartbeats if b.host_time >= since)
    beats: list[Heartbeat] = []

    async def steady() -> bool:
        nonlocal beats
        try:
            raw = await job.peer.get(f"/v1/vms/{vm.name}/heartbeats", since=job.started_at)
        except PeerError:  # a destination daemon that restarts: ask again
            return False
        beats = from_peer(raw["heartbeats"], list[Heartbeat], what="the destination's heartbeats")
        after = [b for b in beats if b.host_time > resumed_at and (b.ops > 0 or not wants_io)]
        return len(after) >= SETTLE_BEATS

    try:
        what = f"steady I/O of VM {vm.name} on {job.report.destination}"
        await wait_until(steady, timeout=SETTLE_TIMEOUT_S, interval=0.2, what=what)
    except WaitTimeout as err:  # the report says what it has: the figures tell the rest
        job.log.warning("%s", err)
    return beats
