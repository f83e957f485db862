"""devagent's four strategies as plans: each says what its disk does at each step of a
migration, and :class:`~devagent.daemon.migration.job.MigrationJob` calls those steps in one
order for all of them (QEMU's own three are in :mod:`.qemu_plans`).

=========  ==================  ==========================  ===========================
plan       before RAM          at the switchover           after the commit
=========  ==================  ==========================  ===========================
shared     (flush)             —                           —
postcopy   (flush)             fence                       fetch the rest, then release
precopy    mirror, converge,   cut the mirror over, fence  release (the replica is whole)
           write-through
hybrid     push at a share     stop the push, fence,       fetch what the push left
           of the link         hand its bitmap over
=========  ==================  ==========================  ===========================

The destination's QEMU reads through the source's agent until the switchover (it reads a
qcow2 header at launch, say); a push lands in a receiver agent beside it.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from typing import ClassVar

from devagent.agent.defaults import COPY_BATCH, COPY_WORKERS, FETCH_CHUNK
from devagent.agent.messages import FetchStatus, LocalStatus, MirrorRequest, MirrorStatus
from devagent.api_types import Devices, DiskRow
from devagent.daemon.migration.context import JobView
from devagent.daemon.migration.messages import (
    CommitAnswer,
    CommitRequest,
    FetchPlan,
    IncomingAnswer,
    IncomingRequest,
    NbdAddress,
    RemoteDisk,
)
from devagent.daemon.nics import NicIdentity
from devagent.errors import PeerError, UsageError
from devagent.vocab import Step, Strategy
from devagent.wait import WaitTimeout, wait_until
from devagent.wire import from_peer, to_json

PRECOPY_CONVERGE_BYTES = 1 << 20  # what pre-copy leaves for the switchover
#: Passes a pre-copy mirror makes before it goes write-through anyway (a guest that dirties
#: faster than the link copies would never leave 1 MiB behind).
PRECOPY_PASSES = 8
#: Hybrid: the share of a known link rate the disk push may take while RAM migrates (the
#: RAM decides the switchover; what the push leaves is fetched after it).
HYBRID_PUSH_SHARE = 0.25
#: Hybrid push: copies in flight and bytes per copy. Stopping the push at the switchover
#: waits for the copies in flight (nothing may land after it): 2 x 256 KiB is 4 ms at 1 Gbit/s.
HYBRID_PUSH_PARALLEL = 2
HYBRID_PUSH_COPY = 256 << 10
COPY_BATCH_MAX = COPY_BATCH  # the most a background copy asks (the Fetch backend's default)
COPY_AHEAD_S = 0.02  # how much link time the copier keeps in flight per worker
DISK_WAIT_S = 600.0  # a mirror's convergence
DISK_STALL_S = 600.0  # a replica that stops growing for this long never completes
POLL_S = 0.1


@dataclass(frozen=True)
class Prepared:
    """The destination, ready: where RAM goes, and where a push or mirror lands."""

    uri: str
    push_target: RemoteDisk | None = None  # devagent's push (the receiver agent)
    nbd: NbdAddress | None = None  # a QEMU mirror's target export
    nic_peers: dict[str, str] | None = None


@dataclass(frozen=True)
class Handover:
    """What the source's disk hands the destination at the switchover."""

    present: str = ""  # base64 bits of the chunks the push landed
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

    def ram_bandwidth(self, job: JobView) -> int:
        """Bytes per second QEMU's RAM migration may take."""
        return (job.request.link_rate_bps or 8 << 33) // 8

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
        require_one_disk(job, self.strategy)
        if not vm.agents:
            raise UsageError(
                f"VM {vm.name} runs without a device agent: only 'shared' storage can migrate it"
            )
        if vm.request.disk_from is not None:
            raise UsageError(
                f"VM {vm.name}'s disk lives on another host: migrate it with 'shared' "
                "(the disk stays where it is)"
            )

    def incoming(self, job: JobView) -> IncomingRequest:
        """What the destination makes: the same image when the disk stays (both hosts see
        it), or a replica reading through to the source's disk, with a receiver for a push."""
        vm = job.managed
        return IncomingRequest(
            request=vm.request,
            config=vm.config,
            image=None if self.moves_disk else str(vm.image),
            backend=job.source_disk,
            size=job.disk_size,
            receive=self.strategy in (Strategy.PRECOPY, Strategy.HYBRID),
            nics=[NicIdentity(node=n.node, address=n.address, mac=n.mac) for n in vm.nics],
        )

    async def prepare(self, job: JobView) -> Prepared:
        if self.moves_disk:
            agent = job.managed.agents[0]
            if agent.tcp_address is None:
                raise PeerError(f"the agent of VM {job.managed.name} serves no peer on TCP")
            job.source_disk = RemoteDisk(address=agent.tcp_address, export=agent.export)
            job.disk_size = (await agent.status()).size
        raw = await job.peer.post("/v1/incoming", to_json(self.incoming(job)))
        answer = from_peer(raw, IncomingAnswer, what="the destination's answer")
        target = None
        if answer.disk_address is not None and answer.disk_export is not None:
            target = RemoteDisk(address=answer.disk_address, export=answer.disk_export)
        return Prepared(uri=answer.uri, push_target=target, nic_peers=answer.nic_peers)

    async def before_ram(self, job: JobView, prepared: Prepared) -> None:
        for agent in job.managed.agents:  # leave the switchover's own flush little to do
            await agent.flush(timeout=DISK_WAIT_S)

    def commit_request(self, job: JobView, handover: Handover | None) -> CommitRequest:
        return CommitRequest()

    async def commit(self, job: JobView, handover: Handover | None) -> CommitAnswer:
        body = to_json(self.commit_request(job, handover))
        raw = await job.peer.post(f"/v1/incoming/{job.managed.name}/commit", body)
        return from_peer(raw, CommitAnswer, what="the destination's commit")

    async def fence(self, job: JobView) -> None:
        if self.moves_disk:
            await job.managed.agents[0].fence()
            job.mark(Step.SOURCE_FENCED)

    async def roll_back(self, job: JobView) -> None:
        """A disk mirror to the destination stops; a fence is lifted (one there can be only
        when a restarted daemon rolls back: the destination never ran the guest, so the
        VM here is still the only writer)."""
        for agent in job.managed.agents:
            await job.quietly(agent.cancel_mirror())
        if self.moves_disk:
            await job.quietly(job.managed.agents[0].unfence())


class SharedPlan(AgentPlan):
    """Both hosts see one image: only RAM moves."""

    strategy = Strategy.SHARED
    moves_disk = False

    def check(self, job: JobView) -> None:
        require_one_disk(job, self.strategy)
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
    """The destination fetches what it lacks after the switchover (postcopy, hybrid)."""

    serves_after_switchover = True

    def commit_request(self, job: JobView, handover: Handover | None) -> CommitRequest:
        assert job.source_disk is not None
        chunk = handover.chunk_size if handover is not None else FETCH_CHUNK
        fetch = FetchPlan(
            remote=job.source_disk,
            chunk_size=chunk,
            present=handover.present if handover is not None else "",
            copy_batch=copy_batch(job.request.link_rate_bps, chunk),
        )
        return CommitRequest(fetch=fetch)

    async def until_released(self, job: JobView) -> None:
        """Wait until the destination's replica is complete and served as Local: as long as
        it grows (a slow link's tail takes what it takes), and :data:`DISK_STALL_S` at most
        without progress."""
        progress = _Progress()
        while not await self._disk_local(job, progress):
            if progress.stalled_for() > DISK_STALL_S:
                why = f": it has no room ({progress.spilling})" if progress.spilling else ""
                raise WaitTimeout(
                    f"VM {job.managed.name}'s replica on {job.report.destination}",
                    DISK_STALL_S, f"no progress past {progress.present} bytes{why}; the VM "
                    f"runs there on this host's disk, which stays served",
                )  # fmt: skip
            await asyncio.sleep(POLL_S)
        job.mark(Step.DISK_LOCAL)

    async def _disk_local(self, job: JobView, progress: _Progress) -> bool:
        try:
            answer = await job.peer.get(f"/v1/vms/{job.managed.name}/devices")
        except PeerError as err:  # the destination's daemon restarts, say: ask again
            job.log.warning("waiting for the disk on %s: %s", job.report.destination, err)
            return False
        devices = from_peer(answer, Devices, what="the destination's devices").devices
        device = next((d for d in devices if isinstance(d, DiskRow)), None)
        if device is None:
            raise PeerError(f"VM {job.managed.name} has no disk on {job.report.destination}")
        backend = device.agent.backend_status if device.agent is not None else None
        fetch = backend if isinstance(backend, FetchStatus) else device.last_fetch
        if fetch is not None:
            if fetch.spilling is not None and progress.spilling is None:
                job.log.warning(
                    "VM %s's replica on %s has no room (%s): the VM runs there on this "
                    "host's disk by remote access, and the migration waits for room",
                    job.managed.name, job.report.destination, fetch.spilling,
                )  # fmt: skip
            progress.spilling = fetch.spilling
            progress.saw(fetch.present_bytes)
            job.disk_progress(fetch.present_bytes, fetch.size - fetch.present_bytes)
            job.progress.disk_bytes_moved = (
                fetch.fetched_on_demand_bytes + fetch.fetched_in_background_bytes
            )
        return isinstance(backend, LocalStatus)


class _Progress:
    """How far a replica got, and since when it has not grown."""

    def __init__(self) -> None:
        self.present = -1
        self.since = time.monotonic()
        self.spilling: str | None = None  # why the replica takes no writes, while it does not

    def saw(self, present: int) -> None:
        if present > self.present:
            self.present, self.since = present, time.monotonic()

    def stalled_for(self) -> float:
        return time.monotonic() - self.since


class PostcopyPlan(FetchingPlan):
    strategy = Strategy.POSTCOPY


class PrecopyPlan(AgentPlan):
    strategy = Strategy.PRECOPY

    async def before_ram(self, job: JobView, prepared: Prepared) -> None:
        assert prepared.push_target is not None
        mirror = MirrorRequest(
            target=prepared.push_target.spec(),
            converge_bytes=PRECOPY_CONVERGE_BYTES,
            active=True,  # converged, writes go to both copies
            max_passes=PRECOPY_PASSES,
        )
        await job.managed.agents[0].mirror(mirror)
        job.mark(Step.MIRROR_STARTED)
        await wait_until(
            lambda: self._converged(job), timeout=DISK_WAIT_S, interval=POLL_S,
            what=f"the disk mirror of VM {job.managed.name} to converge",
        )  # fmt: skip
        job.mark(Step.DISK_CONVERGED)
        await super().before_ram(job, prepared)

    async def _converged(self, job: JobView) -> bool:
        mirror = (await job.managed.agents[0].status()).backend_status
        if not isinstance(mirror, MirrorStatus):
            raise PeerError(f"the disk mirror ended: the agent serves {type(mirror).__name__}")
        job.disk_progress(mirror.copied_bytes, mirror.dirty_bytes)
        if mirror.state == "failed":
            raise PeerError(f"the disk mirror failed: {mirror.error}")
        return mirror.state in ("converged", "finished")

    async def at_switchover(self, job: JobView) -> Handover:
        cut = await job.managed.agents[0].cutover(keep_source=True, timeout=DISK_WAIT_S)
        job.mark(Step.MIRROR_ENDED)
        pushed = cut.mirror.copied_bytes
        job.progress.disk_bytes_pushed = pushed
        return Handover()

    def commit_request(self, job: JobView, handover: Handover | None) -> CommitRequest:
        return CommitRequest(local=True)


class HybridPlan(FetchingPlan):
    strategy = Strategy.HYBRID

    def push_rate(self, job: JobView) -> float:
        """Bytes per second the push may take while RAM migrates."""
        return (job.request.link_rate_bps or 0) / 8 * HYBRID_PUSH_SHARE

    def ram_bandwidth(self, job: JobView) -> int:
        if not job.request.link_rate_bps:
            return super().ram_bandwidth(job)
        return max(1, int(job.request.link_rate_bps / 8 - self.push_rate(job)))

    async def before_ram(self, job: JobView, prepared: Prepared) -> None:
        assert prepared.push_target is not None
        limited = bool(job.request.link_rate_bps) and HYBRID_PUSH_SHARE < 1
        mirror = MirrorRequest(  # small copies: the switchover waits for those in flight
            target=prepared.push_target.spec(),
            parallel=HYBRID_PUSH_PARALLEL,
            max_copy=HYBRID_PUSH_COPY,
            rate_limit=self.push_rate(job) if limited else None,
        )
        await job.managed.agents[0].mirror(mirror)
        job.mark(Step.MIRROR_STARTED)
        await super().before_ram(job, prepared)

    async def at_switchover(self, job: JobView) -> Handover:
        stopped = await job.managed.agents[0].stop_mirror()
        job.mark(Step.MIRROR_ENDED)
        pushed = stopped.mirror.copied_bytes
        job.progress.disk_bytes_pushed = pushed
        return Handover(
            present=clean_chunks(stopped.dirty, stopped.chunks),
            chunk_size=stopped.chunk_size,
        )


def clean_chunks(dirty_b64: str, chunks: int) -> str:
    """The chunks a stopped mirror's target holds (not dirty), as base64 bits."""
    dirty = base64.b64decode(dirty_b64)
    clean = bytearray(~b & 0xFF for b in dirty)
    if chunks % 8:
        clean[-1] &= (1 << (chunks % 8)) - 1
    return base64.b64encode(bytes(clean)).decode()


def copy_batch(link_rate_bps: int | None, chunk_size: int) -> int:
    """Bytes per background copy request after the switchover: what the link moves in
    ``COPY_AHEAD_S`` for each copy worker, so that a guest read fetched on demand waits
    behind little of the copier's data (at 100 Mbit/s: 128 KiB, not 1 MiB)."""
    if not link_rate_bps:
        return COPY_BATCH_MAX
    wanted = int(link_rate_bps / 8 * COPY_AHEAD_S / COPY_WORKERS)
    batch = chunk_size
    while batch * 2 <= min(wanted, COPY_BATCH_MAX):
        batch *= 2
    return batch
