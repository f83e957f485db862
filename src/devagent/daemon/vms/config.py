"""How a VM request becomes a QEMU configuration: its disk (the agent's NBD export, or the
image itself), its NICs, and for the test guest its kernel, initramfs and accelerator.

:func:`build_config` is pure: what it needs of the machine (the test guest's files, whether
KVM works, QEMU's version, which only ``qemu-system-x86_64 --version`` tells, by subprocess)
is found once by :class:`TestGuest`, off the event loop and before the VM manager takes its
lock.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

from devagent.daemon.agents import AgentProcess
from devagent.daemon.nics import NicAgent
from devagent.errors import NotFound, PeerError, StateError, UsageError
from devagent.guest.build import GuestImage, load_guest
from devagent.guest.probe import DiskDigest, disk_digest
from devagent.guest.workload import parse_workload
from devagent.qemu.accel import Accel, choose_accel, qemu_version
from devagent.qemu.config import DiskFormat, DiskSpec, NicSpec, VmConfig, ram_extra_kb

from .request import VmRequest

NBD_RECONNECT_DELAY_S = 5  # QEMU's NBD client reconnects to a restarted agent


class GuestBoot(NamedTuple):
    """The test guest and the accelerator it boots under on this machine."""

    image: GuestImage
    accel: Accel


class TestGuest:
    """Finds the test guest and its accelerator, once per guest kernel, in a thread: the
    accelerator's cache key holds QEMU's version, which only a subprocess tells."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self._accel: dict[str, Accel] = {}  # guest kernel version → accelerator

    async def qemu(self) -> str:
        """QEMU's version line (a subprocess the first time: in a thread)."""
        return await asyncio.to_thread(qemu_version)

    async def find(self) -> GuestBoot:
        """The test guest (NotFound when it is not built) and its accelerator."""
        image = await asyncio.to_thread(load_guest)
        if image.kernel_version not in self._accel:
            accel: Accel = await asyncio.to_thread(choose_accel, image)
            self._accel[image.kernel_version] = accel
        return GuestBoot(image, self._accel[image.kernel_version])


def image_format(path: Path) -> DiskFormat:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise NotFound(f"disk image {path}: {err.strerror}") from err
    return "qcow2" if magic == b"QFI\xfb" else "raw"


def check_growable(path: Path) -> None:
    """A qcow2 image grows its file as the guest writes new clusters; served by an agent
    (NBD: a fixed size) it cannot, and QEMU then hangs the guest's write. One whose file
    is not as large as its disk (its metadata preallocated) is refused, saying how."""
    if image_format(path) != "qcow2":
        return
    with path.open("rb") as f:
        header = f.read(32)
    virtual = int.from_bytes(header[24:32], "big")
    if path.stat().st_size < virtual:
        raise UsageError(
            f"disk image {path} is a qcow2 that grows as the guest writes: served by an "
            "agent its size is fixed, so it must hold its whole disk already (qemu-img "
            "create -f qcow2 -o preallocation=metadata, or qemu-img convert -O qcow2 -o "
            "preallocation=metadata), or be raw"
        )


def image_digest(path: Path) -> DiskDigest:
    """The probe digest of a disk image: a raw one is read as it is; a qcow2 one (the
    ``qemu-cor-stream`` baseline's overlay) through a raw copy ``qemu-img`` makes."""
    if image_format(path) == "raw":
        return disk_digest(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.img"
        argv = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(path), str(raw)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise PeerError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
        return disk_digest(raw)


def disk_spec(node: str, image: Path, agent: AgentProcess | None, fmt: DiskFormat) -> DiskSpec:
    """Disk ``node``: its agent's NBD export when it has one, else the image itself; the
    guest sees the node as the disk's serial."""
    if agent is None:
        return DiskSpec(node=node, path=str(image), format=fmt, serial=node)
    return DiskSpec(
        node=node,
        nbd_socket=str(agent.nbd_socket),
        nbd_export=agent.export,
        format=fmt,
        reconnect_delay_s=NBD_RECONNECT_DELAY_S,
        serial=node,
    )


def build_config(
    request: VmRequest,
    disks: tuple[DiskSpec, ...],
    nics: tuple[NicAgent, ...] = (),
    *,
    guest: GuestBoot | None = None,
    qemu: str = "",
) -> VmConfig:
    """The QEMU configuration for ``request`` with ``disks`` and the NICs ``nics``. The test
    guest (``guest``, needed when the request runs it) is told on the kernel command line
    the address of each NIC in order (``devagent.ip=``) and, with several disks, the
    serials of those its probe writes (``devagent.disks=``). ``qemu`` is QEMU's version
    line: a TCG guest's RAM depends on it (:func:`ram_extra_kb`; not known: the safe side)."""
    specs = tuple(NicSpec(id=n.node, stream_socket=str(n.stream_socket), mac=n.mac) for n in nics)
    if request.has_probe:
        if guest is None:
            raise StateError(f"VM {request.name} runs the test guest: find it first (TestGuest)")
        assert request.workload is not None
        workload = parse_workload(request.workload)
        return VmConfig(
            name=request.name,
            ram_mb=request.ram_mb,
            ram_extra_kb=ram_extra_kb(guest.accel, qemu),
            accel=guest.accel,
            kernel=str(guest.image.kernel),
            initrd=str(guest.image.initrd),
            append=f"console=ttyS0 quiet panic=-1 {workload.to_kernel_arg()}"
            + (f" devagent.ip={','.join(n.address for n in nics)}" if nics else "")
            + (f" devagent.disks={','.join(d.node for d in disks)}" if len(disks) > 1 else ""),
            disks=disks,
            nics=specs,
        )
    return VmConfig(
        name=request.name,
        ram_mb=request.ram_mb,
        accel="tcg",
        ram_extra_kb=ram_extra_kb("tcg", qemu),
        kernel=request.kernel,
        initrd=request.initrd,
        append=request.append,
        disks=disks,
        nics=specs,
    )
