"""A live migration as the source daemon runs it, peer to peer with the destination daemon.

The job's life is one enum, :class:`Phase`, moved through one table. The source daemon
prepares the destination (``POST /v1/incoming``: an incoming QEMU waiting for the VM), runs
QEMU's RAM migration over QMP, has the destination commit the VM once QEMU reports
completion, releases its own copy, and writes the report from both hosts' probe heartbeats.

Before switchover any failure rolls back: the migration is cancelled, the VM keeps running on
the source untouched, and the destination is told to remove everything it made.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener

from devagent.client import DaemonClient, Endpoint
from devagent.daemon.host import Host
from devagent.daemon.netmigration import NET_MEASURES, NetMigration
from devagent.daemon.netstat import link_bytes
from devagent.daemon.vms import ManagedVm
from devagent.errors import DevagentError, PeerError, StateError, UsageError
from devagent.guest.probe import Heartbeat
from devagent.qemu.vm import VmState
from devagent.report import MigrationReport, fill_io_measures, fill_link_measures, io_series
from devagent.vocab import BASELINES, STRATEGIES

log = logging.getLogger(__name__)

PEER_TIMEOUT_S = 600.0
PEER_CHECK_S = 0.3  # how often the destination daemon is checked during the RAM phase
PRECOPY_CONVERGE_BYTES = 1 << 20  # what pre-copy leaves for the switchover
#: Passes a pre-copy mirror makes before it goes write-through anyway (a guest that dirties
#: faster than the link copies would never leave 1 MiB behind).
PRECOPY_PASSES = 8
#: Hybrid: the share of a known link rate the disk push may take while RAM migrates (the
#: RAM decides the switchover; what the push leaves is fetched after it).
HYBRID_PUSH_SHARE = 0.25
#: Hybrid push: copies in flight and bytes per copy. Stopping the push at the switchover
#: waits for the copies in flight (nothing may land after it): 2 x 256 KiB is 4 ms at 1 Gbit/s.
HYBRID_PUSH_PARALLEL = 2
HYBRID_PUSH_COPY = 256 << 10
FETCH_CHUNK = 64 << 10
COPY_WORKERS = 2  # the Fetch backend's default
COPY_BATCH_MAX = 1 << 20
COPY_AHEAD_S = 0.02  # how much link time the copier keeps in flight per worker
POLL_S = 0.1
BASELINE_S = 3.0  # steady-state window before the migration, for io_rate_ratio
SETTLE_BEATS = 5  # heartbeats with I/O the destination must show before the report closes
SETTLE_TIMEOUT_S = 10.0


class Phase(Enum):
    PREPARING = "preparing"
    RAM = "ram"
    SWITCHOVER = "switchover"
    FINISHING = "finishing"
    COMPLETED = "completed"
    FAILED = "failed"


_NEXT: dict[Phase, frozenset[Phase]] = {
    Phase.PREPARING: frozenset({Phase.RAM, Phase.FAILED}),
    Phase.RAM: frozenset({Phase.SWITCHOVER, Phase.FAILED}),
    Phase.SWITCHOVER: frozenset({Phase.FINISHING, Phase.FAILED}),
    Phase.FINISHING: frozenset({Phase.COMPLETED, Phase.FAILED}),
    Phase.COMPLETED: frozenset(),
    Phase.FAILED: frozenset(),
}


@dataclass(frozen=True)
class MigrationRequest:
    destination: Endpoint
    storage: str = "shared"
    link_rate_bps: int | None = None
    downtime_limit_ms: int | None = None
    auto_converge: bool = True

    @classmethod
    def from_json(cls, body: Any) -> MigrationRequest:
        if not isinstance(body, dict):
            raise UsageError("the request body must be a JSON object")
        storage = body.get("storage", "shared")
        if storage not in STRATEGIES + BASELINES:
            raise UsageError(
                f"storage {storage!r} is not available: choose one of "
                f"{', '.join(STRATEGIES + BASELINES)}"
            )
        rate = body.get("link_rate_bps")
        downtime = body.get("downtime_limit_ms")
        for key, value in (("link_rate_bps", rate), ("downtime_limit_ms", downtime)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise UsageError(f"'{key}' must be a positive integer")
        return cls(
            destination=Endpoint.from_json(body.get("to")),
            storage=storage,
            link_rate_bps=rate,
            downtime_limit_ms=downtime,
            auto_converge=bool(body.get("auto_converge", True)),
        )


class MigrationJob:
    def __init__(self, host: Host, managed: ManagedVm, request: MigrationRequest):
        self.id = secrets.token_hex(4)
        self.host = host
        self.managed = managed
        self.request = request
        self.phase = Phase.PREPARING
        self.started_at = time.time()
        self.finished_at: float | None = None
        self.progress: dict[str, Any] = {}
        dest = request.destination
        self.report = MigrationReport(
            vm=managed.name,
            source=host.name,
            destination=dest.name or dest.url,
            storage=request.storage,
            link_rate_bps=request.link_rate_bps,
        )
        self.log = logging.getLogger(f"{__name__}.{managed.name}")
        self.task: asyncio.Task[None] | None = None
        # The NICs' steps (hold, forward, hand-over), for a VM that has NICs.
        self.net: NetMigration | None = None
        if managed.nics:
            self.net = NetMigration(managed, self.report, self._mark, self.log)

    def _move(self, phase: Phase) -> None:
        if phase not in _NEXT[self.phase]:
            raise StateError(
                f"migration {self.id}: no transition {self.phase.value} -> {phase.value}"
            )
        self.log.info("migration %s to %s: %s", self.id, self.report.destination, phase.value)
        self.phase = phase

    def _mark(self, step: str, at: float | None = None) -> None:
        """Note on the report's timeline that ``step`` was reached (now, or at ``at``)."""
        when = time.time() if at is None else at
        self.report.timeline[step] = round(when - self.started_at, 3)

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "vm": self.managed.name,
            "phase": self.phase.value,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "progress": self.progress,
            "report": self.report.to_json(),
        }

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"migration-{self.id}")

    async def _run(self) -> None:
        try:
            await self._migrate()
        except asyncio.CancelledError:
            self._fail("cancelled")
            raise
        except DevagentError as err:
            self._fail(str(err))
        except Exception as err:  # a bug: keep the daemon up and say what happened
            self.log.exception("migration %s crashed", self.id)
            self._fail(f"internal error: {err!r}")

    def _fail(self, message: str) -> None:
        self.log.error("migration %s failed: %s", self.id, message)
        self.report.status = "failed"
        self.report.error = message
        self.phase = Phase.FAILED
        self.finished_at = time.time()

    async def _migrate(self) -> None:
        managed, vm = self.managed, self.managed.vm
        vm.require(VmState.RUNNING)
        self._check_storage()
        storage = self.request.storage
        moves_disk = storage != "shared"
        agent = managed.agents[0] if managed.agents else None
        t0 = self.started_at
        bytes0 = link_bytes(self.host.loopback)
        incoming: dict[str, Any] = {
            "request": managed.request.to_json(),
            "config": managed.config.to_json(),
        }
        source_disk: dict[str, Any] = {}
        disk_size = 0
        if moves_disk:
            assert agent is not None and agent.tcp_address is not None
            source_disk = {"kind": "remote", "address": agent.tcp_address, "export": agent.export}
            disk_size = int((await agent.call("GET", "/status"))["size"])
            incoming["size"] = disk_size
            # Until the switchover the destination's QEMU reads through to the source (it
            # reads a qcow2 header at launch, say); a mirror pushes into a receiver agent.
            incoming["backend"] = source_disk
            incoming["receive"] = storage in ("precopy", "hybrid")
        else:
            incoming["image"] = str(managed.image)  # the destination sees it too
        if self.net is not None:  # the destination makes the same NICs, held
            incoming["nics"] = self.net.incoming()
            await self.net.start()
        async with DaemonClient(self.request.destination, timeout=PEER_TIMEOUT_S) as peer:
            answer = await peer.post("/v1/incoming", incoming)
            self._mark("destination_ready")
            uri = str(answer["uri"])
            target = {
                "kind": "remote",
                "address": answer["disk_address"],
                "export": answer["disk_export"],
            }
            handover: dict[str, Any] | None = None
            try:
                if self.net is not None:
                    self.net.prepared(answer)
                if storage in ("precopy", "hybrid"):
                    assert agent is not None
                    mirror: dict[str, Any] = {"target": target}
                    if storage == "precopy":  # converged, writes go to both copies
                        mirror.update(
                            converge_bytes=PRECOPY_CONVERGE_BYTES,
                            active=True,
                            max_passes=PRECOPY_PASSES,
                        )
                    else:  # small copies: the switchover waits for those in flight
                        mirror.update(parallel=HYBRID_PUSH_PARALLEL, max_copy=HYBRID_PUSH_COPY)
                        if self.request.link_rate_bps and HYBRID_PUSH_SHARE < 1:
                            mirror["rate_limit"] = self._push_rate()
                    await agent.call("POST", "/mirror", mirror)
                    self._mark("mirror_started")
                if storage == "precopy":
                    await self._disk_converged()
                    self._mark("disk_converged")
                for each in managed.agents:  # leave the switchover's own flush little to do
                    await each.call("POST", "/flush", timeout=PEER_TIMEOUT_S)
                self._move(Phase.RAM)
                self._mark("ram_started")
                done = await self._ram(uri, peer)
                self._mark("ram_completed")
                # QEMU stopped the guest here and flushed its disk: the switchover.
                if storage == "precopy":
                    assert agent is not None
                    cut = await agent.call(
                        "POST", "/mirror/cutover", {"keep_source": True}, timeout=PEER_TIMEOUT_S
                    )
                    self.progress["disk_bytes_pushed"] = cut["mirror"]["copied_bytes"]
                elif storage == "hybrid":
                    assert agent is not None
                    handover = await agent.call("POST", "/mirror/stop")
                    self.progress["disk_bytes_pushed"] = handover["mirror"]["copied_bytes"]
                if storage in ("precopy", "hybrid"):
                    self._mark("mirror_ended")
            except BaseException as err:
                await self._roll_back(peer, err)
                raise
            if moves_disk:  # one writer: the instance here may never write again
                assert agent is not None
                await agent.call("POST", "/fence")
                self._mark("source_fenced")
            if self.net is not None:  # the source's kept frames, and what comes, go there
                await self.net.switched_over()
            self._move(Phase.SWITCHOVER)
            commit: dict[str, Any] = {"local": storage == "precopy"}
            if storage in ("postcopy", "hybrid"):
                commit["fetch"] = {"remote": source_disk, "chunk_size": FETCH_CHUNK}
                if handover is not None:
                    commit["fetch"]["present"] = _clean_chunks(handover)
                    commit["fetch"]["chunk_size"] = handover["chunk_size"]
                commit["fetch"]["copy_batch"] = copy_batch(
                    self.request.link_rate_bps, commit["fetch"]["chunk_size"]
                )
            committed = await peer.post(f"/v1/incoming/{managed.name}/commit", commit)
            resumed_at = float(committed["resumed_at"])
            for step, at in committed.get("steps", {}).items():
                self._mark(f"destination_{step}", float(at))
            self._mark("resumed", resumed_at)
            self._mark("committed")
            self._move(Phase.FINISHING)
            if self.net is not None:  # until the network has learned the guest's new place
                await self.net.finish(peer, committed.get("steps", {}))
            source_done = await managed.completions_since(t0 - BASELINE_S)
            managed.role = "migrated"
            with contextlib.suppress(PeerError, StateError):  # QEMU's final figures
                done = await vm.migration_outcome()
            # The old instance: inert since the switchover (its disk flushed and inactivated).
            # After a fence its NBD client would wait out reconnect-delay on quit: kill it.
            await (vm.kill() if moves_disk else vm.stop())
            if storage in ("postcopy", "hybrid"):
                await self._disk_arrived(peer)
                self._mark("disk_local")
            allocated = allocated_bytes(managed.image) if moves_disk else 0
            await self.host.vms.remove(managed.name, delete_disk=moves_disk)
            released_at = time.time()
            self._mark("released", released_at)
            bytes1 = link_bytes(self.host.loopback)
            dest_beats = await self._settle(peer, resumed_at)
            dest_done = (
                await peer.get(f"/v1/vms/{managed.name}/completions", since=t0 - BASELINE_S)
            )["completions"]
            completions = None
            if source_done is not None and dest_done is not None:
                completions = [*source_done, *dest_done]
            report = self.report
            report.time_to_switchover_s = round(resumed_at - t0, 3)
            report.total_time_s = round(released_at - t0, 3)
            report.downtime_ms = done.get("downtime")
            stopped = report.timeline.get("source_stopped")
            if stopped is not None:
                report.vm_pause_ms = round((resumed_at - self.started_at - stopped) * 1000, 1)
            else:
                report.missing["vm_pause_ms"] = "QEMU sent no STOP event for the switchover"
            ram = done.get("ram", {})
            report.ram_bytes = managed.config.ram_mb << 20
            report.ram_transferred_bytes = ram.get("transferred")
            report.disk_bytes_moved = self.progress.get("disk_bytes_moved", 0) + (
                self.progress.get("disk_bytes_pushed", 0)
            )
            fill_link_measures(
                report, bytes0, bytes1, allocated + report.ram_bytes, self.request.link_rate_bps
            )
            beats = [*managed.heartbeats, *dest_beats]
            report.io_series = io_series(
                [
                    *((self.host.name, b) for b in managed.heartbeats),
                    *((report.destination, b) for b in dest_beats),
                ],
                t0 - BASELINE_S,
                max(released_at, resumed_at) + 1.0,
                t0,
            )
            fill_io_measures(
                report,
                beats,
                start=t0,
                end=max(released_at, resumed_at),
                baseline_start=t0 - BASELINE_S,
                completions=completions,
            )
            if self.net is None:
                report.mark_missing("the VM has no NIC", *NET_MEASURES)
            report.mark_missing("no pinger ran (devagent demo --net runs one)", "ping_max_gap_ms")
            if managed.request.has_probe:
                answer = await peer.post(f"/v1/vms/{managed.name}/integrity")
                report.integrity = str(answer["integrity"])
            else:
                report.missing["integrity"] = "no ioprobe in the guest to say what it last wrote"
        report.status = "completed"
        self._move(Phase.COMPLETED)
        self.finished_at = time.time()

    async def _disk_converged(self) -> None:
        """Pre-copy: wait until the source agent's mirror has little left to copy."""
        agent = self.managed.agents[0]
        deadline = time.monotonic() + PEER_TIMEOUT_S
        while True:
            if time.monotonic() > deadline:
                raise PeerError(f"the disk mirror did not converge in {PEER_TIMEOUT_S:.0f} s")
            mirror = (await agent.call("GET", "/status"))["backend_status"]
            self._disk_progress(mirror.get("copied_bytes", 0), mirror.get("dirty_bytes", 0))
            if mirror.get("state") in ("converged", "finished"):
                return
            if mirror.get("state") == "failed" or mirror.get("kind") != "mirror":
                raise PeerError(f"the disk mirror failed: {mirror.get('error')}")
            await asyncio.sleep(POLL_S)

    async def _disk_arrived(self, peer: DaemonClient) -> None:
        """Post-copy: wait until the destination's replica is complete and local."""
        name = self.managed.name
        while True:
            device = (await peer.get(f"/v1/vms/{name}/devices"))["devices"][0]
            backend = device.get("agent", {}).get("backend_status", {})
            fetch = backend if backend.get("kind") == "fetch" else device.get("last_fetch")
            if fetch:
                present = fetch["present_bytes"]
                self._disk_progress(present, fetch["size"] - present)
                moved = fetch["fetched_on_demand_bytes"] + fetch["fetched_in_background_bytes"]
                self.progress["disk_bytes_moved"] = moved
            if backend.get("kind") == "local":
                return
            await asyncio.sleep(POLL_S)

    def _push_rate(self) -> float:
        """Bytes per second a hybrid push may take while RAM migrates."""
        return (self.request.link_rate_bps or 0) / 8 * HYBRID_PUSH_SHARE

    def _disk_progress(self, done: int, left: int) -> None:
        self.progress.update(disk_done=done, disk_left=left)

    def _check_storage(self) -> None:
        if self.request.storage != "shared":
            if not self.managed.agents:
                raise UsageError(
                    f"VM {self.managed.name} runs without a device agent: only 'shared' "
                    "storage can migrate it"
                )
            if self.managed.request.disk_from is not None:
                raise UsageError(
                    f"VM {self.managed.name}'s disk lives on another host: migrate it with "
                    "'shared' (the disk stays where it is)"
                )
            return
        shared = self.host.shared_dir
        in_shared = shared is not None and self.managed.image.is_relative_to(shared)
        if self.request.storage == "shared" and not in_shared and self.managed.request.disk is None:
            raise UsageError(
                f"VM {self.managed.name}'s disk is local to host {self.host.name}: "
                "the 'shared' strategy needs a disk both hosts see (vm start --storage shared)"
            )

    async def _ram(self, uri: str, peer: DaemonClient) -> dict[str, Any]:
        vm = self.managed.vm
        capabilities = [{"capability": "events", "state": True}]
        capabilities.append({"capability": "auto-converge", "state": self.request.auto_converge})
        if self.net is not None:  # QEMU waits at pre-switchover for the NICs' hold
            capabilities += self.net.capabilities()
        await vm.qmp("migrate-set-capabilities", capabilities=capabilities)
        link = self.request.link_rate_bps
        params: dict[str, Any] = {"max-bandwidth": (link or 8 << 33) // 8}
        if link and self.request.storage == "hybrid":  # the push has the rest of the link
            params["max-bandwidth"] = max(1, int(link / 8 - self._push_rate()))
        if self.request.downtime_limit_ms:
            params["downtime-limit"] = self.request.downtime_limit_ms
        await vm.qmp("migrate-set-parameters", **params)
        with vm.listen("MIGRATION", "STOP") as events:
            await vm.qmp("migrate", uri=uri)
            return await self._follow_ram(events, peer)

    async def _follow_ram(self, events: EventListener, peer: DaemonClient) -> dict[str, Any]:
        """Until QEMU's RAM migration ends: progress, the destination's health, and the
        moment QEMU stopped the guest for the switchover (its STOP event's own stamp). The
        loop wakes on every MIGRATION event, so the completion is seen at once."""
        vm = self.managed.vm
        next_check = time.monotonic() + PEER_CHECK_S
        while True:
            info: dict[str, Any] = await vm.qmp("query-migrate")
            status = info.get("status")
            ram = info.get("ram", {})
            self.progress = {
                "status": status,
                "ram_transferred": ram.get("transferred", 0),
                "ram_remaining": ram.get("remaining", 0),
                "ram_total": ram.get("total", self.managed.config.ram_mb << 20),
                "elapsed_s": round(time.time() - self.started_at, 3),
            }
            if status == "completed":
                return info
            if status == "pre-switchover" and self.net is not None:
                await self.net.at_pre_switchover()
            if status in ("failed", "cancelled"):
                raise PeerError(
                    f"QEMU migration {status}: {info.get('error-desc', 'no reason given')}"
                )
            if vm.exited:
                raise PeerError(f"source QEMU of VM {self.managed.name} exited during migration")
            if time.monotonic() >= next_check:  # the destination's daemon must see it through
                next_check = time.monotonic() + PEER_CHECK_S
                try:
                    await asyncio.wait_for(peer.get("/v1/health"), PEER_CHECK_S * 2)
                except (PeerError, TimeoutError) as err:
                    raise PeerError(
                        f"destination host {self.report.destination} vanished during the "
                        f"migration: {err}"
                    ) from err
            try:
                event = await asyncio.wait_for(events.get(), POLL_S)
            except TimeoutError:
                continue
            if event["event"] == "STOP":
                stamp = event.get("timestamp")
                at = None
                if isinstance(stamp, dict):  # QEMU's own clock: the same host's wall clock
                    at = float(stamp.get("seconds", 0)) + stamp.get("microseconds", 0) / 1e6
                self._mark("source_stopped", at or None)
                if self.net is not None:  # the guest stopped: frames for it wait from now
                    await self.net.hold()
            elif self.net is not None and _status_of(event) == "pre-switchover":
                await self.net.at_pre_switchover()  # at once: QEMU waits for it

    async def _roll_back(self, peer: DaemonClient, cause: BaseException) -> None:
        """Before switchover: keep the VM on the source, leave nothing on the destination."""
        vm = self.managed.vm
        self.log.warning("rolling back migration %s: %s", self.id, cause)
        for agent in self.managed.agents:  # a disk mirror to the destination stops
            with contextlib.suppress(DevagentError):
                await agent.call("POST", "/mirror/cancel")
        with contextlib.suppress(DevagentError):
            await vm.qmp("migrate_cancel")
        if self.net is not None:  # the guest stays here: what was held for it is delivered
            await self.net.roll_back()
        with contextlib.suppress(DevagentError):
            status = await vm.qmp("query-status")
            if status.get("status") in ("paused", "postmigrate", "finish-migrate"):
                await vm.qmp("cont")
        with contextlib.suppress(DevagentError):
            await peer.delete(f"/v1/incoming/{self.managed.name}")

    async def _settle(self, peer: DaemonClient, resumed_at: float) -> list[Heartbeat]:
        """Wait until the destination's probe shows steady I/O, and return its heartbeats."""
        if not self.managed.request.has_probe:
            return []
        deadline = time.time() + SETTLE_TIMEOUT_S
        # As the guest was just before the migration (an idle guest's prefill did I/O).
        since = self.started_at - BASELINE_S
        wants_io = any(b.ops > 0 for b in self.managed.heartbeats if b.host_time >= since)
        while True:
            raw = await peer.get(f"/v1/vms/{self.managed.name}/heartbeats", since=self.started_at)
            beats = [Heartbeat(**b) for b in raw["heartbeats"]]
            after = [b for b in beats if b.host_time > resumed_at and (b.ops > 0 or not wants_io)]
            if len(after) >= SETTLE_BEATS or time.time() > deadline:
                return beats
            await asyncio.sleep(0.2)


def _status_of(event: Any) -> object:
    """The ``status`` of a MIGRATION event (None for any other event)."""
    data = event.get("data")
    return data.get("status") if isinstance(data, dict) else None


def _clean_chunks(handover: dict[str, Any]) -> str:
    """The chunks a stopped mirror's target holds (not dirty), as base64 bits."""
    dirty = base64.b64decode(handover["dirty"])
    n = int(handover["chunks"])
    clean = bytearray(~b & 0xFF for b in dirty)
    if n % 8:
        clean[-1] &= (1 << (n % 8)) - 1
    return base64.b64encode(bytes(clean)).decode()


def copy_batch(link_rate_bps: int | None, chunk_size: int) -> int:
    """Bytes per background copy request after the switchover: what the link moves in
    ``COPY_AHEAD_S`` for each copy worker, so that a guest read fetched on demand waits
    behind little of the copier's data (at 100 Mbit/s: 128 KiB, not 1 MiB)."""
    if not link_rate_bps:
        return COPY_BATCH_MAX
    wanted = int(link_rate_bps / 8 * COPY_AHEAD_S / COPY_WORKERS)
    batch = chunk_size
    while batch * 2 <= min(wanted, COPY_BATCH_MAX):
        batch *= 2
    return batch


def allocated_bytes(path: Path) -> int:
    """Bytes a (sparse) image really holds."""
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0
