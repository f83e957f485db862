"""The migration's destination half, and bringing a disk home from another host: an
incoming VM is prepared (:func:`prepare_incoming`, or :func:`add_incoming` for the
QEMU-only baselines), it arrives and runs (:func:`commit_incoming`), its disk becomes
local (:func:`~.arrival.await_local`, also for :func:`fetch_home`).

A commit is recorded as begun in ``vm.json`` before the guest runs; what follows the mark
(:func:`~.arrival.go_live`), and the watch of a fetched replica, are :mod:`.arrival`'s, which
a daemon that restarts uses too. The migration's own logic (the messages, the once-only
commit, the order) is :mod:`devagent.daemon.migration.destination`; this module makes and
readies the VM. Its functions take the manager or the VM, and use the manager's internals
(``_lock``, ``_add``, ``_launch``) as its own methods do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import msgspec

from devagent.agent.fetch import presence_path
from devagent.agent.messages import (
    BackendSpec,
    FetchSpec,
    LocalSpec,
    RemoteSpec,
)
from devagent.api_types import DiskExchange
from devagent.client import DaemonClient
from devagent.daemon.agents import AgentProcess
from devagent.daemon.nics import NicIdentity
from devagent.errors import DevagentError, NotFound, PeerError, StateError, UsageError
from devagent.qemu.answers import StatusInfo
from devagent.qemu.config import VmConfig
from devagent.vocab import DestinationStep
from devagent.wait import all_of

from .arrival import ARRIVAL_TIMEOUT_S, await_local, go_live, release_nics
from .managed import ManagedVm, VmRole
from .request import VmRequest, disk_file

if TYPE_CHECKING:
    from .manager import VmManager

log = logging.getLogger(__name__)

#: How long after its QMP socket closed a killed QEMU's exit is known (its process reaped).
EXIT_KNOWN_WITHIN_S = 2.0


# --- the manager's side ------------------------------------------------------------------------


class IncomingDisk(NamedTuple):
    """One disk of an incoming VM: the same ``image`` when both hosts see it, else a new
    replica of ``size`` bytes served through ``backend`` (e.g. ``Remote`` to the source's
    agent) or, with none, as ``Local`` (a mirror's target); ``receive``: a receiver agent
    beside it takes a push."""

    node: str
    image: Path | None = None
    size: int = 0
    backend: BackendSpec | None = None
    receive: bool = False


async def prepare_incoming(
    manager: VmManager,
    request: VmRequest,
    config: VmConfig,
    disks: list[IncomingDisk],
    *,
    nics: list[NicIdentity] | None = None,
    source: str | None = None,
    serving: asyncio.Future[ManagedVm] | None = None,
) -> ManagedVm:
    """Start QEMU waiting for ``config``'s VM to arrive by live migration, with an agent
    for each of its ``disks`` (the whole set, in the VM's order). When a disk moves, QEMU
    stays paused after the migration (``-S``) until :func:`commit_incoming` has the disks
    ready. ``source``: the host it comes from (its commit, abort and the like are that
    host's alone). ``serving`` is given the VM once its receivers (a push's targets)
    serve and its NICs are up, while QEMU and its agents may still be starting."""
    async with manager._lock:
        if request.name in manager.vms:
            raise StateError(f"VM {request.name!r} already exists on host {manager.host_name}")
        if [d.node for d in disks] != request.nodes():
            raise UsageError(
                f"VM {request.name} has the disks {', '.join(request.nodes())}: 'disks' must "
                "describe each, in order"
            )
        if len(nics or []) != len(config.nics):
            raise UsageError(
                f"VM {request.name} has {len(config.nics)} NIC(s): 'nics' must describe "
                "each (node, address, mac)"
            )
        if nics:  # before anything is made
            manager._require_network()
        paused = any(d.image is None for d in disks)
        images: dict[str, Path] = {}
        backends: dict[str, BackendSpec] = {}
        try:
            for disk in disks:
                images[disk.node] = disk.image or _new_replica(
                    manager, request.name, disk.node, disk.size
                )
                backend = disk.backend
                if disk.image is None and backend is None:  # a mirror's target: no room
                    backend = target_spec(images[disk.node])  # is a roll-back, not a wait
                if backend is not None:
                    backends[disk.node] = backend
            managed = manager._add(
                request, images, VmRole.INCOMING, config=config, backends=backends,
                paused=paused, incoming_nics=nics or [],
            )  # fmt: skip
        except BaseException:
            _remove_replicas(disks, images)
            raise
        managed.source_host = source
        managed.receivers = {
            disk.node: _receiver(manager, managed, images[disk.node], disk.node)
            for disk in disks
            if disk.receive
        }
    await _launch_with_receivers(manager, managed, serving)
    return managed


async def add_receivers(manager: VmManager, managed: ManagedVm, nodes: list[str]) -> None:
    """Receivers for a push that begins only once RAM moves (``hybrid`` on a fast link,
    whose prepare made none: most such pushes never begin). Each of ``nodes``, a disk whose
    replica this host made, gets one unless it has one; asked again while they start, the
    same start is waited for. A commit waits for a start under way before it retires them
    (:meth:`ManagedVm.receivers_started`), and so does a removal."""
    if managed.role is not VmRole.INCOMING:
        raise StateError(f"VM {managed.name} is not an incoming VM: no push lands here now")
    for node in nodes:
        image = managed.images.get(node)
        if image is None or not manager.made_here(image):
            raise UsageError(f"VM {managed.name} has no replica of {node!r} here to push to")
    if managed.receiving is None or managed.receiving.done():
        wanted = [node for node in nodes if node not in managed.receivers]
        managed.receiving = asyncio.ensure_future(_start_receivers(manager, managed, wanted))
    await asyncio.shield(managed.receiving)
    missing = [node for node in nodes if node not in managed.receivers]
    if missing:  # (a start of others was under way: this one waited for it)
        raise StateError(
            f"VM {managed.name}: receivers of other disks were starting; none of "
            f"{', '.join(missing)} yet: ask again"
        )


async def _start_receivers(manager: VmManager, managed: ManagedVm, nodes: list[str]) -> None:
    receivers = {node: _receiver(manager, managed, managed.images[node], node) for node in nodes}
    managed.receivers.update(receivers)  # (before they start: a removal stops them too)
    try:
        await all_of(*(r.start() for r in receivers.values()))
    except BaseException:
        for node, receiver in receivers.items():
            await receiver.kill()
            managed.receivers.pop(node, None)
        raise
    managed.save()


def _receiver(manager: VmManager, managed: ManagedVm, image: Path, node: str) -> AgentProcess:
    """The agent that takes disk ``node``'s push into its new replica ``image``."""
    return AgentProcess(
        vm=managed.name,
        node=f"receive-{node}",
        image=str(image),
        run_dir=str(managed.run_dir),
        listen_address=manager.address,
        backend=target_spec(image),
    )


def _remove_replicas(disks: list[IncomingDisk], images: dict[str, Path]) -> None:
    """The replicas made for disks before one could not be: removed with the rest."""
    for disk in disks:
        if disk.image is None and disk.node in images:
            for path in (images[disk.node], presence_path(images[disk.node])):
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)


def target_spec(image: Path) -> LocalSpec:
    """A new replica as a migration's target before the switchover: no guest waits on it,
    so a write that finds no room fails at once (the migration rolls back with the reason)
    instead of being held; the commit swaps to a spec that holds."""
    return LocalSpec(path=str(image), space_hold_s=0.0)


def _new_replica(manager: VmManager, name: str, node: str, size: int) -> Path:
    """A new sparse replica of disk ``node``, ``size`` bytes, in this host's disks folder;
    a folder with no room, or read-only, is a clear :class:`PeerError` (the migration rolls
    back with it)."""
    image = manager.root / "disks" / disk_file(name, node)
    try:
        image.parent.mkdir(parents=True, exist_ok=True)
        for stale in (image, presence_path(image)):
            stale.unlink(missing_ok=True)
        with image.open("wb") as f:
            f.truncate(size)
    except OSError as err:
        raise PeerError(
            f"host {manager.host_name} cannot make the replica of VM {name}'s {node} in "
            f"{image.parent}: {err.strerror}"
        ) from err
    return image


async def _launch_with_receivers(
    manager: VmManager, managed: ManagedVm, served: asyncio.Future[ManagedVm] | None
) -> None:
    # The receivers start beside the VM's own agents and QEMU: each agent takes a while
    # to come up. A push may start once they serve and the NICs are up (their agents'
    # addresses go in the answer): ``served``; RAM waits for all.
    receivers = list(managed.receivers.values())
    nics_up = asyncio.Event()

    async def receive() -> None:
        await asyncio.gather(*(r.start() for r in receivers))
        await nics_up.wait()
        if served is not None and not served.done():
            served.set_result(managed)

    receiving = asyncio.ensure_future(receive())
    try:
        await manager._launch(managed, nics_up)  # on failure it removes the VM (and receivers)
        await receiving
    except BaseException:
        receiving.cancel()
        await asyncio.gather(receiving, return_exceptions=True)
        for receiver in receivers:
            await receiver.kill()
        if managed.name in manager.vms:
            await manager.remove(managed.name)
        raise


async def add_incoming(
    manager: VmManager, request: VmRequest, config: VmConfig, image: Path
) -> ManagedVm:
    """Start QEMU with ``config`` as given, waiting for its VM to arrive, with no agent:
    QEMU's own strategies build their own block graph
    (:mod:`devagent.daemon.migration.qemu_incoming`).
    ``image``, made by the caller in this host's disks folder, goes if the VM never
    arrives."""
    async with manager._lock:
        if request.name in manager.vms:
            raise StateError(f"VM {request.name!r} already exists on host {manager.host_name}")
        run_dir = manager.run_dir(request.name)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        managed = ManagedVm(request, config, run_dir, VmRole.INCOMING, {"disk0": image})
        manager.vms[request.name] = managed
    await manager._launch(managed)
    return managed


# --- the VM's side -----------------------------------------------------------------------------


async def commit_incoming(vm: ManagedVm, fetches: dict[str, FetchSpec]) -> dict[str, float]:
    """The migration arrived: ready the disks, run the guest, return when it resumed
    (``resumed_at``) and when each step before it ended (wall clock).

    With ``fetches`` (every strategy that moves the disk) each disk's agent swaps to its
    Fetch replica of the source's disk (``fetch.remote``; ``fetch.path`` is the disk's
    image), seeded with the chunks a push or mirror already landed (``fetch.present``,
    base64 bits: all of them after a precopy), copying the rest in the background; a task
    watches each become Local (once the source lets it go). The disks are readied while
    QEMU finishes loading the guest (:func:`_ready_disks`), not after. Nothing runs the
    guest before every disk is ready and the migration arrived: QEMU was started paused
    (``-S``)."""
    steps: dict[str, float] = {DestinationStep.COMMIT: time.time()}
    readying = asyncio.ensure_future(_ready_disks(vm, fetches))
    try:
        steps[DestinationStep.ARRIVED] = await _arrival(vm)
    except BaseException:
        # The disks' steps end first (a moment, normally): a commit asked again then finds
        # them done (each disk swaps once), and an abort finds no swap under way.
        await asyncio.gather(readying, return_exceptions=True)
        raise
    steps.update(await readying)
    vm.commit_began()  # saved before the guest runs: the point of no return
    try:
        steps.update(await go_live(vm))
    except DevagentError as err:
        # A QEMU killed now fails ``cont`` (its QMP socket closes) a moment before its exit
        # is known here: wait that moment, rather than take a crash for a passing error.
        if not await vm.vm.wait_exit(EXIT_KNOWN_WITHIN_S):
            raise
        # Past the point of no return the guest lives here: its QEMU's death is a crash of
        # the VM on this host (``vm restart`` boots it on its disk), not a way back. The
        # source, told so (a 409), reads the commit back from the VM's status.
        if vm.nics:  # held since they started: a restarted guest's frames must flow
            await release_nics(vm)
        vm.arrived()
        vm.save()
        raise StateError(f"VM {vm.name} crashed here as its commit began: {err}") from err
    assert vm.vm.resumed_at is not None
    return {**steps, "resumed_at": vm.vm.resumed_at}


async def _arrival(vm: ManagedVm) -> float:
    """When QEMU left ``inmigrate`` (the migration arrived whole)."""
    deadline = time.time() + ARRIVAL_TIMEOUT_S
    while True:
        if vm.vm.exited:  # for good: the source need not ask again (it rolls back at once)
            raise StateError(f"VM {vm.name}'s incoming QEMU exited: it cannot commit here")
        if (await vm.vm.query("query-status", StatusInfo)).status != "inmigrate":
            return time.time()
        if time.time() > deadline:
            raise PeerError(f"VM {vm.name}: the migration did not arrive")
        await asyncio.sleep(0.002)  # the guest is paused meanwhile: look often


async def _retire_receiver(vm: ManagedVm, node: str) -> float:
    """A push the source gave up at the switchover may still be on the wire: disk
    ``node``'s receiver stops now, its requests in flight finished, before the replica is
    served (the source counts such chunks as missing: they are fetched). Its process
    exits off the critical path. Returns when it stopped serving."""
    receiver = vm.receivers[node]
    try:
        await receiver.retire(timeout=30.0)
    except (PeerError, StateError) as err:
        log.warning("VM %s: receiver of %s unreachable (%s): killing it", vm.name, node, err)
        await receiver.kill()
    retired = time.time()
    vm.retiring.append(asyncio.create_task(receiver.stop()))
    del vm.receivers[node]
    return retired


async def _ready_disks(vm: ManagedVm, fetches: dict[str, FetchSpec]) -> dict[str, float]:
    """The source stopped its pushes and fenced its agents before it asked for the
    commit: each push's receiver retires, then each disk's agent swaps to its Fetch
    replica, all while QEMU may still be loading the guest (the agent holds any request
    QEMU makes meanwhile across its swap, as always). Returns when each step ended."""
    steps: dict[str, float] = {}
    await vm.receivers_started()  # (a push begun beside RAM: its receivers, still starting)
    if retired := await all_of(*(_retire_receiver(vm, n) for n in list(vm.receivers))):
        steps[DestinationStep.RECEIVER_RETIRED] = max(retired)
    if fetches:
        swapped = await all_of(*(_swap_to_fetch(vm, n, f) for n, f in fetches.items()))
        steps[DestinationStep.DISK_SWAPPED] = max(swapped)
    return steps


async def _swap_to_fetch(vm: ManagedVm, node: str, spec: FetchSpec) -> float:
    """The chunks the mirror pushed are in disk ``node``'s replica (its receiver wrote
    them): the agent serves them at once and makes them durable in the background.
    Returns when the agent swapped (at once for a disk an earlier try of the commit
    swapped already)."""
    if node in vm.fetching:
        return time.time()
    agent = vm.agent_for(node)
    await agent.swap(spec)
    swapped = time.time()
    agent.backend = spec.without_seeds()  # (what a restart of the agent is given)
    vm.fetching[node] = asyncio.create_task(await_local(vm, agent))
    return swapped


async def fetch_home(
    vm: ManagedVm, node: str, path: Path, *, rate_limit: int | None = None
) -> DiskExchange:
    """Bring a disk that lives on another host home to ``path`` on this host: the agent
    serves from a local replica filled on demand (copy-on-read) and in the background,
    and switches to it as ``Local`` once complete; then the peer's export is removed."""
    agent = vm.agent_for(node)
    remote, disk = agent.backend, vm.request.disk(node)
    home = disk.lives_on
    if home is None or not isinstance(remote, RemoteSpec):
        raise StateError(f"VM {vm.name}'s {node} does not live on another host")
    if path.exists():
        raise UsageError(f"{path} exists: a replica is made new")
    started = time.time()
    spec = FetchSpec(
        path=str(path), remote=remote, copier=True, then_local=True,
        rate_limit=rate_limit or None,
    )  # fmt: skip
    swapped = await agent.swap(spec)
    agent.backend, agent.image = spec, str(path)  # a restarted agent resumes the fetch
    vm.images[node] = path
    vm.save()
    status = await await_local(vm, agent)
    vm.request = vm.request.with_disk(node, msgspec.structs.replace(disk, lives_on=None))
    vm.save()
    peer = home.peer
    with contextlib.suppress(PeerError, NotFound):
        async with DaemonClient(peer) as client:
            await client.delete(f"/v1/exports/{home.export}")
    return DiskExchange(
        vm=vm.name,
        device=node,
        duration_s=round(time.time() - started, 3),
        held_ms=round(swapped.hold_s * 1000, 3),
        backend=status.backend,
        released=peer.name,
    )
