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
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from devagent.client import Endpoint
from devagent.errors import UsageError
from devagent.guest.workload import parse_workload
from devagent.vocab import parse_size

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
Name = Annotated[str, msgspec.Meta(pattern=NAME_RE.pattern)]
MIN_DISK_BYTES, MAX_DISK_BYTES = 1 << 20, 1 << 40
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


class VmRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a user asks for when starting a VM, checked (made from a :class:`VmRequestBody`
    or, in tests, directly; decoded directly, as a migration's messages carry it, its name
    and RAM are checked)."""

    name: Name
    ram_mb: Annotated[int, msgspec.Meta(ge=64, le=65536)] = 256
    disk_size: int = 1 << 30
    workload: str | None = "moderate"
    disk: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    storage: Storage = "shared"
    agent: bool = True  # False: QEMU opens the image itself (the QEMU-only baselines)
    disk_from: Endpoint | None = None  # the disk lives on this peer host
    nics: int = 0  # NICs on this host's guest network (the test guest configures one)

    @classmethod
    def from_json(cls, data: Any) -> VmRequest:
        """A request from JSON already parsed (a saved record, a peer's payload)."""
        return convert(data, VmRequestBody, VM_RULES).request()

    def to_json(self) -> object:
        """The request as JSON values (its saved record, a peer's payload)."""
        return msgspec.to_builtins(self)

    def replace(self, **changes: Any) -> VmRequest:
        return msgspec.structs.replace(self, **changes)

    @property
    def has_probe(self) -> bool:
        return self.disk is None


#: What each field of a VM request must be (the 400's wording).
VM_RULES: Mapping[str, str] = {
    "name": NAME_RULE,
    "ram_mb": "'ram_mb' must be an integer from 64 to 65536",
    "disk_size": "'disk_size' must be a size in bytes or with a K, M or G suffix",
    "storage": "'storage' must be 'shared' or 'local'",
    "agent": "'agent' must be true or false",
    "nic": "'nic' must be true or false (or give 'nics', not both)",
    "nics": "'nics' must be 0 or 1 (the test guest configures one NIC)",
    "disk_from": "'disk_from': a peer must be given as {'url': …, 'token': …}",
    **{key: f"'{key}' must be a string" for key in ("workload", "disk", "kernel", "initrd")},
    "append": "'append' must be a string",
}


class VmRequestBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``POST /v1/vms`` body as a client may write it."""

    name: Name
    ram_mb: Annotated[int, msgspec.Meta(ge=64, le=65536)] = 256
    disk_size: int | str = 1 << 30  # bytes, or "1G"
    workload: str | None = "moderate"
    disk: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    storage: Storage = "shared"
    agent: bool = True
    disk_from: Endpoint | None = None
    nics: Annotated[int, msgspec.Meta(ge=0, le=1)] | msgspec.UnsetType = msgspec.UNSET
    nic: bool | msgspec.UnsetType = msgspec.UNSET  # "nic": true is one NIC

    def request(self) -> VmRequest:
        """The request, once the rules between fields hold."""
        if self.nic is not msgspec.UNSET and self.nics is not msgspec.UNSET:
            raise UsageError(f"{VM_RULES['nic']} (at $.nic)")
        nics = int(self.nic) if self.nic is not msgspec.UNSET else (self.nics or 0)
        size = parse_size(self.disk_size)
        if not MIN_DISK_BYTES <= size <= MAX_DISK_BYTES:
            raise UsageError("'disk_size' must be from 1M to 1T (at $.disk_size)")
        if self.disk is None and (self.kernel or self.initrd):
            raise UsageError("'kernel'/'initrd' are for a user's own guest: give 'disk' too")
        workload = None if self.disk is not None else self.workload  # a user's guest: no probe
        if workload is not None:
            parse_workload(workload)  # raises UsageError when malformed
        disk_from = None
        if self.disk_from is not None:
            disk_from = self.disk_from
            if self.disk is not None or not self.agent:
                raise UsageError("'disk_from' makes a new disk on the peer: no 'disk' with it")
        return VmRequest(
            name=self.name, ram_mb=self.ram_mb, disk_size=size, workload=workload,
            disk=self.disk, kernel=self.kernel, initrd=self.initrd, append=self.append,
            storage=self.storage, agent=self.agent, disk_from=disk_from, nics=nics,
        )  # fmt: skip


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

ProbeCommand = Literal["pause", "resume", "verify"]


class ProbeBody(msgspec.Struct, frozen=True):
    """``POST /v1/vms/{name}/probe``: a command for the guest's ioprobe."""

    command: ProbeCommand


PROBE_RULES: Mapping[str, str] = {"command": "body must be {'command': 'pause'|'resume'|'verify'}"}
