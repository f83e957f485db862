"""A VM as its daemon keeps it (:class:`ManagedVm`): the QEMU process (:class:`Vm`), what
its probe said on the console (heartbeats, answers to commands), its agents and NICs, its
record ``vm.json``, and the status the API shows.

The VM's part in a migration is its **role** (:class:`VmRole`), one enum moved only by the
events of :data:`ROLE_TRANSITIONS` (a commit that begins, an arrival, a departure); the state
the API shows comes from the role and QEMU's own state together
(:meth:`ManagedVm.shown_state`): a copy left behind by a migration says so, and whether it
still serves the disk to the destination, rather than the ``failed`` or ``stopped`` of its
killed QEMU.

The moves a daemon restart must know of are saved in ``vm.json`` as they happen: an incoming
VM's commit is recorded as begun (``committing``) *before* its guest runs here, the point of
no return of a migration, and a copy left behind is recorded as ``migrated``.

Device exchange lives in :mod:`.exchange`, the migration's destination half in
:mod:`.incoming`; both are functions taking a ManagedVm.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from devagent.agent.messages import CompletionsAnswer, FetchStatus, StatusAnswer
from devagent.api_types import (
    AgentBrief,
    DeviceRow,
    DiskRow,
    Integrity,
    NicBrief,
    NicRow,
    VmStatus,
)
from devagent.client import DaemonClient
from devagent.daemon.agents import AgentProcess
from devagent.daemon.nics import NicAgent
from devagent.daemon.supervised import STATUS_TIMEOUT_S, Supervised
from devagent.errors import DevagentError, NotFound, PeerError, StateError, UsageError
from devagent.guest.probe import ConsoleParser, DiskDigest, Heartbeat, Paused, ProbeEvent, Verified
from devagent.guest.workload import adopting
from devagent.net.messages import NetStatus
from devagent.qemu.config import VmConfig
from devagent.qemu.vm import Vm, VmState
from devagent.wire import from_peer

from .config import image_digest
from .request import VmRequest

log = logging.getLogger(__name__)
T = TypeVar("T")

HEARTBEATS_KEPT = 36_000  # one hour at ten a second
PROBE_ANSWERS: dict[str, type[ProbeEvent]] = {
    "pause": Paused,
    "verify": Verified,
    "resume": Heartbeat,  # answered by the next heartbeat
}


class VmRole(StrEnum):
    """What this host's copy of a VM is to its guest."""

    RUNNING = "running"  # the guest lives here
    INCOMING = "incoming"  # a migration is arriving here; the guest still lives on the source
    #: The destination began the commit: the guest runs here from now on (or is about to);
    #: there is no way back, and a daemon that restarts goes forward with it.
    COMMITTING = "committing"
    MIGRATED = "migrated"  # the guest migrated away: this copy is left behind


class RoleEvent(StrEnum):
    COMMIT_BEGAN = "begun its commit"  # the RAM and the disk are ready: the guest runs next
    ARRIVED = "arrived"  # the incoming migration completed: the guest lives here now
    MIGRATED_AWAY = "migrated away"  # past the switchover: the guest lives on the destination


#: The only moves of a role; anything else is a :class:`StateError`.
ROLE_TRANSITIONS: dict[tuple[VmRole, RoleEvent], VmRole] = {
    (VmRole.INCOMING, RoleEvent.COMMIT_BEGAN): VmRole.COMMITTING,
    (VmRole.COMMITTING, RoleEvent.ARRIVED): VmRole.RUNNING,
    (VmRole.RUNNING, RoleEvent.MIGRATED_AWAY): VmRole.MIGRATED,
}

#: A migration's record in a source VM's folder while the migration is unsettled
#: (:mod:`devagent.daemon.migration.record`): the VM is kept on a daemon restart, even with
#: its QEMU gone, for the migration to be taken up again.
MIGRATION_RECORD = "migration.json"


class ManagedVm:
    """A VM as its daemon keeps it: the QEMU process and what its probe said."""

    def __init__(
        self,
        request: VmRequest,
        config: VmConfig,
        run_dir: Path,
        role: VmRole | str,
        images: dict[str, Path],
        agents: list[AgentProcess] | None = None,
        nics: list[NicAgent] | None = None,
    ):
        self.request = request
        self.config = config
        self.run_dir = run_dir
        self._role = VmRole(role)
        self._serves_disk = True  # when migrated: until its agents stop, the destination reads
        #: Each disk's image on this host by node, in order (served by its agent, if any).
        self.images = dict(images)
        self.agents = agents or []  # one block agent per disk
        self.nics = nics or []  # one net agent per NIC
        #: By node: a replica being filled, and its figures (kept once it is local).
        self.fetching: dict[str, asyncio.Task[StatusAnswer]] = {}
        self.last_fetch: dict[str, FetchStatus] = {}
        # An incoming VM's replicas as a mirror's targets, by node, until the switchover
        # (the VM's own agents forward to the source meanwhile, so QEMU never sees a
        # half-copied disk).
        self.receivers: dict[str, AgentProcess] = {}
        #: Receivers asked for once RAM moves (:func:`~.incoming.add_receivers`), starting.
        self.receiving: asyncio.Task[None] | None = None
        #: The host a migration brings (or brought) it from: the only one whose certificate
        #: may commit, abort, settle or keep its disks (:mod:`devagent.daemon.auth`).
        self.source_host: str | None = None
        self.retiring: list[asyncio.Task[None]] = []  # receivers, stopping
        self.heartbeats: deque[Heartbeat] = deque(maxlen=HEARTBEATS_KEPT)
        self.parser = ConsoleParser() if request.has_probe else None
        self.vm = Vm(config, run_dir, on_console=self._on_console if self.parser else None)
        self.log = logging.getLogger(f"{__name__}.{config.name}")
        self._waiters: list[tuple[type[ProbeEvent], asyncio.Future[ProbeEvent]]] = []

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def image(self) -> Path:
        """The first disk's image (the VM's only disk where only one is allowed: a disk on
        another host, QEMU's own strategies)."""
        return next(iter(self.images.values()))

    def image_of(self, node: str) -> Path:
        try:
            return self.images[node]
        except KeyError:
            raise NotFound(f"VM {self.name} has no disk {node!r}") from None

    # --- role ------------------------------------------------------------------------------

    @property
    def role(self) -> VmRole:
        return self._role

    @role.setter
    def role(self, role: VmRole | str) -> None:
        """For code that still assigns the role: the same guarded move as :meth:`arrived`
        and :meth:`migrated_away`."""
        events = {VmRole.RUNNING: RoleEvent.ARRIVED, VmRole.MIGRATED: RoleEvent.MIGRATED_AWAY}
        event = events.get(VmRole(role))
        if event is None:
            raise StateError(f"VM {self.name}: no event makes a VM {role} again")
        self._move_role(event)

    def _move_role(self, event: RoleEvent) -> None:
        new = ROLE_TRANSITIONS.get((self._role, event))
        if new is None:
            raise StateError(
                f"VM {self.name} is {self._role} here (QEMU {self.vm.state.value}): "
                f"it cannot have {event}"
            )
        self.log.info("VM %s: %s -> %s (%s)", self.name, self._role, new, event)
        self._role = new

    async def receivers_started(self) -> None:
        """Until receivers asked for once RAM moved have started (or failed to): their
        processes known, a commit retires them and a removal stops them."""
        if self.receiving is not None:
            await asyncio.wait([self.receiving])

    def commit_began(self) -> None:
        """The migration's point of no return, made durable before the guest runs here: a
        daemon that restarts from now on runs the guest here rather than discarding it (the
        source's daemon, asking, goes forward)."""
        self._move_role(RoleEvent.COMMIT_BEGAN)
        self.save()

    def fresh_instance(self) -> None:
        """After its QEMU died: a new QEMU for the same VM and devices, to boot (not to
        migrate into, not paused), its probe heard anew; the probe adopts the disk as the
        crashed boot left it, so that its digest (and ``integrity``) go on covering it."""
        extra = tuple(a for a in self.config.extra_args if a != "-S")
        append = adopting(self.config.append) if self.config.append else None
        self.config = self.config.replace(incoming=False, extra_args=extra, append=append)
        self.parser = ConsoleParser() if self.request.has_probe else None
        self.heartbeats.clear()
        self.vm = Vm(self.config, self.run_dir,
                     on_console=self._on_console if self.parser else None)  # fmt: skip

    def arrived(self) -> None:
        """The incoming migration completed: the guest lives here now."""
        self._move_role(RoleEvent.ARRIVED)

    def migrated_away(self, *, serves_disk: bool = True) -> None:
        """Past the switchover the guest lives on the destination: this copy is left
        behind. ``serves_disk``: its agents still serve the disk to the destination (a
        postcopy tail) until the disk is local there and this copy is removed. Saved at
        once: a daemon that restarts keeps the copy for the migration to finish."""
        self._move_role(RoleEvent.MIGRATED_AWAY)
        self._serves_disk = serves_disk
        self.save()

    @property
    def serves_disk(self) -> bool:
        """A copy left behind by a migration whose disk the destination still reads through
        its agents (a post-copy tail): they are supervised although its QEMU is gone."""
        return self._role is VmRole.MIGRATED and self._serves_disk

    def shown_state(self) -> str:
        """The state the API shows: QEMU's, but for a copy left behind by a migration
        (whose QEMU is stopped or killed) what that copy is."""
        if self._role is VmRole.MIGRATED:
            if self._serves_disk and any(a.alive for a in self.agents):
                return "migrated, serving its disk to the destination"
            return "migrated"
        return self.vm.state.value

    # --- the probe -------------------------------------------------------------------------

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
        if self.role is not VmRole.RUNNING:
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
        kind = PROBE_ANSWERS.get(command)
        if kind is None:
            raise UsageError(f"unknown probe command {command!r}: use {', '.join(PROBE_ANSWERS)}")
        future: asyncio.Future[ProbeEvent] = asyncio.get_running_loop().create_future()
        self._waiters.append((kind, future))
        await self.vm.send_console(command + "\n")
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError as err:
            raise PeerError(
                f"VM {self.name}: ioprobe did not answer {command!r} in {timeout:g} s"
            ) from err
        finally:
            if (kind, future) in self._waiters:
                self._waiters.remove((kind, future))

    async def wait_running(self, timeout: float) -> None:
        """Wait until the guest runs (an incoming VM resumes once its migration completes).
        QEMU's RESUME event moves the state; the :class:`Vm` offers no wait on it."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.vm.state is not VmState.RUNNING:
            if self.vm.exited or self.vm.state is VmState.FAILED:
                raise PeerError(f"VM {self.name}: QEMU failed: {self.vm.log_tail()}")
            if asyncio.get_running_loop().time() > deadline:
                raise PeerError(
                    f"VM {self.name} not running after {timeout:.0f} s "
                    f"(still {self.vm.state.value})"
                )
            await asyncio.sleep(0.02)

    async def check_integrity(self) -> Integrity:
        """Pause the probe, compare each disk with what the guest last wrote there (the
        probe's digest over the generation of every block it wrote), then let the probe
        go on. ``ok``, or what differs; and the same for each disk."""
        try:
            paused = await self.probe_command("pause")
        except PeerError:  # unanswered: it may have paused all the same
            with contextlib.suppress(DevagentError):
                await self.probe_command("resume")
            raise
        assert isinstance(paused, Paused)
        try:
            found = {node: await self._disk_digest(node) for node in self.images}
        finally:
            await self.probe_command("resume")
        only = len(found) == 1
        disks = {
            node: "ok" if paused.digest_of(node, only=only) == digest else (
                f"mismatch: the guest last wrote digest {paused.digest_of(node, only=only)}, "
                f"the disk holds {digest}"
            )
            for node, digest in found.items()
        }  # fmt: skip
        if paused.table_digest not in (None, paused.digest):  # its memory lost an update
            overall = (
                f"mismatch: the guest's memory disagrees with itself (its running digest "
                f"{paused.digest}, its block table's {paused.table_digest}); the disks hold "
                + ", ".join(f"{node} {digest}" for node, digest in found.items())
            )
        else:
            wrong = [f"{node}: {v.removeprefix('mismatch: ')}" for node, v in disks.items()
                     if v != "ok"]  # fmt: skip
            overall = "ok" if not wrong else "mismatch: " + "; ".join(wrong)
        return Integrity(integrity=overall, disks=disks)

    async def _disk_digest(self, node: str) -> str:
        """The probe's digest of disk ``node`` as this host (or the peer its disk lives on)
        reads it."""
        home = self.request.disk(node).lives_on
        if home is not None:  # the disk lives on the peer: ask it
            async with DaemonClient(home.peer) as client:
                found = await client.post_as(f"/v1/exports/{home.export}/digest", DiskDigest)
            return found.digest
        return (await asyncio.to_thread(image_digest, self.image_of(node))).digest

    def heartbeats_since(self, since: float) -> list[Heartbeat]:
        return [b for b in self.heartbeats if b.host_time > since]

    # --- devices ---------------------------------------------------------------------------

    def agent_for(self, node: str) -> AgentProcess:
        for agent in self.agents:
            if agent.node == node:
                return agent
        if not self.agents:
            raise StateError(f"VM {self.name}'s disk has no agent (QEMU opens it directly)")
        raise NotFound(f"VM {self.name} has no device {node!r}")

    def nic_for(self, node: str) -> NicAgent:
        for nic in self.nics:
            if nic.node == node:
                return nic
        raise NotFound(f"VM {self.name} has no NIC {node!r}")

    async def devices(self) -> list[DeviceRow]:
        """Each disk: its backend, in-flight requests, journal figures; each NIC: address,
        tap, hold, forward, counters. The agents are asked all at once, each for
        :data:`STATUS_TIMEOUT_S` at most: a silent one is shown as such, not waited for."""
        disks, nics = await asyncio.gather(  # all at once
            asyncio.gather(*(_quick_status(a, StatusAnswer) for a in self.agents)),
            asyncio.gather(*(_quick_status(n, NetStatus) for n in self.nics)),
        )
        rows: list[DeviceRow] = [
            self._disk_row(a, *got) for a, got in zip(self.agents, disks, strict=True)
        ]
        if not self.agents:
            direct = "direct (QEMU opens the image; no agent)"
            rows += [
                DiskRow(vm=self.name, device=node, image=str(image), state=direct)
                for node, image in self.images.items()
            ]
        rows += [self._nic_row(n, *got) for n, got in zip(self.nics, nics, strict=True)]
        return rows

    def _disk_row(self, agent: AgentProcess, status: StatusAnswer | None, trouble: str) -> DiskRow:
        last_fetch = self.last_fetch.get(agent.node)  # kept from the agent's status
        return DiskRow(
            vm=self.name,
            device=agent.node,
            image=agent.image,
            state=trouble if status is None else "serving",
            agent_pid=agent.pid,
            nbd_socket=str(agent.nbd_socket),
            last_fetch=last_fetch,
            agent=status,
        )

    def _nic_row(self, nic: NicAgent, status: NetStatus | None, trouble: str) -> NicRow:
        if status is None:
            state = trouble
        elif status.held:
            state = "held"
        else:
            state = f"forwarding to {status.forward.peer}" if status.forward else "serving"
        return NicRow(
            vm=self.name,
            device=nic.node,
            address=nic.address,
            mac=nic.mac,
            tap=nic.tap,
            agent_pid=nic.pid,
            stream_socket=str(nic.stream_socket),
            state=state,
            agent=status,
        )

    async def completions_by_disk(self, since: float) -> dict[str, list[float]] | None:
        """Completion times of guest I/O on each disk's agent here after ``since``, by
        node; None when the VM has no agent, or an agent's journal no longer reaches back
        to ``since`` (a long migration under heavy I/O): then only the probe's heartbeats
        tell."""
        if not self.agents:
            return None
        times: dict[str, list[float]] = {}
        for agent in self.agents:
            raw = await agent.call("GET", "/completions", since=since)
            answer = from_peer(raw, CompletionsAnswer, what=f"{agent.title()}: its completions")
            if not answer.complete:
                log.info("VM %s: the journal of %s no longer reaches back", self.name, agent.node)
                return None
            times[agent.node] = sorted(answer.completions)
        return times

    # --- record and status -----------------------------------------------------------------

    def save(self) -> None:
        record = {
            "request": self.request.to_json(),
            "config": self.config.to_json(),
            "pid": self.vm.pid,
            "role": self.role.value,
            "images": {node: str(image) for node, image in self.images.items()},
            "agents": [a.to_json() for a in self.agents],
            "nics": [n.to_json() for n in self.nics],
            "receivers": [r.to_json() for r in self.receivers.values()],
            "resumed_at": self.vm.resumed_at,  # the source's read-back after a restart
            "source_host": self.source_host,
        }
        tmp = self.run_dir / "vm.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.run_dir / "vm.json")

    def disk_location(self) -> str:
        """Where the disks are: each image here, or ``host NAME (remote)``."""
        remote = self.request.remote_disks()
        return ", ".join(
            f"host {remote[node].peer.name} (remote)" if node in remote else str(image)
            for node, image in self.images.items()
        )

    def api_status(self) -> VmStatus:
        """What the API says of the VM; it asks no agent (``alive`` is a signal 0)."""
        last = self.heartbeats[-1] if self.heartbeats else None
        first = self.heartbeats[0] if self.heartbeats else None
        return VmStatus(
            name=self.name,
            state=self.shown_state(),
            role=self.role.value,
            pid=self.vm.pid,
            ram_mb=self.config.ram_mb,
            disk=self.disk_location(),
            agents=[AgentBrief(node=a.node, pid=a.pid, alive=a.alive) for a in self.agents],
            nics=[
                NicBrief(
                    node=n.node, address=n.address, mac=n.mac, tap=n.tap, pid=n.pid, alive=n.alive
                )
                for n in self.nics
            ],
            storage=self.request.storage,
            workload=self.request.workload,
            probe=self.parser is not None,
            started_at=self.vm.started_at,
            resumed_at=self.vm.resumed_at,
            first_heartbeat_at=first.host_time if first else None,
            last_heartbeat=last,
        )


async def _quick_status(agent: Supervised, into: type[T]) -> tuple[T | None, str]:
    """An agent's ``GET /status`` answer as an ``into``, or (None, why it is shown
    unreachable)."""
    try:
        return from_peer(await agent.quick_status(), into, what=f"{agent.title()}: its status"), ""
    except TimeoutError:
        return None, f"unreachable (no answer in {STATUS_TIMEOUT_S:g} s)"
    except (PeerError, StateError) as err:
        return None, f"unreachable: {err}"
    except UsageError as err:  # an answer of the wrong shape
        return None, f"unreadable: {err}"
