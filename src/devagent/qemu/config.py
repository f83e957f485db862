"""A VM's description, serialisable to JSON (so daemons can hand it to each other for a
migration) and turned into QEMU's command line by :meth:`VmConfig.qemu_args`.

Each part is a declared type (a frozen msgspec Struct): a configuration is decoded once, in
one call that names a bad field's path (:meth:`VmConfig.from_json`), and QEMU's ``-blockdev``
JSON is built from QEMU's own node types (:class:`BlockNode` and its kinds), not dicts."""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from devagent.errors import UsageError

DiskFormat = Literal["raw", "qcow2"]


# --- QEMU's -blockdev graph (QAPI ``BlockdevOptions``, tagged by ``driver``) ----------------


class Cache(msgspec.Struct, rename="kebab"):
    direct: bool
    no_flush: bool = False


class UnixAddress(msgspec.Struct, tag="unix", tag_field="type"):
    path: str


class InetAddress(msgspec.Struct, tag="inet", tag_field="type"):
    host: str
    port: str


class BlockNode(msgspec.Struct, rename="kebab", omit_defaults=True, tag_field="driver"):
    """A node of QEMU's block graph; its kind is its ``driver``."""


class FileNode(BlockNode, tag="file"):
    filename: str
    cache: Cache
    aio: Literal["threads", "native", "io_uring"]


class NbdNode(BlockNode, tag="nbd"):
    server: UnixAddress | InetAddress
    export: str
    reconnect_delay: int = 0
    tls_creds: str | None = None


class FormatNode(BlockNode):
    """A format driver's node over ``file`` (and, for an overlay, ``backing``)."""

    file: FileNode | NbdNode
    node_name: str | None = None
    read_only: bool = False
    discard: str | None = None
    detect_zeroes: str | None = None
    backing: RawNode | None = None


class RawNode(FormatNode, tag="raw"):
    pass


class Qcow2Node(FormatNode, tag="qcow2"):
    pass


class CopyOnReadNode(BlockNode, tag="copy-on-read"):
    node_name: str
    file: RawNode | Qcow2Node


FORMATS: dict[str, type[RawNode] | type[Qcow2Node]] = {"raw": RawNode, "qcow2": Qcow2Node}


# --- the VM -------------------------------------------------------------------------------


class NbdSource(msgspec.Struct, frozen=True):
    """An NBD export on another host (a QEMU-only baseline's backing: its source's disk)."""

    host: str
    port: str
    export: str
    tls_creds: str | None = None  # the id of the QEMU's tls-creds-x509 client object


class DiskSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One virtio disk. Exactly one of ``path`` (a file QEMU opens itself) or ``nbd_socket``
    (an NBD export on a unix socket, e.g. a device agent) says where its bytes are."""

    node: str = "disk0"
    path: str | None = None
    format: DiskFormat = "raw"
    nbd_socket: str | None = None
    nbd_export: str = ""
    reconnect_delay_s: int = 0
    direct: bool = False
    # The QEMU-only baselines (devagent.daemon.migration.qemu_incoming) build a little more of
    # the graph: zeroes written as holes, a qcow2 overlay whose backing is an NBD export on
    # another host, and a copy-on-read filter on top.
    unmap: bool = False
    backing_nbd: NbdSource | None = None
    copy_on_read: bool = False
    #: What the guest reads as the disk's serial (``/sys/block/vdX/serial``): its node,
    #: so that the guest tells its disks apart (None in records from before it).
    serial: str | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.nbd_socket is None):
            raise UsageError(f"disk {self.node}: give exactly one of a path or an NBD socket")

    def replace(self, **changes: object) -> DiskSpec:
        return msgspec.structs.replace(self, **changes)

    def protocol(self) -> FileNode | NbdNode:
        if self.path is not None:
            return FileNode(filename=self.path, cache=Cache(direct=self.direct), aio="threads")
        assert self.nbd_socket is not None
        return NbdNode(
            server=UnixAddress(path=self.nbd_socket),
            export=self.nbd_export,
            reconnect_delay=self.reconnect_delay_s,
        )

    def blockdev(self) -> RawNode | Qcow2Node | CopyOnReadNode:
        top = f"{self.node}-overlay" if self.copy_on_read else self.node
        node = FORMATS[self.format](file=self.protocol(), node_name=top)
        if self.unmap:
            node.discard = node.detect_zeroes = "unmap"
        if self.backing_nbd is not None:
            nbd = self.backing_nbd
            source = NbdNode(
                server=InetAddress(host=nbd.host, port=nbd.port), export=nbd.export,
                tls_creds=nbd.tls_creds,
            )  # fmt: skip
            node.backing = RawNode(file=source, node_name=f"{self.node}-source", read_only=True)
        if self.copy_on_read:
            return CopyOnReadNode(node_name=self.node, file=node)
        return node


class NicSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One virtio NIC on QEMU's ``stream`` netdev, QEMU listening on the unix socket
    ``stream_socket`` for its net agent (``devagent agent net --vm-socket``). QEMU is the
    server because in 7.2 only the server side survives its peer going away: it listens
    again, and the agent reconnects."""

    id: str = "net0"
    stream_socket: str = ""
    mac: str | None = None

    def __post_init__(self) -> None:
        if not self.stream_socket:
            raise UsageError(f"nic {self.id}: give the stream socket its agent connects to")

    def replace(self, **changes: object) -> NicSpec:
        return msgspec.structs.replace(self, **changes)

    def qemu_args(self, index: int) -> list[str]:
        netdev = f"stream,id={self.id},server=on,addr.type=unix,addr.path={self.stream_socket}"
        device = f"virtio-net-pci,netdev={self.id},id=nic{index}"
        if self.mac:
            device += f",mac={self.mac}"
        return ["-netdev", netdev, "-device", device]


#: RAM a TCG guest gets beyond its ``ram_mb`` on QEMU before 9.0 (Debian 12 has 7.2), which
#: loses guest stores in a TCG guest's RAM migration: when a RAM block is a whole number of
#: 256 KiB, its dirty-bitmap sync takes a fast path that clears the bits without re-arming
#: the TCG TLB's dirty trap, so later stores through that TLB entry are never sent (QEMU
#: commit "physmem: Fix migration dirty bitmap coherency with TCG memory access", in 9.0).
#: Seen here as a guest that read a block one generation newer than its own table said.
#: A block of any other size takes the per-page path, which re-arms the trap, but page by
#: page: each dirty page costs a walk of every vCPU's TLB, under QEMU's global lock. The
#: migration's first sync finds every page dirty, and held a 128 MiB guest's vCPU and I/O
#: for about 100 ms here (perf: the migration thread in ``tlb_reset_dirty``). QEMU 9.0's
#: fast path re-arms the trap with one walk per RAM block, so from 9.0 on the RAM is left
#: as asked.
TCG_RAM_EXTRA_KB = 8
#: The first QEMU whose fast path is safe under TCG.
TCG_DIRTY_SYNC_FIXED = (9, 0)


def qemu_release(version: str) -> tuple[int, int] | None:
    """(major, minor) of ``qemu-system-x86_64 --version``'s first line, or None."""
    found = re.search(r"version (\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else None


def ram_extra_kb(accel: str, qemu: str) -> int:
    """What a guest under ``accel`` gets beyond its ``ram_mb`` on QEMU ``qemu`` (its version
    line; see :data:`TCG_RAM_EXTRA_KB`). A version not understood gets the extra."""
    if accel != "tcg":
        return 0
    release = qemu_release(qemu)
    return 0 if release is not None and release >= TCG_DIRTY_SYNC_FIXED else TCG_RAM_EXTRA_KB


class VmConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Everything needed to start (or receive) the same VM on any host. Its JSON leaves out
    what is at its default, so that a field added later (``ram_extra_kb``) reaches a daemon
    that does not know it only when it matters."""

    name: str
    ram_mb: int = 256
    #: :data:`TCG_RAM_EXTRA_KB` for a TCG guest (0 in records from before it).
    ram_extra_kb: int = 0
    cpus: int = 1
    accel: Literal["tcg", "kvm"] = "tcg"
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    incoming: bool = False
    extra_args: tuple[str, ...] = ()

    def qemu_args(self) -> list[str]:
        args = [
            "-name",
            f"{self.name},process=qemu-{self.name}",
            "-machine",
            f"pc,accel={self.accel}",
            "-m",
            f"{self.ram_mb * 1024 + self.ram_extra_kb}K" if self.ram_extra_kb else str(self.ram_mb),
            "-smp",
            str(self.cpus),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ]
        if self.kernel:
            args += ["-kernel", self.kernel]
            if self.initrd:
                args += ["-initrd", self.initrd]
            if self.append:
                args += ["-append", self.append]
        for index, disk in enumerate(self.disks):
            args += ["-blockdev", msgspec.json.encode(disk.blockdev()).decode()]
            device = f"virtio-blk-pci,drive={disk.node},id=vd{index}"
            if disk.serial:
                device += f",serial={disk.serial}"
            if not self.kernel and index == 0:
                device += ",bootindex=1"
            args += ["-device", device]
        for index, nic in enumerate(self.nics):
            args += nic.qemu_args(index)
        if self.incoming:
            args += ["-incoming", "defer"]
        return args + list(self.extra_args)

    def to_json(self) -> object:
        """As JSON values (what a peer's :meth:`from_json` takes)."""
        return msgspec.to_builtins(self)

    @classmethod
    def from_json(cls, data: object) -> VmConfig:
        """A configuration from parsed JSON (a saved ``vm.json``); :class:`UsageError`
        naming the bad field's path."""
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as err:
            raise UsageError(f"bad VM configuration: {err}") from None

    def replace(self, **changes: object) -> VmConfig:
        return msgspec.structs.replace(self, **changes)
