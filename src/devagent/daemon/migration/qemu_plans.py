"""QEMU's own storage migration as plans, run by the same job as devagent's so the
benchmarks compare them on the same lab, guest and measures (the destination's half is
:mod:`.qemu_incoming`).

The VM runs without a device agent (``"agent": false``: QEMU opens its raw image itself) on
its host's own storage. Only QEMU's block layer moves the disk, driven over QMP, the way a
careful user (or libvirt) would:

``qemu-mirror`` / ``qemu-mirror-active`` (``copy-mode=write-blocking``)
    The destination exports a fresh sparse image with its NBD server. The source adds an NBD
    client node for it and runs ``blockdev-mirror`` (``sync=full``) until ``BLOCK_JOB_READY``.
    Then RAM migrates with ``pause-before-switchover``, as libvirt does: once the source is
    stopped and drained (``pre-switchover``), the ready mirror is ended with
    ``block-job-cancel`` (the target left a consistent copy, no pivot) and only then does
    migration go on and inactivate the source's disk.
``qemu-cor-stream``
    The source exports its disk read-only on its own NBD server. The destination's disk is
    a qcow2 overlay whose backing is an NBD node to that export, under a ``copy-on-read``
    filter; ``block-stream`` starts after the switchover, and the source is released when
    it completes. (From QEMU 10.0 the export of the disk QEMU inactivated at the end of
    RAM refuses block status, which the stream needs: the source activates it again.)

Before the switchover any failure rolls back as devagent's strategies do. With no agent
journals, ``max_io_gap_ms`` comes from the probe's heartbeats and ``io_gap_source`` says so.
"""

from __future__ import annotations

import asyncio
import time

from devagent.daemon.migration.context import JobView, Qemu, free_port
from devagent.daemon.migration.messages import (
    BaselineAnswer,
    BaselineIncoming,
    CommitAnswer,
    NbdAddress,
)
from devagent.daemon.migration.plans import Handover, Plan, Prepared, require_one_disk
from devagent.daemon.migration.qemu_tls import add_creds
from devagent.daemon.vms import image_format
from devagent.errors import DevagentError, PeerError, UsageError
from devagent.qemu.accel import qemu_version
from devagent.qemu.answers import BlockJobInfo, JobInfo
from devagent.qemu.config import qemu_release
from devagent.report import limit_seconds
from devagent.vocab import Strategy
from devagent.wait import wait_until
from devagent.wire import from_peer, to_json

MIRROR_JOB = "bn-mirror"
STREAM_JOB = "bn-stream"
TARGET_NODE = "bn-target"  # the source's NBD client node, the mirror's target
EXPORT_ID = "bn-export"
EXPORT_NAME = "disk0"
READY_TIMEOUT_S = 1800.0  # a background mirror that never converges fails, clearly...
READY_LIMITS = 5.0  # ...or after this many times what the link allows, when its rate is known
JOB_TIMEOUT_S = 590.0
#: The first QEMU whose NBD export of an inactive node answers only reads (block status
#: fails with EPERM), and which has ``blockdev-set-active``.
INACTIVE_EXPORTS_READ_ONLY = (10, 0)
POLL_S = 0.1


async def wait_job(vm: Qemu, job_id: str, timeout: float) -> JobInfo:
    """Wait until QMP job ``job_id`` (made with ``auto-dismiss: false``) concludes; dismiss it
    and return its last ``query-jobs`` entry; raise with QEMU's error if it failed."""
    found: list[JobInfo] = []

    async def concluded() -> bool:
        jobs = await vm.query("query-jobs", list[JobInfo])
        job = next((j for j in jobs if j.id == job_id), None)
        if job is None:
            raise PeerError(f"QEMU job {job_id} vanished")
        found[:] = [job]
        return job.status == "concluded"

    await wait_until(concluded, timeout=timeout, interval=POLL_S, what=f"QEMU job {job_id}")
    await vm.qmp("job-dismiss", id=job_id)
    if found[0].error:
        raise PeerError(f"QEMU job {job_id} failed: {found[0].error}")
    return found[0]


class QemuPlan(Plan):
    """A QEMU-only flow: no agent, QEMU's block layer moves the raw image."""

    mode = "mirror"
    cancels_ram_first = True

    def check(self, job: JobView) -> None:
        vm = job.managed
        require_one_disk(job, self.strategy)
        if vm.agents:
            raise UsageError(
                f"VM {vm.name} runs with a device agent; the QEMU-only strategies need one "
                "started with 'agent': false (QEMU opens its image itself)"
            )
        if not vm.request.has_probe or vm.request.remote_disks():
            raise UsageError(
                f"the QEMU-only strategies migrate the test guest on local storage: VM "
                f"{vm.name} is not one"
            )
        shared = job.host.shared_dir
        if shared is not None and vm.image.is_relative_to(shared):
            raise UsageError(f"VM {vm.name}'s disk is shared: migrate it with 'shared'")
        if image_format(vm.image) != "raw":
            raise UsageError(f"VM {vm.name}'s disk is not a raw image")

    def incoming(self, job: JobView) -> BaselineIncoming:
        vm = job.managed
        return BaselineIncoming(
            request=vm.request,
            config=vm.config,
            size=vm.image.stat().st_size,
            mode=self.mode,
            source=job.host.name,
        )

    async def prepare(self, job: JobView) -> Prepared:
        raw = await job.peer.post("/v1/baselines/incoming", to_json(self.incoming(job)))
        answer = from_peer(raw, BaselineAnswer, what="the destination's answer")
        return Prepared(uri=answer.uri, nbd=answer.nbd)

    async def commit(self, job: JobView, handover: Handover | None) -> CommitAnswer:
        raw = await job.peer.post(f"/v1/baselines/incoming/{job.managed.name}/commit")
        return from_peer(raw, CommitAnswer, what="the destination's commit")

    def disk_bytes_moved(self, job: JobView) -> int | None:
        return None  # QEMU's block jobs count holes as progress


class QemuMirrorPlan(QemuPlan):
    strategy = Strategy.QEMU_MIRROR
    copy_mode = "background"
    pauses_before_switchover = True

    async def before_ram(self, job: JobView, prepared: Prepared) -> None:
        assert prepared.nbd is not None
        vm, nbd = job.managed.vm, prepared.nbd
        server = {"type": "inet", "host": nbd.host, "port": nbd.port}
        tls = {} if job.host.tls is None else await add_creds(vm, job.host.tls, "client")
        await vm.qmp(
            "blockdev-add",
            **{"driver": "nbd", "node-name": TARGET_NODE, "server": server, **tls},
            export=nbd.export,
        )
        await vm.qmp(
            "blockdev-mirror",
            **{"job-id": MIRROR_JOB, "device": "disk0", "target": TARGET_NODE},
            sync="full",
            **{"copy-mode": self.copy_mode, "auto-dismiss": False},
        )
        allocated = job.managed.image.stat().st_blocks * 512
        limit = limit_seconds(allocated + (job.managed.config.ram_mb << 20),
                              job.request.link_rate_bps)  # fmt: skip
        wait = READY_TIMEOUT_S if limit is None else max(60.0, READY_LIMITS * limit)
        await self._until_ready(job, wait)

    async def _until_ready(self, job: JobView, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not await self._ready(job):
            await job.check_peer()
            if time.monotonic() > deadline:
                raise PeerError(
                    f"the QEMU mirror was not ready after {timeout:.0f} s (the guest "
                    "dirties the disk faster than the link copies it)"
                )
            await asyncio.sleep(POLL_S)

    async def _ready(self, job: JobView) -> bool:
        jobs = await job.managed.vm.query("query-block-jobs", list[BlockJobInfo])
        found = next((j for j in jobs if j.device == MIRROR_JOB), None)
        if found is None or found.status == "concluded":
            error = "it vanished" if found is None else found.error
            raise PeerError(f"the QEMU mirror stopped before it was ready: {error}")
        job.disk_progress({"disk0": (found.offset, found.len - found.offset)})
        return found.ready

    async def at_pre_switchover(self, job: JobView) -> None:
        """Guest stopped, disk drained: end the ready mirror with ``block-job-cancel``,
        which copies what is still dirty and leaves the target a consistent copy without
        pivoting onto it (libvirt's order)."""
        vm = job.managed.vm
        await vm.qmp("block-job-cancel", device=MIRROR_JOB)
        done = await wait_job(vm, MIRROR_JOB, JOB_TIMEOUT_S)
        job.progress.disk_bytes_pushed = done.total_progress

    async def roll_back(self, job: JobView) -> None:
        vm = job.managed.vm
        try:
            jobs = await vm.query("query-jobs", list[JobInfo])
        except DevagentError:
            jobs = []
        if any(j.id == MIRROR_JOB for j in jobs):
            await job.quietly(vm.qmp("block-job-cancel", device=MIRROR_JOB, force=True))
            await job.quietly(wait_job(vm, MIRROR_JOB, 30.0))
        await job.quietly(vm.qmp("blockdev-del", **{"node-name": TARGET_NODE}))


class QemuMirrorActivePlan(QemuMirrorPlan):
    strategy = Strategy.QEMU_MIRROR_ACTIVE
    copy_mode = "write-blocking"


class QemuCorStreamPlan(QemuPlan):
    strategy = Strategy.QEMU_COR_STREAM
    mode = "cor-stream"
    serves_after_switchover = True  # the destination streams from the source's export,
    source_qemu_serves = True  # which the source's QEMU serves

    def __init__(self) -> None:
        self.source_export: NbdAddress | None = None  # the running disk, served read-only

    async def prepare(self, job: JobView) -> Prepared:
        self.source_export = await self._export_disk(job)  # a failure: the roll-back ends it
        return await super().prepare(job)

    def incoming(self, job: JobView) -> BaselineIncoming:
        incoming = super().incoming(job)
        incoming.source_export = self.source_export
        return incoming

    async def _export_disk(self, job: JobView) -> NbdAddress:
        """Serve the running disk read-only on this host's address."""
        vm, address = job.managed.vm, job.host.address
        port = free_port(address)
        addr = {"type": "inet", "data": {"host": address, "port": str(port)}}
        tls = {}
        if job.host.tls is not None:  # the destination's QEMU alone may read it
            tls = await add_creds(vm, job.host.tls, "server", job.request.to.host)
        await vm.qmp("nbd-server-start", addr=addr, **tls)
        try:
            await vm.qmp(
                "block-export-add",
                **{"type": "nbd", "id": EXPORT_ID, "node-name": "disk0"},
                writable=False,
                name=EXPORT_NAME,
            )
        except BaseException:
            await job.quietly(vm.qmp("nbd-server-stop"))
            raise
        return NbdAddress(host=address, port=str(port), export=EXPORT_NAME)

    async def at_switchover(self, job: JobView) -> Handover | None:
        """RAM completed and QEMU inactivated the disk. From 10.0 an export of an inactive
        node still serves reads but refuses block status, which ``block-stream`` asks for:
        activate the exported node again (the guest here stays stopped; only the export
        reads it)."""
        release = qemu_release(qemu_version())
        if release is not None and release >= INACTIVE_EXPORTS_READ_ONLY:
            await job.managed.vm.qmp("blockdev-set-active", **{"node-name": "disk0"}, active=True)
        return None

    async def until_released(self, job: JobView) -> None:
        await job.peer.post(f"/v1/baselines/incoming/{job.managed.name}/stream-done")

    async def roll_back(self, job: JobView) -> None:
        await job.quietly(job.managed.vm.qmp("nbd-server-stop"))
