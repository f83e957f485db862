"""The messages of a migration, as declared types: what the CLI asks the source daemon
(:class:`MigrateRequest`), and what the source and destination daemons say to each other
(``/v1/incoming`` and its commit, ``/v1/baselines/incoming``). Each is decoded once, where it
arrives (:mod:`devagent.wire`); their JSON is the API's, documented in the README."""

from __future__ import annotations

from typing import Annotated

import msgspec

from devagent.agent.messages import FetchSpec, RemoteSpec
from devagent.api_types import VmStatus
from devagent.client import Endpoint
from devagent.daemon.nics import NicIdentity
from devagent.daemon.vms.request import VmRequest
from devagent.qemu.config import VmConfig
from devagent.vocab import Strategy

Positive = Annotated[int, msgspec.Meta(gt=0)]


class Message(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A message whose unknown fields are an error (a typo is not silently ignored)."""


class MigrateRequest(Message):
    """``POST /v1/vms/NAME/migrate``: move the VM to ``to`` by ``storage``."""

    to: Endpoint
    storage: Strategy = Strategy.SHARED
    link_rate_bps: Positive | None = None  # the link's rate, when known: limits and shares
    downtime_limit_ms: Positive | None = None  # QEMU's downtime-limit
    auto_converge: bool = True

    @property
    def destination(self) -> Endpoint:
        return self.to


class RemoteDisk(msgspec.Struct, tag="remote", tag_field="kind"):
    """An agent's export on another host (the agent's ``RemoteSpec``, its timeouts left to
    the agent that reaches it)."""

    address: str  # tcp:HOST:PORT
    export: str
    host: str = ""  # the host serving it: whose certificate its agent must present

    def spec(self) -> RemoteSpec:
        return RemoteSpec(address=self.address, export=self.export, host=self.host)


class IncomingDisk(Message):
    """One disk of an incoming VM. ``image``: the disk is shared, the destination's agent
    serves that same file. Otherwise a new replica of ``size`` bytes is made, served through
    ``backend`` (reads go to the source until the switchover) and, with ``receive``, a
    receiver agent takes a push."""

    node: str
    image: str | None = None
    size: int = 0
    backend: RemoteDisk | None = None
    receive: bool = False


class IncomingRequest(Message):
    """``POST /v1/incoming``: start an incoming QEMU for ``request``'s VM, paused, with an
    agent for each of its ``disks`` (all of them, in the VM's order) and its ``nics``."""

    request: VmRequest
    config: VmConfig  # the source's
    disks: list[IncomingDisk]
    #: The source host's name: on TLS, its certificate's; the VM's commit, abort, settle
    #: and keep-remote are then that host's alone.
    source: str = ""
    nics: list[NicIdentity] = msgspec.field(default_factory=list)
    #: Answer once the disks' receivers serve and the NICs are up (a push may start),
    #: before QEMU listens (``uri`` empty): ``POST /v1/incoming/NAME/listening`` then waits
    #: for the rest, and answers again with ``uri``.
    early: bool = False


class IncomingAnswer(msgspec.Struct):
    uri: str  # for QEMU's ``migrate`` (empty in an early answer)
    #: Where each disk's push goes (its receiver, or the VM's agent), by node.
    disk_targets: dict[str, RemoteDisk] = msgspec.field(default_factory=dict)
    nic_peers: dict[str, str] = msgspec.field(default_factory=dict)  # node -> tcp:HOST:PORT
    vm: VmStatus | None = None  # the incoming VM's status
    #: QEMU listens for RAM already (False: an ``early`` answer, its start goes on).
    listening: bool = True


class ReceiversRequest(Message):
    """``POST /v1/incoming/NAME/receivers``: a receiver for each of ``nodes``' replicas, for
    a push that begins only once RAM moves (its prepare asked for none)."""

    nodes: list[str]


class ReceiversAnswer(msgspec.Struct):
    #: Where each disk's push goes (its receiver), by node.
    disk_targets: dict[str, RemoteDisk] = msgspec.field(default_factory=dict)


class FetchPlan(msgspec.Struct, omit_defaults=True):
    """Post-copy: the destination's agent fetches what it lacks from ``remote``."""

    remote: RemoteDisk
    chunk_size: Positive
    present: str = ""  # base64 bits: chunks a push already landed in the replica
    copy_batch: Positive | None = None
    #: Base64 bits: chunks that read zeroes on the source at the switchover (its holes):
    #: present without a fetch where the replica reads zeroes too.
    zeroes: str = ""

    def spec(self, path: str) -> FetchSpec:
        """The agent's backend for the replica at ``path``: fetched; served as Local once
        the source lets it go (``POST /v1/vms/NAME/devices/NODE/settle``), not before: until
        then a replica whose space fails spills to the source, which keeps the disk."""
        spec = FetchSpec(
            path=path, remote=self.remote.spec(), chunk_size=self.chunk_size,
            copier=True, present=self.present, zeroes=self.zeroes,
        )  # fmt: skip
        if self.copy_batch is not None:
            spec.copy_batch = self.copy_batch
        return spec


class CommitRequest(Message):
    """``POST /v1/incoming/NAME/commit``: the RAM arrived; ready the disks, run the guest."""

    #: By node: each disk's replica, served as a Fetch of the source's disk until the source
    #: lets it go (a precopy's is complete: every chunk present).
    fetches: dict[str, FetchPlan] = msgspec.field(default_factory=dict)


class CommitAnswer(msgspec.Struct):
    resumed_at: float  # wall clock of the guest's RESUME on the destination
    steps: dict[str, float] = msgspec.field(default_factory=dict)  # DestinationStep -> time
    vm: VmStatus | None = None


class DomainIncoming(Message):
    """``POST /v1/libvirt/incoming``: agents for the disks of libvirt domain ``domain``,
    which libvirt is about to migrate here (no QEMU: libvirt starts it). Each disk a new
    replica of ``size`` bytes reading through to the source's agent (``backend``) until the
    commit, with a receiver beside it for a push (``receive``)."""

    domain: str
    disks: list[IncomingDisk]
    source: str = ""  # the source host's name (as IncomingRequest's)


class DomainIncomingAnswer(msgspec.Struct):
    #: By node: the unix socket the domain's disk names on this host (its XML rewritten).
    sockets: dict[str, str]
    #: Where each disk's push goes (its receiver), by node.
    disk_targets: dict[str, RemoteDisk] = msgspec.field(default_factory=dict)


class Arrived(msgspec.Struct):
    at: float  # wall clock when the destination saw the migration finished there


class DomainCommitAnswer(msgspec.Struct):
    resumed_at: float  # wall clock of libvirt's resume on the destination
    #: QEMU's downtime as libvirt's job information gives it (None: it gave none).
    downtime_ms: float | None = None
    steps: dict[str, float] = msgspec.field(default_factory=dict)  # DestinationStep -> time


class NbdAddress(msgspec.Struct):
    """A QEMU NBD server's export (the baselines)."""

    host: str
    port: str
    export: str


class BaselineIncoming(Message):
    """``POST /v1/baselines/incoming``: an incoming QEMU for one of QEMU's own flows."""

    request: VmRequest
    config: VmConfig
    size: Positive
    mode: str  # "mirror" or "cor-stream"
    source_export: NbdAddress | None = None  # cor-stream: the source's read-only export
    source: str = ""  # the source host's name (as IncomingRequest's)


class BaselineAnswer(msgspec.Struct, omit_defaults=True):
    uri: str
    nbd: NbdAddress | None = None  # mirror: where to mirror to
    vm: VmStatus | None = None
