"""The two strategies that push each disk to a receiver on the destination before the
switchover (the plans' table: :mod:`.plans`):

``precopy``  a mirror makes each replica complete before RAM moves (started as soon as the
             destination's receivers serve, its QEMU still starting), then writes go to
             both copies until the switchover cuts it over;
``hybrid``   a push runs beside RAM on what RAM leaves of the link (:mod:`.share`): on a
             slow link it starts before RAM, on a fast one only once RAM leaves it room;
             the switchover stops it and hands the destination the bitmap of what it
             landed; the rest is fetched after.
"""

from __future__ import annotations

from collections.abc import Awaitable

from devagent.agent.defaults import COPY_WORKERS, FETCH_CHUNK, MIRROR_CHUNK
from devagent.agent.messages import MirrorRequest, MirrorStarted, MirrorStatus
from devagent.agent.presence import clean_chunks, every_chunk
from devagent.daemon.migration.context import DiskAgentLink, DiskJob, JobView
from devagent.daemon.migration.messages import RemoteDisk
from devagent.daemon.migration.plans import (
    DISK_WAIT_S,
    POLL_S,
    FetchingPlan,
    Handover,
    Prepared,
    each_disk,
    raise_failure,
)
from devagent.daemon.migration.share import (
    FIXED_SHARE,
    LinkShare,
    copy_batch,
    disk_link_rate,
    pushes_early,
)
from devagent.errors import PeerError
from devagent.vocab import Step, Strategy
from devagent.wait import wait_until

PRECOPY_CONVERGE_BYTES = 1 << 20  # what pre-copy leaves for the switchover
#: Passes a pre-copy mirror makes before it goes write-through anyway (a guest that dirties
#: faster than the link copies would never leave 1 MiB behind).
PRECOPY_PASSES = 8
#: Hybrid push: copies in flight and bytes per copy. Stopping the push at the switchover
#: waits for the copies in flight (nothing may land after it): 2 x 256 KiB is 4 ms at 1 Gbit/s.
HYBRID_PUSH_PARALLEL = 2
HYBRID_PUSH_COPY = 256 << 10


class PrecopyPlan(FetchingPlan):
    """The mirror makes each replica complete before RAM moves; it is served there as a
    Fetch with every chunk present (nothing left to fetch) until this host lets it go."""

    strategy = Strategy.PRECOPY

    def receives(self, job: JobView) -> bool:
        return True

    async def before_ram(self, job: DiskJob, prepared: Prepared) -> None:
        share = disk_link_rate(job)

        def mirror(agent: DiskAgentLink) -> Awaitable[MirrorStarted]:
            return agent.mirror(MirrorRequest(
                target=target_of(prepared.push_targets, agent.node).spec(),
                converge_bytes=PRECOPY_CONVERGE_BYTES,
                active=True,  # converged (or outrun), writes go to both copies
                max_passes=PRECOPY_PASSES,
                parallel=COPY_WORKERS,  # a guest write through waits behind little
                max_copy=copy_batch(share, MIRROR_CHUNK),
            ))  # fmt: skip

        await each_disk(job, mirror)
        job.mark(Step.MIRROR_STARTED)
        await prepared.listening()  # (long before the mirrors converge)
        await wait_until(
            lambda: self._converged(job), timeout=DISK_WAIT_S, interval=POLL_S,
            what=f"the disk mirrors of VM {job.managed.name} to converge",
        )  # fmt: skip
        job.mark(Step.DISK_CONVERGED)
        await super().before_ram(job, prepared)

    async def _converged(self, job: DiskJob) -> bool:
        """Every disk's mirror converged (a failed one fails them all)."""
        mirrors = await each_disk(job, _mirror_status)
        job.disk_progress({node: (m.copied_bytes, m.dirty_bytes) for node, m in mirrors.items()})
        for node, mirror in mirrors.items():
            if mirror.state == "failed":
                raise PeerError(f"the disk mirror of {node} failed: {mirror.error}")
            if mirror.writes_paced and Step.DISK_WRITES_PACED not in job.report.timeline:
                job.mark(Step.DISK_WRITES_PACED)  # the agent's log says which disk, and when
        return all(m.state in ("converged", "finished") for m in mirrors.values())

    async def at_switchover(self, job: DiskJob) -> Handover:
        await super().at_switchover(job)
        cut = await each_disk(job, lambda a: a.cutover(keep_source=True, timeout=DISK_WAIT_S))
        job.mark(Step.MIRROR_ENDED)
        pushed_bytes(job, {node: c.mirror.sent_bytes for node, c in cut.items()})
        return Handover(present={
            node: every_chunk(-(-size // FETCH_CHUNK)) for node, size in job.disk_sizes.items()
        })  # fmt: skip


class HybridPlan(FetchingPlan):
    """The disk pushed while RAM migrates, on what RAM leaves of the link
    (:mod:`.share`); what the push had not landed at the switchover is fetched after it."""

    strategy = Strategy.HYBRID
    share: LinkShare | None = None

    def receives(self, job: JobView) -> bool:
        return not receives_later(job)

    def ram_bandwidth(self, job: DiskJob) -> int:
        if not job.request.link_rate_bps or job.follows_ram:  # RAM first, the push adapts
            return super().ram_bandwidth(job)
        return max(1, int(job.request.link_rate_bps / 8 * (1 - FIXED_SHARE)))

    async def before_ram(self, job: DiskJob, prepared: Prepared) -> None:
        """On a slow link the push starts as soon as the destination's receivers serve,
        with the whole link while QEMU starts there (an early prepare,
        :func:`.share.pushes_early`). On a fast one it waits: beside that QEMU's start it
        delayed it 30-70 ms (the matrix of 2026-12-06), and beside RAM's start (each
        dialling the destination at once) RAM's phase grew by more than the push's start
        took; it begins once RAM leaves it room (:data:`.share.BEGIN_SHARE`), if ever (so
        too on a slow link whose destination did not answer early). Where the link's rate
        is not known, or RAM's not followed, it starts before RAM."""
        link = job.request.link_rate_bps
        share = LinkShare(job, link / 8, job.follows_ram) if link else None
        early = prepared.until_listening is not None
        waits = share is not None and share.follows_ram and not early  # for room beside RAM
        if share is not None and early:  # the link is the push's alone until QEMU listens
            share.rate = share.link  # there; then RAM first (its start's share)
        if not waits:
            await self._push(job, prepared.push_targets, share)
        self.share = share
        await prepared.listening()
        if share is not None:
            if early:
                await share.restart()
            share.start(begin=(lambda: self._begin(job, prepared, share)) if waits else None)
        await super().before_ram(job, prepared)

    async def _begin(self, job: DiskJob, prepared: Prepared, share: LinkShare) -> bool:
        """The push that waited for RAM to leave it room, started (its receivers asked for
        first, where the prepare made none); False if the destination started none."""
        targets = await prepared.targets()
        if targets is None:
            return False
        await self._push(job, targets, share)
        return True

    async def _push(
        self, job: DiskJob, targets: dict[str, RemoteDisk], share: LinkShare | None
    ) -> None:
        """Each disk's push started to its receiver in ``targets``, at its part of
        ``share``'s rate (unlimited without)."""

        def push(agent: DiskAgentLink) -> Awaitable[MirrorStarted]:
            return agent.mirror(MirrorRequest(  # small copies: the switchover waits for those
                target=target_of(targets, agent.node).spec(),  # in flight
                parallel=HYBRID_PUSH_PARALLEL,
                max_copy=HYBRID_PUSH_COPY,
                rate_limit=share.of(agent.node) if share is not None else None,
            ))  # fmt: skip

        await each_disk(job, push)
        job.mark(Step.MIRROR_STARTED)

    def check_beside_ram(self) -> None:
        super().check_beside_ram()
        if self.share is not None:
            raise_failure(self.share.begun)  # a push that began beside RAM and failed

    async def roll_back(self, job: JobView) -> None:
        if self.share is not None:
            await self.share.stop()
            begun = self.share.begun
            if begun is not None and not begun.cancelled():
                begun.exception()  # taken: the roll-back has its own cause to tell
        await super().roll_back(job)

    async def at_switchover(self, job: DiskJob) -> Handover:
        if self.share is not None:
            await self.share.stop()
            begun = self.share.begun
            if begun is not None and begun.cancelled():  # some disks' pushes may run
                raise PeerError(f"the push of VM {job.managed.name}'s disks was cancelled")
            raise_failure(begun)
        await super().at_switchover(job)
        if self.share is not None and not self.share.pushing:  # RAM left it no room
            pushed_bytes(job, dict.fromkeys(job.disk_sizes, 0))
            return Handover()  # every chunk fetched
        stopped = await each_disk(job, lambda agent: agent.stop_mirror())
        job.mark(Step.MIRROR_ENDED)
        pushed_bytes(job, {node: s.mirror.sent_bytes for node, s in stopped.items()})
        chunk_sizes = {s.chunk_size for s in stopped.values()}
        if len(chunk_sizes) != 1:  # every agent makes its bitmap of FETCH_CHUNK chunks
            raise PeerError(f"the disks' pushes use different chunks: {sorted(chunk_sizes)}")
        return Handover(
            present={node: clean_chunks(s.dirty, s.chunks) for node, s in stopped.items()},
            chunk_size=chunk_sizes.pop(),
        )


def pushed_bytes(job: DiskJob, pushed: dict[str, int]) -> None:
    """What each disk's push or mirror sent as data, on its row and in all."""
    for node, copied in pushed.items():
        job.report.device(node, "disk").bytes_pushed = copied
    job.progress.disk_bytes_pushed = sum(pushed.values())


def receives_later(job: DiskJob) -> bool:
    """Whether a hybrid push asks for its receivers only as it begins: one that waits for
    RAM to leave it room (a link faster than :data:`.share.EARLY_PUSH_MAX_BPS`, its RAM
    followed), which most never do. A receiver started with the destination's QEMU is one
    process more beside that start, and one more to retire at the switchover (it delayed
    ``destination_ready`` and the commit by some ms each, for nothing)."""
    link = job.request.link_rate_bps
    return bool(link) and job.follows_ram and not pushes_early(link)


def target_of(targets: dict[str, RemoteDisk], node: str) -> RemoteDisk:
    """Where disk ``node``'s push or mirror lands on the destination."""
    target = targets.get(node)
    if target is None:
        raise PeerError(f"the destination gave no target for {node}'s push")
    return target


async def _mirror_status(agent: DiskAgentLink) -> MirrorStatus:
    mirror = (await agent.status()).backend_status
    if not isinstance(mirror, MirrorStatus):
        raise PeerError(
            f"the disk mirror of {agent.node} ended: the agent serves {type(mirror).__name__}"
        )
    return mirror
