"""A live migration as the source daemon runs it, peer to peer with the destination daemon.

One job for every strategy; the strategy's :class:`~.plans.Plan` says what the disk does at
each step. The steps, in order (each a method here)::

    prepare        the destination makes an incoming QEMU (and agents), paused; QEMU here
                   is set up for RAM meanwhile
    before_ram     plan: start a push or a mirror, wait for convergence
    ram            QEMU's RAM migration (:mod:`.ram`): once it moves, the plan's flush
                   (:meth:`~.plans.AgentPlan.ram_active`); the plan's pre-switchover step
    switchover     plan: stop the push / cut the mirror over; then fence the source
    commit         the destination readies the disk and runs the guest
    finish         the NICs' hand-over, the old instance stopped, plan: wait until the disk
                   is local; the source released; the report (:mod:`.report`)

The rule on failure: before the switchover (RAM not completed, or the plan's switchover step
failed) the job rolls back: the VM runs on the source untouched, and the destination removes
everything it made. After it the job goes forward: the guest runs on the destination, and a
step that fails for a passing reason (a peer that restarts, an agent restarted by its
supervisor, a link cut) is tried again until its deadline. The one way back after the
switchover is a commit that could not be done by its deadline and never began: the
destination removes its incoming VM, and the source runs the guest again.

The point of no return is the destination's: its commit is recorded there as begun before
the guest runs. Until then the source's QEMU (running, or paused once RAM completed) holds
the whole guest and the source's agent the whole disk, so a roll-back is always safe. A
daemon that restarts mid-migration therefore asks the destination (:mod:`.recovery`): the
commit began there, the job goes forward from where it was; it never began, the destination
removes its incoming VM (it refuses while a commit is under way) and only then does the
source undo its steps, the fence included, and run the guest again. Either way the guest
ends running on exactly one host.

The job's life is one :class:`Phase` moved through one table; each move is saved first in
the VM's folder (:mod:`.record`), so that a restarted daemon knows where the job was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar, cast

from devagent.api_types import MigrationProgress, MigrationStatus, VmStatus
from devagent.daemon.migration.context import HostContext, MigratingVm, Peer
from devagent.daemon.migration.messages import CommitAnswer, MigrateRequest, RemoteDisk
from devagent.daemon.migration.net import NET_MEASURES, NetMigration
from devagent.daemon.migration.plans import Handover, Plan, Prepared
from devagent.daemon.migration.ram import migrate_ram, set_up_ram
from devagent.daemon.migration.record import (
    NEXT,
    MigrationRecord,
    Phase,
    remove_record,
    save_record,
)
from devagent.daemon.migration.report import BASELINE_S, finish_report
from devagent.daemon.migration.running import RunningJob
from devagent.daemon.vms.managed import VmRole
from devagent.errors import DevagentError, NotFound, PeerError, StateError
from devagent.qemu.answers import MigrationInfo
from devagent.qemu.vm import VmState
from devagent.report import MigrationReport
from devagent.vocab import Step
from devagent.wait import WaitTimeout, all_of, wait_until
from devagent.wire import from_peer

log = logging.getLogger(__name__)

T = TypeVar("T")
PEER_CHECK_S = 0.3  # how often the destination daemon is checked while RAM or a disk moves


class MigrationJob(RunningJob):
    """One VM's migration from this host (see the module's docstring)."""

    follows_ram = True  # its RAM follower reads query-migrate as RAM moves

    def __init__(
        self, host: HostContext, managed: MigratingVm, request: MigrateRequest, plan: Plan
    ) -> None:
        self.id = secrets.token_hex(4)
        self.host = host
        self.managed = managed
        self.request = request
        self.plan = plan
        self.phase = Phase.PREPARING
        self.started_at = time.time()
        self.finished_at: float | None = None
        #: The steps' figures so far, written by the plans and :mod:`.ram`.
        self.progress = MigrationProgress()
        dest = request.destination
        self.report = MigrationReport(
            vm=managed.name,
            source=host.name,
            destination=dest.name or dest.url,
            storage=request.storage.value,
            link_rate_bps=request.link_rate_bps,
        )
        for node in managed.images:  # a row per device: each disk, then each NIC
            self.report.device(node, "disk")
        for nic in managed.nics:
            self.report.device(nic.node, "nic")
        self.log = logging.getLogger(f"{__name__}.{managed.name}")
        self.task: asyncio.Task[None] | None = None
        self._peer: Peer | None = None
        # What the plan learns on the way: each source disk as the destination reaches it.
        self.source_disks: dict[str, RemoteDisk] = {}
        self.disk_sizes: dict[str, int] = {}
        self.bytes_before: int | None = None
        self.handover: Handover | None = None  # the plan's, at the switchover
        self.committed_at: float | None = None  # when the destination's commit was heard
        self.cleanup_failures: list[str] = []  # roll-back steps that failed, for the report
        self._next_check = time.monotonic() + PEER_CHECK_S
        # The NICs' steps (hold, forward, hand-over), for a VM that has NICs.
        self.net = NetMigration(managed, self.report, self.mark, self.log) if managed.nics else None

    # -- bookkeeping -----------------------------------------------------------------------

    @property
    def peer(self) -> Peer:
        if self._peer is None:
            raise StateError(f"migration {self.id} has no destination connection yet")
        return self._peer

    def _move(self, phase: Phase) -> None:
        """Move to ``phase``, saved first: the record never says less than the job did."""
        if phase not in NEXT[self.phase]:
            raise StateError(
                f"migration {self.id}: no transition {self.phase.value} -> {phase.value}"
            )
        if phase is Phase.COMPLETED:
            remove_record(self.managed.run_dir)  # settled (the release took the folder)
        else:
            self.record(phase)
        self.log.info("migration %s to %s: %s", self.id, self.report.destination, phase.value)
        self.phase = phase

    def record(self, phase: Phase) -> None:
        """Save the job as it stands, at ``phase`` (:mod:`.record`)."""
        record = MigrationRecord(
            id=self.id, request=self.request, phase=phase, started_at=self.started_at,
            report=self.report, progress=self.progress, source_disks=self.source_disks,
            disk_sizes=self.disk_sizes, bytes_before=self.bytes_before,
            nic_peers=dict(self.net.peers) if self.net is not None else {},
            handover=self.handover,
        )  # fmt: skip
        save_record(self.managed.run_dir, record)

    def settle(self) -> None:
        """A roll-back ended: the migration is settled unless one of its steps failed (then
        the record stays, and a daemon restart tries the roll-back again)."""
        if self.cleanup_failures:
            self.log.warning("migration %s: its record is kept for a retry", self.id)
            return
        remove_record(self.managed.run_dir)

    async def quietly(self, step: Awaitable[Any]) -> None:
        """Run an undo step of a roll-back that may find nothing to undo (a mirror that never
        started, say): its failure is logged, and does not stop the others."""
        try:
            await step
        except DevagentError as err:
            self.log.info("migration %s: clean-up step failed: %s", self.id, err)

    async def surely(self, step: Awaitable[Any], what: str) -> None:
        """Run a roll-back step that must work (the guest resumed, the destination emptied):
        its failure does not stop the others, and is logged and said in the report."""
        try:
            await step
        except DevagentError as err:
            self.log.error("migration %s: %s failed: %s", self.id, what, err)
            self.cleanup_failures.append(f"{what} failed: {err}")

    async def check_peer(self) -> None:
        """The destination's daemon must see the migration through: asked every
        :data:`PEER_CHECK_S` while RAM or a disk moves."""
        if time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + PEER_CHECK_S
        try:
            await asyncio.wait_for(self.peer.get("/v1/health"), PEER_CHECK_S * 2)
        except (PeerError, TimeoutError) as err:
            raise PeerError(
                f"destination host {self.report.destination} vanished during the migration: {err}"
            ) from err

    def status(self) -> MigrationStatus:
        return MigrationStatus(
            id=self.id,
            vm=self.managed.name,
            phase=self.phase.value,
            started_at=self.started_at,
            finished_at=self.finished_at,
            progress=self.progress,
            report=self.report,
        )

    # -- the run -----------------------------------------------------------------------------

    def _fail(self, message: str) -> None:
        if self.cleanup_failures:
            message += f" (and then: {'; '.join(self.cleanup_failures)})"
        super()._fail(message)

    async def _migrate(self) -> None:
        self.managed.vm.require(VmState.RUNNING)
        self.plan.check(self)
        self.bytes_before = self.host.link_bytes()
        self.record(Phase.PREPARING)
        async with self.host.connect(self.request.destination) as peer:
            self._peer = peer
            try:
                prepared = await self.prepare()
                await self.plan.before_ram(self, prepared)
                done = await self.ram(prepared)
                self.handover = await self.plan.at_switchover(self)
            except BaseException as err:
                await self.roll_back(err)
                raise
            await self.switch_over()
            committed = await self.commit(self.handover)
            await self.finish(committed, done)
        self.report.status = "completed"
        self._move(Phase.COMPLETED)
        self.finished_at = time.time()

    async def prepare(self) -> Prepared:
        """The destination made ready; meanwhile QEMU here is set up for RAM."""
        prepared, _ = await all_of(self._prepare_destination(), set_up_ram(self))
        return cast(Prepared, prepared)

    async def _prepare_destination(self) -> Prepared:
        if self.net is not None:
            await self.net.start()
        prepared = await self.plan.prepare(self)
        if prepared.until_listening is None:  # (else once its QEMU listens)
            self.mark(Step.DESTINATION_READY)
        if self.net is not None:
            self.net.prepared(prepared.nic_peers or {})
        return prepared

    async def ram(self, prepared: Prepared) -> MigrationInfo:
        uri = await prepared.listening()
        self._move(Phase.RAM)
        self.mark(Step.RAM_STARTED)
        done = await migrate_ram(self, uri)
        self.mark(Step.RAM_COMPLETED)  # QEMU stopped the guest and flushed its disk
        return done

    async def switch_over(self) -> None:
        """One writer: the old instance never writes again; its frames go to the new one."""
        try:
            await self.plan.fence(self)
        except DevagentError as err:
            # The old instance is inert since RAM completed; killed, it cannot write at all.
            self.log.warning("fencing failed (%s): killing the source's QEMU instead", err)
            await self.managed.vm.kill()
            self.mark(Step.SOURCE_FENCED)
        if self.net is not None:
            await self.net.switched_over()
        self._move(Phase.SWITCHOVER)

    async def commit(self, handover: Handover | None) -> CommitAnswer:
        """The destination runs the guest. A commit whose answer was lost is read back from
        the VM's state there; one that cannot be done is undone (:meth:`commit_failed`)."""
        try:
            committed = await self.forward(
                lambda: self._commit_once(handover), what="the destination's commit"
            )
        except DevagentError as err:
            committed = await self.commit_failed(err)
        for step, at in committed.steps.items():
            self.mark(f"destination_{step}", at)
        self.mark(Step.RESUMED, committed.resumed_at)
        self.committed_at = time.time()
        self.mark(Step.COMMITTED, self.committed_at)
        self._move(Phase.FINISHING)
        return committed

    async def _commit_once(self, handover: Handover | None) -> CommitAnswer:
        try:
            return await self.plan.commit(self, handover)
        except StateError:  # committed already: our earlier try got through
            committed = await self.commit_seen()
            if committed is None:
                raise
            return committed

    async def commit_failed(self, err: DevagentError) -> CommitAnswer:
        """The destination could not commit (for :data:`FORWARD_RETRY_S`). Until its commit
        began the source still holds the whole guest (QEMU paused, the disk fenced): the
        destination removes its incoming VM, and the guest runs here again (the migration
        fails, rolled back). A destination whose commit began refuses the removal: its
        guest runs there, and the job goes forward after all. One that cannot be reached,
        or a source whose QEMU is gone (killed when a fence failed), leaves the guest
        paused where it is, the job's record kept: a daemon restart asks again
        (:mod:`.recovery`)."""
        dest, name = self.report.destination, self.managed.name
        if self.managed.vm.exited:  # the incoming VM holds the only copy of the guest
            raise PeerError(
                f"{err}; the source's QEMU is gone, so VM {name} stays paused on {dest} "
                "until its commit works (restart devagentd here to ask it again)"
            ) from err
        self.log.error("migration %s: %s; rolling back unless the commit began on %s",
                       self.id, err, dest)  # fmt: skip
        try:
            committed = await self.forward(
                self._remove_or_read_back, what=f"removing the incoming VM on {dest}"
            )
        except DevagentError as gone:
            raise PeerError(
                f"{err}; and then {gone}: VM {name} stays paused on {self.report.source} "
                f"until host {dest} answers (restart devagentd here to ask it again)"
            ) from gone
        if committed is not None:  # its commit began after all: the guest runs there
            return committed
        await self.undo_source(unknown=True)  # (a restarted job knows not what the NICs do)
        self.settle()
        raise PeerError(f"rolled back after the switchover: {err}") from err

    async def _remove_or_read_back(self) -> CommitAnswer | None:
        """The incoming VM removed (None), or the commit as it went if it began there. A
        commit still under way there, not begun yet, refuses both for now: asked again."""
        try:
            await self.remove_incoming()
            return None
        except StateError:
            committed = await self.commit_seen()  # a PeerError while it is committing
        if committed is None:
            raise PeerError(f"VM {self.managed.name}'s commit is under way on "
                            f"{self.report.destination}, not begun yet")  # fmt: skip
        return committed

    async def read_back(self) -> CommitAnswer:
        """The commit as the destination tells it once its guest runs there."""
        committed = await self.commit_seen()
        if committed is None:
            raise StateError(f"VM {self.managed.name} does not run on {self.report.destination}")
        return committed

    async def commit_seen(self) -> CommitAnswer | None:
        """The commit as the destination's VM status tells it; None if its guest does not
        run there. A commit under way there (begun, the guest not running yet) is a
        :class:`PeerError`: :meth:`forward` asks again."""
        raw = await self.peer.get(f"/v1/vms/{self.managed.name}")
        vm = from_peer(raw, VmStatus, what="the destination's VM status")
        if vm.role == VmRole.COMMITTING and vm.state != "running":
            raise PeerError(f"VM {vm.name}'s commit is under way on {self.report.destination}")
        if vm.role == VmRole.RUNNING and vm.state == "failed":  # it crashed there, past its
            # commit: the guest lives there (restarted there), so the job goes forward
            self.log.error("migration %s: VM %s crashed on %s after its commit began",
                           self.id, vm.name, self.report.destination)  # fmt: skip
            return CommitAnswer(resumed_at=vm.resumed_at or time.time())
        if vm.state != "running" or vm.resumed_at is None:
            return None
        return CommitAnswer(resumed_at=vm.resumed_at)

    async def finish(self, committed: CommitAnswer, done: MigrationInfo) -> None:
        """After the guest runs on the destination: hand over, release, clean up, report.
        The copy here is marked migrated first: nothing that fails from here on may leave it
        looking like the VM's running instance. The source is released once the
        destination needs nothing of it (``total_time_s`` ends there); its clean-up (QEMU
        stopped, the agents and the copy removed) comes after, off that time."""
        if self.managed.role != VmRole.MIGRATED:  # (a restarted daemon may find it so)
            self.managed.migrated_away(serves_disk=self.plan.serves_after_switchover)
        if self.net is not None:  # until the network has learned the guest's new place
            heard_at = self.committed_at or time.time()  # (read back after a restart)
            await self.past_switchover(self.net.finish(self.peer, committed.steps, heard_at),
                                       "the NICs' hand-over", *NET_MEASURES)  # fmt: skip
        await self.plan.until_released(self)
        self.mark(Step.RELEASED)
        source_done = await self._completions()
        with contextlib.suppress(PeerError, StateError):  # QEMU's final figures
            done = await self.managed.vm.migration_outcome()
        # The old instance: inert since the switchover (its disk flushed and inactivated).
        # After a fence its NBD client would wait out reconnect-delay on quit: kill it.
        vm = self.managed.vm
        await (vm.kill() if self.plan.moves_disk else vm.stop())
        allocated = (
            sum(allocated_bytes(i) for i in self.managed.images.values())
            if self.plan.moves_disk
            else 0
        )
        await self.forward(self._release, what=f"the release of VM {self.managed.name} here")
        self.mark(Step.SOURCE_CLEANED)
        await finish_report(self, committed, done, source_done, allocated)

    async def past_switchover(self, step: Awaitable[Any], what: str, *figures: str) -> None:
        """A step past the switchover that the guest does not need (a figure, the NICs'
        hand-over once the destination announced the guest): its failure (an agent that
        died, restarted by its supervisor) is logged and said in the report, as the
        figures it would have given; the migration goes on."""
        try:
            await step
        except DevagentError as err:
            self.log.warning("migration %s: %s failed: %s", self.id, what, err)
            self.report.mark_missing(f"{what} failed: {err}", *figures)

    async def _completions(self) -> dict[str, list[float]] | None:
        """The source agents' completions by disk (for the largest I/O gaps); None when an
        agent cannot say (one that died and was restarted has a new journal)."""
        try:
            return await self.managed.completions_by_disk(self.started_at - BASELINE_S)
        except DevagentError as err:
            self.log.warning("migration %s: the source's completions: %s", self.id, err)
            return None

    async def _release(self) -> None:
        """Remove what is left of the VM here; a removal that got part-way before it failed
        has taken the VM out of the host's table already, and is done when tried again."""
        try:
            await self.host.release(self.managed.name, self.plan.moves_disk)
        except NotFound:
            self.log.info("VM %s was removed here already", self.managed.name)

    async def roll_back(self, cause: BaseException) -> None:
        """Before the switchover: keep the VM on the source, leave nothing on the
        destination."""
        self.log.warning("rolling back migration %s: %s", self.id, cause)
        await self.undo_source()
        if self._peer is not None:
            remove = self.remove_incoming()
            await self.surely(remove, f"removing the incoming VM on {self.report.destination}")
        self.settle()

    async def undo_source(self, *, unknown: bool = False) -> None:
        """The source's half of a roll-back: the plan's disk work undone (a push or mirror
        stopped, a fence lifted), QEMU's migration cancelled, the NICs' frames delivered,
        the guest running again. ``unknown``: after a daemon restart nothing says what the
        NICs' agents hold or forward, so all of it is undone."""
        vm = self.managed.vm
        if self.plan.cancels_ram_first:  # QEMU's own jobs end once its migration has
            await self.quietly(vm.qmp("migrate_cancel"))
            await self.plan.roll_back(self)
        else:  # no guest write may go on towards the destination once the guest runs again
            await self.plan.roll_back(self)
            await self.quietly(vm.qmp("migrate_cancel"))
        if self.net is not None:  # the guest stays here: what was held for it is delivered
            await self.net.roll_back(unknown=unknown)
        await self.surely(self._resume_source(), "resuming the guest on the source")

    async def remove_incoming(self) -> None:
        """The destination removes its incoming VM (one it no longer has is removed)."""
        try:
            await self.peer.delete(f"/v1/incoming/{self.managed.name}")
        except NotFound:
            self.log.info("no incoming VM %s on %s", self.managed.name, self.report.destination)

    async def _resume_source(self) -> None:
        """Run the guest here again if the migration had stopped it."""
        vm = self.managed.vm

        async def status() -> str | None:  # None while QEMU is still finishing the migration
            now = str((await vm.qmp("query-status"))["status"])
            return None if now == "finish-migrate" else now

        try:
            now = await wait_until(status, timeout=10.0, interval=0.05,
                                   what="QEMU to leave finish-migrate")  # fmt: skip
        except WaitTimeout:
            now = "finish-migrate"
        if now in ("paused", "postmigrate", "finish-migrate"):
            await vm.qmp("cont")


def allocated_bytes(path: Path) -> int:
    """Bytes a (sparse) image really holds."""
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0
