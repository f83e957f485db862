"""The destination's half of a libvirt domain's migration: the disks' agents made before
libvirt moves the domain here, readied once its RAM arrived, or removed on a roll-back.

``prepare``   ``POST /v1/libvirt/incoming``: for each disk a new replica served by an agent
              that reads through to the source's agent (the domain's QEMU, started here by
              libvirt, connects to it before any RAM comes), and a receiver for a push
``arrived``   ``POST /v1/libvirt/incoming/NAME/arrived``: answers once libvirt's migration
              finished here, the guest paused (libvirt's ``Finish``; the source's QEMU has
              stopped and flushed its disks by then)
``commit``    ``POST /v1/libvirt/incoming/NAME/commit``: libvirt moved the domain here and
              left it paused (``VIR_MIGRATE_PAUSED``): each agent swaps to a Fetch of the
              source's disk seeded with what the push landed, then libvirt resumes the
              guest; once per domain (a repeat after it began gets the first answer)
``abort``     ``DELETE /v1/libvirt/incoming/NAME``: the agents and replicas removed (refused
              once the commit began: the guest runs here)

A committed domain's agents become the host's adopted ones: its disks are served here from
now on, each replica going Local by itself once whole (``then_local``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from devagent.agent.fetch import presence_path
from devagent.agent.messages import FetchSpec, LocalSpec
from devagent.daemon.agents import AgentProcess
from devagent.daemon.libvirt_adopt import serve_replica
from devagent.daemon.libvirt_domains import IncomingDomain
from devagent.daemon.migration.messages import (
    CommitRequest,
    DomainCommitAnswer,
    DomainIncoming,
    DomainIncomingAnswer,
    RemoteDisk,
)
from devagent.errors import DevagentError, NotFound, PeerError, StateError, UsageError
from devagent.vocab import DestinationStep
from devagent.wait import all_of

if TYPE_CHECKING:
    from devagent.daemon.host import Host

log = logging.getLogger(__name__)

#: libvirt's ``VIR_DOMAIN_JOB_STATS_COMPLETED``: the job that just ended (the incoming
#: migration, its figures brought over from the source), and ``KEEP_COMPLETED``: left for
#: others to read too (a read clears them otherwise).
JOB_STATS_COMPLETED = 1 | 2
#: libvirt's ``virDomainState`` of a paused domain, and the reason libvirt gives once its
#: migration here finished with ``VIR_MIGRATE_PAUSED`` (an incoming one is paused for
#: ``migration`` until then).
STATE_PAUSED, PAUSED_USER = 3, 1
ARRIVAL_TIMEOUT_S = 3600.0
ARRIVAL_POLL_S = 0.005


def run_dir(host: Host, name: str) -> Path:
    """Domain ``name``'s agents' sockets and logs on this host (its adoption's too)."""
    return host.root / "domains" / name


async def prepare(host: Host, incoming: DomainIncoming) -> DomainIncomingAnswer:
    """The agents for the domain's disks, each serving a new replica that reads through to
    the source's agent; see the module's description."""
    name = incoming.domain
    if name in host.adopted or name in host.incoming_domains:
        raise StateError(f"domain {name} is here already (host {host.name})")
    if not incoming.disks:
        raise UsageError(f"domain {name}: 'disks' names none")
    made = IncomingDomain(name=name, source=incoming.source, agents={})
    host.incoming_domains[name] = made
    folder, disks_dir = run_dir(host, name), host.root / "disks"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for disk in incoming.disks:
            if disk.backend is None or disk.size <= 0:
                raise UsageError(f"domain {name}: disk {disk.node} needs 'backend' and 'size'")
        agents = await all_of(*(
            serve_replica(name, d.node, d.size, disks_dir, folder, host.address,
                          backend=d.backend.spec())
            for d in incoming.disks if d.backend is not None
        ))  # fmt: skip
        made.agents = {agent.node: agent for agent in agents}
        for disk in incoming.disks:
            if disk.receive:
                image = made.agents[disk.node].image
                made.receivers[disk.node] = AgentProcess(
                    vm=name, node=f"receive-{disk.node}", image=image, run_dir=str(folder),
                    listen_address=host.address, backend=LocalSpec(path=image, space_hold_s=0.0),
                )  # fmt: skip
        await all_of(*(r.start() for r in made.receivers.values()))
    except BaseException:
        await remove(host, name)
        raise
    log.info("domain %s coming from %s: disks %s served", name, incoming.source or "?",
             ", ".join(made.agents))  # fmt: skip
    return DomainIncomingAnswer(
        sockets={node: str(agent.nbd_socket) for node, agent in made.agents.items()},
        disk_targets={
            node: RemoteDisk(address=r.tcp_address or "", export=r.export, host=host.name)
            for node, r in made.receivers.items()
        },
    )


async def arrived(host: Host, name: str) -> float:
    """Wait until libvirt's migration of domain ``name`` finished here, the guest paused
    (the source's QEMU stopped for good and its disks flushed); returns when."""
    made = host.incoming_domains.get(name)
    if made is None:
        raise NotFound(f"no incoming domain {name} on host {host.name}")
    link = host.require_libvirt()
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
    dom = None
    while time.monotonic() < deadline:
        try:
            dom = dom or await link.call("lookupByName", name)
            if tuple(await link.run(dom, "state")) == (STATE_PAUSED, PAUSED_USER):
                return time.time()
        except NotFound:  # libvirt has not made it here yet
            dom = None
        await asyncio.sleep(ARRIVAL_POLL_S)
    raise PeerError(f"domain {name} did not arrive on host {host.name}")


async def commit(host: Host, name: str, request: CommitRequest) -> DomainCommitAnswer:
    """libvirt moved the domain here, paused: ready the disks, run the guest. Once: a
    repeat (the source's answer lost) gets the first one's answer."""
    made = host.incoming_domains.get(name)
    if made is None:
        raise NotFound(f"no incoming domain {name} on host {host.name}")
    async with made.committing:
        if made.answer is not None:
            return made.answer
        if made.began:  # began, then failed: the guest is here; its state says the rest
            raise StateError(f"domain {name}'s commit began here and failed: see its log")
        made.answer = await _commit(host, made, request)
    host.adopted[name] = list(made.agents.values())
    del host.incoming_domains[name]
    return made.answer


async def _commit(host: Host, made: IncomingDomain, request: CommitRequest) -> DomainCommitAnswer:
    link = host.require_libvirt()
    steps: dict[str, float] = {DestinationStep.COMMIT: time.time()}
    dom = await link.call("lookupByName", made.name)
    state = tuple(await link.run(dom, "state"))
    if state != (STATE_PAUSED, PAUSED_USER):
        raise StateError(f"domain {made.name} is not here paused (state, reason {state}): "
                         "libvirt's migration did not arrive")  # fmt: skip
    if made.receivers:
        await all_of(*(_retire(made, node) for node in list(made.receivers)))
        steps[DestinationStep.RECEIVER_RETIRED] = time.time()
    missing = [node for node in made.agents if node not in request.fetches]
    if missing:
        raise UsageError(f"domain {made.name}: the commit names no fetch for {', '.join(missing)}")
    made.began = True  # from here on the guest runs here: no abort
    await all_of(*(_swap(made, node, plan.spec(made.agents[node].image))
                   for node, plan in request.fetches.items()))  # fmt: skip
    steps[DestinationStep.DISK_SWAPPED] = time.time()
    await link.run(dom, "resume")
    resumed_at = time.time()
    downtime = None
    with contextlib.suppress(DevagentError):  # a figure: its absence fails nothing
        stats = await link.run(dom, "jobStats", JOB_STATS_COMPLETED)
        downtime = float(stats["downtime"]) if "downtime" in stats else None
    log.info("domain %s runs here (from %s)", made.name, made.source or "?")
    return DomainCommitAnswer(resumed_at=resumed_at, downtime_ms=downtime, steps=steps)


async def _retire(made: IncomingDomain, node: str) -> None:
    """A push given up at the switchover may still be on the wire: the receiver finishes
    what it took, then stops (see :func:`devagent.daemon.vms.incoming._retire_receiver`)."""
    receiver = made.receivers.pop(node)
    try:
        await receiver.retire(timeout=30.0)
    except (PeerError, StateError) as err:
        log.warning("domain %s: receiver of %s unreachable (%s): killing it", made.name, node, err)
        await receiver.kill()
        return
    await receiver.stop()


async def _swap(made: IncomingDomain, node: str, spec: FetchSpec) -> None:
    """Disk ``node``'s agent serves its replica from now on, fetching what it lacks from
    the source's agent, and serves it as Local by itself once whole."""
    spec.then_local = True
    agent = made.agents[node]
    await agent.swap(spec)
    agent.backend = spec


async def remove(host: Host, name: str) -> None:
    """A roll-back: the incoming domain's agents and replicas go (refused once its commit
    began: the guest runs here)."""
    made = host.incoming_domains.get(name)
    if made is None:
        raise NotFound(f"no incoming domain {name} on host {host.name}")
    if made.began:
        raise StateError(f"domain {name}'s commit began on host {host.name}: it runs here")
    for agent in [*made.receivers.values(), *made.agents.values()]:
        with contextlib.suppress(DevagentError):
            await agent.kill()
    for agent in made.agents.values():
        for path in (Path(agent.image), presence_path(Path(agent.image))):
            path.unlink(missing_ok=True)
    del host.incoming_domains[name]
    log.info("incoming domain %s removed", name)
