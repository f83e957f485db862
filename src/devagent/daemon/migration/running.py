"""What every migration job this host runs as the source does the same way, whoever moves
the RAM (:class:`~.job.MigrationJob` for devagent's own VMs,
:class:`~devagent.daemon.libvirt_migration.DomainMigration` for a libvirt domain): its
timeline and disk progress, its run as a task whose failure is reported rather than
raised, and the retries of a step past the switchover."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from devagent.api_types import MigrationProgress
from devagent.daemon.migration.record import Phase
from devagent.errors import DevagentError, PeerError
from devagent.report import MigrationReport

T = TypeVar("T")
#: After the switchover a failed step is tried again for this long.
FORWARD_RETRY_S = 120.0
FORWARD_RETRY_PAUSE_S = 0.5


class RunningJob:
    """A source's migration job, as its subclass's ``__init__`` sets it up."""

    id: str
    phase: Phase
    started_at: float
    finished_at: float | None
    report: MigrationReport
    progress: MigrationProgress
    log: logging.Logger
    task: asyncio.Task[None] | None
    #: Its progress follows QEMU's RAM migration as it goes (see :class:`.context.DiskJob`).
    follows_ram = False

    def mark(self, step: str, at: float | None = None) -> None:
        """Note on the report's timeline that ``step`` was reached (now, or at ``at``)."""
        when = time.time() if at is None else at
        self.report.timeline[str(step)] = round(when - self.started_at, 3)

    def disk_progress(self, per_disk: Mapping[str, tuple[int, int]]) -> None:
        """Each disk's bytes done and left, by node (and all of them together)."""
        self.progress.disks = dict(per_disk)
        self.progress.disk_done = sum(done for done, _ in per_disk.values())
        self.progress.disk_left = sum(left for _, left in per_disk.values())

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"migration-{self.id}")

    async def run(self) -> None:
        try:
            await self._migrate()
        except asyncio.CancelledError:
            self._fail("cancelled")
            raise
        except DevagentError as err:
            self._fail(str(err))
        except Exception as err:  # a bug: keep the daemon up and say what happened
            self.log.exception("migration %s crashed", self.id)
            self._fail(f"internal error: {err!r}")

    async def _migrate(self) -> None:
        raise NotImplementedError

    def _fail(self, message: str) -> None:
        self.log.error("migration %s failed: %s", self.id, message)
        self.report.status = "failed"
        self.report.error = message
        self.phase = Phase.FAILED
        self.finished_at = time.time()

    async def forward(self, step: Callable[[], Awaitable[T]], *, what: str) -> T:
        """Past the switchover: run ``step()`` until it succeeds (a peer or an agent that
        restarts), for :data:`FORWARD_RETRY_S` at most."""
        deadline = time.monotonic() + FORWARD_RETRY_S
        while True:
            try:
                return await step()
            except PeerError as err:
                if time.monotonic() > deadline:
                    raise PeerError(f"{what} failed for {FORWARD_RETRY_S:.0f} s: {err}") from err
                self.log.warning("%s failed, trying again: %s", what, err)
            await asyncio.sleep(FORWARD_RETRY_PAUSE_S)
