"""devagent's four strategies as plans: each says what its disk does at each step of a
migration, and :class:`~devagent.daemon.migration.job.MigrationJob` calls those steps in one
order for all of them (``precopy`` and ``hybrid``, which push the disk, are in
:mod:`.pushing`; QEMU's own three in :mod:`.qemu_plans`).

=========  ==================  ==========================  ===========================
plan       before RAM          at the switchover           after the commit
=========  ==================  ==========================  ===========================
shared     —                   —                           —
postcopy   —                   fence                       fetch the rest, let go, release
precopy    mirror, converge,   cut the mirror over, fence  let go (the replica is whole),
           write-through                                   release
hybrid     push at a share     stop the push, fence,       fetch what the push left, let
           of the link         hand its bitmap over        go, release
=========  ==================  ==========================  ===========================

"Let go" (:meth:`FetchingPlan._settle`): until then each replica on the destination is a
Fetch of this host's disk, its fallback (a replica with no room spills to it, one whose
space went read-only keeps its disk here); from then on it is the VM's only disk.

A VM's disks move as one set: each step acts on every disk at once (in parallel), a
migration waits for the slowest, and a failure of any one rolls all of them back. The
destination's QEMU reads through the source's agents until the switchover (it reads a
qcow2 header at launch, say); a push lands in a receiver agent beside each disk's.

The link is split so: a hybrid push takes what RAM leaves of it while RAM migrates
(:mod:`.share`), shared among the disks by their size (so that each is as far along);
after the switchover the disks' fetches share the link, each copying in batches sized for
its share (:func:`.share.copy_batch`).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import msgspec

from devagent.agent.defaults import FETCH_CHUNK
from devagent.agent.messages import FenceAnswer, FetchStatus, LocalStatus
from devagent.api_types import Devices, DiskRow
from devagent.daemon.migration.context import DiskAgentLink, DiskJob, JobView, ReplicaProgress
from devagent.daemon.migration.messages import (
    CommitAnswer,
    CommitRequest,
    FetchPlan,
    IncomingAnswer,
    IncomingDisk,
    IncomingRequest,
    NbdAddress,
    ReceiversAnswer,
    ReceiversRequest,
    RemoteDisk,
)
from devagent.daemon.migration.share import copy_batch, disk_link_rate, pushes_early
from devagent.daemon.nics import NicIdentity
from devagent.errors import DevagentError, PeerError, UsageError
from devagent.vocab import Step, Strategy
from devagent.wait import WaitTimeout, all_of
from devagent.wire import from_peer, to_json

DISK_WAIT_S = 600.0  # a mirror's convergence
DISK_STALL_S = 600.0  # a replica that stops growing for this long never completes
POLL_S = 0.1
#: A replica spilling for this reason never gets room again by itself (a filesystem that
#: went read-only on an error stays so until an operator acts).
READ_ONLY = os.strerror(errno.EROFS)
T = TypeVar("T")
log = logging.getLogger(__name__)


async def each_disk(job: DiskJob, step: Callable[[DiskAgentLink], Awaitable[T]]) -> dict[str, T]:
    """``step`` on every disk's agent at once; its answers by node. All of them run to their
    end (none is left half-done behind another's failure); then the first failure is
    raised."""
    agents = list(job.managed.agents)
    done = await all_of(*(step(a) for a in agents))
    return {agent.node: answer for agent, answer in zip(agents, done, strict=True)}


@dataclass(frozen=True)
class Prepared:
    """The destination, ready: where RAM goes, and where a push or mirror lands."""

    uri: str
    #: devagent's push of each disk (its receiver agent), by node.
    push_targets: dict[str, RemoteDisk] = field(default_factory=dict)
    nbd: NbdAddress | None = None  # a QEMU mirror's target export
    nic_peers: dict[str, str] | None = None
    #: Set when the destination answered once the push's receivers served and its NICs
    #: were up, its QEMU still starting (an ``early`` prepare; ``uri`` empty): waits until
    #: that QEMU listens for RAM, and says where RAM goes.
    until_listening: Callable[[], Awaitable[str]] | None = None
    #: Set where the prepare made no receivers (a push that may begin once RAM moves):
    #: asks the destination for them; where each disk's push goes, or None if it starts
    #: none (no push then).
    receivers_later: Callable[[], Awaitable[dict[str, RemoteDisk] | None]] | None = None

    async def targets(self) -> dict[str, RemoteDisk] | None:
        """Where each disk's push goes: its receiver, started at the prepare or now (None:
        the destination started none, see :attr:`receivers_later`)."""
        if self.receivers_later is None:
            return self.push_targets
        return await self.receivers_later()

    async def listening(self) -> str:
        """Until the destination's QEMU listens for RAM (a start that failed there raised):
        where RAM goes."""
        return self.uri if self.until_listening is None else await self.until_listening()


@dataclass(frozen=True)
class Handover:
    """What the source's disks hand the destination at the switchover."""

    #: By node: base64 bits of the chunks the push landed.
    present: dict[str, str] = field(default_factory=dict)
    chunk_size: int = FETCH_CHUNK


class Plan:
    """One strategy's disk steps. The base moves nothing (RAM only, a shared disk)."""

    strategy: ClassVar[Strategy]
    moves_disk: ClassVar[bool] = True
    #: QEMU pauses before the switchover for :meth:`at_pre_switchover`.
    pauses_before_switchover: ClassVar[bool] = False
    #: A roll-back cancels QEMU's migration before the plan's own steps (QEMU's block jobs),
    #: or after them (devagent's mirror stops first: no write goes on towards the
    #: destination once QEMU runs the guest again).
    cancels_ram_first: ClassVar[bool] = False
    #: The source still serves the disk to the destination after the switchover.
    serves_after_switchover: ClassVar[bool] = False
    #: ...and its QEMU is what serves it (QEMU's own NBD export): it stops only once the
    #: destination no longer needs it.
    source_qemu_serves: ClassVar[bool] = False

    def check(self, job: JobView) -> None:
        """Refuse a VM this strategy cannot move (:class:`UsageError`), before anything."""

    async def prepare(self, job: JobView) -> Prepared:
        raise NotImplementedError

    async def before_ram(self, job: JobView, prepared: Prepared) -> None:
        """The disk's work while the guest runs on the source only."""

    def ram_bandwidth(self, job: DiskJob) -> int:
        """Bytes per second QEMU's RAM migration may take."""
        return (job.request.link_rate_bps or 8 << 33) // 8

    def ram_active(self, job: DiskJob) -> None:
        """QEMU's RAM migration left its setup (and the guest its stall at RAM's start)."""

    def check_beside_ram(self) -> None:
        """Raise the failure of the plan's work beside RAM (the disks' flush), if it ended
        so: the migration rolls back without waiting for RAM to complete."""

    async def at_pre_switchover(self, job: JobView) -> None:
        """The guest stopped and its disk drained; QEMU waits for this before it goes on."""

    async def at_switchover(self, job: JobView) -> Handover | None:
        """RAM completed (the guest stopped for good here): end the disk's work on the source."""
        return None

    async def fence(self, job: JobView) -> None:
        """One writer: the instance here may never write the disk again."""

    async def commit(self, job: JobView, handover: Handover | None) -> CommitAnswer:
        raise NotImplementedError

    async def until_released(self, job: JobView) -> None:
        """Wait until the source holds nothing the destination still needs."""

    async def roll_back(self, job: JobView) -> None:
        """Before the switchover: undo this plan's disk work on the source."""

    def disk_bytes_moved(self, job: JobView) -> int | None:
        return (job.progress.disk_bytes_moved or 0) + (job.progress.disk_bytes_pushed or 0)


def _listening(job: JobView) -> Callable[[], Awaitable[str]]:
    """The wait for an early-prepared destination's QEMU: asked of it once; RAM's URI."""
    heard: list[str] = []

    async def until_listening() -> str:
        if not heard:
            raw = await job.peer.post(f"/v1/incoming/{job.managed.name}/listening")
            answer = from_peer(raw, IncomingAnswer, what="the destination's start")
            heard.append(answer.uri)
            job.mark(Step.DESTINATION_READY)
        return heard[0]

    return until_listening


def _receivers_later(job: JobView) -> Callable[[], Awaitable[dict[str, RemoteDisk] | None]]:
    """The ask for receivers once a push begins beside RAM (``POST
    /v1/incoming/NAME/receivers``). A destination that answers with an error (one of the
    version before the route: 404, or 403 where TLS checks the route) gets no push: it is
    never needed, every chunk is fetched after the switchover instead."""

    async def ask() -> dict[str, RemoteDisk] | None:
        try:
            raw = await job.peer.post(
                f"/v1/incoming/{job.managed.name}/receivers",
                to_json(ReceiversRequest(nodes=list(job.disk_sizes))),
            )
            answer = from_peer(raw, ReceiversAnswer, what="the destination's receivers")
        except DevagentError as err:
            job.log.warning("VM %s: no push beside RAM, %s started no receivers for it: %s",
                            job.managed.name, job.report.destination, err)  # fmt: skip
            return None
        job.mark(Step.RECEIVERS_STARTED)
        return answer.disk_targets

    return ask


def require_one_disk(job: JobView, strategy: Strategy) -> None:
    """Refuse a VM of several disks (:class:`UsageError`): a migration moves one disk."""
    disks = len(job.managed.images)
    if disks > 1:
        raise UsageError(
            f"VM {job.managed.name} has {disks} disks: '{strategy}' migrates a VM of one disk "
            "(moving several disks as one set is not built yet)"
        )


class AgentPlan(Plan):
    """devagent's strategies: the disk goes through the VM's device agent."""

    def check(self, job: JobView) -> None:
        vm = job.managed
        if not vm.agents:
            raise UsageError(
                f"VM {vm.name} runs without a device agent: only 'shared' storage can migrate it"
            )
        remote = vm.request.remote_disks()
        if remote:
            raise UsageError(
                f"VM {vm.name}'s {', '.join(remote)} lives on another host: bring it home "
                "first (devagent device swap VM NODE --to PATH), then migrate"
            )

    def receives(self, job: JobView) -> bool:
        """Whether the destination's prepare starts a receiver for each disk (a push's or
        a mirror's target)."""
        return False

    def incoming(self, job: JobView) -> IncomingRequest:
        """What the destination makes for each disk: the same image when the disk stays
        (both hosts see it), or a replica reading through to the source's disk, with a
        receiver for a push."""
        vm = job.managed
        receive = self.receives(job)
        if self.moves_disk:
            disks = [
                IncomingDisk(node=node, size=size, backend=job.source_disks[node], receive=receive)
                for node, size in job.disk_sizes.items()
            ]
        else:
            disks = [IncomingDisk(node=node, image=str(image)) for node, image in vm.images.items()]
        return IncomingRequest(
            request=vm.request,
            config=vm.config,
            disks=disks,
            nics=[NicIdentity(node=n.node, address=n.address, mac=n.mac) for n in vm.nics],
            source=job.host.name,
            # precopy's mirror starts while QEMU starts there (RAM waits for it to converge
            # anyway); hybrid's push only on a slow link: on a fast one, beside the
            # destination's start, it delayed that QEMU, and RAM with it
            # (docs/BENCHMARKS.md, the push while QEMU starts)
            early=self.moves_disk
            and (
                self.strategy is Strategy.PRECOPY
                or (self.strategy is Strategy.HYBRID and pushes_early(job.request.link_rate_bps))
            ),
        )

    async def prepare(self, job: JobView) -> Prepared:
        if self.moves_disk:
            sizes = await each_disk(job, self._size)
            job.disk_sizes = sizes
            job.source_disks = {
                a.node: RemoteDisk(address=a.tcp_address or "", export=a.export, host=job.host.name)
                for a in job.managed.agents
            }
        incoming = self.incoming(job)
        try:
            raw = await job.peer.post("/v1/incoming", to_json(incoming))
        except UsageError as err:  # a destination that knows no early answer: as before it
            if not incoming.early or "early" not in str(err):
                raise
            older = msgspec.structs.replace(incoming, early=False)
            raw = await job.peer.post("/v1/incoming", to_json(older))
        answer = from_peer(raw, IncomingAnswer, what="the destination's answer")
        later = self.strategy is Strategy.HYBRID and not any(d.receive for d in incoming.disks)
        return Prepared(
            uri=answer.uri, push_targets=answer.disk_targets, nic_peers=answer.nic_peers,
            until_listening=None if answer.listening else _listening(job),
            receivers_later=_receivers_later(job) if later else None,
        )  # fmt: skip

    @staticmethod
    async def _size(agent: DiskAgentLink) -> int:
        if agent.tcp_address is None:
            raise PeerError(f"the agent of {agent.node} serves no peer on TCP")
        return (await agent.status()).size

    early_flush: asyncio.Task[None] | None = None
    fenced: dict[str, FenceAnswer] | None = None  # by node, once fenced

    async def before_ram(self, job: DiskJob, prepared: Prepared) -> None:
        """Nothing: RAM starts at once (the disks' flush waits for it: :meth:`ram_active`)."""

    def ram_active(self, job: DiskJob) -> None:
        """Each disk flushed once RAM moves, so that the switchover's own flush (QEMU's, as
        it stops the guest) has little left to do. Neither RAM's start waits for it nor
        does it add to the guest's stall as RAM starts (QEMU's first dirty-page sync); its
        failure rolls back at RAM's next look (:meth:`check_beside_ram`), and the
        switchover cancels it if it still runs."""
        if self.early_flush is None:
            self.early_flush = asyncio.create_task(_flush_each(job))

    def check_beside_ram(self) -> None:
        raise_failure(self.early_flush)

    async def at_switchover(self, job: DiskJob) -> Handover | None:
        await self.end_early_flush()
        return None

    def commit_request(self, job: DiskJob, handover: Handover | None) -> CommitRequest:
        return CommitRequest()

    async def commit(self, job: JobView, handover: Handover | None) -> CommitAnswer:
        body = to_json(self.commit_request(job, handover))
        raw = await job.peer.post(f"/v1/incoming/{job.managed.name}/commit", body)
        return from_peer(raw, CommitAnswer, what="the destination's commit")

    async def fence(self, job: DiskJob) -> None:
        """Each disk fenced; what each answered (its holes) kept for the commit."""
        if self.moves_disk:
            self.fenced = await each_disk(job, lambda agent: agent.fence())
            job.mark(Step.SOURCE_FENCED)

    async def roll_back(self, job: JobView) -> None:
        """Each disk's mirror to the destination stops; a fence is lifted (one there can be
        only when a restarted daemon rolls back: the destination never ran the guest, so
        the VM here is still the only writer)."""
        await self.end_early_flush(cancel=True)
        for agent in job.managed.agents:
            await job.quietly(agent.cancel_mirror())
        if self.moves_disk:
            for agent in job.managed.agents:
                await job.quietly(agent.unfence())

    async def end_early_flush(self, *, cancel: bool = False) -> None:
        """The flush begun as RAM moved, ended: its failure raised (a roll-back), or it is
        cancelled if it still runs (the guest is stopped, QEMU flushed as it stopped it),
        or whatever its state with ``cancel`` (a roll-back's)."""
        flushing, self.early_flush = self.early_flush, None
        if flushing is None:
            return
        if flushing.done() and not cancel:
            return flushing.result()  # its failure raised
        flushing.cancel()
        await asyncio.wait([flushing])
        if not flushing.cancelled():
            flushing.exception()  # taken (said by _flush_each)


class SharedPlan(AgentPlan):
    """Both hosts see one image: only RAM moves."""

    strategy = Strategy.SHARED
    moves_disk = False

    def check(self, job: JobView) -> None:
        vm, shared = job.managed, job.host.shared_dir
        in_shared = shared is not None and all(i.is_relative_to(shared) for i in vm.images.values())
        if not in_shared and not vm.request.own_images:
            raise UsageError(
                f"VM {vm.name}'s disk is local to host {job.host.name}: the 'shared' strategy "
                "needs a disk both hosts see (vm start --storage shared)"
            )

    def disk_bytes_moved(self, job: JobView) -> int | None:
        return 0


class FetchingPlan(AgentPlan):
    """After the switchover the destination serves each replica as a Fetch of this host's
    disk, fetching what it lacks (postcopy, hybrid; precopy's lacks nothing), until this
    host lets it go."""

    serves_after_switchover = True

    def commit_request(self, job: DiskJob, handover: Handover | None) -> CommitRequest:
        chunk = handover.chunk_size if handover is not None else FETCH_CHUNK
        present = handover.present if handover is not None else {}
        share = disk_link_rate(job)
        fenced = self.fenced or {}
        fetches = {
            node: FetchPlan(
                remote=source,
                chunk_size=chunk,
                present=present.get(node, ""),
                copy_batch=copy_batch(share, chunk),
                zeroes=_zeroes(fenced.get(node), chunk),
            )
            for node, source in job.source_disks.items()
        }
        return CommitRequest(fetches=fetches)

    async def until_released(self, job: JobView) -> None:
        """Wait until every replica on the destination is complete, then let each go (it
        is served as Local there: :meth:`_settle`): as long as they grow (a slow link's tail
        takes what it takes), and :data:`DISK_STALL_S` at most without progress. A replica
        whose space went read-only can never be: that disk is kept here (:meth:`keep`)."""
        progress = ReplicaProgress()
        while not await self._disk_local(job, progress):
            if progress.unwritable:
                await self.keep(job, progress.unwritable)
                progress.unwritable.clear()
                continue
            if progress.stalled_for() > DISK_STALL_S:
                why = f": it has no room ({progress.spilling})" if progress.spilling else ""
                why = why or (f": {progress.refused}" if progress.refused else "")
                raise WaitTimeout(
                    f"VM {job.managed.name}'s replicas on {job.report.destination}",
                    DISK_STALL_S, f"no progress past {progress.present} bytes{why}; the VM "
                    f"runs there on this host's disks, which stay served",
                )  # fmt: skip
            await asyncio.sleep(progress.next_look_in(POLL_S))
        job.mark(Step.DISK_LOCAL)

    async def _disk_local(self, job: JobView, progress: ReplicaProgress) -> bool:
        try:
            answer = await job.peer.get(f"/v1/vms/{job.managed.name}/devices")
        except PeerError as err:  # the destination's daemon restarts, say: ask again
            job.log.warning("waiting for the disks on %s: %s", job.report.destination, err)
            progress.lost_sight()
            return False
        devices = from_peer(answer, Devices, what="the destination's devices").devices
        disks = {d.device: d for d in devices if isinstance(d, DiskRow)}
        nodes = job.managed.request.nodes()  # (a disk kept here is no longer in images)
        missing = [node for node in nodes if node not in disks]
        if missing:
            raise PeerError(
                f"VM {job.managed.name} has no {', '.join(missing)} on {job.report.destination}"
            )
        local, present, moved, spilling = True, 0, 0, None
        per_disk: dict[str, tuple[int, int]] = {}
        unsettled: dict[str, bool] = {}  # replicas not served as Local yet: whole?
        for node in nodes:
            device, row = disks[node], job.report.device(node, "disk")
            if row.kept_on is not None:  # it stays here: nothing to wait for
                continue
            backend = device.agent.backend_status if device.agent is not None else None
            if not isinstance(backend, LocalStatus):
                local = False
                unsettled[node] = (
                    isinstance(backend, FetchStatus) and backend.complete and not backend.spilling
                )
            elif row.local_after_s is None:
                row.local_after_s = round(time.time() - job.started_at, 3)
            fetch = backend if isinstance(backend, FetchStatus) else device.last_fetch
            if fetch is None:
                continue
            row.bytes_fetched = fetch.fetched_on_demand_bytes + fetch.fetched_in_background_bytes
            spilling = spilling or (f"{node}: {fetch.spilling}" if fetch.spilling else None)
            if fetch.spilling is not None and READ_ONLY in fetch.spilling:
                progress.unwritable[node] = fetch.spilling
            present += fetch.present_bytes
            per_disk[node] = (fetch.present_bytes, fetch.size - fetch.present_bytes)
            moved += fetch.fetched_on_demand_bytes + fetch.fetched_in_background_bytes
        if spilling is not None and progress.spilling is None:
            job.log.warning(
                "VM %s's replicas on %s have no room (%s): the VM runs there on this "
                "host's disks by remote access, and the migration waits for room",
                job.managed.name, job.report.destination, spilling,
            )  # fmt: skip
        progress.spilling = spilling
        progress.saw(present, missing=sum(missing for _, missing in per_disk.values()))
        job.disk_progress(per_disk)
        job.progress.disk_bytes_moved = moved
        if unsettled and all(unsettled.values()):
            return await self._settle(job, list(unsettled), progress)
        return local

    async def _settle(self, job: JobView, nodes: list[str], progress: ReplicaProgress) -> bool:
        """Every replica is complete: the destination serves each alone from now on (it
        checks, with the guest's I/O held, that each is whole and its space writable). This
        is the point of no return: the guest writes there only, this host's copy goes stale,
        and a space that fails there from now on fails the VM's only disk. Until every disk
        answers, the source's disks serve as before; one that refuses (it spills now, its
        agent restarts) is looked at again on the next poll."""
        name = job.managed.name

        async def settle(node: str) -> None:
            await job.peer.post(f"/v1/vms/{name}/devices/{node}/settle")
            row = job.report.device(node, "disk")
            row.local_after_s = row.local_after_s or round(time.time() - job.started_at, 3)

        done = await asyncio.gather(*(settle(n) for n in nodes), return_exceptions=True)
        refused = "; ".join(f"{n}: {e}" for n, e in zip(nodes, done, strict=True) if e is not None)
        if refused and refused != progress.refused:
            job.log.warning("VM %s's replicas on %s cannot be let go yet: %s",
                            name, job.report.destination, refused)  # fmt: skip
        progress.refused = refused or None
        return not refused

    async def keep(self, job: JobView, unwritable: dict[str, str]) -> None:
        """The destination's replica of each of these disks cannot be written (its space
        went read-only: it will not heal by itself). Each disk stays here instead, served
        as an export to the destination, whose agent hands back what its replica held and
        reads and writes it here (remote access); the VM's copy here is released all the
        same, and the report says where the disk is and how to bring it home."""
        keep_disk = job.host.keep_disk
        if keep_disk is None:
            raise PeerError("this host cannot keep a disk for another (no exports here)")
        name, dest = job.managed.name, job.report.destination
        for node, why in unwritable.items():
            home = await keep_disk(name, node)
            path, body = f"/v1/vms/{name}/devices/{node}/keep-remote", to_json(home)
            await job.forward(
                functools.partial(job.peer.post, path, body),
                what=f"handing {node} over to {dest} by remote access",
            )
            job.report.device(node, "disk").kept_on = job.host.name
            job.report.warnings.append(
                f"{node} stays on host {job.host.name} (export {home.export}), which VM "
                f"{name} on {dest} uses by remote access: its replica there cannot be "
                f"written ({why}). Once {dest} has a writable disks folder, bring it home: "
                f"devagent device swap {name} {node} --to PATH"
            )
            job.log.warning("migration %s: %s", job.id, job.report.warnings[-1])


class PostcopyPlan(FetchingPlan):
    strategy = Strategy.POSTCOPY


async def _flush_each(job: DiskJob) -> None:
    try:
        for agent in job.managed.agents:
            await agent.flush(timeout=DISK_WAIT_S)
    except DevagentError as err:  # said now: a roll-back does not wait for it
        log.warning("flushing the disks as RAM moved failed: %s", err)
        raise


def _zeroes(fenced: FenceAnswer | None, chunk_size: int) -> str:
    """The chunks a fenced disk reads as zeroes, if counted in ``chunk_size`` chunks."""
    return fenced.zeroes if fenced is not None and fenced.chunk_size == chunk_size else ""


def raise_failure(task: asyncio.Task[Any] | None) -> None:
    """``task``'s failure raised, if it ended with one."""
    if task is not None and task.done() and not task.cancelled():
        error = task.exception()
        if error is not None:
            raise error
