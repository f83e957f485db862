"""How a migration report looks on a terminal."""

from __future__ import annotations

from rich.table import Table

from devagent.report import MEASURES, DeviceMeasures, MigrationReport

UNITS = {
    "time_to_switchover_s": "s",
    "total_time_s": "s",
    "downtime_ms": "ms",
    "vm_pause_ms": "ms",
    "max_io_gap_ms": "ms",
    "io_gap_excess_ms": "ms",
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


def devices_table(report: MigrationReport) -> Table:
    """A row per device: a disk's bytes pushed and fetched, when it was local on the
    destination, its own largest I/O gap and integrity; a NIC's frames."""
    title = f"devices of {report.vm}: {report.source} → {report.destination}"
    table = Table(title=title, title_justify="left")
    for column in ("device", "pushed", "fetched", "local at", "largest gap", "integrity / lost"):
        table.add_column(column, justify="left" if column == "device" else "right")
    for row in report.devices:
        table.add_row(*_device_cells(row))
    return table


def _device_cells(row: DeviceMeasures) -> list[str]:
    def size(value: int | None) -> str:
        return "—" if value is None else f"{value / (1 << 20):,.1f} MiB"

    def unit(value: float | None, suffix: str) -> str:
        return "—" if value is None else f"{value:g} {suffix}"

    if row.kind == "nic":
        lost = row.frames_lost
        shown = "—" if lost is None else f"[{'green' if lost == 0 else 'red'}]{lost} frames[/]"
        forwarded = "—" if row.frames_forwarded is None else f"{row.frames_forwarded} fwd"
        return [f"{row.node} (NIC)", "", forwarded, "", "", shown]
    integrity = row.integrity or "—"
    if row.integrity is not None:
        integrity = f"[{'green' if row.integrity == 'ok' else 'red'}]{row.integrity}[/]"
    return [
        row.node, size(row.bytes_pushed), size(row.bytes_fetched),
        unit(row.local_after_s, "s"), unit(row.max_io_gap_ms, "ms"), integrity,
    ]  # fmt: skip


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
