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
              guest; a repeat whose answer was lost gets the first one's, one after a try
              that failed part-way takes it up where it stopped
``abort``     ``DELETE /v1/libvirt/incoming/NAME``: the agents and replicas removed (refused
              once the commit began: the guest runs here)

A committed domain's agents become the host's served ones (``Host.serve_domain``, recorded):
its disks are served here from now on, each replica going Local by itself once whole
(``then_local``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
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
    IncomingDisk,
    RemoteDisk,
)
from devagent.errors import DevagentError, NotFound, PeerError, StateError, UsageError
from devagent.libvirt_link import JOB_STATS_COMPLETED, PAUSED_USER, STATE_PAUSED
from devagent.vocab import DestinationStep
from devagent.wait import all_of

if TYPE_CHECKING:
    from devagent.daemon.host import Host

log = logging.getLogger(__name__)

ARRIVAL_TIMEOUT_S = 3600.0
ARRIVAL_POLL_S = 0.005


def run_dir(host: Host, name: str) -> Path:
    """Domain ``name``'s agents' sockets and logs on this host (its adoption's too)."""
    return host.root / "domains" / name


#: What a domain's name and a disk's target may be here (they go into file names).
DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
DISK_TARGET = re.compile(r"^[a-z][a-z0-9]{0,15}$")


def check_names(incoming: DomainIncoming) -> None:
    """A peer's names, before they make any path: a refusal names what is wrong."""
    name, nodes = incoming.domain, [d.node for d in incoming.disks]
    if not DOMAIN_NAME.match(name):
        raise UsageError(f"{name!r} is not a domain name devagent takes ({DOMAIN_NAME.pattern})")
    if not nodes:
        raise UsageError(f"domain {name}: 'disks' names none")
    bad = [n for n in nodes if not DISK_TARGET.match(n)]
    if bad or len(set(nodes)) != len(nodes):
        raise UsageError(f"domain {name}: disk targets must be distinct, like vda: {nodes}")
    for disk in incoming.disks:
        if disk.backend is None or disk.size <= 0:
            raise UsageError(f"domain {name}: disk {disk.node} needs 'backend' and 'size'")


async def prepare(host: Host, incoming: DomainIncoming) -> DomainIncomingAnswer:
    """The agents for the domain's disks, each serving a new replica that reads through to
    the source's agent; see the module's description. Each agent is the incoming domain's
    as soon as it runs: a failure removes every one made."""
    check_names(incoming)
    name = incoming.domain
    if name in host.adopted or name in host.incoming_domains:
        raise StateError(f"domain {name} is here already (host {host.name})")
    made = IncomingDomain(name=name, source=incoming.source, agents={})
    host.incoming_domains[name] = made
    host.domain_commits.pop(name, None)  # an earlier stay's
    folder, disks_dir = run_dir(host, name), host.root / "disks"

    async def serve(disk: IncomingDisk, backend: RemoteDisk) -> None:
        made.agents[disk.node] = await serve_replica(
            name, disk.node, disk.size, disks_dir, folder, host.address, backend=backend.spec()
        )
        if disk.receive:
            image = made.agents[disk.node].image
            made.receivers[disk.node] = receiver = AgentProcess(
                vm=name, node=f"receive-{disk.node}", image=image, run_dir=str(folder),
                listen_address=host.address, backend=LocalSpec(path=image, space_hold_s=0.0),
            )  # fmt: skip
            await receiver.start()

    try:
        folder.mkdir(parents=True, exist_ok=True)
        await all_of(*(serve(d, d.backend) for d in incoming.disks if d.backend is not None))
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
    (the source's QEMU stopped for good and its disks flushed); returns when. libvirt's
    state is looked at every :data:`ARRIVAL_POLL_S` (its events say no more: the pause of
    ``VIR_MIGRATE_PAUSED`` is a state); a domain removed meanwhile (rolled back) ends the
    wait."""
    made = host.incoming_domains.get(name)
    if made is None:
        raise NotFound(f"no incoming domain {name} on host {host.name}")
    link = host.require_libvirt()
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
    dom = None
    while time.monotonic() < deadline and host.incoming_domains.get(name) is made:
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
    repeat (the source's answer lost) gets the first one's answer; one after a commit that
    failed part-way takes it up where it stopped (the swaps done are not done again)."""
    done = host.domain_commits.get(name)
    if done is not None and name not in host.incoming_domains:
        return done
    made = host.incoming_domains.get(name)
    if made is None:
        raise NotFound(f"no incoming domain {name} on host {host.name}")
    if set(request.fetches) != set(made.agents):
        wanted, given = ", ".join(made.agents), ", ".join(request.fetches)
        raise UsageError(f"domain {name}: the commit must name a fetch for each of its disks "
                         f"({wanted}), not {given}")  # fmt: skip
    async with made.committing:
        if name not in host.incoming_domains:  # committed while this one waited
            return host.domain_commits[name]
        answer = await _commit(host, made, request)
        host.domain_commits[name] = answer
        host.serve_domain(name, list(made.agents.values()))
        del host.incoming_domains[name]
    return answer


async def _commit(host: Host, made: IncomingDomain, request: CommitRequest) -> DomainCommitAnswer:
    link = host.require_libvirt()
    steps: dict[str, float] = {DestinationStep.COMMIT: time.time()}
    dom = await link.call("lookupByName", made.name)
    state = tuple(await link.run(dom, "state"))
    if state != (STATE_PAUSED, PAUSED_USER) and not made.began:
        raise StateError(f"domain {made.name} is not here paused (state, reason {state}): "
                         "libvirt's migration did not arrive")  # fmt: skip
    made.began = True  # from here on the guest runs here: no abort
    if made.receivers:
        await all_of(*(_retire(made, node) for node in list(made.receivers)))
        steps[DestinationStep.RECEIVER_RETIRED] = time.time()
    await all_of(*(_swap(made, node, plan.spec(made.agents[node].image))
                   for node, plan in request.fetches.items()))  # fmt: skip
    steps[DestinationStep.DISK_SWAPPED] = time.time()
    if state[0] == STATE_PAUSED:
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
    exiting = asyncio.create_task(receiver.stop())  # its exit, off the guest's pause
    _exiting.add(exiting)
    exiting.add_done_callback(_exiting.discard)


_exiting: set[asyncio.Task[None]] = set()  # retired receivers' exits under way


async def _swap(made: IncomingDomain, node: str, spec: FetchSpec) -> None:
    """Disk ``node``'s agent serves its replica from now on, fetching what it lacks from
    the source's agent, and serves it as Local by itself once whole."""
    spec.then_local = True
    agent = made.agents[node]
    if isinstance(agent.backend, FetchSpec):  # swapped by an earlier try of this commit
        return
    await agent.swap(spec)
    agent.backend = spec.without_seeds()  # (what a restart of the agent is given)


async def remove(host: Host, name: str) -> None:
    """A roll-back: the incoming domain's agents and replicas go (refused once its commit
    began: the guest runs here)."""
    made = host.incoming_domains.get(name)
    if made is None:
        raise NotFound(f"no incoming domain {name} on host {host.name}")
    async with made.committing:  # a commit under way decides first
        if made.began or host.incoming_domains.get(name) is not made:
            raise StateError(f"domain {name}'s commit began on host {host.name}: it runs here")
        del host.incoming_domains[name]
    for agent in [*made.receivers.values(), *made.agents.values()]:
        with contextlib.suppress(DevagentError):
            await agent.kill()
    for agent in made.agents.values():
        for path in (Path(agent.image), presence_path(Path(agent.image))):
            path.unlink(missing_ok=True)
    log.info("incoming domain %s removed", name)
