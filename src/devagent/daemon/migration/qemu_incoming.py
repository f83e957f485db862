"""The destination's half of QEMU's own storage migration (the plans are :mod:`.qemu_plans`).

``prepare``      ``POST /v1/baselines/incoming``: an incoming QEMU (``-incoming defer``,
                 ``-S``, ``late-block-activate``) with no agent: for ``mirror`` a fresh
                 sparse raw image exported writable on its NBD server; for ``cor-stream`` a
                 qcow2 overlay backed by the source's export under a copy-on-read filter
``commit``       ``POST /v1/baselines/incoming/NAME/commit``: the RAM arrived; stop serving
                 the mirror's target (or start ``block-stream``), run the guest
``stream_done``  ``POST /v1/baselines/incoming/NAME/stream-done``: wait for the stream
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from devagent.daemon.migration.context import free_port
from devagent.daemon.migration.destination import peer_config
from devagent.daemon.migration.messages import (
    BaselineAnswer,
    BaselineIncoming,
    CommitAnswer,
    NbdAddress,
)
from devagent.daemon.migration.qemu_plans import (
    EXPORT_ID,
    EXPORT_NAME,
    JOB_TIMEOUT_S,
    STREAM_JOB,
    wait_job,
)
from devagent.daemon.migration.qemu_tls import (
    CLIENT_CREDS,
    add_creds,
    cli_client_creds,
    migrate_incoming,
)
from devagent.daemon.vms import ManagedVm, VmRole
from devagent.daemon.vms import incoming as incoming_vm
from devagent.daemon.vms.arrival import ARRIVAL_TIMEOUT_S
from devagent.errors import PeerError, StateError, UsageError
from devagent.qemu.answers import StatusInfo
from devagent.qemu.config import DiskSpec, NbdSource
from devagent.qemu.vm import VmState
from devagent.wait import wait_until

if TYPE_CHECKING:
    from devagent.daemon.host import Host


async def prepare(host: Host, incoming: BaselineIncoming) -> BaselineAnswer:
    if incoming.mode not in ("mirror", "cor-stream"):
        raise UsageError("'mode' must be 'mirror' or 'cor-stream'")
    request = incoming.request
    image, disk = await _disk(host, request.name, incoming)
    extra: tuple[str, ...] = ("-S",)  # a peer's own QEMU options are refused
    if host.tls is not None and incoming.mode == "cor-stream":  # its backing is over TLS
        extra = (*extra, *cli_client_creds(host.tls))
    config = peer_config(incoming.config).replace(disks=(disk,), incoming=True, extra_args=extra)
    try:
        managed = await incoming_vm.add_incoming(host.vms, request, config, image)
        managed.source_host = incoming.source or None
        managed.save()
    except BaseException:
        image.unlink(missing_ok=True)
        raise
    try:
        return await _listen(host, managed, incoming.mode, incoming.source)
    except BaseException:
        await host.vms.remove(managed.name)
        raise


async def _disk(host: Host, name: str, incoming: BaselineIncoming) -> tuple[Path, DiskSpec]:
    folder = host.root / "disks"
    folder.mkdir(parents=True, exist_ok=True)
    if incoming.mode == "mirror":
        image = folder / f"{name}.img"
        image.unlink(missing_ok=True)
        with image.open("wb") as f:
            f.truncate(incoming.size)
        return image, DiskSpec(node="disk0", path=str(image), format="raw", unmap=True)
    if incoming.source_export is None:
        raise UsageError("'cor-stream' needs 'source_export': {'host', 'port', 'export'}")
    image = folder / f"{name}.qcow2"
    image.unlink(missing_ok=True)
    await asyncio.to_thread(_make_overlay, image, incoming.size)
    source = incoming.source_export
    creds = CLIENT_CREDS if host.tls is not None else None
    backing = NbdSource(host=source.host, port=source.port, export=source.export, tls_creds=creds)
    disk = DiskSpec(
        node="disk0", path=str(image), format="qcow2", backing_nbd=backing, copy_on_read=True
    )
    return image, disk


async def _listen(host: Host, managed: ManagedVm, mode: str, source: str) -> BaselineAnswer:
    vm = managed.vm
    caps = [{"capability": c, "state": True} for c in ("events", "late-block-activate")]
    await vm.qmp("migrate-set-capabilities", capabilities=caps)
    nbd = None
    if mode == "mirror":
        port = free_port(host.address)
        addr = {"type": "inet", "data": {"host": host.address, "port": str(port)}}
        tls = {} if host.tls is None else await add_creds(vm, host.tls, "server", source)
        await vm.qmp("nbd-server-start", addr=addr, **tls)
        # The export activates the incoming disk node (as libvirt relies on) so the
        # mirror can write it while migration is under way.
        await vm.qmp(
            "block-export-add",
            **{"type": "nbd", "id": EXPORT_ID, "node-name": "disk0"},
            writable=True,
            name=EXPORT_NAME,
        )
        nbd = NbdAddress(host=host.address, port=str(port), export=EXPORT_NAME)
    uri = f"tcp:{host.address}:{free_port(host.address)}"
    await migrate_incoming(vm, uri, host.tls, source)
    return BaselineAnswer(uri=uri, nbd=nbd)


def _make_overlay(path: Path, size: int) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise PeerError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def _is_stream(managed: ManagedVm) -> bool:
    return bool(managed.config.disks and managed.config.disks[0].copy_on_read)


async def commit(managed: ManagedVm) -> CommitAnswer:
    """The RAM arrived; run the guest. A mirror's target stops being served first; a stream
    starts right after."""
    if managed.role is not VmRole.INCOMING:
        raise StateError(f"VM {managed.name} is not an incoming VM")
    vm = managed.vm

    async def arrived() -> bool:
        if vm.exited:
            raise PeerError(f"VM {managed.name}: its QEMU exited before the migration arrived")
        return (await vm.query("query-status", StatusInfo)).status != "inmigrate"

    await wait_until(arrived, timeout=ARRIVAL_TIMEOUT_S, interval=0.01,
                     what=f"VM {managed.name}'s migration to arrive")  # fmt: skip
    if not _is_stream(managed):
        await vm.qmp("nbd-server-stop")  # the mirror is done: nobody writes the disk but us
    managed.commit_began()  # saved before the guest runs: the point of no return
    if vm.state is not VmState.RUNNING:
        await vm.qmp("cont")
    await managed.wait_running(timeout=30.0)
    if _is_stream(managed):
        await vm.qmp(
            "block-stream",
            **{"job-id": STREAM_JOB, "device": "disk0-overlay", "auto-dismiss": False},
        )
    managed.arrived()
    managed.save()
    assert vm.resumed_at is not None
    return CommitAnswer(resumed_at=vm.resumed_at, vm=managed.api_status())


async def stream_done(managed: ManagedVm) -> dict[str, int]:
    """Wait until ``block-stream`` has copied everything the overlay lacked (the source is
    then no longer needed)."""
    if not _is_stream(managed):
        raise StateError(f"VM {managed.name} has no block-stream running")
    job = await wait_job(managed.vm, STREAM_JOB, JOB_TIMEOUT_S)
    return {"stream_len": job.total_progress}
