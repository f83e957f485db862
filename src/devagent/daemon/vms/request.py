"""What a user asks of the daemon's VM API: declared types, decoded once at the edge.

A request body becomes a typed object in one call, :func:`decode` (raw bytes) or
:func:`convert` (JSON already parsed: a saved ``vm.json``, a peer's payload). The fields
declare their own constraints (``msgspec.Meta``); the rules that tie fields together are
checked in one place (:meth:`VmRequestBody.request`). msgspec names a bad field by its path
(``$.ram_mb``); both functions translate its errors into :class:`UsageError` (a 400) with
the project's wording for that field, and the path.

:class:`VmRequestBody` is the wire form, what a client may write (``"nic": true``,
``"disk_size": "1G"``); :class:`VmRequest` what the daemon keeps, one meaning per field. A
request's JSON (``vm.json``, the incoming payload) is a valid body too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from devagent.client import Endpoint
from devagent.errors import UsageError
from devagent.guest.workload import parse_workload
from devagent.vocab import parse_size

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
Name = Annotated[str, msgspec.Meta(pattern=NAME_RE.pattern)]
MIN_DISK_BYTES, MAX_DISK_BYTES = 1 << 20, 1 << 40
MAX_DISKS = 8  # disk0 … disk7
MAX_NICS = 4  # net0 … net3
DEFAULT_DISK_BYTES = 1 << 30
Storage = Literal["shared", "local"]
T = TypeVar("T")

NAME_RULE = "'name' must be 1-32 characters of a-z, 0-9 and '-'"


# --- decoding, and msgspec's errors in the project's words ---------------------------------


def decode(raw: bytes, kind: type[T], rules: Mapping[str, str] | None = None) -> T:
    """``raw`` (a request body; empty is ``{}``) as a ``kind``; :class:`UsageError` naming
    the bad field's path, with ``rules[field]`` saying what that field must be."""
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except msgspec.ValidationError as err:
        raise usage_error(err, rules or {}) from err
    except msgspec.DecodeError as err:
        raise UsageError(f"request body is not valid JSON: {err}") from err


def convert(data: Any, kind: type[T], rules: Mapping[str, str] | None = None) -> T:
    """JSON already parsed, as a ``kind`` (the errors as :func:`decode` says them)."""
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as err:
        raise usage_error(err, rules or {}) from err


def usage_error(err: msgspec.ValidationError, rules: Mapping[str, str]) -> UsageError:
    """``Expected `int` >= 64 - at `$.ram_mb``` → the field's rule, at ``$.ram_mb``."""
    text, _, where = str(err).partition(" - at `")
    path = where.rstrip("`") or "$"
    field = re.split(r"[.\[]", path.removeprefix("$."), maxsplit=1)[0] if path != "$" else ""
    if not field and text.startswith("Expected `object`"):
        return UsageError(f"the request body must be a JSON object (at $: {text})")
    rule = rules.get(field)
    if rule is None:
        return UsageError(f"{text} (at {path})")
    return UsageError(f"{rule} (at {path}: {text})")


# --- POST /v1/vms ------------------------------------------------------------------------------


class RemoteHome(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a disk lives when it is not on its VM's host: an export on a peer host, which
    the VM reaches by remote access."""

    peer: Endpoint
    export: str  # the export's name there

    @property
    def path(self) -> Path:
        """What the VM's record says of the disk's image: no path on the VM's host."""
        return Path(f"/remote/{self.peer.name}/{self.export}")


class DiskRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One disk of a VM: a new one of ``size`` bytes (made by the daemon, written by the test
    guest's probe), or the user's own raw or qcow2 ``image``; ``lives_on`` a peer host when
    the VM uses it there by remote access."""

    size: int = 0
    image: str | None = None
    lives_on: RemoteHome | None = None

    def __post_init__(self) -> None:
        if (self.image is None) == (self.size == 0):
            raise UsageError("a disk is either a size (a new disk) or an image, not both")
        if self.image is None and not MIN_DISK_BYTES <= self.size <= MAX_DISK_BYTES:
            raise UsageError("a disk's size must be from 1M to 1T")


def disk_node(index: int) -> str:
    """The node (QEMU's, the agent's, the guest's serial) of a VM's disk ``index``."""
    return f"disk{index}"


def export_name(vm: str, node: str) -> str:
    """The name of the export that serves VM ``vm``'s disk ``node`` on a peer host."""
    return vm if node == "disk0" else f"{vm}-{node}"


def disk_file(vm: str, node: str) -> str:
    """The file name of a new disk devagent makes for VM ``vm`` (or a replica of it):
    ``NAME.img`` for its first, ``NAME-diskN.img`` for the others."""
    return f"{vm}.img" if node == "disk0" else f"{vm}-{node}.img"


def nic_node(index: int) -> str:
    """The node (QEMU's netdev, the net agent's) of a VM's NIC ``index``."""
    return f"net{index}"


class VmRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a user asks for when starting a VM, checked (made from a :class:`VmRequestBody`
    or, in tests, directly; decoded directly, as a migration's messages carry it, its name
    and RAM are checked)."""

    name: Name
    ram_mb: Annotated[int, msgspec.Meta(ge=64, le=65536)] = 256
    #: Its disks in order (``disk0``, ``disk1``, …): the first one boots a user's guest.
    disks: tuple[DiskRequest, ...] = (DiskRequest(size=DEFAULT_DISK_BYTES),)
    workload: str | None = "moderate"
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    storage: Storage = "shared"
    agent: bool = True  # False: QEMU opens the image itself (the QEMU-only baselines)
    nics: int = 0  # NICs on this host's guest network (the test guest configures each)

    @classmethod
    def from_json(cls, data: Any) -> VmRequest:
        """A request from JSON already parsed (a saved record, a peer's payload). A record
        from before several disks wrote ``disk_size`` beside the image ``disk``: unused."""
        if isinstance(data, dict) and data.get("disk") is not None:
            data = {k: v for k, v in data.items() if k != "disk_size"}
        return convert(data, VmRequestBody, VM_RULES).request()

    def to_json(self) -> object:
        """The request as JSON values (its saved record, a peer's payload)."""
        return msgspec.to_builtins(self)

    def replace(self, **changes: Any) -> VmRequest:
        return msgspec.structs.replace(self, **changes)

    @property
    def has_probe(self) -> bool:
        """The VM runs the test guest (its probe writes every disk): it has no user image."""
        return not self.own_images

    @property
    def own_images(self) -> bool:
        """Some disk is the user's own image (never deleted, never made by devagent)."""
        return any(d.image is not None for d in self.disks)

    def nodes(self) -> list[str]:
        return [disk_node(i) for i in range(len(self.disks))]

    def disk(self, node: str) -> DiskRequest:
        for index, disk in enumerate(self.disks):
            if disk_node(index) == node:
                return disk
        raise UsageError(f"VM {self.name} has no disk {node!r}")

    def with_disk(self, node: str, disk: DiskRequest) -> VmRequest:
        """The same request with disk ``node`` as ``disk`` (one that moved, say)."""
        self.disk(node)  # it has such a disk
        disks = tuple(
            disk if n == node else d for n, d in zip(self.nodes(), self.disks, strict=True)
        )
        return self.replace(disks=disks)

    def remote_disks(self) -> dict[str, RemoteHome]:
        """The disks that live on a peer host (remote access), by node."""
        return {
            node: disk.lives_on
            for node, disk in zip(self.nodes(), self.disks, strict=True)
            if disk.lives_on is not None
        }


#: What each field of a VM request must be (the 400's wording).
VM_RULES: Mapping[str, str] = {
    "name": NAME_RULE,
    "ram_mb": "'ram_mb' must be an integer from 64 to 65536",
    "disk_size": "'disk_size' must be a size in bytes or with a K, M or G suffix",
    "data_disks": "'data_disks' must be a list of sizes (in bytes or with a K, M or G suffix)",
    "disk": "'disk' must be an image's path, or a list of them",
    "disks": "'disks' must be a list of {'size': BYTES} or {'image': PATH}",
    "storage": "'storage' must be 'shared' or 'local'",
    "agent": "'agent' must be true or false",
    "nic": "'nic' must be true or false (or give 'nics', not both)",
    "nics": f"'nics' must be from 0 to {MAX_NICS}",
    "disk_from": "'disk_from': a peer must be given as {'url': …, 'token': …}",
    **{key: f"'{key}' must be a string" for key in ("workload", "kernel", "initrd")},
    "append": "'append' must be a string",
}


class VmRequestBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``POST /v1/vms`` body as a client may write it. Its disks are either ``disks``
    (a VM's record: each a size or an image) or, as a user writes them, ``disk`` (the
    user's image, or several), else a new disk of ``disk_size``; then ``data_disks`` (new
    disks of those sizes)."""

    name: Name
    ram_mb: Annotated[int, msgspec.Meta(ge=64, le=65536)] = 256
    disk_size: int | str | msgspec.UnsetType = msgspec.UNSET  # bytes, or "1G"
    data_disks: list[int | str] = msgspec.field(default_factory=list)
    disks: list[DiskRequest] | msgspec.UnsetType = msgspec.UNSET
    workload: str | None = "moderate"
    disk: str | list[str] | None = None
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    storage: Storage = "shared"
    agent: bool = True
    disk_from: Endpoint | None = None
    nics: Annotated[int, msgspec.Meta(ge=0, le=MAX_NICS)] | msgspec.UnsetType = msgspec.UNSET
    nic: bool | msgspec.UnsetType = msgspec.UNSET  # "nic": true is one NIC

    def request(self) -> VmRequest:
        """The request, once the rules between fields hold."""
        if self.nic is not msgspec.UNSET and self.nics is not msgspec.UNSET:
            raise UsageError(f"{VM_RULES['nic']} (at $.nic)")
        nics = int(self.nic) if self.nic is not msgspec.UNSET else (self.nics or 0)
        if re.search(r"-disk[0-9]+$", self.name):  # another VM's disk file, its export
            raise UsageError(f"a VM's name cannot end in -diskN (at $.name: {self.name!r})")
        disks = self._disks()
        own = any(d.image is not None for d in disks)
        if not own and (self.kernel or self.initrd):
            raise UsageError("'kernel'/'initrd' are for a user's own guest: give 'disk' too")
        workload = None if own else self.workload  # a user's guest: no probe
        if workload is not None:
            parse_workload(workload)  # raises UsageError when malformed
        if self.disk_from is not None:  # its one disk, new, on that peer
            if own or not self.agent or len(disks) > 1:
                raise UsageError("'disk_from' makes one new disk on the peer: no 'disk' with it")
            home = RemoteHome(peer=self.disk_from, export=export_name(self.name, "disk0"))
            disks = (msgspec.structs.replace(disks[0], lives_on=home),)
        return VmRequest(
            name=self.name, ram_mb=self.ram_mb, disks=disks, workload=workload,
            kernel=self.kernel, initrd=self.initrd, append=self.append,
            storage=self.storage, agent=self.agent, nics=nics,
        )  # fmt: skip

    def _disks(self) -> tuple[DiskRequest, ...]:
        if self.disks is not msgspec.UNSET:
            if self.disk is not None or self.disk_size is not msgspec.UNSET or self.data_disks:
                raise UsageError("give 'disks', or 'disk'/'disk_size'/'data_disks', not both")
            disks = tuple(self.disks)
        else:
            images = [self.disk] if isinstance(self.disk, str) else self.disk or []
            if images and self.disk_size is not msgspec.UNSET:
                raise UsageError("'disk_size' is for a new disk: not with 'disk' (an image)")
            first = [] if images else [_sized(self.disk_size, "disk_size")]
            disks = (
                *(DiskRequest(image=image) for image in images),
                *first,
                *(_sized(size, f"data_disks[{i}]") for i, size in enumerate(self.data_disks)),
            )
        if not 1 <= len(disks) <= MAX_DISKS:
            raise UsageError(f"a VM has 1 to {MAX_DISKS} disks, not {len(disks)}")
        return disks


def _sized(size: int | str | msgspec.UnsetType, where: str) -> DiskRequest:
    """A new disk of ``size`` (``DEFAULT_DISK_BYTES`` unset), its range checked."""
    found = DEFAULT_DISK_BYTES if size is msgspec.UNSET else parse_size(size)
    if not MIN_DISK_BYTES <= found <= MAX_DISK_BYTES:
        raise UsageError(f"'{where.split('[')[0]}' must be from 1M to 1T (at $.{where})")
    return DiskRequest(size=found)


def decode_vm_request(raw: bytes) -> VmRequest:
    """The ``POST /v1/vms`` body."""
    return decode(raw, VmRequestBody, VM_RULES).request()


# --- the bodies of a VM's device and probe requests --------------------------------------------


class SwapBody(msgspec.Struct, frozen=True):
    """``POST /v1/vms/{name}/devices/{node}/swap``: ``to`` a path (a disk) or a tap (a NIC)."""

    to: Annotated[str, msgspec.Meta(min_length=1)]
    sync: bool = False
    rate_limit: Annotated[int, msgspec.Meta(gt=0)] | None = None


SWAP_RULES: Mapping[str, str] = {
    "to": "body must be {'to': ABSOLUTE_PATH, 'sync': bool} (for a NIC {'to': TAP})",
    "sync": "'sync' must be true or false",
    "rate_limit": "'rate_limit' must be a positive number of bytes per second",
}


class AttachRemoteBody(msgspec.Struct, frozen=True):
    """``POST /v1/vms/{name}/devices/{node}/attach-remote``: move the disk to ``from``."""

    peer: Endpoint = msgspec.field(name="from")
    sync: bool = False

    def endpoint(self) -> Endpoint:
        return self.peer


ATTACH_RULES: Mapping[str, str] = {
    "from": "body must be {'from': {'url', 'token', 'name'}, 'sync': bool}",
    "sync": "'sync' must be true or false",
}

KEEP_RULES: Mapping[str, str] = {
    "peer": "body must be {'peer': {'url', 'token', 'name'}, 'export': NAME}",
    "export": "'export' must be the export's name on the peer",
}

ProbeCommand = Literal["pause", "resume", "verify"]


class ProbeBody(msgspec.Struct, frozen=True):
    """``POST /v1/vms/{name}/probe``: a command for the guest's ioprobe."""

    command: ProbeCommand


PROBE_RULES: Mapping[str, str] = {"command": "body must be {'command': 'pause'|'resume'|'verify'}"}
