"""A migration this host was the source of, taken up again after its daemon restarted
(SIGKILLed mid-migration and started again by its service manager): the job is rebuilt from
its record (:mod:`.record`) under its own id, and its run finishes the migration or rolls it
back, deterministically, by what the destination says (:mod:`.job`'s docstring says why a
roll-back is safe until the destination's commit began).

====================================  ==================================================
the destination's VM                  the recovered job
====================================  ==================================================
``committing`` or ``running``         forward: the commit read back from the VM's status
(its commit began)                    (asked first, if the record stops at the
                                      switchover), then the job's own ``finish``
``incoming``: removed on asking       roll back here: QEMU's migration cancelled, the
(refused while a commit is under      push or mirror stopped, the fence lifted, the
way: asked again)                     NICs' frames delivered, the guest resumed
none                                  roll back here (nothing there to remove)
``incoming``, this host's QEMU gone,  forward: commit now, with the switchover's recorded
the record past the switchover        hand-over (not for ``qemu-cor-stream``, whose
                                      source QEMU served the disk: that fails, said)
unreachable for ``FORWARD_RETRY_S``   before the switchover (never asked to commit):
                                      roll back here, the incoming VM left there (said);
                                      past it: nothing is changed, the job fails and its
                                      record stays for the next restart
====================================  ==================================================

The destination is asked first, and removes its incoming VM, *before* the source lifts its
fence or runs the guest: a commit that the previous daemon asked just before it died is
either seen (go forward) or excluded (the destination refuses the removal while it runs).

What died with the old process is not invented: figures computed from the source guest's
heartbeats before the restart are left out of the report and ``missing`` says why; the
destination's commit steps are not known again (only when the guest resumed).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from enum import Enum

from devagent.api_types import VmStatus
from devagent.daemon.migration import plan_for
from devagent.daemon.migration.context import HostContext, MigratingVm
from devagent.daemon.migration.job import MigrationJob
from devagent.daemon.migration.net import NetMigration
from devagent.daemon.migration.plans import Plan
from devagent.daemon.migration.record import (
    PAST_SWITCHOVER,
    MigrationRecord,
    Phase,
    load_record,
)
from devagent.daemon.migration.running import FORWARD_RETRY_S
from devagent.daemon.vms.managed import VmRole
from devagent.errors import NotFound, PeerError, StateError
from devagent.qemu.answers import MigrationInfo
from devagent.report import MEASURES
from devagent.wire import from_peer

#: On the report's timeline: when the restarted daemon took the migration up.
TAKEN_UP = "taken_up_after_restart"
RESTARTED = "not measured: the source's daemon restarted during the migration"
#: Measures computed from the source guest's heartbeats, which died with the old daemon.
HEARTBEAT_MEASURES = ("guest_max_latency_ms", "guest_p99_latency_ms", "io_rate_ratio")


class Verdict(Enum):
    """What the destination's answer makes of the migration (the module's table)."""

    FORWARD = "the destination's commit began: going forward"
    COMMIT = "this host's QEMU is gone: committing on the destination"
    ROLL_BACK = "the destination's commit never began: rolling back"
    UNREACHABLE = "the destination cannot be asked"


def recovered_jobs(host: HostContext, vms: Iterable[MigratingVm]) -> list[MigrationJob]:
    """A job (not started) for each VM whose folder holds an unsettled migration record."""
    jobs: list[MigrationJob] = []
    for managed in vms:
        record = load_record(managed.run_dir)
        if record is not None:
            jobs.append(RecoveredJob(host, managed, record, plan_for(record.request.storage)))
    return jobs


class RecoveredJob(MigrationJob):
    """A source job rebuilt from its record; its run decides, then goes forward or back."""

    def __init__(
        self, host: HostContext, managed: MigratingVm, record: MigrationRecord, plan: Plan
    ) -> None:
        super().__init__(host, managed, record.request, plan)
        self.id, self.phase, self.started_at = record.id, record.phase, record.started_at
        self.report, self.progress = record.report, record.progress
        self.report.status, self.report.error = "running", None
        self.source_disks, self.disk_sizes = record.source_disks, record.disk_sizes
        self.bytes_before, self.handover = record.bytes_before, record.handover
        if managed.nics:  # on this report, towards the destination's agents it was given
            self.net = NetMigration(managed, self.report, self.mark, self.log)
            self.net.peers = dict(record.nic_peers)

    async def _migrate(self) -> None:
        self.mark(TAKEN_UP)
        self.log.warning("migration %s of VM %s taken up again at %s after a daemon restart",
                         self.id, self.managed.name, self.phase.value)  # fmt: skip
        async with self.host.connect(self.request.destination) as peer:
            self._peer = peer
            verdict = await self.decide()
            self.log.warning("migration %s: %s", self.id, verdict.value)
            if verdict is Verdict.UNREACHABLE and self.phase in PAST_SWITCHOVER:
                raise PeerError(
                    f"{verdict.value} for {FORWARD_RETRY_S:.0f} s whether its commit of VM "
                    f"{self.managed.name} began: nothing was changed here (the guest stays "
                    "paused, the record kept: a daemon restart asks again)"
                )
            if verdict in (Verdict.ROLL_BACK, Verdict.UNREACHABLE):
                await self.roll_back_here(verdict)
                return
            await self.go_forward()
        self.report.status = "completed"
        self._move(Phase.COMPLETED)
        self.finished_at = time.time()

    # -- the decision ---------------------------------------------------------------------

    async def decide(self) -> Verdict:
        """Ask the destination (the module's table), for :data:`FORWARD_RETRY_S` while it
        cannot be reached."""
        what = f"asking {self.report.destination} about VM {self.managed.name}"
        try:
            return await self.forward(self._ask, what=what)
        except PeerError as err:
            self.log.error("migration %s: %s", self.id, err)
            return Verdict.UNREACHABLE

    async def _ask(self) -> Verdict:
        """One look at the destination's VM; an incoming one is removed there before the
        source undoes anything (:class:`PeerError`: ask again)."""
        name, where = self.managed.name, self.report.destination
        try:
            raw = await self.peer.get(f"/v1/vms/{name}")
        except NotFound:
            return Verdict.ROLL_BACK
        vm = from_peer(raw, VmStatus, what="the destination's VM status")
        if vm.role in (VmRole.COMMITTING, VmRole.RUNNING):
            return Verdict.FORWARD
        if vm.role != VmRole.INCOMING:
            raise StateError(f"VM {name} is {vm.role} on {where}: neither arriving nor arrived")
        if self.managed.vm.exited:
            return self._source_gone()
        try:
            await self.remove_incoming()
        except StateError as err:  # its commit is under way there: see how it ends
            raise PeerError(f"{where} keeps its incoming VM {name}: {err}") from err
        return Verdict.ROLL_BACK

    def _source_gone(self) -> Verdict:
        """This host's QEMU is gone and the destination holds the guest, paused: the only
        way left is forward, if the plan's switchover step ran (its hand-over is recorded)
        and the disk does not depend on the dead QEMU."""
        name, where = self.managed.name, self.report.destination
        if self.phase in PAST_SWITCHOVER and not self.plan.source_qemu_serves:
            return Verdict.COMMIT
        raise StateError(
            f"VM {name}'s QEMU is gone here before the switchover, and its commit never "
            f"began on {where}: nothing can resume the guest here; its incoming VM there is "
            "left as it is"
        )

    # -- the two ways ---------------------------------------------------------------------

    async def roll_back_here(self, verdict: Verdict) -> None:
        """The destination never ran the guest (and now never will): the source undoes its
        steps, the fence included, and runs it again."""
        if verdict is Verdict.ROLL_BACK:
            why = "the destination never began its commit"
        else:  # before the switchover: no commit was ever asked
            why = "the destination was unreachable, and had never been asked to commit"
            self.cleanup_failures.append(
                f"removing the incoming VM on {self.report.destination} failed: unreachable"
            )
        await self.undo_source(unknown=True)
        self.settle()
        self._fail(f"rolled back after a daemon restart: {why}")

    async def go_forward(self) -> None:
        """The guest runs on the destination (or is committed there now): the rest of the
        job as it would have gone, from where the record says it was."""
        if self.phase not in PAST_SWITCHOVER:  # impossible while records precede moves
            raise StateError(
                f"VM {self.managed.name} runs on {self.report.destination} though this host "
                f"never asked it to commit (its record says {self.phase.value}): left as it is"
            )
        if self.phase is Phase.SWITCHOVER:
            committed = await self.commit(self.handover)  # read back if it began
        else:
            committed = await self.forward(self.read_back, what="the destination's commit")
        done = MigrationInfo(status="completed")  # finish reads QEMU's own if it still runs
        await self.finish(committed, done)
        self._note_restart()

    def _note_restart(self) -> None:
        """Leave out what the old daemon took with it, and say so."""
        report = self.report
        lost = list(HEARTBEAT_MEASURES) if self.managed.request.has_probe else []
        if report.io_gap_source == "probe heartbeats":  # the source's half died
            lost += ["max_io_gap_ms", "io_gap_excess_ms"]
            report.max_io_gap_at_s = report.io_gap_source = None
        for name in lost:
            setattr(report, name, None)
            report.missing[name] = RESTARTED
        for name in MEASURES:
            if getattr(report, name) is None:
                report.missing.setdefault(name, RESTARTED)
