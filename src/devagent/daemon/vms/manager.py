"""Every VM of one host (:class:`VmManager`): starting one (its disk, NICs, agents and QEMU),
removing one, adopting them all after a daemon restart, and restarting the agents that die.

Each VM's folder ``<host dir>/vms/<name>/`` holds ``vm.json`` (request, configuration, pid,
role), QEMU's sockets and logs; a daemon that restarts adopts every VM whose QEMU still runs,
so a daemon restart never touches a guest. A migration under way when the daemon stopped
follows one rule, its point of no return being the destination's commit (recorded as begun
before the guest runs there):

* an incoming VM whose commit never began is discarded: the guest still lives on the
  source, whose daemon rolls the migration back;
* one whose commit began goes forward: it is adopted and runs (``cont`` if it was still
  paused), its NICs are released, and the watch that serves its replica as Local once
  fetched is started again;
* a source VM whose folder holds an unsettled migration record is kept even when its QEMU
  is gone (its agents may still serve the disk to the destination): the daemon's migration
  routes take that migration up again (:mod:`devagent.daemon.migration.recovery`).

One lock orders the changes to the set of VMs; what is slow and needs no order (finding the
test guest, asking QEMU its version) is done before it, in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from devagent.agent.fetch import presence_path
from devagent.agent.messages import BackendSpec, FetchSpec, RemoteSpec
from devagent.client import DaemonClient
from devagent.daemon.agents import AgentProcess
from devagent.daemon.nics import NicAgent, NicIdentity, delete_tap, make_tap
from devagent.daemon.supervised import until_listening
from devagent.errors import DevagentError, NotFound, PeerError, StateError, UsageError
from devagent.guestnet import AddressLedger, GuestNetwork, mac_for, tap_name
from devagent.lab.procs import terminate, under_path
from devagent.qemu.config import DiskFormat, VmConfig
from devagent.qemu.vm import VmState, pid_alive
from devagent.wait import all_of
from devagent.wire import convert, decode, from_peer

from .arrival import await_local, go_live
from .config import GuestBoot, TestGuest, build_config, check_growable, disk_spec, image_format
from .managed import MIGRATION_RECORD, ManagedVm, VmRole
from .request import MAX_NICS, RemoteHome, VmRequest, disk_file, export_name, nic_node

log = logging.getLogger(__name__)


class ExportServed(msgspec.Struct):
    """What the daemon reads of a peer's ``POST /v1/exports`` answer: where it serves."""

    address: str  # tcp:HOST:PORT
    export: str


class _Record(msgspec.Struct):
    """A VM's ``vm.json`` (:meth:`ManagedVm.save`), read back in one call."""

    request: VmRequest
    config: VmConfig
    pid: int
    images: dict[str, str] = msgspec.field(default_factory=dict)
    image: str | None = None  # a record from before several disks: disk0's
    role: VmRole = VmRole.RUNNING
    agents: list[AgentProcess] = msgspec.field(default_factory=list)
    nics: list[NicAgent] = msgspec.field(default_factory=list)
    receivers: list[AgentProcess] = msgspec.field(default_factory=list)
    receiver: AgentProcess | None = None  # a record from before several disks
    resumed_at: float | None = None  # the guest's last RESUME this daemon saw
    source_host: str | None = None  # the host a migration brought it from

    @classmethod
    def read(cls, path: Path) -> _Record:
        raw = decode(path.read_bytes(), dict[str, Any], what=str(path))
        if "request" in raw:  # a request of any version, in today's form
            raw["request"] = VmRequest.from_json(raw["request"]).to_json()
        record = convert(raw, cls, what=str(path))
        # An incoming VM's receivers: discarded with the rest.
        record.agents += record.receivers + ([record.receiver] if record.receiver else [])
        if record.image is not None and not record.images:
            record.images = {"disk0": record.image}
        return record

    def image_paths(self) -> dict[str, Path]:
        return {node: Path(image) for node, image in self.images.items()}

    async def kill_helpers(self) -> None:
        for agent in self.agents:
            await agent.kill()
        for nic in self.nics:
            await nic.kill()
            nic.remove_tap()


def _drop_kept(record: _Record, kept: Mapping[str, str]) -> None:
    """Take out of ``record`` each disk an export of this host serves (``kept``: image by
    export name): a migration kept it here for its destination."""
    name = record.request.name
    for agent in list(record.agents):
        if kept.get(export_name(name, agent.node)) == agent.image:
            log.warning("VM %s: its %s is export %s's now", name, agent.node,
                        export_name(name, agent.node))  # fmt: skip
            record.agents.remove(agent)
            record.images.pop(agent.node, None)


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
        self.addresses = AddressLedger(root / "guest-addresses-lent.json")
        self.root = root
        self.shared_dir = shared_dir
        self.address = address  # agents also serve peers (migration, remote access) here
        self.test_guest = TestGuest()
        self.vms: dict[str, ManagedVm] = {}
        self._lock = asyncio.Lock()

    async def warm_up(self) -> None:
        """Find the test guest's accelerator at daemon start, so that no VM start waits on
        QEMU's version (with no guest built yet, the first start that needs one does)."""
        with contextlib.suppress(NotFound):
            await self.test_guest.find()

    def get(self, name: str) -> ManagedVm:
        try:
            return self.vms[name]
        except KeyError:
            raise NotFound(f"no VM {name!r} on host {self.host_name}") from None

    def run_dir(self, name: str) -> Path:
        return self.root / "vms" / name

    def disk_paths(self, request: VmRequest) -> dict[str, Path]:
        """Where each disk of ``request`` is on this host: the user's own image, or the new
        disk's file in the shared folder or this host's disks folder."""
        paths = {}
        for node, disk in zip(request.nodes(), request.disks, strict=True):
            if disk.lives_on is not None:  # no image here
                paths[node] = disk.lives_on.path
                continue
            if disk.image is not None:
                path = Path(disk.image)
                if not path.exists():
                    raise NotFound(f"disk image {path} does not exist on host {self.host_name}")
                if request.agent:
                    check_growable(path)
                paths[node] = path
                continue
            if request.storage == "shared":
                if self.shared_dir is None:
                    raise UsageError(f"host {self.host_name} has no shared folder")
                folder = self.shared_dir
            else:
                folder = self.root / "disks"
            folder.mkdir(parents=True, exist_ok=True)
            paths[node] = folder / disk_file(request.name, node)
        return paths

    # --- starting ------------------------------------------------------------------------------

    async def start(self, request: VmRequest) -> ManagedVm:
        if request.nics:  # before anything is made or looked for
            self._require_network()
        guest = await self.test_guest.find() if request.has_probe else None  # not under the lock
        qemu = await self.test_guest.qemu()
        async with self._lock:
            if request.name in self.vms:
                raise StateError(f"VM {request.name!r} already exists on host {self.host_name}")
            images = self.disk_paths(request)
            remote: dict[str, BackendSpec] = {}
            for node, home in request.remote_disks().items():
                remote[node] = await self._remote_disk(home, request.disk(node).size)
            for disk, image in zip(request.disks, images.values(), strict=True):
                if disk.image is None and disk.lives_on is None and not image.exists():
                    with image.open("wb") as f:
                        f.truncate(disk.size)
            managed = self._add(
                request, images, VmRole.RUNNING, None, remote, guest=guest, qemu=qemu
            )
        await self._launch(managed)
        return managed

    async def _remote_disk(self, home: RemoteHome, size: int) -> RemoteSpec:
        """Have the peer host make a new disk and serve it; the backend spec to reach it."""
        async with DaemonClient(home.peer) as client:
            raw = await client.post("/v1/exports", {"name": home.export, "size": size})
        export = from_peer(raw, ExportServed, what=f"host {home.peer.name}'s new export")
        return RemoteSpec(address=export.address, export=export.export, host=home.peer.name)

    def _add(
        self,
        request: VmRequest,
        images: dict[str, Path],
        role: VmRole,
        config: VmConfig | None,
        backends: dict[str, BackendSpec] | None = None,
        *,
        guest: GuestBoot | None = None,
        qemu: str = "",
        paused: bool = False,
        incoming_nics: list[NicIdentity] | None = None,
    ) -> ManagedVm:
        nics = self._plan_nics(request, incoming_nics)  # before any folder: it may refuse
        run_dir = self.run_dir(request.name)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        agents = {
            node: AgentProcess(
                vm=request.name,
                node=node,
                image=str(image),
                run_dir=str(run_dir),
                listen_address=self.address,
                backend=(backends or {}).get(node),
            )
            for node, image in images.items()
            if request.agent
        }
        for nic in nics:
            nic.run_dir = str(run_dir)
        # The format: a user's image says it; a new disk is raw; an incoming VM's replica
        # has no header yet: the source's configuration says it.
        formats: dict[str, DiskFormat] = {
            node: "raw" if disk.image is None else image_format(images[node])
            for node, disk in zip(request.nodes(), request.disks, strict=True)
        } if config is None else {d.node: d.format for d in config.disks}  # fmt: skip
        disks = tuple(
            disk_spec(node, path, agents.get(node), formats[node]) for node, path in images.items()
        )
        if config is None:
            config = build_config(request, disks, tuple(nics), guest=guest, qemu=qemu)
        else:  # an incoming VM: the source's configuration with this host's disks
            if config.disks and config.disks[0].serial is None:  # a VM from before serials
                disks = tuple(d.replace(serial=None) for d in disks)
            extra = tuple(a for a in config.extra_args if a != "-S") + (("-S",) if paused else ())
            config = config.replace(disks=disks, incoming=True, extra_args=extra)
            if nics:  # and this host's NIC sockets
                local = {n.node: str(n.stream_socket) for n in nics}
                specs = tuple(n.replace(stream_socket=local[n.id]) for n in config.nics)
                config = config.replace(nics=specs)
        managed = ManagedVm(request, config, run_dir, role, images, list(agents.values()), nics)
        self.vms[request.name] = managed
        return managed

    # --- NICs ----------------------------------------------------------------------------------

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

    def _plan_nics(self, request: VmRequest, incoming: list[NicIdentity] | None) -> list[NicAgent]:
        """The NICs of a new VM (an address and MAC of this host's block) or of an arriving
        one (its own address and MAC; a local tap; held until it runs here, and accepting
        the frames the source's agent forwards)."""
        wanted = len(incoming) if incoming else request.nics
        if not wanted:
            return []
        network = self._require_network()
        if incoming:
            self.addresses.take_back(*(n.address for n in incoming))
            return [self._nic(request.name, n.node, n.address, n.mac, True) for n in incoming]
        in_use = [n.address for m in self.vms.values() for n in m.nics]
        nics = []
        for index in range(wanted):
            address = self.addresses.pick(network, in_use)
            ip = f"{address}/{network.prefix}"
            nics.append(self._nic(request.name, nic_node(index), ip, mac_for(address), False))
            in_use.append(ip)
        return nics

    def _nic(self, vm: str, node: str, address: str, mac: str, hold: bool) -> NicAgent:
        tap = tap_name(vm, node)
        return NicAgent(
            vm=vm, node=node, run_dir="", address=address, mac=mac, tap=tap, made_tap=tap,
            peer_listen=self.address, hold=hold,
        )  # fmt: skip

    # --- launching and removing ----------------------------------------------------------------

    async def _launch(self, managed: ManagedVm, nics_up: asyncio.Event | None = None) -> None:
        """The VM's agents and its NICs' all start at once (each takes a while), and QEMU
        as soon as every disk's agent listens and the NICs are up (``nics_up`` set then):
        QEMU connects to each agent as it starts, and waits there until the agent serves
        (its backend open, a remote one once it reached its peer), while the agents finish
        their start."""
        nics = asyncio.ensure_future(self._start_nics(managed)) if managed.nics else None
        listening = [asyncio.Event() for _ in managed.agents]
        starting = [asyncio.ensure_future(agent.start(listens))
                    for agent, listens in zip(managed.agents, listening, strict=True)]  # fmt: skip
        try:
            if nics is not None:
                await nics
            if nics_up is not None:
                nics_up.set()
            await until_listening(starting, listening)
            await all_of(*starting, managed.vm.launch())  # an agent's failure said first
        except BaseException:
            if nics is not None:
                nics.cancel()
            # (each start ends by itself, its process known, so that the removal ends it)
            await asyncio.gather(*starting, *([nics] if nics else []), return_exceptions=True)
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
        await managed.receivers_started()  # (their processes known, to stop them below)
        await managed.vm.stop()
        for fetching in managed.fetching.values():
            fetching.cancel()
        for receiver in managed.receivers.values():
            await receiver.stop()
        for retiring in managed.retiring:
            await retiring
        for agent in managed.agents:
            await agent.stop()
        for nic in managed.nics:  # its net agent, and the tap made for it
            await nic.stop()
        if managed.role is VmRole.MIGRATED:  # it runs elsewhere with its address
            self.addresses.lend(*(n.address for n in managed.nics))
        await self._remove_disks(managed, delete_disk)
        if not keep_dir:
            keep_logs(managed.run_dir, self.root / "logs", f"{name}-{managed.role}")
            shutil.rmtree(managed.run_dir, ignore_errors=True)
        log.info("VM %s removed from host %s", name, self.host_name)

    def made_here(self, image: Path) -> bool:
        """A disk devagent made on this host (in its disks folder), never a user's image."""
        return image.is_relative_to(self.root / "disks")

    async def _remove_disks(self, managed: ManagedVm, delete_disk: bool) -> None:
        """The disks of a VM being removed: an incoming VM's new replicas, and with
        ``delete_disk`` every disk devagent made (the user's own image itself never: a
        replica of it that a migration made here is devagent's); a running VM's disks on
        peer hosts are removed there."""
        request = managed.request
        for node, image in managed.images.items():
            made_here = self.made_here(image)
            disk = request.disk(node)
            users = disk.lives_on is not None or disk.image == str(image)
            if (managed.role is VmRole.INCOMING and made_here) or (delete_disk and not users):
                _delete(image)
        if managed.role is VmRole.RUNNING:
            for home in request.remote_disks().values():
                await self._release_remote_disk(managed.name, home)

    async def _discard(self, folder: Path, images: list[Path]) -> None:
        """Kill whatever still runs from a VM's folder, remove it, the tap made for its NIC
        and the replicas made for it on this host (never an image outside this host's own
        disks folder)."""
        await asyncio.to_thread(terminate, under_path(folder), 2.0, 2.0)
        if self.network is not None:  # the taps its NICs would have had (named after it)
            for index in range(MAX_NICS):
                await asyncio.to_thread(delete_tap, tap_name(folder.name, nic_node(index)))
        for image in images:
            if self.made_here(image):
                _delete(image)
        shutil.rmtree(folder, ignore_errors=True)

    async def _release_remote_disk(self, name: str, home: RemoteHome) -> None:
        try:
            async with DaemonClient(home.peer) as client:
                await client.delete(f"/v1/exports/{home.export}")
        except (PeerError, NotFound) as err:
            log.warning("VM %s: could not remove its disk %s on host %s: %s",
                        name, home.export, home.peer.name, err)  # fmt: skip

    async def restart(self, name: str) -> ManagedVm:
        """Boot VM ``name`` again on this host after its QEMU died (a crash, a kill): the
        same devices, its disk as its agent serves it (every write the guest saw
        acknowledged is there, a replica still being fetched goes on filling). What the
        guest held in memory is gone: it boots afresh."""
        async with self._lock:
            managed = self.get(name)
            if managed.role is not VmRole.RUNNING or not managed.vm.exited:
                raise StateError(
                    f"VM {name} is {managed.shown_state()} on host {self.host_name}: only a "
                    "VM whose QEMU died is restarted"
                )
            managed.fresh_instance()
            for helper in [*managed.agents, *managed.nics]:
                if not helper.alive:
                    await helper.start()
            await managed.vm.launch()
            managed.save()
        log.warning("VM %s restarted on host %s after its QEMU died (pid %s)",
                    name, self.host_name, managed.vm.pid)  # fmt: skip
        return managed

    # --- after a daemon restart, and while it runs ---------------------------------------------

    async def adopt_all(self, kept: Mapping[str, str] | None = None) -> None:
        """After a daemon restart: take over every VM whose QEMU still runs, with its agents;
        finish the arrival of a VM whose commit began; keep a source VM whose migration is
        unsettled; remove what a start or a migration whose commit never began left behind
        (the module's docstring says the rule). ``kept``: the image of each export by name;
        a disk an export serves is the export's, no longer its VM's (a keep the daemon's
        end interrupted before the VM's record said so)."""
        for folder in sorted((self.root / "vms").glob("*")):
            if folder.is_dir() and not (folder / "vm.json").exists():
                log.warning("%s has no record (a start that never finished): removing it", folder)
                made = sorted((self.root / "disks").glob(f"{folder.name}.img")) + sorted(
                    (self.root / "disks").glob(f"{folder.name}-disk*.img")
                )
                await self._discard(folder, made)
        for record_path in sorted((self.root / "vms").glob("*/vm.json")):
            try:
                record = _Record.read(record_path)
            except (OSError, ValueError, KeyError, TypeError, UsageError) as err:
                log.warning("cannot read %s: %s", record_path, err)
                continue
            _drop_kept(record, kept or {})
            try:
                await self._adopt(record, record_path.parent)
            except DevagentError as err:  # one VM's trouble never keeps the daemon down
                log.error("cannot adopt VM %s: %s", record.request.name, err)

    async def _adopt(self, record: _Record, folder: Path) -> None:
        """One VM's record after a restart, by the rule of the module's docstring."""
        name, pid = record.request.name, record.pid
        if record.role is VmRole.INCOMING:
            # Its commit never began: the guest still lives on the source, which rolls back.
            log.warning("VM %s was arriving when the daemon stopped: discarding it", name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await record.kill_helpers()
            await self._discard(folder, list(record.image_paths().values()))
            return
        alive, migrating = pid_alive(pid), (folder / MIGRATION_RECORD).exists()
        if not alive and not migrating:
            log.info("VM %s (pid %d) is gone; forgetting it", name, pid)
            await record.kill_helpers()
            shutil.rmtree(folder, ignore_errors=True)
            return
        helpers: list[AgentProcess | NicAgent] = [*record.agents, *record.nics]
        dead = [a.node for a in helpers if not a.alive]
        if dead:
            log.error("VM %s: agent(s) for %s gone; its devices wait for them",
                      name, ", ".join(dead))  # fmt: skip
        managed = ManagedVm(
            record.request, record.config, folder, record.role, record.image_paths(),
            record.agents, record.nics,
        )  # fmt: skip
        managed.source_host = record.source_host
        if alive:
            try:
                await managed.vm.adopt(pid)
            except PeerError as err:
                log.warning("cannot adopt VM %s: %s", name, err)
                return
            if record.resumed_at is not None and managed.vm.state is VmState.RUNNING:
                managed.vm.resumed_at = record.resumed_at  # not the adoption's time
        else:  # kept for its migration, taken up again once the daemon serves
            log.warning("VM %s (pid %d) is gone, but a migration of it is unsettled", name, pid)
            managed.vm.gone(pid)
        self.vms[name] = managed
        if record.role is VmRole.COMMITTING and alive:
            await _finish_arrival(managed)
        _watch_replica(managed)
        log.info("adopted VM %s (pid %d, %s)", name, pid, managed.vm.state.value)

    async def supervise_once(self) -> list[str]:
        """Restart every agent of a live VM that died; returns what it restarted."""
        restarted = []
        for managed in list(self.vms.values()):
            for agent in _supervised(managed):
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


async def _finish_arrival(managed: ManagedVm) -> None:
    """A VM whose commit began before the daemon stopped: the guest lives here now (the
    source's daemon goes forward), so it runs, paused or not."""
    log.warning("VM %s: its commit had begun when the daemon stopped: running it here",
                managed.name)  # fmt: skip
    try:
        await go_live(managed)
    except DevagentError as err:
        log.error("VM %s: its arrival could not be finished: %s", managed.name, err)


def _watch_replica(managed: ManagedVm) -> None:
    """A migration's replica not yet let go (a Fetch backend, on a VM whose disk does not
    live on another host): watch it become Local again, as the commit did (once the
    source lets it go), so that a restarted agent opens the replica alone rather than
    reaching for a source that is gone by then."""
    if managed.vm.exited:
        return
    remote = managed.request.remote_disks()
    for agent in managed.agents:
        if isinstance(agent.backend, FetchSpec) and agent.node not in remote:
            managed.log.info("VM %s: watching its replica of %s again", managed.name, agent.node)
            managed.fetching[agent.node] = asyncio.create_task(await_local(managed, agent))


#: The folders of logs kept from VMs removed from this host (the newest ones).
LOGS_KEPT = 50


def keep_logs(run_dir: Path, logs: Path, label: str) -> None:
    """Keep the logs of a VM leaving this host (QEMU's, its console's, its agents') in
    ``logs/<label>-<time>/``, for a later look at what happened; the oldest beyond
    :data:`LOGS_KEPT` go. Best effort: a failure is logged, the removal goes on."""
    try:
        found = sorted(run_dir.glob("*.log"))
        if not found:
            return
        now = time.time()
        stamp = (
            time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
        )
        kept = logs / f"{label}-{stamp}"
        kept.mkdir(parents=True, exist_ok=True)
        for path in found:
            shutil.move(path, kept / path.name)
        for old in sorted(logs.iterdir(), key=lambda p: p.stat().st_mtime)[:-LOGS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        log.warning("cannot keep the logs of %s: %s", run_dir, err)


def _delete(image: Path) -> None:
    """Remove a replica devagent made and its presence file; one that cannot be removed (a
    filesystem gone read-only) is logged and left for the operator: the rest of a removal
    goes on."""
    for path in (image, presence_path(image)):
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            log.error("cannot remove %s: %s (left for the operator)", path, err.strerror)


def _supervised(managed: ManagedVm) -> list[AgentProcess | NicAgent]:
    """The agents of ``managed`` its daemon keeps alive: all of a live VM's; a copy left
    behind by a migration keeps its disk agents while the destination reads through them
    (its QEMU is gone: nothing of it writes, and a restarted agent serves the same port)."""
    if managed.serves_disk:
        return list(managed.agents)
    if managed.vm.state not in (VmState.RUNNING, VmState.PAUSED, VmState.INCOMING):
        return []  # not launched yet (its agents are being started), or going away
    if managed.vm.exited:  # a crashed VM's disk agents hold its data and serve its restart
        return list(managed.agents) if managed.role is VmRole.RUNNING else []
    return [*managed.agents, *managed.nics]
