"""How a migration report looks on a terminal."""

from __future__ import annotations

from rich.table import Table

from devagent.report import MEASURES, MigrationReport

UNITS = {
    "time_to_switchover_s": "s",
    "total_time_s": "s",
    "downtime_ms": "ms",
    "vm_pause_ms": "ms",
    "max_io_gap_ms": "ms",
    "guest_max_latency_ms": "ms",
    "guest_p99_latency_ms": "ms",
    "limit_s": "s",
    "bytes_between_hosts": "bytes",
    "net_frames_buffered": "frames",
    "net_frames_forwarded": "frames",
    "net_frames_lost": "frames",
    "ping_max_gap_ms": "ms",
}
MUST_BE_ZERO = ("guest_io_errors", "guest_verify_failures", "guest_ops_lost", "net_frames_lost")
#: Shown only for a VM with a NIC.
NET = ("net_frames_buffered", "net_frames_forwarded", "net_frames_lost", "ping_max_gap_ms")


def report_table(report: MigrationReport) -> Table:
    title = (
        f"migration of {report.vm}: {report.source} → {report.destination} "
        f"({report.storage}) — {report.status}"
    )
    table = Table(title=title, title_justify="left", min_width=len(title))
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("", style="dim")
    has_nic = report.net_frames_lost is not None
    for name in (*MEASURES[:3], "vm_pause_ms", *MEASURES[3:]):
        value = getattr(report, name)
        if name in NET and not has_nic:
            continue
        if value is None:
            table.add_row(name, "—", report.missing.get(name, ""))
            continue
        text = f"{value:,}" if isinstance(value, int) else str(value)
        if name in MUST_BE_ZERO or name == "integrity":
            good = value == 0 or value == "ok"
            text = f"[{'green' if good else 'red'}]{text}[/]"
        table.add_row(name, text, UNITS.get(name, ""))
    return table
