"""What a migration job needs of the world, and nothing more: a narrow host context and the
few operations it calls on the VM, its QEMU, its agents and the peer daemon.

The daemon passes the real things (:class:`~devagent.daemon.host.Host`'s parts, a
``ManagedVm``, a :class:`~devagent.client.DaemonClient`); the unit tests pass fakes of the
same shape (``tests/migration_fakes.py``), so every step of a job can be failed without root,
QEMU or a lab.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from devagent.agent.messages import (
    CutoverAnswer,
    FenceAnswer,
    FlushAnswer,
    MirrorCancelled,
    MirrorRate,
    MirrorRequest,
    MirrorStarted,
    MirrorStopped,
    StatusAnswer,
    UnfenceAnswer,
)
from devagent.api_types import MigrationProgress
from devagent.client import DaemonClient, Endpoint
from devagent.daemon.migration.messages import MigrateRequest, RemoteDisk
from devagent.daemon.netstat import link_bytes
from devagent.daemon.vms.request import RemoteHome, VmRequest, export_name
from devagent.errors import StateError
from devagent.guest.probe import Heartbeat
from devagent.qemu.answers import MigrationInfo
from devagent.qemu.config import VmConfig
from devagent.qemu.vm import VmState
from devagent.report import MigrationReport
from devagent.tls import Tls

T = TypeVar("T")

PEER_TIMEOUT_S = 600.0  # one peer request (a commit waits for the disk's swap, say)


class Events(Protocol):
    """QMP events as they come (qemu.qmp's ``EventListener``)."""

    async def get(self) -> object: ...  # typed by devagent.qemu.answers.event_of


class Qemu(Protocol):
    """The VM's QEMU, as a job drives it over QMP."""

    @property
    def exited(self) -> bool: ...

    def require(self, *states: VmState) -> None: ...

    async def qmp(self, command: str, **args: Any) -> Any: ...

    async def query(self, command: str, into: type[T], **args: Any) -> T: ...

    def listen(self, *names: str) -> AbstractContextManager[Events]: ...

    async def migration_outcome(self, timeout: float = 2.0) -> MigrationInfo: ...

    async def stop(self, timeout: float = ...) -> None: ...

    async def kill(self) -> None: ...


class AgentLink(Protocol):
    """An agent through its control socket, as the NICs' steps call it: a route and a JSON
    body, the answer decoded by the caller into :mod:`devagent.net.messages`' types."""

    @property
    def node(self) -> str: ...

    async def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        timeout: float = 60.0,
        **params: str | int | float,
    ) -> Any: ...


class DiskAgentLink(Protocol):
    """A disk's agent: the routes of its control API a job calls, typed
    (:class:`devagent.daemon.agents.AgentProcess`)."""

    @property
    def node(self) -> str: ...

    @property
    def tcp_address(self) -> str | None: ...  # "tcp:HOST:PORT": where peers reach it

    @property
    def export(self) -> str: ...

    async def status(self) -> StatusAnswer: ...

    async def flush(self, *, timeout: float = 60.0) -> FlushAnswer: ...

    async def fence(self) -> FenceAnswer: ...

    async def unfence(self) -> UnfenceAnswer: ...

    async def mirror(self, request: MirrorRequest) -> MirrorStarted: ...

    async def cutover(
        self, *, keep_source: bool = False, timeout: float = 60.0
    ) -> CutoverAnswer: ...

    async def cancel_mirror(self) -> MirrorCancelled: ...

    async def stop_mirror(self) -> MirrorStopped: ...

    async def mirror_rate(self, rate_limit: float | None) -> MirrorRate: ...


class NicLink(AgentLink, Protocol):
    @property
    def address(self) -> str: ...

    @property
    def mac(self) -> str: ...

    def describe(self) -> str: ...


class MigratingVm(Protocol):
    """The VM a source job moves (the daemon's ``ManagedVm``)."""

    @property
    def name(self) -> str: ...

    @property
    def vm(self) -> Qemu: ...

    @property
    def agents(self) -> Sequence[DiskAgentLink]: ...

    @property
    def nics(self) -> Sequence[NicLink]: ...

    @property
    def request(self) -> VmRequest: ...

    @property
    def config(self) -> VmConfig: ...

    @property
    def image(self) -> Path: ...  # the first disk's

    @property
    def images(self) -> Mapping[str, Path]: ...  # each disk's by node

    @property
    def run_dir(self) -> Path: ...  # where the job keeps its record

    @property
    def role(self) -> str: ...  # devagent.daemon.vms.VmRole

    @property
    def heartbeats(self) -> Iterable[Heartbeat]: ...

    async def completions_by_disk(self, since: float) -> dict[str, list[float]] | None: ...

    def migrated_away(self, *, serves_disk: bool = True) -> None: ...


class Peer(Protocol):
    """The destination's daemon (a :class:`DaemonClient` in use)."""

    async def get(self, path: str, **params: Any) -> Any: ...

    async def post(self, path: str, body: Any = None) -> Any: ...

    async def delete(self, path: str) -> Any: ...


def connect(endpoint: Endpoint) -> AbstractAsyncContextManager[Peer]:
    return DaemonClient(endpoint, timeout=PEER_TIMEOUT_S)


@dataclass(frozen=True)
class HostContext:
    """The source host as a job sees it."""

    name: str
    address: str
    shared_dir: Path | None
    #: Remove a VM that left (its QEMU, agents, folder; its disk too when ``delete_disk``).
    release: Callable[[str, bool], Awaitable[None]]
    #: Talk to a peer daemon.
    connect: Callable[[Endpoint], AbstractAsyncContextManager[Peer]] = connect
    #: Bytes on the host's link so far (None where it cannot be told).
    link_bytes: Callable[[], int | None] = field(default=lambda: None)
    #: Keep a migrated VM's disk here as an export (its destination cannot hold it):
    #: (VM, node) → where the destination reaches it.
    keep_disk: Callable[[str, str], Awaitable[RemoteHome]] | None = None
    #: The host's certificate: QEMU's migration stream and NBD are TLS with it (None:
    #: an --insecure daemon).
    tls: Tls | None = None

    @classmethod
    def of(cls, host: Any) -> HostContext:
        """The context of a daemon's :class:`~devagent.daemon.host.Host`."""
        loopback = str(host.address).startswith("127.")

        async def release(name: str, delete_disk: bool) -> None:
            await host.vms.remove(name, delete_disk=delete_disk)

        async def keep_disk(name: str, node: str) -> RemoteHome:
            export = export_name(name, node)
            home = RemoteHome(peer=host.endpoint(), export=export)
            if export in host.exports.exports:  # kept already (a job taken up again)
                return home
            managed = host.vms.get(name)
            agent = managed.agent_for(node)
            if agent.backend is not None:  # not a whole disk here (still being fetched)
                raise StateError(f"VM {name}'s {node} is not whole on this host: it cannot "
                                 "be kept here")  # fmt: skip

            def forget() -> None:  # the export's now: not the VM's to restart or delete
                managed.agents.remove(agent)
                managed.images.pop(node, None)
                managed.save()

            await host.exports.take_over(export, agent, forget)
            return home

        return cls(
            name=host.name,
            address=host.address,
            shared_dir=host.shared_dir,
            release=release,
            link_bytes=lambda: link_bytes(loopback),
            keep_disk=keep_disk,
            tls=host.tls,
        )


class NetSteps(Protocol):
    """The NICs' step the RAM follower takes (:class:`.net.NetMigration`)."""

    async def hold(self) -> None: ...


class PlanSteps(Protocol):
    """What the RAM follower and the report ask of a plan (:class:`.plans.Plan`)."""

    @property
    def moves_disk(self) -> bool: ...

    @property
    def serves_after_switchover(self) -> bool: ...

    @property
    def pauses_before_switchover(self) -> bool: ...

    def ram_bandwidth(self, job: JobView) -> int: ...

    def ram_active(self, job: JobView) -> None: ...

    def check_beside_ram(self) -> None: ...

    async def at_pre_switchover(self, job: JobView) -> None: ...

    def disk_bytes_moved(self, job: JobView) -> int | None: ...


class DiskOwner(Protocol):
    """Whose disks a job moves: a VM of this daemon, or a libvirt domain it adopted."""

    @property
    def name(self) -> str: ...

    @property
    def agents(self) -> Sequence[DiskAgentLink]: ...


class DiskJob(Protocol):
    """A migration job as devagent's disk steps see it (:mod:`.plans`' agent plans): the
    same for a VM of this daemon (:class:`.job.MigrationJob`) and a libvirt domain
    (:class:`devagent.daemon.libvirt_migration.DomainMigration`)."""

    @property
    def request(self) -> MigrateRequest: ...

    @property
    def managed(self) -> DiskOwner: ...

    @property
    def report(self) -> MigrationReport: ...

    @property
    def progress(self) -> MigrationProgress: ...

    #: By node: each source disk as the destination reaches it, and its size.
    source_disks: dict[str, RemoteDisk]
    disk_sizes: dict[str, int]

    #: Its ``progress`` follows QEMU's RAM migration as it goes (``ram_transferred``), so a
    #: push can take what RAM leaves of the link.
    @property
    def follows_ram(self) -> bool: ...

    def mark(self, step: str, at: float | None = None) -> None: ...

    def disk_progress(self, per_disk: Mapping[str, tuple[int, int]]) -> None: ...


class JobView(DiskJob, Protocol):
    """A migration job as its plan, RAM follower and report see it
    (:class:`.job.MigrationJob`): what it moves, where to, and its bookkeeping."""

    id: str
    host: HostContext
    managed: MigratingVm
    request: MigrateRequest
    report: MigrationReport
    progress: MigrationProgress
    started_at: float
    bytes_before: int | None
    log: logging.Logger
    #: By node: each source disk as the destination reaches it, and its size (the plan's
    #: prepare).
    source_disks: dict[str, RemoteDisk]
    disk_sizes: dict[str, int]

    @property
    def plan(self) -> PlanSteps: ...

    @property
    def net(self) -> NetSteps | None: ...

    @property
    def peer(self) -> Peer: ...

    def mark(self, step: str, at: float | None = None) -> None: ...

    def disk_progress(self, per_disk: Mapping[str, tuple[int, int]]) -> None: ...

    async def quietly(self, step: Awaitable[Any]) -> None: ...

    async def check_peer(self) -> None: ...

    async def forward(self, step: Callable[[], Awaitable[T]], *, what: str) -> T: ...


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        port: int = s.getsockname()[1]
        return port


class ReplicaProgress:
    """How far a replica got, since when it has not grown, and when to look again."""

    #: The soonest a look follows the last one (each is a request to the destination).
    SOONEST_LOOK_S = 0.01

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.present = -1
        self.since = clock()
        self.missing = 0  # bytes the replicas still lacked at the last look
        self.rate: float | None = None  # bytes per second they grew by between the last looks
        self._looked_at: float | None = None
        self._last = -1  # bytes present at the last look
        self.spilling: str | None = None  # why the replica takes no writes, while it does not
        self.unwritable: dict[str, str] = {}  # disks whose space went read-only: why
        self.refused: str | None = None  # why the destination refused the last settle

    def saw(self, present: int, missing: int = 0) -> None:
        now = self._clock()
        if self._looked_at is not None and self._last >= 0:
            self.rate = max(0.0, (present - self._last) / max(now - self._looked_at, 1e-6))
        self._looked_at, self._last, self.missing = now, present, missing
        if present > self.present:
            self.present, self.since = present, now

    def lost_sight(self) -> None:
        """A look that failed (the destination's daemon restarts, say): no rate to go by
        until two looks again."""
        self.rate, self._looked_at, self._last = None, None, -1

    def stalled_for(self) -> float:
        return self._clock() - self.since

    def next_look_in(self, longest: float) -> float:
        """Seconds to the next look: ``longest``, or less when the replicas, growing as they
        did, are due to be complete sooner (the source lets its disks go that much earlier;
        a replica slower than that is looked at again as soon as it is due)."""
        if not self.rate or self.missing <= 0:
            return longest
        return min(longest, max(self.SOONEST_LOOK_S, self.missing / self.rate))
