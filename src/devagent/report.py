"""The migration report: the measures of a migration, under the same names everywhere
(CLI ``--json``, benchmarks, docs), and the pure functions that compute them.

A measure that cannot be had for a run (no probe in a user's guest, no link counters in a
loopback lab) is ``None`` and ``missing`` says why, so a report never passes a guess off
as a figure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any, Protocol

from devagent.wire import convert

MEASURES = (
    "time_to_switchover_s",
    "total_time_s",
    "downtime_ms",
    "max_io_gap_ms",
    "io_gap_excess_ms",
    "guest_max_latency_ms",
    "guest_p99_latency_ms",
    "io_rate_ratio",
    "bytes_between_hosts",
    "limit_s",
    "guest_io_errors",
    "guest_verify_failures",
    "guest_ops_lost",
    "integrity",
    "net_frames_buffered",
    "net_frames_forwarded",
    "net_frames_lost",
    "ping_max_gap_ms",
)


class Beat(Protocol):
    """What the measures need of a probe heartbeat."""

    @property
    def host_time(self) -> float: ...
    @property
    def ops(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def verify_failures(self) -> int: ...
    @property
    def ops_total(self) -> int: ...
    @property
    def lat_max_us(self) -> int: ...
    @property
    def lat_p99_us(self) -> int: ...


@dataclass
class DeviceMeasures:
    """One device's row of a migration report (``devices``); a figure that does not apply
    to its kind, or could not be had, is None."""

    node: str
    kind: str  # "disk" or "nic"
    #: A disk: bytes its push or mirror copied before the switchover, and bytes fetched
    #: after it (on demand and in the background).
    bytes_pushed: int | None = None
    bytes_fetched: int | None = None
    #: A disk: seconds after the migrate command at which the destination served it from
    #: its own complete replica (None when the disk does not move: shared storage).
    local_after_s: float | None = None
    #: A disk: the largest gap between two consecutive completed guest I/O requests on it
    #: (its agents' journals on both hosts).
    max_io_gap_ms: float | None = None
    integrity: str | None = None  # a disk: "ok" when it holds what the guest last wrote
    #: A disk the destination could not hold (its replica space read-only): it stays on
    #: this host (the source), which the VM uses by remote access.
    kept_on: str | None = None
    #: A NIC: frames its agents kept, forwarded and lost (as the aggregate measures).
    frames_buffered: int | None = None
    frames_forwarded: int | None = None
    frames_lost: int | None = None


@dataclass
class MigrationReport:
    vm: str
    source: str
    destination: str
    storage: str
    status: str = "running"
    error: str | None = None
    time_to_switchover_s: float | None = None
    total_time_s: float | None = None
    downtime_ms: float | None = None
    #: The VM's own pause: its STOP on the source to its RESUME on the destination, from
    #: QEMU's events (QEMU 7.2's ``downtime_ms`` here is often 0 when the guest did pause).
    vm_pause_ms: float | None = None
    max_io_gap_ms: float | None = None
    #: What the migration added to the guest's own gaps: ``max_io_gap_ms`` less the
    #: largest gap, on the same instrument, in a window as long as the migration just
    #: before it (as much of that as the report's steady-state baseline holds). Negative:
    #: the guest's own gaps were longer than any during the migration.
    io_gap_excess_ms: float | None = None
    guest_max_latency_ms: float | None = None
    guest_p99_latency_ms: float | None = None
    io_rate_ratio: float | None = None
    bytes_between_hosts: int | None = None
    limit_s: float | None = None
    guest_io_errors: int | None = None
    guest_verify_failures: int | None = None
    #: How many I/O operations the guest went back by across the switchover: the most the
    #: source's heartbeats counted less the fewest the destination's count. Must be 0: the
    #: guest resumed from older memory than it had shown (what it did since is forgotten,
    #: while the disk may hold its writes).
    guest_ops_lost: int | None = None
    integrity: str | None = None
    #: Frames for the guest the NICs' agents kept during the switchover (both hosts).
    net_frames_buffered: int | None = None
    #: Frames the source's agent forwarded to the destination's after the switchover.
    net_frames_forwarded: int | None = None
    #: Frames the NICs' agents dropped during the migration (both hosts): must be 0.
    net_frames_lost: int | None = None
    #: Largest gap between two consecutive answers of a 10 ms ping to the guest, seen on
    #: the pinging host (set by whoever ran the pinger: ``devagent demo --net``).
    ping_max_gap_ms: float | None = None
    ram_bytes: int | None = None
    ram_transferred_bytes: int | None = None
    disk_bytes_moved: int | None = None
    link_rate_bps: int | None = None
    io_gap_source: str | None = None
    #: When the largest I/O gap began, in seconds after the migrate command.
    max_io_gap_at_s: float | None = None
    #: Seconds after the migrate command at which each step was reached (both hosts' steps:
    #: the destination's are on the same wall clock).
    timeline: dict[str, float] = field(default_factory=dict)
    #: The probe's heartbeats around the migration, one row each:
    #: [seconds after the migrate command, host, ops in the beat, p99 ms, max latency ms].
    io_series: list[list[Any]] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    #: One row per device (each disk, then each NIC), beside the aggregate measures.
    devices: list[DeviceMeasures] = field(default_factory=list)
    #: What a completed migration did other than asked, and what the operator can do.
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def device(self, node: str, kind: str) -> DeviceMeasures:
        """Device ``node``'s row, made (after the others) the first time it is asked."""
        for row in self.devices:
            if row.node == node:
                return row
        row = DeviceMeasures(node=node, kind=kind)
        self.devices.append(row)
        return row

    @classmethod
    def from_json(cls, data: object) -> MigrationReport:
        """A saved report (keys it does not know are left out)."""
        return convert(data, cls, what="a migration report")

    def damage(self) -> list[str]:
        """What the guest lost, as sentences (none: intact as far as the report tells):
        I/O errors or verify failures, I/O forgotten across the switchover, and for a
        completed migration a disk that is not what the guest last wrote."""
        errors, failures = self.guest_io_errors, self.guest_verify_failures
        found = []
        if errors or failures:
            found.append(f"guest I/O errors {errors}, verify failures {failures}")
        if self.guest_ops_lost:
            found.append(f"the guest went back {self.guest_ops_lost} I/O operations across "
                         "the switchover (it resumed from older memory)")  # fmt: skip
        if self.status == "completed" and self.integrity not in (None, "ok"):
            found.append(f"integrity {self.integrity}")
        return found

    def mark_missing(self, reason: str, *names: str) -> None:
        for name in names:
            if getattr(self, name) is None:
                self.missing[name] = reason


def ops_lost(source: Sequence[Beat], destination: Sequence[Beat]) -> int | None:
    """``guest_ops_lost``: 0 when the destination's probe went on from where the source's
    left off; None without heartbeats on both sides."""
    if not source or not destination:
        return None
    return max(0, max(b.ops_total for b in source) - min(b.ops_total for b in destination))


def largest_gap(times: Iterable[float], start: float, end: float) -> float | None:
    """Largest gap between consecutive ``times`` that began in [start, end], counting from
    the last time before ``start`` and up to the first after ``end``."""
    found = largest_gap_at(times, start, end)
    return found[1] if found is not None else None


def largest_gap_at(times: Iterable[float], start: float, end: float) -> tuple[float, float] | None:
    """(when it began, how long) of the largest gap between consecutive ``times`` that
    began in [start, end]: counted from the last time before ``start``, and to the first
    time after ``end`` (a pause that the window's end falls into counts whole: a VM that
    resumed just before its migration was declared over still paused until its first I/O
    after that)."""
    ordered = sorted(times)
    before = [t for t in ordered if t < start]
    inside = [t for t in ordered if start <= t <= end]
    after = [t for t in ordered if t > end]
    points = before[-1:] + inside + after[:1]
    if len(points) < 2:
        return None
    return max(((a, b - a) for a, b in pairwise(points)), key=lambda gap: gap[1])


def max_io_gap_s(beats: Sequence[Beat], start: float, end: float) -> float | None:
    """Largest wall-clock gap between two consecutive heartbeats that saw completed I/O."""
    return largest_gap((b.host_time for b in beats if b.ops > 0), start, end)


def ops_rate(beats: Iterable[Beat], start: float, end: float) -> float | None:
    """Completed guest I/O per second over [start, end]."""
    if end <= start:
        return None
    chosen = [b for b in beats if start < b.host_time <= end]
    if not chosen:
        return None
    return sum(b.ops for b in chosen) / (end - start)


def fill_io_measures(
    report: MigrationReport,
    beats: Sequence[Beat],
    *,
    start: float,
    end: float,
    baseline_start: float,
    completions: Sequence[float] | None = None,
) -> None:
    """Fill the measures that come from the guest probe's heartbeats: ``start``/``end`` bound
    the migration, [baseline_start, start] is the steady state it is compared with. With
    ``completions`` (the agents' journals on both hosts) ``max_io_gap_ms`` is exact rather
    than bounded below by the heartbeats' 100 ms period."""
    if not beats:
        if completions:
            _fill_gaps(report, completions, "agent journals", start, end, baseline_start)
        names = (
            "max_io_gap_ms",
            "io_gap_excess_ms",
            "guest_max_latency_ms",
            "guest_p99_latency_ms",
            "io_rate_ratio",
            "guest_io_errors",
            "guest_verify_failures",
        )
        unsaid = [name for name in names if name not in report.missing]
        report.mark_missing("no probe heartbeats (the guest runs no ioprobe)", *unsaid)
        return
    if not any(b.ops for b in beats if baseline_start <= b.host_time <= end):
        # An idle guest: the journals then hold only QEMU's own flushes, whose spacing
        # says nothing about the guest's I/O.
        reason = "the guest did no I/O around the migration (idle)"
        report.missing["max_io_gap_ms"] = report.missing["io_gap_excess_ms"] = reason
    elif completions:
        _fill_gaps(report, completions, "agent journals", start, end, baseline_start)
    else:
        with_io = [b.host_time for b in beats if b.ops > 0]
        _fill_gaps(report, with_io, "probe heartbeats", start, end, baseline_start)
    window = [b for b in beats if start <= b.host_time <= end]
    if window:
        report.guest_max_latency_ms = round(max(b.lat_max_us for b in window) / 1000, 3)
        report.guest_p99_latency_ms = round(max(b.lat_p99_us for b in window) / 1000, 3)
    before, during = ops_rate(beats, baseline_start, start), ops_rate(beats, start, end)
    if before and during is not None:
        report.io_rate_ratio = round(during / before, 3)
    else:
        report.missing["io_rate_ratio"] = "no guest I/O before the migration to compare with"
    last = max(beats, key=lambda b: b.host_time)
    report.guest_io_errors = last.errors
    report.guest_verify_failures = last.verify_failures


def gap_before(times: Iterable[float], start: float, end: float, earliest: float) -> float | None:
    """The guest's own largest gap: between consecutive ``times`` inside the window as long
    as [start, end] that ends at ``start``, begun no sooner than ``earliest`` (the oldest
    time the instrument is known to hold); None with fewer than two times in it."""
    since = max(earliest, start - (end - start))
    inside = sorted(t for t in times if since <= t <= start)
    if len(inside) < 2:
        return None
    return max(b - a for a, b in pairwise(inside))


def _fill_gaps(
    report: MigrationReport,
    times: Sequence[float],
    source: str,
    start: float,
    end: float,
    baseline_start: float,
) -> None:
    """``max_io_gap_ms`` and ``io_gap_excess_ms`` from one instrument's ``times``."""
    report.io_gap_source = source
    found = largest_gap_at(times, start, end)
    if found is None:
        report.missing.setdefault(
            "max_io_gap_ms", "the guest completed no I/O during the migration"
        )
        report.missing.setdefault("io_gap_excess_ms", "no I/O gap during the migration")
        return
    report.max_io_gap_ms = round(found[1] * 1000, 1)
    report.max_io_gap_at_s = round(found[0] - start, 3)
    own = gap_before(times, start, end, baseline_start)
    if own is None:
        report.missing["io_gap_excess_ms"] = f"no guest I/O in the {source} before the migration"
    else:
        report.io_gap_excess_ms = round((found[1] - own) * 1000, 1)


def io_series(
    beats: Iterable[tuple[str, Beat]], start: float, end: float, t0: float
) -> list[list[Any]]:
    """The report's ``io_series``: (host, heartbeat) pairs within [start, end], oldest
    first, as rows of [seconds after ``t0``, host, ops, p99 ms, max ms]."""
    rows = [
        [round(b.host_time - t0, 3), host, b.ops, b.lat_p99_us / 1000, b.lat_max_us / 1000]
        for host, b in beats
        if start <= b.host_time <= end
    ]
    return sorted(rows, key=lambda row: float(row[0]))


def fill_link_measures(
    report: MigrationReport,
    bytes_before: int | None,
    bytes_after: int | None,
    bytes_to_move: int,
    link_rate_bps: int | None,
) -> None:
    """``bytes_between_hosts`` from the source link's counters read before and after (None
    in a loopback lab) and ``limit_s`` for ``bytes_to_move`` over a known link rate."""
    if bytes_before is not None and bytes_after is not None:
        report.bytes_between_hosts = bytes_after - bytes_before
    else:
        report.missing["bytes_between_hosts"] = "loopback lab: the hosts share one link"
    report.limit_s = limit_seconds(bytes_to_move, link_rate_bps)
    if report.limit_s is None:
        report.missing["limit_s"] = "the link rate is not known (unshaped link)"


def limit_seconds(bytes_to_move: int, link_rate_bps: int | None) -> float | None:
    """The physical floor of a migration's total time: bytes that must cross ÷ link rate."""
    if not link_rate_bps:
        return None
    return round(bytes_to_move * 8 / link_rate_bps, 3)
