"""A VM's description, serialisable to JSON (so daemons can hand it to each other for a
migration) and turned into QEMU's command line by :meth:`VmConfig.qemu_args`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from devagent.errors import UsageError

DiskFormat = Literal["raw", "qcow2"]


@dataclass(frozen=True)
class DiskSpec:
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
    # the graph:
    # zeroes written as holes, a qcow2 overlay whose backing is an NBD export on another
    # host (``{"host", "port", "export"}``), and a copy-on-read filter on top.
    unmap: bool = False
    backing_nbd: dict[str, str] | None = None
    copy_on_read: bool = False

    def __post_init__(self) -> None:
        if (self.path is None) == (self.nbd_socket is None):
            raise UsageError(f"disk {self.node}: give exactly one of a path or an NBD socket")

    def blockdev(self) -> dict[str, Any]:
        protocol: dict[str, Any]
        if self.path is not None:
            protocol = {
                "driver": "file",
                "filename": self.path,
                "cache": {"direct": self.direct, "no-flush": False},
                "aio": "threads",
            }
        else:
            protocol = {
                "driver": "nbd",
                "server": {"type": "unix", "path": self.nbd_socket},
                "export": self.nbd_export,
            }
            if self.reconnect_delay_s:
                protocol["reconnect-delay"] = self.reconnect_delay_s
        top = f"{self.node}-overlay" if self.copy_on_read else self.node
        node: dict[str, Any] = {"driver": self.format, "node-name": top, "file": protocol}
        if self.unmap:
            node.update({"discard": "unmap", "detect-zeroes": "unmap"})
        if self.backing_nbd is not None:
            server = {"type": "inet", **{k: self.backing_nbd[k] for k in ("host", "port")}}
            node["backing"] = {
                "driver": "raw",
                "node-name": f"{self.node}-source",
                "read-only": True,
                "file": {"driver": "nbd", "server": server, "export": self.backing_nbd["export"]},
            }
        if self.copy_on_read:
            return {"driver": "copy-on-read", "node-name": self.node, "file": node}
        return node


@dataclass(frozen=True)
class NicSpec:
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

    def qemu_args(self, index: int) -> list[str]:
        netdev = f"stream,id={self.id},server=on,addr.type=unix,addr.path={self.stream_socket}"
        device = f"virtio-net-pci,netdev={self.id},id=nic{index}"
        if self.mac:
            device += f",mac={self.mac}"
        return ["-netdev", netdev, "-device", device]


@dataclass(frozen=True)
class VmConfig:
    """Everything needed to start (or receive) the same VM on any host."""

    name: str
    ram_mb: int = 256
    cpus: int = 1
    accel: Literal["tcg", "kvm"] = "tcg"
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    incoming: bool = False
    extra_args: tuple[str, ...] = field(default=())

    def qemu_args(self) -> list[str]:
        args = [
            "-name",
            f"{self.name},process=qemu-{self.name}",
            "-machine",
            f"pc,accel={self.accel}",
            "-m",
            str(self.ram_mb),
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
            args += ["-blockdev", json.dumps(disk.blockdev(), separators=(",", ":"))]
            device = f"virtio-blk-pci,drive={disk.node},id=vd{index}"
            if not self.kernel and index == 0:
                device += ",bootindex=1"
            args += ["-device", device]
        for index, nic in enumerate(self.nics):
            args += nic.qemu_args(index)
        if self.incoming:
            args += ["-incoming", "defer"]
        return args + list(self.extra_args)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmConfig:
        try:
            fields = dict(data)
            fields["disks"] = tuple(DiskSpec(**d) for d in fields.get("disks", ()))
            fields["nics"] = tuple(NicSpec(**n) for n in fields.get("nics", ()))
            fields["extra_args"] = tuple(fields.get("extra_args", ()))
            return cls(**fields)
        except TypeError as err:
            raise UsageError(f"bad VM configuration: {err}") from err
