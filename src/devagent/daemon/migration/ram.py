"""QEMU's RAM migration as every strategy runs it, devagent's and QEMU's own alike.

The source sets the capabilities and parameters, starts ``migrate`` and follows it on QEMU's
``MIGRATION`` and ``STOP`` events until it completes: the completion is seen at once, the
guest's stop is stamped with QEMU's own clock (``source_stopped``), and the destination's
daemon is asked now and then whether it still sees the migration through. At
``pre-switchover`` (QEMU paused before the switchover, when a plan or the NICs asked for
it) the plan's and the NICs' steps run before QEMU is told to go on, once.

The downtime limit, unless the request sets one, starts tight (:data:`DOWNTIME_TIGHT_MS`,
where QEMU's default is 300 ms): QEMU stops the guest only once what is left to copy goes
in that long, so the pause is the last few dirty pages, not what a whole pass over RAM
left dirty (one more pass, a few tens of ms at 1 Gbit/s, costs the guest nothing). A guest
that dirties RAM too fast for that gets QEMU's default once QEMU has synced its dirty
pages :data:`TIGHT_SYNCS` times (once at setup, then once per pass), or as soon as
auto-converge starts slowing its vCPUs, whichever comes first: the tight limit must not
be what throttles a guest that QEMU's own would have let finish.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from devagent.daemon.migration.context import Events, JobView
from devagent.daemon.migration.qemu_tls import add_creds
from devagent.errors import PeerError
from devagent.qemu.answers import Event, MigrationInfo, event_of
from devagent.vocab import Step
from devagent.wire import to_json

EVENT_WAIT_S = 0.1  # the longest the follower sleeps without a fresh query-migrate
DOWNTIME_TIGHT_MS = 20
DOWNTIME_RELAXED_MS = 300  # QEMU's default
TIGHT_SYNCS = 5


class Capability(msgspec.Struct):
    """One entry of ``migrate-set-capabilities``."""

    capability: str
    state: bool


class Parameters(msgspec.Struct, rename="kebab", omit_defaults=True):
    """``migrate-set-parameters``' arguments devagent sets (bytes per second, ms)."""

    max_bandwidth: int
    downtime_limit: int | None = None
    tls_creds: str | None = None  # the stream is TLS: this client's credentials object
    tls_hostname: str | None = None  # the host whose certificate the destination presents


async def set_up_ram(job: JobView) -> None:
    """QEMU's capabilities and parameters for the job's RAM migration (TLS credentials too),
    set while the destination is prepared: ``migrate`` then starts RAM at once."""
    vm = job.managed.vm
    pause = job.plan.pauses_before_switchover or job.net is not None
    capabilities = [
        Capability("events", True),
        Capability("auto-converge", job.request.auto_converge),
        Capability("pause-before-switchover", pause),
    ]
    await vm.qmp("migrate-set-capabilities", capabilities=to_json(capabilities))
    params = Parameters(
        job.plan.ram_bandwidth(job), job.request.downtime_limit_ms or DOWNTIME_TIGHT_MS
    )
    if job.host.tls is not None:
        params.tls_creds = (await add_creds(vm, job.host.tls, "client"))["tls-creds"]
        params.tls_hostname = job.request.to.host
    await vm.qmp("migrate-set-parameters", **to_json(params))


async def migrate_ram(job: JobView, uri: str) -> MigrationInfo:
    """Run QEMU's RAM migration to ``uri`` (set up by :func:`set_up_ram`); return its last
    ``query-migrate``."""
    vm = job.managed.vm
    with vm.listen("MIGRATION", "STOP") as events:
        await vm.qmp("migrate", uri=uri)
        return await RamFollower(job).follow(events)


class RamFollower:
    """Follows one RAM migration to its end (see the module's docstring)."""

    def __init__(self, job: JobView) -> None:
        self.job = job
        self.continued = False  # QEMU was told to go on past pre-switchover
        self.tight = not job.request.downtime_limit_ms  # DOWNTIME_TIGHT_MS, ours to relax
        self.active = False  # QEMU left its setup (the plan was told)

    async def follow(self, events: Events) -> MigrationInfo:
        job, vm = self.job, self.job.managed.vm
        while True:
            info = await vm.query("query-migrate", MigrationInfo)
            status = info.status
            self._progress(info)
            if status == "completed":
                return info
            self.past_setup(status)
            await self.relax(info)
            if status == "pre-switchover":
                await self.at_pre_switchover()
            if status in ("failed", "cancelled"):
                reason = info.error_desc or "no reason given"
                raise PeerError(f"QEMU migration {status}: {reason}")
            if vm.exited:
                raise PeerError(f"source QEMU of VM {job.managed.name} exited during migration")
            await job.check_peer()
            job.plan.check_beside_ram()
            try:
                event = event_of(await asyncio.wait_for(events.get(), EVENT_WAIT_S))
            except TimeoutError:
                continue
            if event.event == "STOP":
                await self.stopped(event)
            elif event.event == "MIGRATION" and event.data.status == "pre-switchover":
                await self.at_pre_switchover()  # at once: QEMU waits for it
            elif event.event == "MIGRATION" and event.data.status:
                self.past_setup(event.data.status)

    def past_setup(self, status: str) -> None:
        """Once RAM moves (QEMU's setup, and its first dirty-page sync, behind it): the
        plan's work that waited for it (:meth:`Plan.ram_active`)."""
        if not self.active and status not in ("none", "setup", "failed", "cancelled"):
            self.active = True
            self.job.plan.ram_active(self.job)

    def _progress(self, info: MigrationInfo) -> None:
        job = self.job
        ram = info.ram
        total = ram.total if ram is not None else None
        progress = job.progress
        progress.status = info.status
        progress.ram_transferred = ram.transferred if ram is not None else 0
        progress.ram_remaining = ram.remaining if ram is not None else 0
        progress.ram_total = total if total is not None else job.managed.config.ram_mb << 20
        progress.elapsed_s = round(time.time() - job.started_at, 3)

    async def relax(self, info: MigrationInfo) -> None:
        """QEMU's own downtime limit, once the tight one kept RAM migrating for
        :data:`TIGHT_SYNCS` syncs or auto-converge began to throttle the guest. A relax
        that fails leaves the tight limit: a figure, not a fault."""
        syncs = info.ram.dirty_sync_count if info.ram is not None else 0
        throttled = info.cpu_throttle_percentage > 0
        if not self.tight or info.status != "active" or (syncs < TIGHT_SYNCS and not throttled):
            return
        self.tight, job = False, self.job
        job.log.info("VM %s's RAM did not converge within %d ms (%d syncs, vCPUs throttled"
                     " %d %%): downtime limit %d ms", job.managed.name, DOWNTIME_TIGHT_MS,
                     syncs, info.cpu_throttle_percentage, DOWNTIME_RELAXED_MS)  # fmt: skip
        relaxed = Parameters(job.plan.ram_bandwidth(job), DOWNTIME_RELAXED_MS)
        try:
            await job.managed.vm.qmp("migrate-set-parameters", **to_json(relaxed))
        except PeerError as err:
            job.log.warning("VM %s kept its %d ms downtime limit: %s", job.managed.name,
                            DOWNTIME_TIGHT_MS, err)  # fmt: skip

    async def stopped(self, event: Event) -> None:
        """QEMU stopped the guest for the switchover: note when, by QEMU's own clock (the
        same host's wall clock); frames for the guest wait from now."""
        self.job.mark(Step.SOURCE_STOPPED, event.at() or None)
        if self.job.net is not None:
            await self.job.net.hold()

    async def at_pre_switchover(self) -> None:
        """The guest stopped and drained: the NICs hold, the plan's step runs, QEMU goes on."""
        if self.continued:
            return  # the status is seen again until QEMU moves on
        job = self.job
        job.plan.check_beside_ram()  # not past here with a failed flush: QEMU waits for us
        if job.net is not None:
            await job.net.hold()
        await job.plan.at_pre_switchover(job)
        self.continued = True
        await job.managed.vm.qmp("migrate-continue", state="pre-switchover")
