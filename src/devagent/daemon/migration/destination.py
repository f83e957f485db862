"""The destination's half of devagent's strategies: the incoming VM made on request of the
source's daemon, committed once QEMU's RAM migration arrived, or removed when the source
rolls back.

``prepare``   ``POST /v1/incoming``: an incoming QEMU, paused (``-S``), its disk served by an
              agent that reads through to the source (or, shared, the same image), a
              receiver agent for a push, the NICs' agents holding frames
``commit``    ``POST /v1/incoming/NAME/commit``: ready the disk (a Fetch replica seeded with
              what the push landed, or the complete replica as Local), run the guest; once
              per VM (:class:`Commits`: a repeat gets the first one's answer)
``receivers`` ``POST /v1/incoming/NAME/receivers``: a receiver for each disk named, for a
              push that begins once RAM moves (its prepare made none); refused once
              the VM's commit was asked
``listening`` ``POST /v1/incoming/NAME/listening``: for a VM prepared ``early`` (answered
              once its push's receivers served and its NICs were up, QEMU still
              starting): once its QEMU listens for RAM, the answer again with RAM's URI
              (:class:`Starts`)
``abort``     ``DELETE /v1/incoming/NAME``: remove all of it, once its start ended, unless its
              commit is under way or began (then the guest runs here: refused, 409)

The VM manager does the making and the readying (:mod:`devagent.daemon.vms.incoming`); this
module owns the messages and the order. This host decides the switchover: a commit and an
abort of one VM exclude each other here, so a source daemon that restarted and asks for the
abort either gets it (the guest never runs here) or is refused (it goes forward).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devagent.daemon.agents import AgentProcess
from devagent.daemon.migration.context import free_port
from devagent.daemon.migration.messages import (
    CommitAnswer,
    CommitRequest,
    IncomingAnswer,
    IncomingRequest,
    ReceiversAnswer,
    RemoteDisk,
)
from devagent.daemon.migration.qemu_tls import migrate_incoming
from devagent.daemon.vms import ManagedVm, VmRole
from devagent.daemon.vms import incoming as incoming_vm
from devagent.errors import Forbidden, NotFound, StateError, UsageError
from devagent.qemu.config import VmConfig

if TYPE_CHECKING:
    from devagent.daemon.host import Host

log = logging.getLogger(__name__)


def peer_config(config: VmConfig) -> VmConfig:
    """The QEMU configuration a peer sent, without what only this host may decide: QEMU
    options of its own (``-S`` and a TLS credentials object are this host's to add again),
    and nothing else is taken."""
    extra, args = [], list(config.extra_args)
    while args:
        arg = args.pop(0)
        if arg == "-S":
            continue
        if arg == "-object" and args and args[0].startswith("tls-creds-x509,id=devagent-"):
            args.pop(0)
            continue
        extra.append(arg)
    if extra:
        raise Forbidden(f"a peer may not give QEMU options: {' '.join(extra)}")
    return config.replace(extra_args=())


def shared_image(host: Host, image: str) -> Path:
    """A shared disk a peer names: a file of this host's shared folder, nothing else."""
    path = Path(image).resolve()
    if host.shared_dir is None or not path.is_relative_to(host.shared_dir.resolve()):
        raise Forbidden(f"{image}: a shared disk must be in this host's shared folder")
    return path


async def prepare(host: Host, starts: Starts, incoming: IncomingRequest) -> IncomingAnswer:
    """Start QEMU waiting for the VM, with its disks' and NICs' agents. ``early``: answer
    once the disks' receivers serve and the NICs are up, and let the rest of the start go
    on (:meth:`Starts.listening` waits for it, and says where RAM goes): a push may use
    the link while QEMU starts."""
    disks = []
    config = peer_config(incoming.config)
    for disk in incoming.disks:
        if disk.image is None and disk.size <= 0:
            raise UsageError(f"{disk.node}: without 'image', give the disk's 'size' in bytes")
        disks.append(incoming_vm.IncomingDisk(
            node=disk.node, image=shared_image(host, disk.image) if disk.image else None,
            size=disk.size,
            backend=disk.backend.spec() if disk.backend is not None else None,
            receive=disk.receive,
        ))  # fmt: skip
    name = incoming.request.name
    if name in host.vms.vms:  # (its start's record is its source's to ask)
        raise StateError(f"VM {name!r} already exists on host {host.name}")
    serving: asyncio.Future[ManagedVm] = asyncio.get_running_loop().create_future()
    start = starts.begin(name, incoming.source, _start(host, incoming, config, disks, serving))
    if incoming.early:  # (a request given up leaves the start to end: an abort waits for it)
        either: set[asyncio.Future[Any]] = {serving, start}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if start.done() or not incoming.early:
        return await asyncio.shield(start)  # (a start that failed raises here)
    return _answer(host, serving.result(), uri=None)


async def _start(
    host: Host,
    incoming: IncomingRequest,
    config: VmConfig,
    disks: list[incoming_vm.IncomingDisk],
    serving: asyncio.Future[ManagedVm],
) -> IncomingAnswer:
    managed = await incoming_vm.prepare_incoming(
        host.vms, incoming.request, config, disks,
        nics=incoming.nics, source=incoming.source or None, serving=serving,
    )  # fmt: skip
    managed.save()
    # RAM's port chosen once every agent here bound its own (none can take it meanwhile)
    uri = f"tcp:{host.address}:{free_port(host.address)}"
    try:
        await migrate_incoming(managed.vm, uri, host.tls, incoming.source)
    except BaseException:
        await host.vms.remove(managed.name)
        raise
    return _answer(host, managed, uri)


async def receivers(host: Host, name: str, nodes: list[str]) -> ReceiversAnswer:
    """A receiver for each of ``nodes``' replicas, started now (a push that begins once
    RAM moves); where each push goes."""
    managed = host.vms.get(name)
    await incoming_vm.add_receivers(host.vms, managed, nodes)
    targets = {node: _target(host, managed.receivers[node]) for node in nodes}
    return ReceiversAnswer(disk_targets={n: t for n, t in targets.items() if t is not None})


def _target(host: Host, agent: AgentProcess) -> RemoteDisk | None:
    """Where a peer reaches ``agent`` (None: it serves no peer on TCP)."""
    if agent.tcp_address is None:
        return None
    return RemoteDisk(address=agent.tcp_address, export=agent.export, host=host.name)


def _answer(host: Host, managed: ManagedVm, uri: str | None) -> IncomingAnswer:
    """What the source needs of the incoming VM: where its pushes and its NICs' frames go,
    and where RAM goes (None: QEMU is still starting, an early answer)."""
    targets = {}
    for agent in managed.agents:  # where a push goes: the receiver, or the VM's agent
        target = _target(host, managed.receivers.get(agent.node, agent))
        if target is not None:
            targets[agent.node] = target
    return IncomingAnswer(
        uri=uri or "",
        disk_targets=targets,
        nic_peers={nic.node: nic.peer_address for nic in managed.nics if nic.peer_address},
        vm=managed.api_status(),
        listening=uri is not None,
    )


class Starts:
    """Each incoming VM's start by name, from its prepare on, and the host it comes from:
    an early prepare answers before the start ends; the source's wait for it
    (:meth:`listening`) and an abort (:meth:`settled`) find it here, also once it failed
    (its VM removed then: the reason is kept, and logged)."""

    def __init__(self) -> None:
        self._starts: dict[str, tuple[str | None, asyncio.Future[IncomingAnswer]]] = {}

    def begin(
        self, name: str, source: str | None, start: Awaitable[IncomingAnswer]
    ) -> asyncio.Future[IncomingAnswer]:
        known = self._starts.get(name)
        if known is not None and not known[1].done():
            raise StateError(f"VM {name!r} is starting here already")
        task = asyncio.ensure_future(start)
        task.add_done_callback(lambda done: _said(name, done))
        self._starts[name] = (source or None, task)
        return task

    def source_of(self, name: str) -> str | None:
        """The host VM ``name``'s last start here came from (None: none known)."""
        known = self._starts.get(name)
        return known[0] if known is not None else None

    async def listening(self, name: str) -> IncomingAnswer:
        """Until VM ``name``'s QEMU listens for RAM: its answer (with RAM's URI), or its
        start's failure."""
        known = self._starts.get(name)
        if known is None:
            raise NotFound(f"no VM {name!r} was started here")
        return await asyncio.shield(known[1])

    async def settled(self, name: str) -> None:
        """Until VM ``name``'s start ended, however it ends. An abort waits for it rather
        than cancel it: a start cut short while it spawns a process would not know it."""
        known = self._starts.get(name)
        if known is not None and not known[1].done():
            await asyncio.wait({known[1]})


def _said(name: str, start: asyncio.Future[IncomingAnswer]) -> None:
    """A start that failed is logged (its source hears it too, if it asks)."""
    if not start.cancelled() and start.exception() is not None:
        log.warning("the start of incoming VM %s failed: %s", name, start.exception())


async def ready(managed: ManagedVm, request: CommitRequest) -> CommitAnswer:
    """The RAM arrived: ready the disks, run the guest; when it resumed, and each step."""
    fetches = {
        node: plan.spec(str(managed.image_of(node))) for node, plan in request.fetches.items()
    }
    steps = await incoming_vm.commit_incoming(managed, fetches)
    resumed_at = steps.pop("resumed_at")
    return CommitAnswer(resumed_at=resumed_at, steps=steps, vm=managed.api_status())


Ready = Callable[[ManagedVm, CommitRequest], Awaitable[CommitAnswer]]


class Commits:
    """One commit per incoming VM. The source tries a commit again when its answer was
    lost (a connection cut, a daemon that restarts): the repeat waits for the first one
    and gets its answer, rather than readying the disk a second time. A commit that failed
    before it began (the VM still incoming: the agent could not reach the source's disk
    through a cut link, say) is run again when asked again. The commit runs
    shielded from the request that asked for it, so a client that goes away cannot stop it
    half-way. ``using``: another way to ready the VM (QEMU's own strategies'), under the
    same once-only rule and the same exclusion of an abort."""

    def __init__(self, host: Host, ready: Ready = ready) -> None:
        self.host = host
        self._ready = ready
        self._commits: dict[str, tuple[ManagedVm, asyncio.Future[CommitAnswer]]] = {}

    async def commit(
        self, name: str, request: CommitRequest, using: Ready | None = None
    ) -> CommitAnswer:
        managed = self.host.vms.get(name)
        known = self._commits.get(name)
        if known is not None and known[0] is managed and not _failed_early(known[1], managed):
            return await asyncio.shield(known[1])  # this VM's commit, asked again
        if managed.role is not VmRole.INCOMING:
            raise StateError(f"VM {managed.name} is not an incoming VM")
        done = asyncio.ensure_future((using or self._ready)(managed, request))
        self._commits[name] = (managed, done)
        return await asyncio.shield(done)

    def known(self, name: str) -> bool:
        """A commit of VM ``name``, the one here now, was asked (it may have failed early:
        asked again, it runs again); not one of an earlier VM of that name."""
        known = self._commits.get(name)
        return known is not None and known[0] is self.host.vms.vms.get(name)

    async def abort(self, name: str) -> None:
        """The source rolled back: remove the incoming VM, unless its commit is under way
        (whose answer the source lost: it runs the guest here, and the source must go
        forward) or began."""
        managed = self.host.vms.get(name)
        known = self._commits.get(name)
        if known is not None and known[0] is managed and not known[1].done():
            raise StateError(f"VM {name}'s commit is under way here: refusing to remove it")
        await abort(self.host, name)


def _failed_early(commit: asyncio.Future[CommitAnswer], managed: ManagedVm) -> bool:
    """The commit failed before its point of no return: it may be tried again."""
    failed = commit.done() and not commit.cancelled() and commit.exception() is not None
    return failed and managed.role is VmRole.INCOMING


async def abort(host: Host, name: str) -> None:
    """The source rolled back: remove the incoming VM and all it made here (not one whose
    commit began: its guest runs here)."""
    managed = host.vms.get(name)
    if managed.role is not VmRole.INCOMING:
        raise StateError(f"VM {name} is not an incoming VM ({managed.role}): refusing to remove it")
    await host.vms.remove(name)
