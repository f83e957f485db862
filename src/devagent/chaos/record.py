"""A chaos run's record (one JSONL line each) and the table of fault by phase. Pure."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from devagent.chaos.draw import BEFORE_SWITCHOVER, Phase, RunPlan
from devagent.report import MigrationReport


class Outcome:
    COMPLETED = "completed"  # the VM runs on the destination, nothing of it on the source
    ROLLED_BACK = "rolled back"  # the VM runs on the source, nothing of it on the destination
    UNKNOWN = "unknown"  # neither: a violation says why


class RunRecord(msgspec.Struct, omit_defaults=True):
    """What one run did and found."""

    plan: RunPlan
    vm: str
    source: str
    destination: str
    outcome: str = Outcome.UNKNOWN
    phase_hit: Phase | None = None  # the phase the fault really landed in
    fault_at_s: float | None = None  # from the migrate command
    fault_detail: str = ""
    fault_error: str | None = None  # the fault could not be done
    fault_s: float | None = None  # how long it lasted (a cut, a stop, a full disk)
    #: From the fault's end to the guest's first I/O after it (heartbeats, either host).
    io_resumed_s: float | None = None
    restarted_on: str | None = None  # the host where the VM was booted again after a crash
    migration_id: str | None = None
    report: MigrationReport | None = None
    follow_up: MigrationReport | None = None  # the next migration, without a fault
    violations: list[str] = msgspec.field(default_factory=list)
    notes: list[str] = msgspec.field(default_factory=list)  # what the checks let pass, and why
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations


def expected_outcomes(phase: Phase | None, *, faulted: bool = True) -> tuple[str, ...]:
    """What a fault's phase implies: before the switchover the migration may go on or roll
    back (the VM on the source, untouched); from the switchover on it only goes forward.
    A migration without a fault (``faulted`` False) completes."""
    if not faulted:
        return (Outcome.COMPLETED,)
    if phase is None or phase in BEFORE_SWITCHOVER or phase is Phase.SWITCHOVER:
        return (Outcome.COMPLETED, Outcome.ROLLED_BACK)
    return (Outcome.COMPLETED,)


PHASE_ORDER = [p.value for p in Phase]


class Cell(msgspec.Struct):
    runs: int = 0
    violations: int = 0


def table(records: Sequence[RunRecord]) -> dict[str, dict[str, Cell]]:
    """Runs and violations per fault (rows) and phase landed in (columns)."""
    cells: dict[str, dict[str, Cell]] = {}
    for record in records:
        phase = record.phase_hit.value if record.phase_hit else "not injected"
        cell = cells.setdefault(record.plan.fault, {}).setdefault(phase, Cell())
        cell.runs += 1
        cell.violations += 0 if record.ok else 1
    return cells


def columns(cells: dict[str, dict[str, Cell]]) -> list[str]:
    seen = {phase for row in cells.values() for phase in row}
    return [p for p in [*PHASE_ORDER, "not injected"] if p in seen]


def markdown(records: Sequence[RunRecord]) -> str:
    """The table as Markdown: each cell ``runs`` or ``runs (N violated)``."""
    cells = table(records)
    cols = columns(cells)
    lines = [
        "| fault | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for fault in sorted(cells):
        row = cells[fault]
        shown = [cell_text(row[c]) if c in row else "" for c in cols]
        lines.append(f"| {fault} | " + " | ".join(shown) + " |")
    bad = sum(1 for r in records if not r.ok)
    lines.append("")
    lines.append(f"{len(records)} runs, {bad} with an invariant violated.")
    return "\n".join(lines) + "\n"


def cell_text(cell: Cell) -> str:
    return f"{cell.runs}" + (f" ({cell.violations} violated)" if cell.violations else "")
