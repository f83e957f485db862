"""The daemon API's answers, as declared types (msgspec Structs): the daemon builds one and
answers it as JSON once (:func:`devagent.wire.to_json`); a reader decodes it once
(:meth:`devagent.client.DaemonClient.get_as`, ``post_as``, ``delete_as``) and sees
attributes, never a dict. They live outside ``devagent.daemon`` because the CLI, which never
imports a daemon module, reads them too.

The agents' answers inside them are the agents' own types: a disk agent's status is
:class:`devagent.agent.messages.StatusAnswer`, a NIC agent's
:class:`devagent.net.messages.NetStatus`. A heartbeat is the probe's
:class:`~devagent.guest.probe.Heartbeat`, a report :class:`~devagent.report.MigrationReport`
(dataclasses: msgspec reads and writes them as it does a Struct).

Route → answer::

    GET    /v1/health                          Health
    GET    /v1/vms                             VmList
    POST   /v1/vms, GET /v1/vms/{name}         VmStatus (also suspend, resume)
    DELETE /v1/vms/{name}                      Removed ("stopped")
    GET    /v1/vms/{name}/heartbeats           Heartbeats
    GET    /v1/vms/{name}/devices              Devices (DiskRow | NicRow, tag "kind")
    GET    /v1/vms/{name}/completions          Completions
    POST   /v1/vms/{name}/devices/{node}/swap  DiskExchange, or NicSwap for a NIC
    POST   .../attach-remote                   DiskExchange
    POST   /v1/vms/{name}/probe                ProbeAnswer (tag "command")
    POST   /v1/vms/{name}/integrity            Integrity
    POST   /v1/vms/{name}/migrate              MigrationStatus
    GET    /v1/migrations[/{id}]               Migrations, MigrationStatus
    GET    /v1/exports, POST /v1/exports       Exports, Export
    DELETE /v1/exports/{name}                  Removed ("removed")
    POST   /v1/exports/{name}/digest           devagent.guest.probe.DiskDigest
    GET    /v1/libvirt                         Libvirt
    POST   /v1/libvirt/{name}/adopt            Adopted

The peer-to-peer migration messages (``/v1/incoming``, ``/v1/baselines``) are
:mod:`devagent.daemon.migration.messages`: only daemons read them.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from devagent.agent.messages import FetchStatus, StatusAnswer
from devagent.guest.probe import Heartbeat, Paused, Verified
from devagent.net.messages import NetStatus
from devagent.net.messages import SwapAnswer as NetSwapAnswer
from devagent.report import MigrationReport

# -- the host --------------------------------------------------------------------------


class Health(msgspec.Struct):
    """``GET /v1/health``: which host answers, and where."""

    host: str
    address: str
    port: int


class Removed(msgspec.Struct):
    """A VM stopped (``state`` "stopped"), an export or incoming VM removed ("removed")."""

    name: str
    state: str


# -- VMs -------------------------------------------------------------------------------


class AgentBrief(msgspec.Struct):
    """A disk agent as a VM's status shows it (``alive``: a signal 0, no call)."""

    node: str
    pid: int | None
    alive: bool


class NicBrief(msgspec.Struct):
    node: str
    address: str
    mac: str
    tap: str
    pid: int | None
    alive: bool


class VmStatus(msgspec.Struct):
    """A VM as its daemon shows it; asks no agent."""

    name: str
    state: str  # QEMU's, or what a copy left behind by a migration is
    #: devagent.daemon.vms.VmRole. On a migration's destination: "incoming" until its commit
    #: began, "committing" from then on (the guest runs here, or is about to: no way back),
    #: "running" once it arrived; a source daemon that restarted asks this.
    role: str
    pid: int | None
    ram_mb: int
    disk: str  # the image's path, or "host NAME (remote)"
    agents: list[AgentBrief]
    nics: list[NicBrief]
    storage: str
    workload: str | None
    probe: bool  # the guest runs ioprobe
    started_at: float | None
    resumed_at: float | None
    first_heartbeat_at: float | None
    last_heartbeat: Heartbeat | None


class VmList(msgspec.Struct):
    vms: list[VmStatus]


class Heartbeats(msgspec.Struct):
    """``GET /v1/vms/{name}/heartbeats?since=T``: the probe's heartbeats after T."""

    heartbeats: list[Heartbeat]


class Completions(msgspec.Struct):
    """Completion times of guest I/O on the VM's agents, all of them and each disk's;
    None when they cannot tell (no agent, or a journal that no longer reaches back)."""

    completions: list[float] | None
    devices: dict[str, list[float]] | None = None  # by node


class Announced(msgspec.Struct):
    """``POST /v1/vms/NAME/announce``: when QEMU was asked to announce the guest's MACs."""

    announced_at: float


class Integrity(msgspec.Struct):
    """ "ok", or "mismatch: …" saying both digests; and the same for each disk."""

    integrity: str
    disks: dict[str, str] | None = None  # by node


# -- the probe's answers (tagged by the command they answer) ---------------------------


class PauseAnswer(msgspec.Struct, tag="pause", tag_field="command"):
    event: Paused


class VerifyAnswer(msgspec.Struct, tag="verify", tag_field="command"):
    event: Verified


class ResumeAnswer(msgspec.Struct, tag="resume", tag_field="command"):
    event: Heartbeat  # a resume is answered by the next heartbeat


ProbeAnswer = PauseAnswer | VerifyAnswer | ResumeAnswer

# -- devices ---------------------------------------------------------------------------


class DiskRow(msgspec.Struct, tag="disk", tag_field="kind", omit_defaults=True):
    """A disk of a VM: its agent (absent for a disk QEMU opens directly) and the agent's
    status (absent when it did not answer: ``state`` says why)."""

    vm: str
    device: str
    image: str
    state: str  # "serving", "unreachable: …", "direct (…)"
    agent_pid: int | None = None
    nbd_socket: str | None = None
    last_fetch: FetchStatus | None = None  # a replica's figures, kept once it is local
    agent: StatusAnswer | None = None


class NicRow(msgspec.Struct, tag="nic", tag_field="kind", omit_defaults=True):
    """A NIC of a VM and its net agent's status (absent when it did not answer)."""

    vm: str
    device: str
    address: str
    mac: str
    tap: str
    agent_pid: int | None
    stream_socket: str
    state: str  # "serving", "held", "forwarding to PEER", "unreachable: …"
    agent: NetStatus | None = None


DeviceRow = DiskRow | NicRow


class Devices(msgspec.Struct):
    devices: list[DeviceRow]


class DiskExchange(msgspec.Struct):
    """A disk moved under its running VM: by a mirror and a pivot (a swap to a local path,
    an attach-remote), or home from another host by a fetched replica (``released``: the
    host whose export went). A field that does not apply to the way it moved is None."""

    vm: str
    device: str
    duration_s: float
    held_ms: float  # the guest's I/O held for the pivot
    backend: str  # the agent's new backend
    copied_bytes: int | None = None
    io_gap_ms: float | None = None  # the largest guest I/O gap around the pivot
    old_image: str | None = None
    lives_on: str | None = None  # attach-remote: the host the disk lives on now
    released: str | None = None  # fetched home: the host that served it


class NicSwap(msgspec.Struct):
    """A NIC's uplink replaced by another tap."""

    vm: str
    device: str
    old_tap: str
    tap: str
    duration_s: float
    swapped: NetSwapAnswer
    net_frames_lost: int  # during the swap


# -- migrations ------------------------------------------------------------------------


class MigrationProgress(msgspec.Struct, omit_defaults=True):
    """A migration's figures so far; each appears once its step has said it."""

    status: str | None = None  # QEMU's migration status
    ram_transferred: int | None = None
    ram_remaining: int | None = None
    ram_total: int | None = None
    elapsed_s: float | None = None
    disk_done: int | None = None
    disk_left: int | None = None
    disk_bytes_moved: int | None = None
    disk_bytes_pushed: int | None = None
    #: Each disk's [done, left] bytes by node (the aggregate is ``disk_done``/``disk_left``).
    disks: dict[str, tuple[int, int]] = msgspec.field(default_factory=dict)


class MigrationStatus(msgspec.Struct):
    """``job.status()``: a migration this host runs, or ran, as the source."""

    id: str
    vm: str
    phase: str  # devagent.daemon.migration.Phase
    started_at: float
    finished_at: float | None
    progress: MigrationProgress
    report: MigrationReport


class Migrations(msgspec.Struct):
    migrations: list[MigrationStatus]


# -- exports ---------------------------------------------------------------------------


class Export(msgspec.Struct):
    """A disk of this host served to other hosts by an agent of its own."""

    name: str
    address: str | None  # "tcp:HOST:PORT"
    export: str
    image: str
    size: int
    agent_pid: int | None
    alive: bool


class Exports(msgspec.Struct):
    exports: list[Export]


# -- libvirt ----------------------------------------------------------------------------


class LibvirtDomain(msgspec.Struct):
    """A domain of the host's libvirtd, as libvirt reports it."""

    name: str
    uuid: str
    state: str  # libvirt's: "running", "paused", "shutoff", …
    persistent: bool
    last_event: str | None = None  # the last lifecycle event the daemon saw: "resumed/migrated"


class Libvirt(msgspec.Struct):
    """``GET /v1/libvirt``: the host's libvirtd as its daemon follows it (``uri`` None:
    the daemon runs without ``--libvirt``)."""

    uri: str | None
    connected: bool
    domains: list[LibvirtDomain]


class AdoptedDisk(msgspec.Struct):
    """A disk of a libvirt domain an agent of the host serves since its adoption."""

    node: str  # the disk's target ("vda")
    original: str  # the file the domain used before (left as it was at the pivot)
    image: str  # the agent's replica, the disk from now on
    socket: str  # the agent's unix socket, the domain's disk source
    export: str
    tcp_address: str | None  # where peers reach it ("tcp:HOST:PORT")


class DomainStart(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /v1/libvirt/domains``: the test guest as a new libvirt domain, its disk
    served by an agent of the host from the start."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")]
    disk_size: Annotated[int, msgspec.Meta(ge=1 << 20)]
    ram_mb: Annotated[int, msgspec.Meta(ge=64, le=16384)] = 256
    workload: str = "moderate"  # the probe's profile


class DomainDisk(msgspec.Struct):
    """A disk of a libvirt domain served here, as its agent reports it."""

    node: str
    image: str  # the agent's replica
    socket: str  # the domain's disk source
    status: StatusAnswer


class DomainDisks(msgspec.Struct):
    """``GET /v1/libvirt/{name}/disks``: the disks this host's agents serve the domain."""

    domain: str
    disks: list[DomainDisk]


class Adopted(msgspec.Struct):
    """``POST /v1/libvirt/{name}/adopt``: the domain's disks, each served by an agent."""

    domain: str
    disks: list[AdoptedDisk]
