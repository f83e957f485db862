"""QEMU's own storage migration, run by the daemons as migration strategies beside devagent's
so the benchmarks compare them on the same lab, the same guest and the same measures.

The VM runs without a device agent (``"agent": false``: QEMU opens its raw image itself) on
its host's own storage. Only QEMU's block layer moves the disk, driven over QMP, the way a
careful user (or libvirt) would:

``qemu-mirror`` / ``qemu-mirror-active`` (``copy-mode=write-blocking``)
    The destination starts its incoming QEMU (``-incoming defer``, ``-S``,
    ``late-block-activate``) on a fresh sparse image (``discard``/``detect-zeroes`` unmap)
    and exports that disk writable with its NBD server. The source adds an NBD client node
    for it and runs ``blockdev-mirror`` (``sync=full``; QEMU 7.2 has no zero-skipping
    switch for blockdev-mirror: it zeroes an NBD target with cheap write-zeroes requests and
    copies holes as write-zeroes by itself) until ``BLOCK_JOB_READY``. Then RAM migrates
    with ``pause-before-switchover``, as libvirt does: once the source is stopped and
    drained (``pre-switchover``), the ready mirror is ended with ``block-job-cancel``
    (the target left a consistent copy, no pivot) and only then does migration go on and
    inactivate the source's disk. The destination stops its NBD server and ``cont``s.
``qemu-cor-stream``
    The source exports its disk read-only on its own NBD server. The destination's disk is
    a qcow2 overlay whose backing is an NBD node to that export, under a ``copy-on-read``
    filter. Nothing lands in the overlay before the switchover: the incoming guest does
    not run, and ``block-stream`` starts after it. Migration inactivates the source's disk
    but a read-only export may stay on an inactive node (only writers block inactivation),
    so the destination goes on reading it; the source is released when the stream job
    completes and the overlay no longer has a backing.

Before the switchover any failure rolls back as devagent's strategies do: jobs and the RAM
migration cancelled, the VM running on the source, nothing left on the destination. The
report is devagent's (:class:`MigrationReport`); with no agent journals, ``max_io_gap_ms``
comes from the probe's heartbeats and ``io_gap_source`` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from devagent.client import DaemonClient
from devagent.daemon.host import Host
from devagent.daemon.migration import (
    BASELINE_S,
    PEER_CHECK_S,
    PEER_TIMEOUT_S,
    POLL_S,
    MigrationJob,
    Phase,
    allocated_bytes,
)
from devagent.daemon.netstat import link_bytes
from devagent.daemon.vms import ManagedVm, VmRequest, image_format
from devagent.errors import DevagentError, PeerError, StateError, UsageError
from devagent.qemu.config import DiskSpec, VmConfig
from devagent.qemu.vm import VmState
from devagent.report import fill_io_measures, fill_link_measures, limit_seconds

MIRROR_JOB = "bn-mirror"
STREAM_JOB = "bn-stream"
TARGET_NODE = "bn-target"  # the source's NBD client node, the mirror's target
EXPORT_ID = "bn-export"
EXPORT_NAME = "disk0"
READY_TIMEOUT_S = 1800.0  # a background mirror that never converges fails, clearly...
READY_LIMITS = 5.0  # ...or after this many times what the link allows, when its rate is known
ARRIVAL_TIMEOUT_S = 30.0
MODES = {"qemu-mirror": "mirror", "qemu-mirror-active": "mirror", "qemu-cor-stream": "cor-stream"}


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        port: int = s.getsockname()[1]
        return port


async def _wait_job(vm_qmp: Any, job_id: str, timeout: float) -> dict[str, Any]:
    """Wait until QMP job ``job_id`` (made with ``auto-dismiss: false``) concludes; dismiss it
    and return its last ``query-jobs`` entry; raise with QEMU's error if it failed."""
    deadline = time.monotonic() + timeout
    while True:
        jobs: list[dict[str, Any]] = await vm_qmp("query-jobs")
        job = next((j for j in jobs if j.get("id") == job_id), None)
        if job is None:
            raise PeerError(f"QEMU job {job_id} vanished")
        if job.get("status") == "concluded":
            await vm_qmp("job-dismiss", id=job_id)
            if job.get("error"):
                raise PeerError(f"QEMU job {job_id} failed: {job['error']}")
            return job
        if time.monotonic() > deadline:
            raise PeerError(f"QEMU job {job_id} not done after {timeout:.0f} s")
        await asyncio.sleep(POLL_S)


# --- the destination's side ------------------------------------------------------------


async def prepare_incoming(host: Host, payload: Any) -> dict[str, Any]:
    """``POST /v1/baselines/incoming``: an incoming QEMU for a baseline, waiting (``-S``).

    Body: ``request``, ``config`` (the source's), ``size`` (the disk's bytes), ``mode``
    (``mirror`` or ``cor-stream``) and, for ``cor-stream``, ``source`` (``{"host", "port",
    "export"}``: the source's NBD export). Answer: ``uri`` (for ``migrate``) and, for
    ``mirror``, ``nbd`` (``{"host", "port", "export"}``: where to mirror to)."""
    if not isinstance(payload, dict) or not {"request", "config", "size", "mode"} <= set(payload):
        raise UsageError("body must be {'request', 'config', 'size', 'mode'[, 'source']}")
    mode, size = payload["mode"], payload["size"]
    if mode not in ("mirror", "cor-stream"):
        raise UsageError("'mode' must be 'mirror' or 'cor-stream'")
    if not isinstance(size, int) or size <= 0:
        raise UsageError("'size' must be the disk's size in bytes")
    request = VmRequest.from_json(payload["request"])
    config = VmConfig.from_json(payload["config"])
    folder = host.root / "disks"
    folder.mkdir(parents=True, exist_ok=True)
    if mode == "mirror":
        image = folder / f"{request.name}.img"
        image.unlink(missing_ok=True)
        with image.open("wb") as f:
            f.truncate(size)
        disk = DiskSpec(node="disk0", path=str(image), format="raw", unmap=True)
    else:
        source = payload.get("source")
        if not isinstance(source, dict) or not {"host", "port", "export"} <= set(source):
            raise UsageError("'cor-stream' needs 'source': {'host', 'port', 'export'}")
        image = folder / f"{request.name}.qcow2"
        image.unlink(missing_ok=True)
        await asyncio.to_thread(_make_overlay, image, size)
        backing = {k: str(source[k]) for k in ("host", "port", "export")}
        disk = DiskSpec(
            node="disk0", path=str(image), format="qcow2", backing_nbd=backing, copy_on_read=True
        )
    extra = (*(a for a in config.extra_args if a != "-S"), "-S")
    config = replace(config, disks=(disk,), incoming=True, extra_args=extra)
    try:
        managed = await host.vms.add_incoming(request, config, image)
    except BaseException:
        image.unlink(missing_ok=True)
        raise
    vm = managed.vm
    answer: dict[str, Any] = {}
    try:
        caps = [{"capability": c, "state": True} for c in ("events", "late-block-activate")]
        await vm.qmp("migrate-set-capabilities", capabilities=caps)
        if mode == "mirror":
            port = _free_port(host.address)
            addr = {"type": "inet", "data": {"host": host.address, "port": str(port)}}
            await vm.qmp("nbd-server-start", addr=addr)
            # The export activates the incoming disk node (as libvirt relies on) so the
            # mirror can write it while migration is under way.
            await vm.qmp(
                "block-export-add",
                **{"type": "nbd", "id": EXPORT_ID, "node-name": "disk0"},
                writable=True,
                name=EXPORT_NAME,
            )
            answer["nbd"] = {"host": host.address, "port": str(port), "export": EXPORT_NAME}
        uri = f"tcp:{host.address}:{_free_port(host.address)}"
        await vm.qmp("migrate-incoming", uri=uri)
    except BaseException:
        await host.vms.remove(managed.name)
        raise
    return answer | {"uri": uri}


def _make_overlay(path: Path, size: int) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise PeerError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def _is_stream(managed: ManagedVm) -> bool:
    return bool(managed.config.disks and managed.config.disks[0].copy_on_read)


async def commit_incoming(managed: ManagedVm) -> float:
    """``POST /v1/baselines/incoming/{name}/commit``: the RAM arrived; run the guest. A
    mirror's target stops being served first; a stream starts right after. Returns the
    host time the guest resumed."""
    if managed.role != "incoming":
        raise StateError(f"VM {managed.name} is not an incoming VM")
    vm = managed.vm
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
    while (await vm.qmp("query-status"))["status"] == "inmigrate":
        if vm.exited or time.monotonic() > deadline:
            raise PeerError(f"VM {managed.name}: the migration did not arrive")
        await asyncio.sleep(0.01)
    if not _is_stream(managed):
        await vm.qmp("nbd-server-stop")  # the mirror is done: nobody writes the disk but us
    if vm.state is not VmState.RUNNING:
        await vm.qmp("cont")
    await managed.wait_running(timeout=30.0)
    if _is_stream(managed):
        await vm.qmp(
            "block-stream",
            **{"job-id": STREAM_JOB, "device": "disk0-overlay", "auto-dismiss": False},
        )
    managed.role = "running"
    managed.save()
    assert vm.resumed_at is not None
    return vm.resumed_at


async def stream_done(managed: ManagedVm) -> dict[str, Any]:
    """``POST /v1/baselines/incoming/{name}/stream-done``: wait until ``block-stream`` has
    copied everything the overlay lacked (the source is then no longer needed)."""
    if not _is_stream(managed):
        raise StateError(f"VM {managed.name} has no block-stream running")
    job = await _wait_job(managed.vm.qmp, STREAM_JOB, PEER_TIMEOUT_S - 10)
    return {"stream_len": job.get("total-progress")}


# --- the source's side -----------------------------------------------------------------


class BaselineJob(MigrationJob):
    """A migration by one of the QEMU-only flows (``request.storage`` in MODES)."""

    _next_check = 0.0  # when the destination's daemon is next asked whether it is alive

    async def _migrate(self) -> None:
        managed, vm = self.managed, self.managed.vm
        vm.require(VmState.RUNNING)
        self._check_baseline()
        mode = MODES[self.request.storage]
        t0 = self.started_at
        bytes0 = link_bytes(self.host.loopback)
        size = managed.image.stat().st_size
        allocated = allocated_bytes(managed.image)
        incoming: dict[str, Any] = {
            "request": managed.request.to_json(),
            "config": managed.config.to_json(),
            "size": size,
            "mode": mode,
        }
        if mode == "cor-stream":
            incoming["source"] = await self._export_disk()
        async with DaemonClient(self.request.destination, timeout=PEER_TIMEOUT_S) as peer:
            try:
                answer = await peer.post("/v1/baselines/incoming", incoming)
            except BaseException:
                await self._unexport_disk()
                raise
            try:
                if mode == "mirror":
                    limit = limit_seconds(
                        allocated + (managed.config.ram_mb << 20), self.request.link_rate_bps
                    )
                    wait = READY_TIMEOUT_S if limit is None else max(60.0, READY_LIMITS * limit)
                    await self._mirror_until_ready(answer["nbd"], wait, peer)
                self._move(Phase.RAM)
                hook = self._end_mirror if mode == "mirror" else None
                done = await self._ram_with_pause(str(answer["uri"]), peer, hook)
            except BaseException as err:
                await self._roll_back_baseline(peer, err)
                raise
            # The guest stopped here for good, its disk flushed and inactivated.
            self._move(Phase.SWITCHOVER)
            committed = await peer.post(f"/v1/baselines/incoming/{managed.name}/commit")
            resumed_at = float(committed["resumed_at"])
            with contextlib.suppress(PeerError, StateError):  # QEMU's final figures
                done = await managed.vm.migration_outcome()
            self._move(Phase.FINISHING)
            managed.role = "migrated"
            if mode == "cor-stream":
                await peer.post(f"/v1/baselines/incoming/{managed.name}/stream-done")
            await self.host.vms.remove(managed.name, delete_disk=True)
            released_at = time.time()
            bytes1 = link_bytes(self.host.loopback)
            dest_beats = await self._settle(peer, resumed_at)
            report = self.report
            report.time_to_switchover_s = round(resumed_at - t0, 3)
            report.total_time_s = round(released_at - t0, 3)
            report.downtime_ms = done.get("downtime")
            report.ram_bytes = managed.config.ram_mb << 20
            report.ram_transferred_bytes = done.get("ram", {}).get("transferred")
            report.missing["disk_bytes_moved"] = (
                "QEMU's block jobs count holes as progress: see bytes_between_hosts"
            )
            fill_link_measures(
                report, bytes0, bytes1, allocated + report.ram_bytes, self.request.link_rate_bps
            )
            fill_io_measures(
                report,
                [*managed.heartbeats, *dest_beats],
                start=t0,
                end=max(released_at, resumed_at),
                baseline_start=t0 - BASELINE_S,
            )
            answer = await peer.post(f"/v1/vms/{managed.name}/integrity")
            report.integrity = str(answer["integrity"])
        report.status = "completed"
        self._move(Phase.COMPLETED)
        self.finished_at = time.time()

    def _check_baseline(self) -> None:
        managed = self.managed
        if managed.agents:
            raise UsageError(
                f"VM {managed.name} runs with a device agent; the QEMU-only strategies need "
                "one started with 'agent': false (QEMU opens its image itself)"
            )
        if not managed.request.has_probe or managed.request.disk_from is not None:
            raise UsageError(
                f"the QEMU-only strategies migrate the test guest on local storage: VM "
                f"{managed.name} is not one"
            )
        shared = self.host.shared_dir
        if shared is not None and managed.image.is_relative_to(shared):
            raise UsageError(f"VM {managed.name}'s disk is shared: migrate it with 'shared'")
        if image_format(managed.image) != "raw":
            raise UsageError(f"VM {managed.name}'s disk is not a raw image")

    async def _export_disk(self) -> dict[str, str]:
        """``qemu-cor-stream``: serve the running disk read-only on this host's address."""
        vm, address = self.managed.vm, self.host.address
        port = _free_port(address)
        addr = {"type": "inet", "data": {"host": address, "port": str(port)}}
        await vm.qmp("nbd-server-start", addr=addr)
        try:
            await vm.qmp(
                "block-export-add",
                **{"type": "nbd", "id": EXPORT_ID, "node-name": "disk0"},
                writable=False,
                name=EXPORT_NAME,
            )
        except BaseException:
            with contextlib.suppress(DevagentError):
                await vm.qmp("nbd-server-stop")
            raise
        return {"host": address, "port": str(port), "export": EXPORT_NAME}

    async def _unexport_disk(self) -> None:
        if MODES[self.request.storage] == "cor-stream":
            with contextlib.suppress(DevagentError):
                await self.managed.vm.qmp("nbd-server-stop")

    async def _mirror_until_ready(
        self, nbd: dict[str, str], timeout: float, peer: DaemonClient
    ) -> None:
        vm = self.managed.vm
        server = {"type": "inet", "host": nbd["host"], "port": nbd["port"]}
        await vm.qmp(
            "blockdev-add",
            **{"driver": "nbd", "node-name": TARGET_NODE, "server": server},
            export=nbd["export"],
        )
        mode = "write-blocking" if self.request.storage == "qemu-mirror-active" else "background"
        await vm.qmp(
            "blockdev-mirror",
            **{"job-id": MIRROR_JOB, "device": "disk0", "target": TARGET_NODE},
            sync="full",
            **{"copy-mode": mode, "auto-dismiss": False},
        )
        deadline = time.monotonic() + timeout
        while True:
            jobs: list[dict[str, Any]] = await vm.qmp("query-block-jobs")
            job = next((j for j in jobs if j.get("device") == MIRROR_JOB), None)
            if job is None or job.get("status") == "concluded":
                error = (job or {}).get("error", "it vanished")
                raise PeerError(f"the QEMU mirror stopped before it was ready: {error}")
            self.progress.update(disk_done=job["offset"], disk_left=job["len"] - job["offset"])
            if job.get("ready"):
                return
            await self._check_peer(peer)
            if time.monotonic() > deadline:
                raise PeerError(
                    f"the QEMU mirror was not ready after {timeout:.0f} s (the guest "
                    "dirties the disk faster than the link copies it)"
                )
            await asyncio.sleep(POLL_S)

    async def _end_mirror(self) -> None:
        """At ``pre-switchover`` (guest stopped, disk drained): end the ready mirror with
        ``block-job-cancel``, which copies what is still dirty and leaves the target a
        consistent copy without pivoting onto it (libvirt's order)."""
        vm = self.managed.vm
        await vm.qmp("block-job-cancel", device=MIRROR_JOB)
        job = await _wait_job(vm.qmp, MIRROR_JOB, PEER_TIMEOUT_S)
        self.progress["disk_bytes_pushed"] = job.get("total-progress")

    async def _ram_with_pause(
        self, uri: str, peer: DaemonClient, before_switchover: Any | None
    ) -> dict[str, Any]:
        """QEMU's RAM migration as :meth:`MigrationJob._ram` runs it, plus
        ``pause-before-switchover`` when something must happen once the guest stopped."""
        vm = self.managed.vm
        capabilities = [
            {"capability": "events", "state": True},
            {"capability": "auto-converge", "state": self.request.auto_converge},
            {"capability": "pause-before-switchover", "state": before_switchover is not None},
        ]
        await vm.qmp("migrate-set-capabilities", capabilities=capabilities)
        params: dict[str, Any] = {"max-bandwidth": (self.request.link_rate_bps or 8 << 33) // 8}
        if self.request.downtime_limit_ms:
            params["downtime-limit"] = self.request.downtime_limit_ms
        await vm.qmp("migrate-set-parameters", **params)
        await vm.qmp("migrate", uri=uri)
        while True:
            info: dict[str, Any] = await vm.qmp("query-migrate")
            status = info.get("status")
            ram = info.get("ram", {})
            self.progress.update(
                status=status,
                ram_transferred=ram.get("transferred", 0),
                ram_remaining=ram.get("remaining", 0),
                ram_total=ram.get("total", self.managed.config.ram_mb << 20),
                elapsed_s=round(time.time() - self.started_at, 3),
            )
            if status == "completed":
                return info
            if status == "pre-switchover" and before_switchover is not None:
                await before_switchover()
                await vm.qmp("migrate-continue", state="pre-switchover")
            if status in ("failed", "cancelled"):
                raise PeerError(
                    f"QEMU migration {status}: {info.get('error-desc', 'no reason given')}"
                )
            if vm.exited:
                raise PeerError(f"source QEMU of VM {self.managed.name} exited during migration")
            await self._check_peer(peer)
            await asyncio.sleep(POLL_S)

    async def _check_peer(self, peer: DaemonClient) -> None:
        """The destination's daemon must see the migration through (every PEER_CHECK_S)."""
        if time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + PEER_CHECK_S
        try:
            await asyncio.wait_for(peer.get("/v1/health"), PEER_CHECK_S * 2)
        except (PeerError, TimeoutError) as err:
            raise PeerError(
                f"destination host {self.report.destination} vanished during the migration: {err}"
            ) from err

    async def _roll_back_baseline(self, peer: DaemonClient, cause: BaseException) -> None:
        """Before the switchover: the VM keeps running here, nothing stays on the peer."""
        vm = self.managed.vm
        self.log.warning("rolling back migration %s: %s", self.id, cause)
        with contextlib.suppress(DevagentError):
            await vm.qmp("migrate_cancel")
        with contextlib.suppress(DevagentError):
            jobs = await vm.qmp("query-jobs")
            if any(j.get("id") == MIRROR_JOB for j in jobs):
                with contextlib.suppress(DevagentError):
                    await vm.qmp("block-job-cancel", device=MIRROR_JOB, force=True)
                with contextlib.suppress(DevagentError):
                    await _wait_job(vm.qmp, MIRROR_JOB, 30.0)
        with contextlib.suppress(DevagentError):
            await vm.qmp("blockdev-del", **{"node-name": TARGET_NODE})
        await self._unexport_disk()
        with contextlib.suppress(DevagentError):
            deadline = time.monotonic() + 10.0
            while (status := (await vm.qmp("query-status"))["status"]) == "finish-migrate":
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(POLL_S)
            if status in ("paused", "postmigrate", "finish-migrate"):
                await vm.qmp("cont")
        with contextlib.suppress(DevagentError):
            await peer.delete(f"/v1/incoming/{self.managed.name}")
