"""Fakes of what a migration job talks to: the source's QEMU (QMP with scripted migration
statuses and events), its disk agent, the destination daemon and the host. Each records what
was asked of it and can be told to fail a step, once or for good, so the job's tests fail it
at every step without root, QEMU or a lab."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from devagent.agent.messages import (
    BackendStatus,
    CutoverAnswer,
    FenceAnswer,
    FetchStatus,
    FlushAnswer,
    JournalStats,
    LocalStatus,
    MirrorCancelled,
    MirrorRate,
    MirrorRequest,
    MirrorStarted,
    MirrorStats,
    MirrorStatus,
    MirrorStopped,
    StatusAnswer,
    UnfenceAnswer,
)
from devagent.api_types import Devices, DiskRow, VmStatus
from devagent.client import Endpoint
from devagent.daemon.migration import MigrateRequest, MigrationJob, new_job
from devagent.daemon.migration.context import HostContext, Peer
from devagent.daemon.vms.request import DiskRequest, RemoteHome, VmRequest
from devagent.errors import DevagentError, NotFound, PeerError, StateError, UsageError
from devagent.guest.probe import Heartbeat
from devagent.qemu.answers import MigrationInfo, RamInfo, answer
from devagent.qemu.config import VmConfig
from devagent.qemu.vm import VmState
from devagent.vocab import Strategy
from devagent.wire import to_json

T = TypeVar("T")


def vm_status(
    name: str, state: str, *, resumed_at: float | None = None, role: str = "running"
) -> VmStatus:
    """A VM's status as a daemon answers it (a VM without agents, NICs or probe)."""
    return VmStatus(
        name=name, state=state, role=role, pid=1, ram_mb=256, disk="/disk.img", agents=[],
        nics=[], storage="local", workload=None, probe=False, started_at=resumed_at,
        resumed_at=resumed_at, first_heartbeat_at=None, last_heartbeat=None,
    )  # fmt: skip


#: What to fail, by step: a list is consumed one try at a time (``[err]``: a passing fault),
#: a lone error fails every try (a lasting fault).
Failures = dict[str, "list[DevagentError] | DevagentError"]


def _fail(failures: Failures, key: str) -> None:
    planned = failures.get(key)
    if isinstance(planned, DevagentError):
        raise planned
    if planned:
        raise planned.pop(0)


def beat(at: float) -> dict[str, Any]:
    """A probe heartbeat at host time ``at`` with some I/O in it."""
    return {"hb": int(at * 10), "t_ms": int(at * 1000), "phase": "run", "ops": 10, "reads": 5,
            "writes": 5, "ops_total": 100, "errors": 0, "verify_failures": 0,
            "lat_max_us": 900, "lat_p99_us": 800, "written_blocks": 64, "digest": "00",
            "host_time": at}  # fmt: skip


class FakeEvents:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def get(self) -> dict[str, Any]:
        return await self.queue.get()


class FakeQemu:
    """The source's QEMU: ``migrate`` walks ``statuses``; pre-switchover waits for
    ``migrate-continue``; completion leaves the guest in ``postmigrate``."""

    def __init__(self, statuses: tuple[str, ...] = ("active", "completed")) -> None:
        self.status = "running"
        self.statuses = list(statuses)
        self.commands: list[str] = []
        self.failures: Failures = {}
        self.listeners: list[FakeEvents] = []
        self.migrating: list[str] = []
        self.killed = self.stopped = False
        self.block_job_ready = True
        self.parameters: list[dict[str, Any]] = []  # each migrate-set-parameters
        self.migrate_uri: str | None = None  # where ``migrate`` sent RAM
        self.passes = 0  # RAM's dirty-sync-count: one more per query-migrate while active
        self.throttle = 0  # auto-converge's cpu-throttle-percentage while active
        #: RAM stays active this long after ``migrate`` (its next statuses wait), moving
        #: ``ram_rate`` bytes per second (``query-migrate``'s bytes transferred).
        self.ram_for_s = 0.0
        self.ram_rate = 0.0
        self.migrated_at = 0.0

    @property
    def exited(self) -> bool:
        return self.killed or self.stopped

    def require(self, *states: VmState) -> None:
        if self.status != "running":
            raise StateError(f"fake VM is {self.status}")

    def _emit(self, event: str, **data: Any) -> None:
        stamp = {"seconds": int(time.time()), "microseconds": int(time.time() % 1 * 1e6)}
        for listener in self.listeners:
            listener.queue.put_nowait({"event": event, "data": data, "timestamp": stamp})

    def _advance(self) -> None:
        if not self.migrating:
            return
        if time.monotonic() - self.migrated_at < self.ram_for_s and self.migrating[0] == "active":
            self.current = "active"  # RAM still moving
            return
        status = self.migrating.pop(0) if len(self.migrating) > 1 else self.migrating[0]
        if status in ("pre-switchover", "completed") and self.status == "running":
            self.status = "finish-migrate"
            self._emit("STOP")
        if status == "completed":
            self.status = "postmigrate"
        self._emit("MIGRATION", status=status)
        self.current = status

    async def qmp(self, command: str, **args: Any) -> Any:
        self.commands.append(command)
        _fail(self.failures, command)
        if command == "migrate-set-capabilities":
            caps = {c["capability"]: c["state"] for c in args["capabilities"]}
            self.pauses = caps.get("pause-before-switchover", False)
            return {}
        if command == "migrate":
            self.migrate_uri = args.get("uri")
            self.migrated_at = time.monotonic()
            self.migrating = list(self.statuses)
            if getattr(self, "pauses", False) and "completed" in self.migrating:
                self.migrating.insert(self.migrating.index("completed"), "pre-switchover")
            self.current = "setup"
            return {}
        if command == "migrate-set-parameters":
            self.parameters.append(args)
            return {}
        if command == "query-migrate":
            if self.migrating and self.current != "pre-switchover":
                self._advance()
            status = getattr(self, "current", "none")
            self.passes += status == "active"
            throttle = self.throttle if status == "active" else 0
            moving = min(time.monotonic() - self.migrated_at, self.ram_for_s)
            moved = int(self.ram_rate * moving)
            ram = {"dirty-sync-count": self.passes, "transferred": moved}
            return {"status": status, "ram": ram, "cpu-throttle-percentage": throttle}
        if command == "migrate-continue":
            self.migrating = [s for s in self.migrating if s != "pre-switchover"] or ["completed"]
            self.current = "active"
            return {}
        if command == "migrate_cancel":
            self.migrating, self.current = [], "cancelled"
            if self.status == "finish-migrate":
                self.status = "paused"
            return {}
        if command == "query-status":
            return {"status": self.status}
        if command == "cont":
            self.status = "running"
            return {}
        if command == "query-block-jobs":
            ready = self.block_job_ready
            return [{"device": "bn-mirror", "offset": 8, "len": 8, "ready": ready}]
        if command == "query-jobs":
            return [{"id": args.get("id", "bn-mirror"), "status": "concluded"}]
        return {}

    @contextmanager
    def listen(self, *names: str) -> Iterator[FakeEvents]:
        events = FakeEvents()
        self.listeners.append(events)
        try:
            yield events
        finally:
            self.listeners.remove(events)

    async def query(self, command: str, into: type[T], **args: Any) -> T:
        """A command whose answer the job reads, typed as the real VM's ``query``."""
        return answer(await self.qmp(command, **args), into, what=f"fake QMP {command}")

    async def migration_outcome(self, timeout: float = 2.0) -> MigrationInfo:
        return MigrationInfo(status="completed", downtime=42, ram=RamInfo(transferred=1 << 20))

    async def stop(self, timeout: float = 5.0) -> None:
        self.stopped = True

    async def kill(self) -> None:
        self.killed = True


def journal() -> JournalStats:
    return JournalStats(
        state="serving", in_flight=0, waiting=0, completed=0, errors=0, counts={}, bytes={},
        max_gap_ms=0.0, p99_latency_ms=0.0, latency_histogram_us={},
    )  # fmt: skip


def mirror_stats(copied: int, state: str = "finished") -> MirrorStats:
    return MirrorStats(
        state=state, sync=False, rate_limit=None, copied_bytes=copied, zeroed_bytes=0,
        dirty_bytes=0, passes=1, error=None, sent_bytes=copied,
    )  # fmt: skip


def fetch_status(kind: str, present: int, size: int, spilling: str | None = None) -> BackendStatus:
    """A destination replica's backend: still fetching, whole (complete, not let go yet),
    or local once the source let it go."""
    if kind == "local":
        return LocalStatus(path="/replica.img", read_only=False)
    whole = kind == "whole"
    return FetchStatus(
        path="/replica.img", size=size, chunk_size=64 << 10,
        present_bytes=size if whole else present, complete=whole,
        fetched_on_demand_bytes=1, fetched_in_background_bytes=2,
        skipped_as_zero_bytes=0, copier=True, rate_limit=None, remote="Remote(a)",
        spilling=spilling,
    )  # fmt: skip


class FakeDiskAgent:
    """The source's disk agent: answers the control API's calls a job makes (recorded as
    their routes: ``/mirror``, ``GET /status``)."""

    tcp_address: str | None = "tcp:10.9.0.1:4000"

    def __init__(self, node: str = "disk0", size: int = 4 << 20) -> None:
        self.node = self.export = node
        self.size = size
        self.calls: list[str] = []
        self.failures: Failures = {}
        self.mirror_state = "converged"
        self.writes_paced = False  # the mirror's guest outran it
        self.mirrors: list[MirrorRequest] = []
        self.rates: list[float | None] = []  # each /mirror/rate, in order
        self.everything: list[str] | None = None  # a log shared with the QEMU fake, in order
        self.fenced = False
        self.zeroes = ""  # the fence's answer: the disk's holes, as base64 bits

    def _called(self, route: str) -> None:
        self.calls.append(route)
        if self.everything is not None:
            self.everything.append(f"agent {route}")
        _fail(self.failures, route.removeprefix("GET "))

    async def status(self) -> StatusAnswer:
        self._called("GET /status")
        local = LocalStatus(path="/disk.img", read_only=False)
        stats = mirror_stats(1 << 20, self.mirror_state)
        stats.writes_paced = self.writes_paced
        backend = MirrorStatus(**msgspec.structs.asdict(stats), source=local, target=local)
        return StatusAnswer(
            export=self.export, size=self.size, state="serving", connections=1, addresses=[],
            journal=journal(), pid=1, backend="Mirror", held=False, backend_status=backend,
        )  # fmt: skip

    async def flush(self, *, timeout: float = 60.0) -> FlushAnswer:
        self._called("/flush")
        return FlushAnswer(flushed_in_s=0.001)

    async def fence(self) -> FenceAnswer:
        self._called("/fence")
        self.fenced = True
        return FenceAnswer(fenced=True, dropped=0, zeroes=self.zeroes)

    async def unfence(self) -> UnfenceAnswer:
        self._called("/unfence")
        was, self.fenced = self.fenced, False
        return UnfenceAnswer(unfenced=was, listening=["unix:/run/disk0.nbd"] if was else [])

    async def mirror(self, request: MirrorRequest) -> MirrorStarted:
        self._called("/mirror")
        self.mirrors.append(request)
        return MirrorStarted(mirror=mirror_stats(0, "copying"), target="Remote(b)")

    async def mirror_rate(self, rate_limit: float | None) -> MirrorRate:
        self._called("/mirror/rate")
        self.rates.append(rate_limit)
        return MirrorRate(rate_limit=rate_limit)

    async def cutover(self, *, keep_source: bool = False, timeout: float = 60.0) -> CutoverAnswer:
        self._called("/mirror/cutover")
        return CutoverAnswer(held_from=time.time(), held_s=0.01, mirror=mirror_stats(4 << 20),
                             new="Remote(b)")  # fmt: skip

    async def cancel_mirror(self) -> MirrorCancelled:
        self._called("/mirror/cancel")
        return MirrorCancelled(cancelled=True, mirror=mirror_stats(0, "cancelled"))

    async def stop_mirror(self) -> MirrorStopped:
        self._called("/mirror/stop")
        dirty = base64.b64encode(bytes([0b0000_0011, 0])).decode()
        return MirrorStopped(chunk_size=256 << 10, chunks=16, dirty=dirty,
                             dirty_bytes=512 << 10, mirror=mirror_stats(3 << 20))  # fmt: skip


@dataclass
class FakeVm:
    """The migrating VM (the daemon's ManagedVm); its job's record goes in ``run_dir``."""

    image: Path
    run_dir: Path
    vm: FakeQemu = field(default_factory=FakeQemu)
    agents: list[FakeDiskAgent] = field(default_factory=lambda: [FakeDiskAgent()])
    name: str = "v1"
    nics: list[Any] = field(default_factory=list)
    # a user's own guest (no probe) unless make_job says otherwise
    request: VmRequest = field(
        default_factory=lambda: VmRequest(name="v1", disks=(DiskRequest(image="/user.img"),))
    )
    config: VmConfig = field(default_factory=lambda: VmConfig(name="v1", ram_mb=64))
    heartbeats: list[Heartbeat] = field(default_factory=list)
    role: str = "running"
    completions_error: PeerError | None = None  # the agent's journal cannot be read
    serves_disk: bool = False
    io_pauses: dict[str, float] = field(default_factory=dict)

    @property
    def images(self) -> dict[str, Path]:
        """Each disk's image (one file for all: a fake's disks are never read)."""
        return {agent.node: self.image for agent in self.agents} or {"disk0": self.image}

    async def completions_by_disk(self, since: float) -> dict[str, list[float]] | None:
        """With ``io_pauses`` (seconds by node): each disk completed I/O every 10 ms from
        ``since`` on, but for that pause as the migration began (``since`` + 3 s)."""
        if self.completions_error is not None:
            raise self.completions_error
        if not self.io_pauses:
            return None
        start = since + 3.0
        return {
            node: [since + k / 100 for k in range(300)]
            + [start + pause + k / 100 for k in range(50)]
            for node, pause in self.io_pauses.items()
        }

    def migrated_away(self, *, serves_disk: bool = True) -> None:
        if self.role != "running":
            raise StateError(f"fake VM is {self.role}: it cannot have migrated away")
        self.role, self.serves_disk = "migrated", serves_disk


class FakeDestination:
    """The destination daemon: the role of each VM it holds (``incoming`` until committed,
    ``committing`` while a commit runs, then ``running``), and every request it got (also in
    ``everything``, when a test shares a log with the source's fakes)."""

    def __init__(self) -> None:
        self.vms: dict[str, str] = {}
        self.requests: list[str] = []
        self.everything: list[str] | None = None
        self.failures: Failures = {}
        self.polls_until_local = 2
        self.replica_grows = True  # each look at the replica finds more of it present
        self.present = 0
        self.source: FakeQemu | None = None  # whose NBD export a stream reads
        self.commit_lands_before_failing = False
        self.bodies: dict[str, Any] = {}  # the last body of each POST, by path
        self.disks = ["disk0"]  # the incoming VM's, as the source described them
        #: Disks whose replica space went read-only: spilling for good, never local.
        self.read_only: set[str] = set()
        #: Disks whose space goes read-only as the source lets them go: the settle is
        #: refused, and they spill from then on.
        self.read_only_at_settle: set[str] = set()
        self.settled: set[str] = set()  # replicas the source let go: served as Local
        #: A commit the source asked before it died runs here: an abort is refused, and the
        #: VM is ``committing`` (paused) for one look, then ``running``.
        self.commit_under_way = False
        #: The incoming QEMU dies as the commit begins: the VM is then a crashed VM here
        #: (role running, QEMU failed), and the commit answers 409.
        self.crash_as_commit_begins = False
        #: An early prepare is answered early (True), as soon as QEMU listens (None), or
        #: refused as an unknown field (False: a destination of the version before it).
        self.knows_early: bool | None = True

    def _asked(self, request: str) -> None:
        self.requests.append(request)
        if self.everything is not None:
            self.everything.append(f"peer {request}")
        _fail(self.failures, request)

    async def get(self, path: str, **params: Any) -> Any:
        self._asked(f"GET {path}")
        if path == "/v1/health":
            return {"name": "b"}
        if path.endswith("/heartbeats"):  # the guest's probe, steady on the destination
            now = time.time()
            return {"heartbeats": [beat(now + i / 10) for i in range(6)]}
        if path.endswith("/completions"):
            return {"completions": [], "devices": {node: [] for node in self.disks}}
        if path.endswith("/devices"):
            self.polls_until_local -= 1
            kind = "whole" if self.polls_until_local <= 0 else "fetch"
            self.present += 4096 if self.replica_grows else 0
            agent = StatusAnswer(
                export="disk0", size=4 << 20, state="serving", connections=1, addresses=[],
                journal=journal(), pid=2, backend="Fetch", held=False,
                backend_status=fetch_status(kind, self.present, 4 << 20),
            )  # fmt: skip
            stuck = msgspec.structs.replace(agent, backend_status=fetch_status(
                "fetch", 4096, 4 << 20, "write on /r.img: Read-only file system"))  # fmt: skip
            local = msgspec.structs.replace(agent, backend_status=fetch_status("local", 0, 0))

            def row(node: str) -> DiskRow:
                now = stuck if node in self.read_only else agent
                now = local if node in self.settled else now
                return DiskRow(vm="v1", device=node, image=f"/{node}.img", state="serving",
                               agent=now)  # fmt: skip

            rows = [row(node) for node in self.disks]
            return to_json(Devices(devices=list(rows)))
        if path.startswith("/v1/vms/"):
            name = path.split("/")[3]
            if name not in self.vms:
                raise NotFound(f"host b: no VM {name!r}")
            role = self.vms[name]
            if role == "crashed":
                return to_json(vm_status(name, "failed", role="running"))
            state = {"running": "running", "committing": "paused"}.get(role, "incoming")
            if role == "committing":  # the commit under way ends: the guest runs next look
                self.vms[name] = "running"
            return to_json(vm_status(name, state, resumed_at=time.time(), role=role))
        return {}

    async def post(self, path: str, body: Any = None) -> Any:
        parts = path.split("/")
        if path.endswith("/commit") and self.commit_lands_before_failing:
            self.vms[parts[-2]] = "running"
        self.bodies[path] = body
        self._asked(f"POST {path}")
        if path.endswith("/settle"):
            node = parts[-2]
            if node in self.read_only_at_settle:
                self.read_only.add(node)
                raise StateError(f"replica /{node}.img is not whole: Read-only file system")
            self.settled.add(node)
            return {}
        if path in ("/v1/incoming", "/v1/baselines/incoming"):
            if "early" in body and self.knows_early is False:  # a destination of before
                raise UsageError("Object contains unknown field `early` - at `$`")
            name = body["request"]["name"]
            if name in self.vms:
                raise StateError(f"VM {name!r} already exists")
            self.vms[name] = "incoming"
            self.disks = [d["node"] for d in body.get("disks", [])] or ["disk0"]
            targets = {  # (as the real one: the receiver, if asked for, or the VM's agent)
                d["node"]: target(d["node"], d.get("receive", False)) for d in body.get("disks", [])
            }
            early = body.get("early", False) and self.knows_early  # RAM's URI comes later
            answer = {"uri": "" if early else "tcp:10.9.0.2:5000", "disk_targets": targets,
                      "listening": not early}  # fmt: skip
            if path.startswith("/v1/baselines"):
                nbd = {"host": "10.9.0.2", "port": "10809", "export": "disk0"}
                answer = {"uri": "tcp:10.9.0.2:5000", "nbd": nbd}
            return answer
        if path.endswith("/receivers"):
            if self.vms.get(parts[-2]) != "incoming":
                raise StateError(f"VM {parts[-2]}'s commit was asked here")
            return {"disk_targets": {node: target(node, True) for node in body["nodes"]}}
        if path.endswith("/listening"):
            return {"uri": "tcp:10.9.0.2:5000", "listening": True}
        if path.endswith("/stream-done") and self.source is not None and self.source.exited:
            raise PeerError("host b: QEMU job bn-stream failed: Input/output error")
        if path.endswith("/integrity"):
            return {"integrity": "ok", "disks": {node: "ok" for node in self.disks}}
        if path.endswith("/commit"):
            name = parts[-2]
            if self.vms.get(name) != "incoming":
                raise StateError(f"VM {name} is not an incoming VM")
            if self.crash_as_commit_begins:
                self.vms[name] = "crashed"
                raise StateError(f"host b: VM {name} crashed here as its commit began")
            self.vms[name] = "running"
            return {"resumed_at": time.time(), "steps": {"arrived": time.time()}}
        return {}

    async def delete(self, path: str) -> Any:
        """``DELETE /v1/incoming/NAME``: removed only while incoming (as the real one)."""
        self._asked(f"DELETE {path}")
        name = path.rsplit("/", 1)[-1]
        if name not in self.vms:
            raise NotFound(f"host b: no VM {name!r}")
        if self.commit_under_way:
            self.vms[name], self.commit_under_way = "committing", False
            raise StateError(f"host b: VM {name}'s commit is under way here")
        if self.vms[name] != "incoming":
            raise StateError(f"host b: VM {name} is not an incoming VM ({self.vms[name]})")
        del self.vms[name]
        return {"name": name, "state": "removed"}


def target(node: str, receiver: bool) -> dict[str, str]:
    """Where the destination says disk ``node``'s push goes: its receiver, or (none asked
    for) the VM's own agent."""
    export = f"receive-{node}" if receiver else node
    return {"kind": "remote", "address": "tcp:10.9.0.2:4001", "export": export}


@dataclass
class FakeHost:
    destination: FakeDestination = field(default_factory=FakeDestination)
    released: list[str] = field(default_factory=list)
    failures: Failures = field(default_factory=dict)
    vms: set[str] = field(default_factory=lambda: {"v1"})
    kept: list[tuple[str, str]] = field(default_factory=list)  # (VM, node) kept as exports

    async def keep_disk(self, name: str, node: str) -> RemoteHome:
        self.kept.append((name, node))
        return RemoteHome(peer=Endpoint(url="http://a", name="a"), export=f"{name}-{node}")

    async def release(self, name: str, delete_disk: bool) -> None:
        """As the VM manager removes a VM: out of its table first, then its processes and
        files (which may fail)."""
        if name not in self.vms:
            raise NotFound(f"no VM {name!r} on host a")
        self.vms.discard(name)
        _fail(self.failures, "release")
        self.released.append(name)

    @asynccontextmanager
    async def connect(self, endpoint: Endpoint) -> AsyncIterator[Peer]:
        yield self.destination

    def context(self) -> HostContext:
        return HostContext(
            name="a", address="127.0.0.1", shared_dir=None, release=self.release,
            connect=self.connect, keep_disk=self.keep_disk,
        )  # fmt: skip


#: A link on which hybrid's push starts before RAM (an early prepare), so that a test of
#: the push's steps sees them; on 1 Gbit/s it begins only once RAM leaves it room, which
#: the fake QEMU's RAM (no bytes moved) never does.
PUSH_LINK = 100 * 10**6


def make_job(
    tmp_path: Path, strategy: Strategy, *, vm: FakeVm | None = None, link_rate_bps: int = 10**9
) -> tuple[MigrationJob, FakeVm, FakeHost]:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    vm = vm or FakeVm(image=image, run_dir=tmp_path)
    if strategy.is_baseline:
        vm.agents, vm.request = [], VmRequest(name=vm.name)  # the test guest
    if strategy is Strategy.SHARED:
        vm.request = vm.request.replace(disks=(DiskRequest(image=str(image)),))
    host = FakeHost()
    for agent in vm.agents:
        agent.everything = vm.vm.commands
    host.destination.source = vm.vm
    request = MigrateRequest(
        to=Endpoint(url="http://b", name="b"), storage=strategy, link_rate_bps=link_rate_bps
    )
    return new_job(host.context(), vm, request), vm, host
