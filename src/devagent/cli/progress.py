"""Progress of long steps: rich bars on a terminal, one line per phase otherwise."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from devagent.api_types import MigrationStatus
from devagent.cli.common import err


class MigrationProgress:
    """Feed it the migration job's statuses (``orchestrate.follow_migration``)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.phase: str | None = None
        self.bars: Progress | None = None
        self.ram_task: Any = None
        self.disk_tasks: dict[str, Any] = {}  # by node, or "disk" for them all

    def __enter__(self) -> MigrationProgress:
        if self.enabled and err.is_terminal:
            self.bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TimeElapsedColumn(),
                console=err,
                transient=True,
            )
            self.bars.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.bars is not None:
            self.bars.stop()

    def __call__(self, job: MigrationStatus) -> None:
        if not self.enabled:
            return
        figures = job.progress
        if job.phase != self.phase:
            self.phase = job.phase
            err.print(f"[bold]{job.vm}[/]: {job.phase} ({figures.elapsed_s or 0} s)")
        if self.bars is None:
            return
        if figures.ram_total is not None:
            if self.ram_task is None:
                self.ram_task = self.bars.add_task("RAM ", total=figures.ram_total)
            self.bars.update(self.ram_task, completed=figures.ram_transferred or 0)
        # A bar per disk when there are several, else one for the disk.
        disks = figures.disks if len(figures.disks) > 1 else {}
        if not disks and figures.disk_done is not None:
            disks = {"disk": (figures.disk_done, figures.disk_left or 0)}
        for node, (done, left) in disks.items():
            if node not in self.disk_tasks:
                self.disk_tasks[node] = self.bars.add_task(f"{node:<5}", total=done + left)
            self.bars.update(self.disk_tasks[node], completed=done, total=done + left)


class Spinner:
    """A status line for a wait: ``with Spinner("booting") as s: s.update("…")``."""

    def __init__(self, text: str, enabled: bool = True):
        self.enabled = enabled and err.is_terminal
        self.status = err.status(text) if self.enabled else None

    def __enter__(self) -> Spinner:
        if self.status is not None:
            self.status.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.status is not None:
            self.status.stop()

    def update(self, text: str) -> None:
        if self.status is not None:
            self.status.update(text)
