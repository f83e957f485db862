"""What follows a migration's commit on its destination, taking only the VM (never the
manager): the guest run and made this host's (:func:`go_live`), its NICs released
(:func:`release_nics`), and the watch that serves a fetched replica as Local once complete
(:func:`await_local`, also for a disk brought home). The commit uses them
(:mod:`.incoming`), and so does a daemon that restarts after a commit's mark
(:mod:`.manager`): once the mark is saved, the only way is forward.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from devagent.agent.messages import FetchStatus, LocalStatus, StatusAnswer
from devagent.daemon.agents import AgentProcess
from devagent.errors import DevagentError, PeerError
from devagent.qemu.vm import VmState
from devagent.vocab import DestinationStep

from .managed import ManagedVm

ARRIVAL_TIMEOUT_S = 30.0
#: A replica being filled that makes no progress for this long never becomes local.
FETCH_STALL_S = 3600.0


async def go_live(vm: ManagedVm) -> dict[str, float]:
    """Past the commit's mark (:meth:`ManagedVm.commit_began`) the only way is forward: run
    the guest (``cont`` unless it runs), release its NICs, make it this host's VM. The end
    of a commit, and what a restarted daemon does with a VM whose commit had begun."""
    if vm.vm.state is not VmState.RUNNING:
        await vm.vm.qmp("cont")
    await vm.wait_running(timeout=ARRIVAL_TIMEOUT_S)
    steps = await release_nics(vm) if vm.nics else {}
    vm.arrived()
    vm.save()
    return steps


async def release_nics(vm: ManagedVm) -> dict[str, float]:
    """An arrived VM runs: its NICs' agents (held since they started) deliver what they
    kept, and QEMU announces the guest's MAC so that the network learns its new place
    (QEMU also announced it as the migration loaded; once more now that frames flow)."""
    # Past the switchover: a failure here is logged, it does not fail the migration.
    for nic in vm.nics:
        nic.hold = False  # a restarted agent starts unheld from now on
        try:
            released = await nic.call("POST", "/release")
        except DevagentError as err:  # its hold ended already, or the agent restarts
            vm.log.error("%s: release failed: %s", nic.describe(), err)
            continue
        vm.log.info("%s released: %s", nic.describe(), released)
    steps: dict[str, float] = {DestinationStep.NIC_RELEASED: time.time()}
    try:
        steps[DestinationStep.NIC_ANNOUNCED] = await announce(vm)
    except DevagentError as err:
        vm.log.error("VM %s: announce-self failed: %s", vm.name, err)
        steps[DestinationStep.NIC_ANNOUNCED] = time.time()
    return steps


async def announce(vm: ManagedVm) -> float:
    """QEMU announces the guest's MAC on each NIC (RARP, 5 rounds over 1.25 s), so that the
    bridges learn where the guest is; returns when it was asked."""
    at = time.time()
    await vm.vm.qmp("announce-self", initial=50, max=550, rounds=5, step=100)
    return at


async def await_local(vm: ManagedVm, agent: AgentProcess) -> StatusAnswer:
    """Wait until ``agent``'s Fetch replica is complete and the agent serves it as
    ``Local``; then a restarted agent opens the replica as Local too. Gives up when the
    replica makes no progress for :data:`FETCH_STALL_S` (an agent that died is restarted
    by the supervisor meanwhile, and resumes the fetch)."""
    present = -1
    deadline = time.monotonic() + FETCH_STALL_S
    while time.monotonic() < deadline:
        try:
            status = await agent.status()
        except PeerError:  # the agent died: the supervisor restarts it, resuming the fetch
            await asyncio.sleep(0.2)
            continue
        backend = status.backend_status
        if isinstance(backend, FetchStatus):
            vm.last_fetch[agent.node] = backend
            if backend.present_bytes > present:
                present = backend.present_bytes
                deadline = time.monotonic() + FETCH_STALL_S
        if isinstance(backend, LocalStatus):
            last = vm.last_fetch.get(agent.node)
            if last is not None:  # the figures as the replica completed
                vm.last_fetch[agent.node] = msgspec.structs.replace(
                    last, present_bytes=last.size, complete=True
                )
            agent.backend = None
            vm.save()
            return status
        await asyncio.sleep(0.1)
    raise PeerError(
        f"VM {vm.name}: the replica of {agent.node} made no progress for {FETCH_STALL_S:g} s "
        "and never became local"
    )
