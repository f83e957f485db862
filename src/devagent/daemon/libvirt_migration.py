"""A libvirt domain's migration from this host: devagent moves its disks, libvirt its RAM.

The domain's disks are served by this host's agents (adopted here, or migrated here). Its
disks move by devagent's own strategies, the very plans of :mod:`.migration.plans`; its
RAM and definition move by libvirt. The steps::

    prepare     the destination's daemon starts an agent per disk, reading through to ours,
                and a receiver beside each for a push (``POST /v1/libvirt/incoming``)
    before_ram  the plan: a push at a share of the link (hybrid), a mirror until it
                converges (precopy)
    ram         libvirt migrates the domain, live and peer to peer
                (``virDomainMigrateToURI3``), its live and persistent definitions rewritten
                to name the destination's sockets, the source's undefined; it leaves the
                guest paused there (``VIR_MIGRATE_PAUSED``): the switchover's gate, since
                libvirt runs no hook at the switchover
    switchover  the plan: the push stopped and its bitmap handed over, or the mirror cut
                over; our agents fenced
    commit      the destination swaps each agent to a Fetch of ours, seeded with what the
                push landed, and resumes the guest
    finish      once each replica there is whole and served alone, ours are released; the
                report

The rule on failure is the QEMU job's (:mod:`.migration.job`): until the destination saw
libvirt's migration arrive (``POST /v1/libvirt/incoming/NAME/arrived``), the source holds
the whole guest, and everything rolls back (libvirt's job aborted if it still runs, a push
or mirror cancelled, a fence lifted, the destination's agents and replicas removed; libvirt
runs the guest here again itself). Once it arrived, libvirt has stopped the guest here for
good: the job goes forward, its commit tried again until its deadline (the destination
takes a commit up where an earlier try stopped). Should libvirt's call fail after that, and
libvirt run the guest here again, it is destroyed here: the guest is the destination's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from devagent.agent.fetch import presence_path
from devagent.agent.messages import FetchStatus, LocalStatus
from devagent.api_types import Completions, DomainDisks, MigrationProgress, MigrationStatus
from devagent.client import DaemonClient
from devagent.daemon.agents import AgentProcess
from devagent.daemon.libvirt_adopt import NbdSource, redefined
from devagent.daemon.migration.context import PEER_TIMEOUT_S, Peer, ReplicaProgress
from devagent.daemon.migration.job import PEER_CHECK_S, allocated_bytes
from devagent.daemon.migration.messages import (
    Arrived,
    DomainCommitAnswer,
    DomainIncoming,
    DomainIncomingAnswer,
    IncomingDisk,
    MigrateRequest,
    RemoteDisk,
)
from devagent.daemon.migration.plans import (
    DISK_STALL_S,
    POLL_S,
    FetchingPlan,
    Handover,
    PostcopyPlan,
    Prepared,
)
from devagent.daemon.migration.pushing import HybridPlan, PrecopyPlan
from devagent.daemon.migration.record import NEXT, Phase
from devagent.daemon.migration.report import BASELINE_S
from devagent.daemon.migration.running import RunningJob
from devagent.daemon.netstat import link_bytes
from devagent.errors import DevagentError, NotFound, PeerError, StateError, UsageError
from devagent.libvirt_link import (
    MIGRATE_LIVE,
    MIGRATE_PAUSED,
    MIGRATE_PEER2PEER,
    MIGRATE_PERSIST_DEST,
    MIGRATE_TLS,
    MIGRATE_UNDEFINE_SOURCE,
    STATE_PAUSED,
    STATE_RUNNING,
    XML_INACTIVE,
    XML_MIGRATABLE,
    DomainEvent,
)
from devagent.report import MigrationReport, fill_io_measures, fill_link_measures, largest_gap
from devagent.vocab import Step, Strategy
from devagent.wait import WaitTimeout, wait_until
from devagent.wire import from_peer, to_json

if TYPE_CHECKING:
    from devagent.daemon.host import Host
    from devagent.libvirt_link import LibvirtLink

log = logging.getLogger(__name__)

T = TypeVar("T")

DOMAIN_PLANS: dict[Strategy, type[FetchingPlan]] = {
    Strategy.POSTCOPY: PostcopyPlan,
    Strategy.PRECOPY: PrecopyPlan,
    Strategy.HYBRID: HybridPlan,
}
RAM_TIMEOUT_S = 3600.0


@dataclass
class Domain:
    """The domain whose disks a job moves, as the plans see it (``DiskOwner``)."""

    name: str
    agents: list[AgentProcess]


class DomainMigration(RunningJob):
    """One libvirt domain's migration from this host (see the module's docstring)."""

    def __init__(self, host: Host, name: str, request: MigrateRequest) -> None:
        plan = DOMAIN_PLANS.get(request.storage)
        if plan is None:
            raise UsageError(
                f"domain {name}: a libvirt domain migrates by {', '.join(DOMAIN_PLANS)} "
                f"(its disks are served by agents, not shared), not {request.storage}"
            )
        self.plan = plan()
        self.id = secrets.token_hex(4)
        self.host = host
        self.request = request
        self.managed = Domain(name=name, agents=list(host.adopted[name]))
        self.phase = Phase.PREPARING
        self.started_at = time.time()
        self.finished_at: float | None = None
        self.progress = MigrationProgress()
        dest = request.destination
        self.report = MigrationReport(
            vm=name, source=host.name, destination=dest.name or dest.url,
            storage=request.storage.value, link_rate_bps=request.link_rate_bps,
        )  # fmt: skip
        for agent in self.managed.agents:
            self.report.device(agent.node, "disk")
        self.source_disks: dict[str, RemoteDisk] = {}
        self.disk_sizes: dict[str, int] = {}
        #: By node: the unix socket each disk's agent on the destination serves.
        self.sockets: dict[str, str] = {}
        self.bytes_before: int | None = None  # the link's counters at the start
        self.allocated = 0  # bytes the disks held here when released
        self.log = logging.getLogger(f"{__name__}.{name}")
        self.task: asyncio.Task[None] | None = None
        self.migrating: asyncio.Future[Any] | None = None  # libvirt's call, once made

    @property
    def name(self) -> str:
        return self.managed.name

    def status(self) -> MigrationStatus:
        return MigrationStatus(
            id=self.id, vm=self.name, phase=self.phase.value, started_at=self.started_at,
            finished_at=self.finished_at, progress=self.progress, report=self.report,
        )  # fmt: skip

    def _move(self, phase: Phase) -> None:
        if phase not in NEXT[self.phase]:
            raise StateError(f"migration {self.id}: no move {self.phase.value} -> {phase.value}")
        self.log.info("migration %s of domain %s to %s: %s",
                      self.id, self.name, self.report.destination, phase.value)  # fmt: skip
        self.phase = phase

    async def _migrate(self) -> None:
        link = self.host.require_libvirt()
        dom = await link.call("lookupByName", self.name)
        if (await link.run(dom, "state"))[0] != STATE_RUNNING:
            raise StateError(f"domain {self.name} is not running here")
        self.report.ram_bytes = int((await link.run(dom, "info"))[1]) << 10  # KiB
        self.bytes_before = link_bytes(self.host.loopback)
        async with DaemonClient(self.request.to, timeout=PEER_TIMEOUT_S) as peer:
            try:
                prepared = await self._prepare(peer)
                await self.plan.before_ram(self, prepared)
                arrived = await self._ram(link, dom, peer)
            except BaseException as err:
                await self._roll_back(link, peer, err)
                raise
            self.mark(Step.RAM_COMPLETED, arrived)
            handover = await self._switch_over()
            committed = await self._commit(peer, handover)
            await self._finish(peer, committed)
        self.report.status = "completed"
        self._move(Phase.COMPLETED)
        self.finished_at = time.time()

    async def _prepare(self, peer: Peer) -> Prepared:
        for agent in self.managed.agents:
            if agent.tcp_address is None:
                raise PeerError(f"domain {self.name}: the agent of {agent.node} serves no peer")
            self.disk_sizes[agent.node] = (await agent.status()).size
            self.source_disks[agent.node] = RemoteDisk(
                address=agent.tcp_address, export=agent.export, host=self.host.name
            )
        receive = self.request.storage in (Strategy.PRECOPY, Strategy.HYBRID)
        incoming = DomainIncoming(
            domain=self.name,
            source=self.host.name,
            disks=[
                IncomingDisk(node=node, size=size, backend=self.source_disks[node], receive=receive)
                for node, size in self.disk_sizes.items()
            ],
        )
        raw = await peer.post("/v1/libvirt/incoming", to_json(incoming))
        answer = from_peer(raw, DomainIncomingAnswer, what="the destination's answer")
        self.sockets = answer.sockets
        self.mark(Step.DESTINATION_READY)
        return Prepared(uri="", push_targets=answer.disk_targets)

    async def _ram(self, link: LibvirtLink, dom: Any, peer: Peer) -> float:
        """libvirt migrates the domain and leaves it paused on the destination; returns when
        the destination saw it arrive. The destination's daemon is watched meanwhile, and
        libvirt's job aborted when it vanishes; a migration that arrived all the same goes
        forward (returned, not raised)."""
        self._move(Phase.RAM)
        self.mark(Step.RAM_STARTED)
        address = urlsplit(self.request.to.url).hostname or ""
        sources = {node: NbdSource(export=node, socket=socket)
                   for node, socket in self.sockets.items()}  # fmt: skip
        live = await link.run(dom, "XMLDesc", XML_MIGRATABLE)
        params: dict[str, Any] = {
            "destination_xml": redefined(live, sources),
            "migrate_uri": f"tcp://{address}",
        }
        flags = MIGRATE_LIVE | MIGRATE_PEER2PEER | MIGRATE_PAUSED | MIGRATE_PERSIST_DEST
        if await link.run(dom, "isPersistent"):
            inactive = await link.run(dom, "XMLDesc", XML_INACTIVE | XML_MIGRATABLE)
            params["persistent_xml"] = redefined(inactive, sources)
            flags |= MIGRATE_UNDEFINE_SOURCE
        if self.host.tls is not None:
            flags |= MIGRATE_TLS
        if self.request.link_rate_bps:
            params["bandwidth"] = max(1, self.plan.ram_bandwidth(self) >> 20)  # MiB/s
        uri = self.host.libvirt_peer_uri.format(address=address)

        def stops(event: DomainEvent) -> bool:
            return event.domain == self.name and (event.event, event.detail) == (
                "suspended", "migrated",
            )  # fmt: skip

        stopped = asyncio.ensure_future(link.wait_event(stops, RAM_TIMEOUT_S, "the switchover"))
        migrating = asyncio.ensure_future(link.run(dom, "migrateToURI3", uri, params, flags))
        self.migrating = migrating
        self.plan.ram_active(self)  # (a domain's RAM is whole MiB: no long stall as it starts)
        arrival: asyncio.Future[Any] | None = None
        try:
            event = await self._until(stopped, peer)
            if event is not None:
                self.mark(Step.SOURCE_STOPPED, event.at)
            arrival = asyncio.ensure_future(peer.post(f"/v1/libvirt/incoming/{self.name}/arrived"))
            raw = await self._until(arrival, peer)
            raw = raw if raw is not None else await arrival
            return from_peer(raw, Arrived, what="the destination's arrival").at
        except BaseException:
            if arrival is not None:
                arrival.cancel()
            if not await self._abort(link, dom):
                raise
            return time.time()  # it arrived all the same: forward
        finally:
            stopped.cancel()
            if stopped.done() and not stopped.cancelled():
                stopped.exception()  # (a timeout: retrieved, said no more)

    async def _until(self, wanted: asyncio.Future[T], peer: Peer) -> T | None:
        """``wanted``'s result once it comes; None when libvirt's migration completed
        first. libvirt's failure is raised, as is the destination's daemon vanishing."""
        assert self.migrating is not None
        while True:
            done, _ = await asyncio.wait(
                {wanted, self.migrating}, timeout=PEER_CHECK_S,
                return_when=asyncio.FIRST_COMPLETED,
            )  # fmt: skip
            if wanted in done:
                return wanted.result()
            if self.migrating in done:
                self.migrating.result()  # libvirt's failure
                return None
            try:
                await asyncio.wait_for(peer.get("/v1/health"), PEER_CHECK_S * 2)
            except (PeerError, TimeoutError) as err:
                raise PeerError(f"destination host {self.report.destination} vanished during "
                                f"the migration: {err}") from err  # fmt: skip

    async def _abort(self, link: LibvirtLink, dom: Any) -> bool:
        """Our side failed during libvirt's migration: its job aborted, and awaited. True
        when it completed all the same (the guest is the destination's: go forward)."""
        migrating = self.migrating
        if migrating is None:
            return False
        if not migrating.done():
            self.log.warning("migration %s: aborting libvirt's job", self.id)
            with contextlib.suppress(DevagentError):
                await link.run(dom, "abortJob")
        with contextlib.suppress(Exception):  # its failure is the expected end
            await asyncio.shield(migrating)
        if migrating.cancelled() or migrating.exception() is not None:
            return False
        self.log.error("migration %s: libvirt's migration completed all the same: going "
                       "forward", self.id)  # fmt: skip
        return True

    async def _roll_back(self, link: LibvirtLink, peer: Peer, cause: BaseException) -> None:
        """Before the switchover: the disks as they were here, nothing left there. libvirt
        runs the guest here again itself once its migration failed or was aborted."""
        self.log.warning("rolling back migration %s: %s", self.id, cause)
        self.phase = Phase.FAILED  # (before the report says so: nothing moves it back)
        await self.plan.end_early_flush(cancel=True)
        for agent in self.managed.agents:
            for undo in (agent.cancel_mirror, agent.unfence):
                with contextlib.suppress(DevagentError):  # nothing to undo
                    await undo()
        try:  # libvirt resumes it after a failed migration; one it left paused, too
            dom = await link.call("lookupByName", self.name)
            state = (await link.run(dom, "state"))[0]
            if state == STATE_PAUSED and (self.migrating is None or self.migrating.done()):
                await link.run(dom, "resume")
        except DevagentError as err:
            self.log.error("migration %s: domain %s here: %s", self.id, self.name, err)
        try:
            await peer.delete(f"/v1/libvirt/incoming/{self.name}")
        except NotFound:
            pass
        except DevagentError as err:
            self.log.error("migration %s: removing the incoming domain on %s failed: %s",
                           self.id, self.report.destination, err)  # fmt: skip

    async def _switch_over(self) -> Handover:
        """libvirt stopped the guest here for good: the disks' work here ends (a plan whose
        step fails hands nothing over: the destination then fetches every chunk), and our
        agents are fenced."""
        self._move(Phase.SWITCHOVER)
        try:
            handover = await self.plan.at_switchover(self) or Handover()
        except DevagentError as err:  # (its mirror failed, say)
            self.log.warning("migration %s: the push could not hand over (%s): the "
                             "destination fetches every chunk", self.id, err)  # fmt: skip
            for agent in self.managed.agents:
                with contextlib.suppress(DevagentError):
                    await agent.cancel_mirror()
            handover = Handover()
        try:
            await self.plan.fence(self)
        except DevagentError as err:  # the QEMU here stopped for good; libvirt kills it
            self.log.warning("migration %s: fencing failed: %s", self.id, err)
        return handover

    async def _commit(self, peer: Peer, handover: Handover) -> DomainCommitAnswer:
        body = to_json(self.plan.commit_request(self, handover))
        path = f"/v1/libvirt/incoming/{self.name}/commit"
        raw = await self.forward(lambda: peer.post(path, body), what="the destination's commit")
        committed = from_peer(raw, DomainCommitAnswer, what="the destination's commit")
        for step, at in committed.steps.items():
            self.mark(f"destination_{step}", at)
        self.mark(Step.RESUMED, committed.resumed_at)
        self.mark(Step.COMMITTED)
        self._move(Phase.FINISHING)
        return committed

    async def _finish(self, peer: Peer, committed: DomainCommitAnswer) -> None:
        """The guest runs there: libvirt's call ended (no guest here again), then each
        replica serves alone there (the source is released: ``total_time_s`` ends); then
        our agents and replicas go, and the report is made."""
        await self._confirmed()
        await self._until_local(peer)
        self.mark(Step.RELEASED)
        since = self.started_at - BASELINE_S
        here = await self._completions(since)
        self.host.release_domain(self.name)  # (first: its supervisor restarts no agent)
        for agent in self.managed.agents:
            try:
                await agent.stop()
            except DevagentError as err:  # its replica stays: its process may still run
                self.report.warnings.append(f"the agent of {agent.node} here: {err}")
                await agent.kill()
                continue
            self.allocated += allocated_bytes(Path(agent.image))
            for path in (Path(agent.image), presence_path(Path(agent.image))):
                path.unlink(missing_ok=True)
        self.mark(Step.SOURCE_CLEANED)
        there = await self.forward(
            lambda: peer.get(f"/v1/libvirt/{self.name}/completions", since=since),
            what="the destination's completions",
        )
        theirs = from_peer(there, Completions, what="the destination's completions").devices
        self._fill_report(committed, here, theirs)

    async def _confirmed(self) -> None:
        """libvirt's call returns once it stopped the QEMU here (its Confirm). One that
        failed after the guest ran there may have run the guest here again (libvirt does so
        when it misses the destination's Finish): it is destroyed here, the guest being the
        destination's."""
        if self.migrating is None:
            return
        try:
            await asyncio.shield(self.migrating)
            return
        except DevagentError as err:
            failed = err
        link = self.host.require_libvirt()
        with contextlib.suppress(NotFound):
            dom = await link.call("lookupByName", self.name)
            if await link.run(dom, "isActive"):
                self.log.error("migration %s: domain %s runs here again after libvirt's "
                               "error; destroyed (it runs on %s)",
                               self.id, self.name, self.report.destination)  # fmt: skip
                await link.run(dom, "destroy")
        self.report.warnings.append(f"libvirt's migration ended with an error after the guest "
                                    f"ran on the destination: {failed}")  # fmt: skip

    async def _until_local(self, peer: Peer) -> None:
        """Every replica on the destination whole and served alone there (its agent goes
        Local by itself): as long as they grow, :data:`DISK_STALL_S` without progress."""
        progress = ReplicaProgress()

        async def local() -> bool:
            try:
                raw = await peer.get(f"/v1/libvirt/{self.name}/disks")
            except PeerError as err:  # its daemon restarts, say: ask again
                self.log.warning("waiting for the disks on %s: %s", self.report.destination, err)
                return False
            disks = from_peer(raw, DomainDisks, what="the destination's disks").disks
            per_disk, present, fetched, done = {}, 0, 0, True
            for disk in disks:
                backend = disk.status.backend_status
                if isinstance(backend, FetchStatus):
                    done = False
                    per_disk[disk.node] = (backend.present_bytes,
                                           backend.size - backend.present_bytes)  # fmt: skip
                    present += backend.present_bytes
                    row = self.report.device(disk.node, "disk")
                    row.bytes_fetched = (backend.fetched_on_demand_bytes
                                         + backend.fetched_in_background_bytes)  # fmt: skip
                    fetched += row.bytes_fetched
                elif not isinstance(backend, LocalStatus):
                    done = False
            self.disk_progress(per_disk)
            self.progress.disk_bytes_moved = max(fetched, self.progress.disk_bytes_moved or 0)
            progress.saw(present)
            if progress.stalled_for() > DISK_STALL_S:
                raise WaitTimeout(f"domain {self.name}'s replicas on {self.report.destination}",
                                  DISK_STALL_S, f"no progress past {present} bytes")  # fmt: skip
            return done

        await wait_until(local, timeout=RAM_TIMEOUT_S, interval=POLL_S,
                         what=f"domain {self.name}'s disks local there")  # fmt: skip
        self.mark(Step.DISK_LOCAL)

    async def _completions(self, since: float) -> dict[str, list[float]] | None:
        times = {}
        try:
            for agent in self.managed.agents:
                found = await agent.completions(since)
                if not found.complete:  # its journal no longer reaches back
                    return None
                times[agent.node] = found.completions
        except DevagentError as err:
            self.log.warning("migration %s: the source's completions: %s", self.id, err)
            return None
        return times

    def _fill_report(
        self,
        committed: DomainCommitAnswer,
        here: dict[str, list[float]] | None,
        there: dict[str, list[float]] | None,
    ) -> None:
        report, t0 = self.report, self.started_at
        released_at = t0 + report.timeline[Step.RELEASED]
        report.time_to_switchover_s = round(committed.resumed_at - t0, 3)
        report.total_time_s = round(released_at - t0, 3)
        report.downtime_ms = committed.downtime_ms
        fill_link_measures(
            report, self.bytes_before, link_bytes(self.host.loopback),
            self.allocated + (report.ram_bytes or 0), self.request.link_rate_bps,
        )  # fmt: skip
        stopped = report.timeline.get(Step.SOURCE_STOPPED)
        if stopped is not None:
            report.vm_pause_ms = round((committed.resumed_at - t0 - stopped) * 1000, 1)
        else:
            report.missing["vm_pause_ms"] = "libvirt sent no Suspended/Migrated event here"
        report.disk_bytes_moved = (self.progress.disk_bytes_moved or 0) + (
            self.progress.disk_bytes_pushed or 0
        )
        by_disk = None
        if here is not None and there is not None:
            by_disk = {node: sorted([*times, *there.get(node, [])]) for node, times in here.items()}
        completions = sorted(t for times in (by_disk or {}).values() for t in times) or None
        end = max(released_at, committed.resumed_at)
        fill_io_measures(report, [], start=t0, end=end, baseline_start=t0 - BASELINE_S,
                         completions=completions)  # fmt: skip
        for node, times in (by_disk or {}).items():
            gap = largest_gap(times, t0, end)
            if gap is not None:
                report.device(node, "disk").max_io_gap_ms = round(gap * 1000, 1)
        report.missing.setdefault(
            "integrity", "devagent reads no probe in a libvirt domain's guest yet"
        )
