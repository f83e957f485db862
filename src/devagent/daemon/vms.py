"""The VMs a daemon runs: how an API request becomes a QEMU configuration, and what the
daemon keeps of each VM (the :class:`Vm`, the probe's heartbeats, its folder).

Each VM's folder ``<host dir>/vms/<name>/`` holds ``vm.json`` (request, configuration, pid),
QEMU's sockets and logs; a daemon that restarts adopts every VM whose QEMU still runs, so a
daemon restart never touches a guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from devagent.agent.fetch import presence_path
from devagent.client import DaemonClient, Endpoint
from devagent.daemon.agents import AgentProcess
from devagent.daemon.guestnet import GuestNetwork, mac_for, pick_address, tap_name
from devagent.daemon.nics import NicAgent, delete_tap, make_tap
from devagent.errors import DevagentError, NotFound, PeerError, StateError, UsageError
from devagent.guest.build import load_guest
from devagent.guest.probe import (
    ConsoleParser,
    DiskDigest,
    Heartbeat,
    Paused,
    ProbeEvent,
    Verified,
    disk_digest,
)
from devagent.guest.workload import parse_workload
from devagent.lab.procs import terminate, under_path
from devagent.qemu.accel import choose_accel
from devagent.qemu.config import DiskFormat, DiskSpec, NicSpec, VmConfig
from devagent.qemu.vm import Vm, VmState, pid_alive
from devagent.report import largest_gap
from devagent.vocab import parse_size

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
HEARTBEATS_KEPT = 36_000  # one hour at ten a second
MIRROR_TIMEOUT_S = 3600.0
FETCH_CHUNK = 64 << 10
MIRROR_CONVERGE_BYTES = 1 << 20  # left for the last copy, done with the guest's I/O held
NBD_RECONNECT_DELAY_S = 5  # QEMU's NBD client reconnects to a restarted agent
Storage = Literal["shared", "local"]
Role = Literal["running", "incoming", "migrated"]  # migrated: left behind, serving its disk


@dataclass(frozen=True)
class VmRequest:
    """What a user asks for when starting a VM (the API's ``POST /v1/vms`` body)."""

    name: str
    ram_mb: int = 256
    disk_size: int = 1 << 30
    workload: str | None = "moderate"
    disk: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    storage: Storage = "shared"
    agent: bool = True  # False: QEMU opens the image itself (the QEMU-only baselines)
    disk_from: dict[str, str] | None = None  # the disk lives on this peer host (an Endpoint)
    nics: int = 0  # NICs on this host's guest network (the test guest configures one)

    @classmethod
    def from_json(cls, body: Any) -> VmRequest:
        if not isinstance(body, dict):
            raise UsageError("the request body must be a JSON object")
        body = dict(body)
        if "nic" in body:  # "nic": true is one NIC
            nic = body.pop("nic")
            if not isinstance(nic, bool) or "nics" in body:
                raise UsageError("'nic' must be true or false (or give 'nics', not both)")
            body["nics"] = int(nic)
        unknown = set(body) - set(cls.__dataclass_fields__)
        if unknown:
            raise UsageError(f"unknown field(s): {', '.join(sorted(unknown))}")
        name = body.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise UsageError("'name' must be 1-32 characters of a-z, 0-9 and '-'")
        ram = body.get("ram_mb", 256)
        if not isinstance(ram, int) or not 64 <= ram <= 65536:
            raise UsageError("'ram_mb' must be an integer from 64 to 65536")
        size = parse_size(body.get("disk_size", 1 << 30))
        if not 1 << 20 <= size <= 1 << 40:
            raise UsageError("'disk_size' must be from 1M to 1T")
        storage = body.get("storage", "shared")
        if storage not in ("shared", "local"):
            raise UsageError("'storage' must be 'shared' or 'local'")
        strings: dict[str, Any] = {}
        for key in ("workload", "disk", "kernel", "initrd", "append"):
            value = body.get(key, cls.__dataclass_fields__[key].default)
            if value is not None and not isinstance(value, str):
                raise UsageError(f"'{key}' must be a string")
            strings[key] = value
        if strings["disk"] is None and (strings["kernel"] or strings["initrd"]):
            raise UsageError("'kernel'/'initrd' are for a user's own guest: give 'disk' too")
        if strings["disk"] is not None:
            strings["workload"] = None  # a user's own guest runs no ioprobe
        elif strings["workload"] is not None:
            parse_workload(strings["workload"])  # raises UsageError when malformed
        agent = body.get("agent", True)
        if not isinstance(agent, bool):
            raise UsageError("'agent' must be true or false")
        disk_from = body.get("disk_from")
        if disk_from is not None:
            disk_from = Endpoint.from_json(disk_from).to_json()
            if strings["disk"] is not None or not agent:
                raise UsageError("'disk_from' makes a new disk on the peer: no 'disk' with it")
        nics = body.get("nics", 0)
        if not isinstance(nics, int) or isinstance(nics, bool) or not 0 <= nics <= 1:
            raise UsageError("'nics' must be 0 or 1 (the test guest configures one NIC)")
        return cls(
            name=name,
            nics=nics,
            ram_mb=ram,
            disk_size=size,
            storage=storage,
            agent=agent,
            disk_from=disk_from,
            **strings,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def has_probe(self) -> bool:
        return self.disk is None


def image_format(path: Path) -> DiskFormat:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise NotFound(f"disk image {path}: {err.strerror}") from err
    return "qcow2" if magic == b"QFI\xfb" else "raw"


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


def disk_spec(request: VmRequest, image: Path, agent: AgentProcess | None) -> DiskSpec:
    """The VM's disk: the agent's NBD export when it has one, else the image itself."""
    fmt: DiskFormat = "raw" if request.disk is None else image_format(image)
    if agent is None:
        return DiskSpec(node="disk0", path=str(image), format=fmt)
    return DiskSpec(
        node="disk0",
        nbd_socket=str(agent.nbd_socket),
        nbd_export=agent.export,
        format=fmt,
        reconnect_delay_s=NBD_RECONNECT_DELAY_S,
    )


def build_config(request: VmRequest, disk: DiskSpec, nics: tuple[NicAgent, ...] = ()) -> VmConfig:
    """The QEMU configuration for ``request`` with ``disk`` and the NICs ``nics`` (the test
    guest is told its address on the kernel command line: ``devagent.ip=``)."""
    specs = tuple(NicSpec(id=n.node, stream_socket=str(n.stream_socket), mac=n.mac) for n in nics)
    if request.has_probe:
        guest = load_guest()
        assert request.workload is not None
        workload = parse_workload(request.workload)
        return VmConfig(
            name=request.name,
            ram_mb=request.ram_mb,
            accel=choose_accel(guest),
            kernel=str(guest.kernel),
            initrd=str(guest.initrd),
            append=f"console=ttyS0 quiet panic=-1 {workload.to_kernel_arg()}"
            + "".join(f" devagent.ip={n.address}" for n in nics[:1]),
            disks=(disk,),
            nics=specs,
        )
    return VmConfig(
        name=request.name,
        ram_mb=request.ram_mb,
        kernel=request.kernel,
        initrd=request.initrd,
        append=request.append,
        disks=(disk,),
        nics=specs,
    )


class ManagedVm:
    """A VM as its daemon keeps it: the QEMU process and what its probe said."""

    def __init__(
        self,
        request: VmRequest,
        config: VmConfig,
        run_dir: Path,
        role: Role,
        image: Path,
        agents: list[AgentProcess] | None = None,
        nics: list[NicAgent] | None = None,
    ):
        self.request = request
        self.config = config
        self.run_dir = run_dir
        self.role: Role = role
        self.image = image  # the disk image on this host, served by the agent (if any)
        self.agents = agents or []
        self.nics = nics or []  # one net agent per NIC
        self.fetching: asyncio.Task[dict[str, Any]] | None = None  # replica being filled
        self.last_fetch: dict[str, Any] | None = None  # its figures, kept once it is local
        # An incoming VM's replica as a mirror's target, until the switchover (the VM's own
        # agent forwards to the source meanwhile, so QEMU never sees a half-copied disk).
        self.receiver: AgentProcess | None = None
        self.retiring: asyncio.Task[None] | None = None  # the receiver, stopping
        self.heartbeats: deque[Heartbeat] = deque(maxlen=HEARTBEATS_KEPT)
        self.parser = ConsoleParser() if request.has_probe else None
        self.vm = Vm(config, run_dir, on_console=self._on_console if self.parser else None)
        self.log = logging.getLogger(f"{__name__}.{config.name}")
        self._waiters: list[tuple[type[ProbeEvent], asyncio.Future[ProbeEvent]]] = []

    @property
    def name(self) -> str:
        return self.config.name

    def _on_console(self, data: bytes, host_time: float) -> None:
        assert self.parser is not None
        for event in self.parser.feed(data, host_time):
            if isinstance(event, Heartbeat):
                self.heartbeats.append(event)
            else:
                self.log.info("probe: %s", event)
            for kind, future in list(self._waiters):
                if isinstance(event, kind) and not future.done():
                    future.set_result(event)
                    self._waiters.remove((kind, future))

    async def set_suspended(self, suspended: bool) -> None:
        """Stop the guest's vCPUs (QMP ``stop``) or let them run again (``cont``). A
        suspended guest does nothing and costs no CPU; its devices stay as they are."""
        self.vm.require(VmState.RUNNING if suspended else VmState.PAUSED)
        if self.role != "running":
            raise StateError(f"VM {self.name} is {self.role} here: only a running VM suspends")
        await self.vm.qmp("stop" if suspended else "cont")
        await self.vm.refresh_state()
        self.log.info("VM %s %s", self.name, "suspended" if suspended else "resumed")

    async def probe_command(self, command: str, timeout: float = 30.0) -> ProbeEvent:
        """Send ``pause``, ``resume`` or ``verify`` to the guest's ioprobe and wait for its
        answer (``resume`` is answered by the next heartbeat)."""
        if self.parser is None:
            raise StateError(f"VM {self.name} runs no ioprobe")
        self.vm.require(VmState.RUNNING)
        kinds: dict[str, type[ProbeEvent]] = {
            "pause": Paused,
            "verify": Verified,
            "resume": Heartbeat,
        }
        if command not in kinds:
            raise UsageError(f"unknown probe command {command!r}: use {', '.join(kinds)}")
        future: asyncio.Future[ProbeEvent] = asyncio.get_running_loop().create_future()
        self._waiters.append((kinds[command], future))
        await self.vm.send_console(command + "\n")
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError as err:
            raise PeerError(f"VM {self.name}: ioprobe did not answer {command!r}") from err
        finally:
            if (kinds[command], future) in self._waiters:
                self._waiters.remove((kinds[command], future))

    async def wait_running(self, timeout: float) -> None:
        """Wait until the guest runs (an incoming VM resumes once its migration completes)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.vm.state is not VmState.RUNNING:
            if self.vm.exited or self.vm.state is VmState.FAILED:
                raise PeerError(f"VM {self.name}: QEMU failed: {self.vm.log_tail()}")
            if asyncio.get_running_loop().time() > deadline:
                raise PeerError(f"VM {self.name} not running after {timeout:.0f} s")
            await asyncio.sleep(0.02)

    async def check_integrity(self) -> str:
        """Pause the probe, compare the disk with what the guest last wrote (the probe's
        digest over the generation of every block it wrote), then let the probe go on."""
        paused = await self.probe_command("pause")
        assert isinstance(paused, Paused)
        try:
            if self.request.disk_from is not None:  # the disk lives on the peer: ask it
                peer = Endpoint.from_json(self.request.disk_from)
                async with DaemonClient(peer) as client:
                    answer = await client.post(f"/v1/exports/{self.name}/digest")
                digest = str(answer["digest"])
            else:
                digest = (await asyncio.to_thread(image_digest, self.image)).digest
        finally:
            await self.probe_command("resume")
        if digest == paused.digest:
            return "ok"
        return f"mismatch: the guest last wrote digest {paused.digest}, the disk holds {digest}"

    def agent_for(self, node: str) -> AgentProcess:
        for agent in self.agents:
            if agent.node == node:
                return agent
        if not self.agents:
            raise StateError(f"VM {self.name}'s disk has no agent (QEMU opens it directly)")
        raise NotFound(f"VM {self.name} has no device {node!r}")

    async def _mirror_and_pivot(
        self, agent: AgentProcess, target: dict[str, Any], *, target_zeroed: bool, sync: bool
    ) -> dict[str, Any]:
        """Mirror ``agent``'s device to ``target`` under the running guest, then pivot onto
        it; the answer carries the guest I/O gap around the pivot, from the journal."""
        started = time.time()
        await agent.call(
            "POST",
            "/mirror",
            {
                "target": target,
                "target_zeroed": target_zeroed,
                "sync": sync,
                "converge_bytes": MIRROR_CONVERGE_BYTES,
            },
        )
        try:
            done = await agent.call("POST", "/mirror/cutover", timeout=MIRROR_TIMEOUT_S)
        except BaseException:
            with contextlib.suppress(PeerError, StateError):
                await agent.call("POST", "/mirror/cancel")
            raise
        held_from, held_s = float(done["held_from"]), float(done["held_s"])
        await asyncio.sleep(0.5)  # let completions after the pivot arrive
        times = (await agent.call("GET", "/completions", since=held_from - 1.0))["completions"]
        gap = largest_gap(times, held_from - 0.5, held_from + held_s + 0.5)
        return {
            "vm": self.name,
            "device": agent.node,
            "duration_s": round(time.time() - started, 3),
            "copied_bytes": done["mirror"]["copied_bytes"],
            "held_ms": round(held_s * 1000, 3),
            "io_gap_ms": round(gap * 1000, 3) if gap is not None else None,
            "backend": done["new"],
        }

    async def fetch_home(
        self, node: str, path: Path, *, rate_limit: int | None = None
    ) -> dict[str, Any]:
        """Bring a disk that lives on another host home to ``path`` on this host: the agent
        serves from a local replica filled on demand (copy-on-read) and in the background,
        and switches to it as ``Local`` once complete; then the peer's export is removed."""
        agent = self.agent_for(node)
        remote = agent.backend
        if self.request.disk_from is None or remote is None or remote.get("kind") != "remote":
            raise StateError(f"VM {self.name}'s {node} does not live on another host")
        if path.exists():
            raise UsageError(f"{path} exists: a replica is made new")
        started = time.time()
        spec: dict[str, Any] = {
            "kind": "fetch",
            "path": str(path),
            "remote": remote,
            "copier": True,
            "then_local": True,
        }
        if rate_limit:
            spec["rate_limit"] = rate_limit
        swapped = await agent.call("POST", "/swap", {"backend": spec})
        agent.backend, agent.image = spec, str(path)  # a restarted agent resumes the fetch
        self.image = path
        self.save()
        status = await self._await_local(agent)
        peer = Endpoint.from_json(self.request.disk_from)
        self.request = replace(self.request, disk_from=None)
        self.save()
        with contextlib.suppress(PeerError, NotFound):
            async with DaemonClient(peer) as client:
                await client.delete(f"/v1/exports/{self.name}")
        return {
            "vm": self.name,
            "device": node,
            "duration_s": round(time.time() - started, 3),
            "held_ms": round(float(swapped["hold_s"]) * 1000, 3),
            "backend": repr(status["backend_status"]),
            "released": peer.name,
        }

    async def _await_local(self, agent: AgentProcess) -> dict[str, Any]:
        """Wait until ``agent``'s Fetch replica is complete and the agent serves it as
        ``Local``; then a restarted agent opens the replica as Local too."""
        deadline = time.time() + MIRROR_TIMEOUT_S
        while True:
            try:
                status: dict[str, Any] = await agent.call("GET", "/status")
            except PeerError:  # the agent died: the supervisor restarts it, resuming the fetch
                if time.time() > deadline:
                    raise
                await asyncio.sleep(0.2)
                continue
            backend = status["backend_status"]
            if backend.get("kind") == "fetch":
                self.last_fetch = backend
            if backend.get("kind") == "local":
                if self.last_fetch is not None:  # the figures as the replica completed
                    self.last_fetch = {**self.last_fetch, "present_bytes": self.last_fetch["size"]}
                agent.backend = None
                self.save()
                return status
            await asyncio.sleep(0.1)

    async def commit_incoming(
        self, fetch: dict[str, Any] | None, local: bool = False
    ) -> dict[str, float]:
        """The migration arrived: ready the disk, run the guest, return when it resumed
        (``resumed_at``) and when each step before it ended (wall clock).

        With ``fetch`` (postcopy, hybrid) the agent swaps to a Fetch replica of the source's
        disk (``fetch["remote"]``), seeded with the chunks a mirror already pushed
        (``fetch["present"]``, base64 bits), copying the rest in the background; a task
        watches it complete. With ``local`` (precopy) the replica is complete already and
        the agent swaps to it. Nothing runs the guest before the disk is ready: QEMU was
        started paused (``-S``)."""
        steps = {"commit": time.time()}
        deadline = time.time() + 30.0
        while (await self.vm.qmp("query-status"))["status"] == "inmigrate":
            if self.vm.exited or time.time() > deadline:
                raise PeerError(f"VM {self.name}: the migration did not arrive")
            await asyncio.sleep(0.002)  # the guest is paused meanwhile: look often
        steps["arrived"] = time.time()
        if self.receiver is not None:
            # A push the source gave up at the switchover may still be on the wire: the
            # receiver stops now, its requests in flight finished, before the replica is
            # served (the source counts such chunks as missing: they are fetched). Its
            # process exits off the critical path.
            try:
                await self.receiver.call("POST", "/retire", timeout=30.0)
            except (PeerError, StateError) as err:
                log.warning("VM %s: receiver unreachable (%s): killing it", self.name, err)
                await self.receiver.kill()
            steps["receiver_retired"] = time.time()
            self.retiring = asyncio.create_task(self.receiver.stop())
            self.receiver = None
        if local:
            agent = self.agent_for("disk0")
            await agent.call(
                "POST", "/swap", {"backend": {"kind": "local", "path": str(self.image)}}
            )
            steps["disk_swapped"] = time.time()
            agent.backend = None
        if fetch is not None:
            agent = self.agent_for("disk0")
            # The chunks the mirror pushed are in the replica (the receiver wrote them): the
            # agent serves them at once and makes them durable in the background.
            spec = {
                "kind": "fetch",
                "path": str(self.image),
                "remote": fetch["remote"],
                "chunk_size": int(fetch.get("chunk_size", FETCH_CHUNK)),
                "copier": True,
                "then_local": True,
                "present": str(fetch.get("present", "")),
            }
            if "copy_batch" in fetch:
                spec["copy_batch"] = fetch["copy_batch"]
            await agent.call("POST", "/swap", {"backend": spec})
            steps["disk_swapped"] = time.time()
            agent.backend = spec
            self.fetching = asyncio.create_task(self._await_local(agent))
        if self.vm.state is not VmState.RUNNING:
            await self.vm.qmp("cont")
        await self.wait_running(timeout=30.0)
        if self.nics:
            steps.update(await self.release_nics())
        self.role = "running"
        self.save()
        assert self.vm.resumed_at is not None
        return {**steps, "resumed_at": self.vm.resumed_at}

    async def swap_disk(
        self, node: str, path: Path, *, sync: bool = False, rate_limit: int | None = None
    ) -> dict[str, Any]:
        """Device dynamic exchange: move the live disk onto ``path`` (a file or block
        device of this host) without the guest noticing. A disk that lives on another host
        comes home through a fetched replica instead of a mirror."""
        if self.request.disk_from is not None:
            return await self.fetch_home(node, path, rate_limit=rate_limit)
        agent = self.agent_for(node)
        if path.resolve() == Path(agent.image).resolve() and agent.backend is None:
            raise UsageError(f"VM {self.name}'s {node} already lives on {path}")
        size = int((await agent.call("GET", "/status"))["size"])
        zeroed = not path.exists()
        if zeroed:
            with path.open("wb") as f:
                f.truncate(size)
        elif path.is_file() and path.stat().st_size != size:
            raise UsageError(f"{path} is {path.stat().st_size} bytes; the disk is {size}")
        result = await self._mirror_and_pivot(
            agent, {"kind": "local", "path": str(path)}, target_zeroed=zeroed, sync=sync
        )
        result["old_image"] = agent.image
        agent.image, agent.backend = str(path), None
        if node == "disk0":
            self.image = path
        self.save()
        return result

    async def attach_remote(
        self, node: str, peer: Endpoint, *, sync: bool = False
    ) -> dict[str, Any]:
        """Remote device access for a running VM: move its disk to host ``peer`` (an export
        there) and go on using it from here, over the network."""
        agent = self.agent_for(node)
        if self.request.disk_from is not None:
            raise StateError(f"VM {self.name}'s disk already lives on another host")
        size = int((await agent.call("GET", "/status"))["size"])
        async with DaemonClient(peer) as client:
            export = await client.post("/v1/exports", {"name": self.name, "size": size})
        target = {"kind": "remote", "address": export["address"], "export": export["export"]}
        try:
            result = await self._mirror_and_pivot(agent, target, target_zeroed=True, sync=sync)
        except BaseException:
            async with DaemonClient(peer) as client:
                with contextlib.suppress(PeerError, NotFound):
                    await client.delete(f"/v1/exports/{self.name}")
            raise
        result["old_image"] = agent.image
        result["lives_on"] = peer.name
        agent.backend = target
        self.request = replace(self.request, disk_from=peer.to_json())
        self.save()
        return result

    # -- NICs ------------------------------------------------------------------------------

    def nic_for(self, node: str) -> NicAgent:
        for nic in self.nics:
            if nic.node == node:
                return nic
        raise NotFound(f"VM {self.name} has no NIC {node!r}")

    async def release_nics(self) -> dict[str, float]:
        """An arrived VM runs: its NICs' agents (held since they started) deliver what they
        kept, and QEMU announces the guest's MAC so that the network learns its new place
        (QEMU also announced it as the migration loaded; once more now that frames flow)."""
        # Past the switchover: a failure here is logged, it does not fail the migration.
        for nic in self.nics:
            nic.hold = False  # a restarted agent starts unheld from now on
            try:
                released = await nic.call("POST", "/release")
            except DevagentError as err:  # its hold ended already, or the agent restarts
                self.log.error("%s: release failed: %s", nic.describe(), err)
                continue
            self.log.info("%s released: %s", nic.describe(), released)
        steps = {"nic_released": time.time()}
        try:
            await self.vm.qmp("announce-self", initial=50, max=550, rounds=5, step=100)
        except DevagentError as err:
            self.log.error("VM %s: announce-self failed: %s", self.name, err)
        steps["nic_announced"] = time.time()
        return steps

    async def swap_nic(self, node: str, tap: str) -> dict[str, Any]:
        """Device dynamic exchange for a NIC: make the tap ``tap`` (on this host) its uplink
        without losing a frame."""
        nic = self.nic_for(node)
        if tap == nic.tap:
            raise UsageError(f"VM {self.name}'s {node} already uses tap {tap}")
        started = time.time()
        before = await nic.call("GET", "/status")
        swapped = await nic.call("POST", "/swap", {"uplink": {"kind": "tap", "name": tap}})
        old, nic.tap = nic.tap, tap  # a restarted agent opens the new tap
        self.save()
        after = await nic.call("GET", "/status")
        self.log.info("%s: uplink %s replaced by %s", nic.describe(), old, tap)
        return {
            "vm": self.name,
            "device": node,
            "old_tap": old,
            "tap": tap,
            "duration_s": round(time.time() - started, 3),
            "swapped": swapped,
            "net_frames_lost": after["net_frames_lost"] - before["net_frames_lost"],
        }

    async def devices(self) -> list[dict[str, Any]]:
        """Each disk: its backend, in-flight requests, journal figures (from its agent)."""
        rows: list[dict[str, Any]] = []
        for agent in self.agents:
            row: dict[str, Any] = {
                "vm": self.name,
                "device": agent.node,
                "image": agent.image,
                "agent_pid": agent.pid,
                "nbd_socket": str(agent.nbd_socket),
            }
            if self.last_fetch is not None:
                row["last_fetch"] = self.last_fetch
            try:
                row["agent"] = await agent.call("GET", "/status")
                row["state"] = "serving"
            except (PeerError, StateError) as err:
                row["state"] = f"unreachable: {err}"
            rows.append(row)
        if not self.agents:
            rows.append(
                {
                    "vm": self.name,
                    "device": "disk0",
                    "image": str(self.image),
                    "state": "direct (QEMU opens the image; no agent)",
                }
            )
        for nic in self.nics:
            row = {
                "vm": self.name,
                "device": nic.node,
                "kind": "nic",
                "address": nic.address,
                "mac": nic.mac,
                "tap": nic.tap,
                "agent_pid": nic.pid,
                "stream_socket": str(nic.stream_socket),
            }
            try:
                row["agent"] = await nic.call("GET", "/status")
                forward = row["agent"].get("forward")
                row["state"] = (
                    "held"
                    if row["agent"]["held"]
                    else f"forwarding to {forward['peer']}"
                    if forward
                    else "serving"
                )
            except (PeerError, StateError) as err:
                row["state"] = f"unreachable: {err}"
            rows.append(row)
        return rows

    async def completions_since(self, since: float) -> list[float] | None:
        """Completion times of guest I/O on this host's agents after ``since``; None when the
        VM has no agent, or an agent's journal no longer reaches back to ``since`` (a long
        migration under heavy I/O): then only the probe's heartbeats tell."""
        if not self.agents:
            return None
        times: list[float] = []
        for agent in self.agents:
            answer = await agent.call("GET", "/completions", since=since)
            if not answer.get("complete", True):
                log.info("VM %s: the journal of %s no longer reaches back", self.name, agent.node)
                return None
            times.extend(answer["completions"])
        return sorted(times)

    def migrated_away(self) -> None:
        """The guest runs on another host now; this copy only serves what it still needs."""
        self.role = "migrated"

    def heartbeats_since(self, since: float) -> list[Heartbeat]:
        return [b for b in self.heartbeats if b.host_time > since]

    def save(self) -> None:
        record = {
            "request": self.request.to_json(),
            "config": self.config.to_json(),
            "pid": self.vm.pid,
            "role": self.role,
            "image": str(self.image),
            "agents": [a.to_json() for a in self.agents],
            "nics": [n.to_json() for n in self.nics],
            "receiver": self.receiver.to_json() if self.receiver else None,
        }
        tmp = self.run_dir / "vm.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.run_dir / "vm.json")

    def disk_location(self) -> str:
        if self.request.disk_from is not None:
            return f"host {self.request.disk_from.get('name')} (remote)"
        return str(self.image)

    def status(self) -> dict[str, Any]:
        last = self.heartbeats[-1] if self.heartbeats else None
        first = self.heartbeats[0] if self.heartbeats else None
        return {
            "name": self.name,
            "state": self.vm.state.value,
            "role": self.role,
            "pid": self.vm.pid,
            "ram_mb": self.config.ram_mb,
            "disk": self.disk_location(),
            "agents": [{"node": a.node, "pid": a.pid, "alive": a.alive} for a in self.agents],
            "nics": [
                {"node": n.node, "address": n.address, "mac": n.mac, "tap": n.tap, "pid": n.pid}
                | {"alive": n.alive}
                for n in self.nics
            ],
            "storage": self.request.storage,
            "workload": self.request.workload,
            "probe": self.parser is not None,
            "started_at": self.vm.started_at,
            "resumed_at": self.vm.resumed_at,
            "first_heartbeat_at": first.host_time if first else None,
            "last_heartbeat": asdict(last) if last else None,
        }


class VmManager:
    """Every VM of one host."""

    def __init__(
        self,
        host_name: str,
        root: Path,
        shared_dir: Path | None,
        address: str,
        network: GuestNetwork | None = None,
    ):
        self.host_name = host_name
        self.network = network  # where VM NICs go; None: this host gives VMs no NIC
        # Addresses of this host's block that VMs which migrated away still use: never
        # handed out again (this host does not learn when such a VM stops elsewhere).
        self.lent_path = root / "guest-addresses-lent.json"
        self.lent: set[str] = set()
        with contextlib.suppress(OSError, ValueError, TypeError):
            self.lent = {str(a) for a in json.loads(self.lent_path.read_text())}
        self.root = root
        self.shared_dir = shared_dir
        self.address = address  # agents also serve peers (migration, remote access) here
        self.vms: dict[str, ManagedVm] = {}
        self._lock = asyncio.Lock()

    def get(self, name: str) -> ManagedVm:
        try:
            return self.vms[name]
        except KeyError:
            raise NotFound(f"no VM {name!r} on host {self.host_name}") from None

    def run_dir(self, name: str) -> Path:
        return self.root / "vms" / name

    def disk_path(self, request: VmRequest) -> Path:
        if request.disk is not None:
            path = Path(request.disk)
            if not path.exists():
                raise NotFound(f"disk image {path} does not exist on host {self.host_name}")
            return path
        if request.storage == "shared":
            if self.shared_dir is None:
                raise UsageError(f"host {self.host_name} has no shared folder")
            folder = self.shared_dir
        else:
            folder = self.root / "disks"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{request.name}.img"

    async def start(self, request: VmRequest) -> ManagedVm:
        async with self._lock:
            if request.name in self.vms:
                raise StateError(f"VM {request.name!r} already exists on host {self.host_name}")
            if request.nics:  # before anything is made
                self._require_network()
            if request.disk_from is not None:
                remote = await self._remote_disk(request)
                peer_name = request.disk_from["name"] if request.disk_from else "peer"
                where = Path(f"/remote/{peer_name}/{request.name}")  # no local image here
                managed = self._add(request, where, "running", None, remote)
            else:
                image = self.disk_path(request)
                if request.disk is None and not image.exists():
                    with image.open("wb") as f:
                        f.truncate(request.disk_size)
                managed = self._add(request, image, "running", config=None)
        await self._launch(managed)
        return managed

    async def _remote_disk(self, request: VmRequest) -> dict[str, Any]:
        """Have the peer host make the VM's disk and serve it; the backend spec to reach it."""
        assert request.disk_from is not None
        peer = Endpoint.from_json(request.disk_from)
        async with DaemonClient(peer) as client:
            export = await client.post(
                "/v1/exports", {"name": request.name, "size": request.disk_size}
            )
        return {"kind": "remote", "address": export["address"], "export": export["export"]}

    async def prepare_incoming(
        self,
        request: VmRequest,
        config: VmConfig,
        image: Path | None,
        *,
        size: int = 0,
        backend: dict[str, Any] | None = None,
        receive: bool = False,
        nics: list[dict[str, Any]] | None = None,
    ) -> ManagedVm:
        """Start QEMU waiting for ``config``'s VM to arrive by live migration.

        With ``image`` (shared storage) this host's agent serves that same image. Without
        it the disk moves: a new local replica of ``size`` bytes is made, served by the
        agent through ``backend`` (e.g. ``Remote`` to the source's agent) or, with none, as
        ``Local`` (a mirror's target); and QEMU stays paused after the migration (``-S``)
        until :meth:`ManagedVm.commit_incoming` has the disk ready."""
        async with self._lock:
            if request.name in self.vms:
                raise StateError(f"VM {request.name!r} already exists on host {self.host_name}")
            if len(nics or []) != len(config.nics):
                raise UsageError(
                    f"VM {request.name} has {len(config.nics)} NIC(s): 'nics' must describe "
                    "each (node, address, mac)"
                )
            if nics:  # before anything is made
                self._require_network()
            paused = image is None
            if image is None:
                image = self.root / "disks" / f"{request.name}.img"
                image.parent.mkdir(parents=True, exist_ok=True)
                for stale in (image, presence_path(image)):
                    stale.unlink(missing_ok=True)
                with image.open("wb") as f:
                    f.truncate(size)
            managed = self._add(
                request,
                image,
                "incoming",
                config=config,
                backend=backend,
                paused=paused,
                incoming_nics=nics or [],
            )
            if receive:
                managed.receiver = AgentProcess(
                    vm=request.name,
                    node="receive",
                    image=str(image),
                    run_dir=str(managed.run_dir),
                    listen_address=self.address,
                )
        # The receiver starts beside the VM's own agent and QEMU: each agent takes a while
        # to come up, and the migration waits for all of them.
        receiver = managed.receiver
        receiving = asyncio.ensure_future(receiver.start()) if receiver is not None else None
        try:
            await self._launch(managed)  # on failure it removes the VM (and its receiver)
            if receiving is not None:
                await receiving
        except BaseException:
            if receiver is not None and receiving is not None:
                receiving.cancel()
                await asyncio.gather(receiving, return_exceptions=True)
                await receiver.kill()
            if managed.name in self.vms:
                await self.remove(managed.name)
            raise
        return managed

    async def add_incoming(self, request: VmRequest, config: VmConfig, image: Path) -> ManagedVm:
        """Start QEMU with ``config`` as given, waiting for its VM to arrive, with no agent:
        the QEMU-only baselines build their own block graph (devagent.daemon.migration.qemu_incoming).
        ``image``, made by the caller in this host's disks folder, goes if the VM never
        arrives."""
        async with self._lock:
            if request.name in self.vms:
                raise StateError(f"VM {request.name!r} already exists on host {self.host_name}")
            run_dir = self.run_dir(request.name)
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            managed = ManagedVm(request, config, run_dir, "incoming", image)
            self.vms[request.name] = managed
        await self._launch(managed)
        return managed

    def _add(
        self,
        request: VmRequest,
        image: Path,
        role: Role,
        config: VmConfig | None,
        backend: dict[str, Any] | None = None,
        *,
        paused: bool = False,
        incoming_nics: list[dict[str, Any]] | None = None,
    ) -> ManagedVm:
        nics = self._plan_nics(request, incoming_nics)  # before any folder: it may refuse
        run_dir = self.run_dir(request.name)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        agent = None
        if request.agent:
            agent = AgentProcess(
                vm=request.name,
                node="disk0",
                image=str(image),
                run_dir=str(run_dir),
                listen_address=self.address,
                backend=backend,
            )
        for nic in nics:
            nic.run_dir = str(run_dir)
        disk = disk_spec(request, image, agent)
        if config is None:
            config = build_config(request, disk, tuple(nics))
        else:  # an incoming VM: the source's configuration with this host's disk
            disk = replace(disk, format=config.disks[0].format)  # a new replica has no header
            extra = tuple(a for a in config.extra_args if a != "-S") + (("-S",) if paused else ())
            config = replace(config, disks=(disk,), incoming=True, extra_args=extra)
            if nics:  # and this host's NIC sockets
                local = {n.node: str(n.stream_socket) for n in nics}
                specs = tuple(replace(n, stream_socket=local[n.id]) for n in config.nics)
                config = replace(config, nics=specs)
        managed = ManagedVm(request, config, run_dir, role, image, [agent] if agent else [], nics)
        self.vms[request.name] = managed
        return managed

    def _lend(self, *addresses: str, back: bool = False) -> None:
        """Note that VMs which migrated away use ``addresses`` (or, ``back``, that they
        arrived here again)."""
        before = set(self.lent)
        if back:
            self.lent.difference_update(addresses)
        else:
            self.lent.update(addresses)
        if self.lent != before:
            self.lent_path.parent.mkdir(parents=True, exist_ok=True)
            self.lent_path.write_text(json.dumps(sorted(self.lent)))

    async def _start_nics(self, managed: ManagedVm) -> None:
        """Each NIC's tap on this host's guest bridge, and its net agent."""
        assert self.network is not None
        for nic in managed.nics:
            assert nic.made_tap is not None
            await asyncio.to_thread(make_tap, nic.made_tap, self.network.bridge)
            await nic.start()

    def _require_network(self) -> GuestNetwork:
        if self.network is None:
            raise UsageError(
                f"host {self.host_name} has no guest network for NICs (a namespace lab gives "
                "its hosts one; a loopback lab cannot)"
            )
        return self.network

    def _plan_nics(
        self, request: VmRequest, incoming: list[dict[str, Any]] | None
    ) -> list[NicAgent]:
        """The NICs of a new VM (an address and MAC of this host's block) or of an arriving
        one (its own address and MAC; a local tap; held until it runs here, and accepting
        the frames the source's agent forwards)."""
        wanted = len(incoming) if incoming else request.nics
        if not wanted:
            return []
        network = self._require_network()
        if incoming:
            self._lend(*(str(n["address"]) for n in incoming), back=True)
            return [
                NicAgent(
                    vm=request.name,
                    node=str(n["node"]),
                    run_dir="",
                    address=str(n["address"]),
                    mac=str(n["mac"]),
                    tap=tap_name(request.name, str(n["node"])),
                    made_tap=tap_name(request.name, str(n["node"])),
                    peer_listen=self.address,
                    hold=True,
                )
                for n in incoming
            ]
        used = [ipaddress.IPv4Interface(n.address).ip for m in self.vms.values() for n in m.nics]
        used += [ipaddress.IPv4Interface(a).ip for a in self.lent]
        address = pick_address(network, used)
        tap = tap_name(request.name, "net0")
        return [
            NicAgent(
                vm=request.name,
                node="net0",
                run_dir="",
                address=f"{address}/{network.prefix}",
                mac=mac_for(address),
                tap=tap,
                made_tap=tap,
                peer_listen=self.address,
            )
        ]

    async def _launch(self, managed: ManagedVm) -> None:
        # The NICs' agents come up beside the disk's (each takes a while to start).
        nics = asyncio.ensure_future(self._start_nics(managed)) if managed.nics else None
        try:
            for agent in managed.agents:
                await agent.start()
            if nics is not None:
                await nics
            await managed.vm.launch()
        except BaseException:
            if nics is not None:
                nics.cancel()
                await asyncio.gather(nics, return_exceptions=True)
            await self.remove(managed.name)
            raise
        managed.save()
        log.info("VM %s started on host %s (pid %s)", managed.name, self.host_name, managed.vm.pid)

    async def remove(self, name: str, *, keep_dir: bool = False, delete_disk: bool = False) -> None:
        """Stop the VM's QEMU, then its agents, and forget it. An incoming VM that never
        arrived takes its new replica along; ``delete_disk`` removes the disk devagent made
        for the VM (a migrated VM's source copy), never a user's own image."""
        managed = self.vms.pop(name, None)
        if managed is None:
            raise NotFound(f"no VM {name!r} on host {self.host_name}")
        await managed.vm.stop()
        if managed.fetching is not None:
            managed.fetching.cancel()
        if managed.receiver is not None:
            await managed.receiver.stop()
        if managed.retiring is not None:
            await managed.retiring
        for agent in managed.agents:
            await agent.stop()
        for nic in managed.nics:  # its net agent, and the tap made for it
            await nic.stop()
        if managed.role == "migrated":  # it runs elsewhere with its address
            self._lend(*(n.address for n in managed.nics))
        made_here = managed.image.is_relative_to(self.root / "disks")
        if (managed.role == "incoming" and made_here) or (
            delete_disk and managed.request.disk is None and managed.request.disk_from is None
        ):
            for path in (managed.image, presence_path(managed.image)):
                path.unlink(missing_ok=True)
        if managed.request.disk_from is not None and managed.role == "running":
            await self._release_remote_disk(managed)
        if not keep_dir:
            shutil.rmtree(managed.run_dir, ignore_errors=True)
        log.info("VM %s removed from host %s", name, self.host_name)

    async def _discard(self, folder: Path, image: Path) -> None:
        """Kill whatever still runs from a VM's folder, remove it, the tap made for its NIC
        and the replica made for it on this host (never an image outside this host's own
        disks folder)."""
        await asyncio.to_thread(terminate, under_path(folder), 2.0, 2.0)
        if self.network is not None:  # the tap a NIC would have had (named after the VM)
            await asyncio.to_thread(delete_tap, tap_name(folder.name, "net0"))
        if image.is_relative_to(self.root / "disks"):
            for path in (image, presence_path(image)):
                path.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)

    async def _release_remote_disk(self, managed: ManagedVm) -> None:
        assert managed.request.disk_from is not None
        peer = Endpoint.from_json(managed.request.disk_from)
        try:
            async with DaemonClient(peer) as client:
                await client.delete(f"/v1/exports/{managed.name}")
        except (PeerError, NotFound) as err:
            log.warning(
                "VM %s: could not remove its disk on host %s: %s", managed.name, peer.name, err
            )

    async def adopt_all(self) -> None:
        """After a daemon restart: take over every VM whose QEMU still runs, with its agents;
        remove what a start or a migration the daemon never saw through left behind."""
        for folder in sorted((self.root / "vms").glob("*")):
            if folder.is_dir() and not (folder / "vm.json").exists():
                log.warning("%s has no record (a start that never finished): removing it", folder)
                await self._discard(folder, self.root / "disks" / f"{folder.name}.img")
        for record_path in sorted((self.root / "vms").glob("*/vm.json")):
            try:
                record = json.loads(record_path.read_text())
                request = VmRequest.from_json(record["request"])
                config = VmConfig.from_json(record["config"])
                pid = int(record["pid"])
                image = Path(record["image"])
                agents = [AgentProcess.from_json(a) for a in record.get("agents", [])]
                nics = [NicAgent.from_json(n) for n in record.get("nics", [])]
                if record.get("receiver"):
                    agents.append(AgentProcess.from_json(record["receiver"]))
            except (OSError, ValueError, KeyError, TypeError, UsageError) as err:
                log.warning("cannot read %s: %s", record_path, err)
                continue
            if record.get("role") == "incoming":
                # A migration this daemon never saw through: the VM still runs on its source.
                log.warning("VM %s was arriving when the daemon stopped: discarding it",
                            request.name)  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                for agent in agents:
                    await agent.kill()
                for nic in nics:
                    await nic.kill()
                    nic.remove_tap()
                await self._discard(record_path.parent, image)
                continue
            if not pid_alive(pid):
                log.info("VM %s (pid %d) is gone; forgetting it", request.name, pid)
                for agent in agents:
                    await agent.kill()
                for nic in nics:
                    await nic.kill()
                    nic.remove_tap()
                shutil.rmtree(record_path.parent, ignore_errors=True)
                continue
            dead = [a.node for a in agents if not a.alive] + [n.node for n in nics if not n.alive]
            if dead:
                log.error(
                    "VM %s: agent(s) for %s gone; its devices wait for them",
                    request.name,
                    ", ".join(dead),
                )
            role = record.get("role", "running")
            managed = ManagedVm(request, config, record_path.parent, role, image, agents, nics)
            try:
                await managed.vm.adopt(pid)
            except PeerError as err:
                log.warning("cannot adopt VM %s: %s", request.name, err)
                continue
            self.vms[request.name] = managed
            log.info("adopted VM %s (pid %d, %s)", request.name, pid, managed.vm.state.value)

    async def supervise_once(self) -> list[str]:
        """Restart every agent of a live VM that died; returns what it restarted."""
        restarted = []
        for managed in list(self.vms.values()):
            if managed.vm.state not in (VmState.RUNNING, VmState.PAUSED, VmState.INCOMING):
                continue  # not launched yet (its agents are being started), or going away
            if managed.vm.exited:
                continue
            agents: list[AgentProcess | NicAgent] = [*managed.agents, *managed.nics]
            for agent in agents:
                if agent.pid is None or agent.alive:
                    continue  # never started, or alive
                log.error(
                    "VM %s: agent for %s died (%s); restarting it",
                    managed.name,
                    agent.node,
                    agent.tail(2),
                )
                try:
                    await agent.start()
                except PeerError as err:
                    log.error(
                        "VM %s: agent for %s will not restart: %s", managed.name, agent.node, err
                    )
                    continue
                managed.save()
                restarted.append(f"{managed.name}/{agent.node}")
        return restarted
