"""Device dynamic exchange under a running VM: re-point one of its devices to another
physical device without the guest noticing. A disk moves onto another file or block
device of its host (:func:`swap_disk`) or onto another host (:func:`attach_remote`), both
by a mirror and a pivot in its agent (:func:`mirror_and_pivot`); a disk that lives on
another host comes home by a fetched replica (:func:`.incoming.fetch_home`); a NIC changes
its uplink tap (:func:`swap_nic`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from devagent.agent.messages import (
    BackendSpec,
    CompletionsAnswer,
    CutoverAnswer,
    FetchSpec,
    LocalSpec,
    LocalStatus,
    MirrorRequest,
    RemoteSpec,
    StatusAnswer,
)
from devagent.api_types import DiskExchange, Export, NicSwap
from devagent.client import DaemonClient, Endpoint
from devagent.daemon.agents import AgentProcess
from devagent.errors import NotFound, PeerError, StateError, UsageError
from devagent.net.messages import NetStatus, SwapAnswer
from devagent.report import largest_gap
from devagent.wire import from_peer, to_json

from .incoming import fetch_home
from .request import RemoteHome, export_name

if TYPE_CHECKING:
    from .managed import ManagedVm

MIRROR_TIMEOUT_S = 3600.0
MIRROR_CONVERGE_BYTES = 1 << 20  # left for the last copy, done with the guest's I/O held
SETTLE_S = 0.5  # completions after the pivot arrive within this


async def mirror_and_pivot(
    managed: ManagedVm,
    agent: AgentProcess,
    target: BackendSpec,
    *,
    target_zeroed: bool,
    sync: bool,
) -> DiskExchange:
    """Mirror ``agent``'s device to ``target`` under the running guest, then pivot onto
    it; the answer carries the guest I/O gap around the pivot, from the journal."""
    started = time.time()
    mirror = MirrorRequest(
        target=target, target_zeroed=target_zeroed, sync=sync, converge_bytes=MIRROR_CONVERGE_BYTES
    )
    await agent.call("POST", "/mirror", to_json(mirror))
    try:
        raw = await agent.call("POST", "/mirror/cutover", timeout=MIRROR_TIMEOUT_S)
    except BaseException:
        with contextlib.suppress(PeerError, StateError):
            await agent.call("POST", "/mirror/cancel")
        raise
    done = from_peer(raw, CutoverAnswer, what=f"{agent.title()}: its cutover")
    await asyncio.sleep(SETTLE_S)  # a pause on purpose, not a poll
    raw = await agent.call("GET", "/completions", since=done.held_from - 1.0)
    times = from_peer(raw, CompletionsAnswer, what=f"{agent.title()}: its completions").completions
    gap = largest_gap(times, done.held_from - SETTLE_S, done.held_from + done.held_s + SETTLE_S)
    return DiskExchange(
        vm=managed.name,
        device=agent.node,
        duration_s=round(time.time() - started, 3),
        copied_bytes=done.mirror.copied_bytes,
        held_ms=round(done.held_s * 1000, 3),
        io_gap_ms=round(gap * 1000, 3) if gap is not None else None,
        backend=done.new,
        old_image=agent.image,
    )


async def _disk_size(agent: AgentProcess) -> int:
    raw = await agent.call("GET", "/status")
    return from_peer(raw, StatusAnswer, what=f"{agent.title()}: its status").size


async def swap_disk(
    managed: ManagedVm,
    node: str,
    path: Path,
    *,
    sync: bool = False,
    rate_limit: int | None = None,
) -> DiskExchange:
    """Move the live disk onto ``path`` (a file or block device of this host) without the
    guest noticing. A disk that lives on another host comes home through a fetched replica
    instead of a mirror."""
    if managed.request.disk(node).lives_on is not None:
        return await fetch_home(managed, node, path, rate_limit=rate_limit)
    agent = managed.agent_for(node)
    if path.resolve() == Path(agent.image).resolve() and agent.backend is None:
        raise UsageError(f"VM {managed.name}'s {node} already lives on {path}")
    size = await _disk_size(agent)
    zeroed = not path.exists()
    if zeroed:
        with path.open("wb") as f:
            f.truncate(size)
    elif path.is_file() and path.stat().st_size != size:
        raise UsageError(f"{path} is {path.stat().st_size} bytes; the disk is {size}")
    target = LocalSpec(path=str(path))
    result = await mirror_and_pivot(managed, agent, target, target_zeroed=zeroed, sync=sync)
    agent.image, agent.backend = str(path), None
    managed.images[node] = path
    managed.save()
    return result


async def attach_remote(
    managed: ManagedVm, node: str, peer: Endpoint, *, sync: bool = False
) -> DiskExchange:
    """Remote device access for a running VM: move its disk to host ``peer`` (an export
    there) and go on using it from here, over the network."""
    agent = managed.agent_for(node)
    disk = managed.request.disk(node)
    if disk.lives_on is not None:
        raise StateError(f"VM {managed.name}'s {node} already lives on another host")
    size = await _disk_size(agent)
    name = export_name(managed.name, node)
    async with DaemonClient(peer) as client:
        export = await client.post_as("/v1/exports", Export, {"name": name, "size": size})
    if export.address is None:
        raise PeerError(f"host {peer.name}: its export {export.name} has no address")
    target = RemoteSpec(address=export.address, export=export.export, host=peer.name)
    try:
        result = await mirror_and_pivot(managed, agent, target, target_zeroed=True, sync=sync)
    except BaseException:
        async with DaemonClient(peer) as client:
            with contextlib.suppress(PeerError, NotFound):
                await client.delete(f"/v1/exports/{name}")
        raise
    result.old_image = agent.image
    result.lives_on = peer.name
    agent.backend = target
    home = RemoteHome(peer=peer, export=name)
    managed.request = managed.request.with_disk(node, msgspec.structs.replace(disk, lives_on=home))
    managed.save()
    return result


#: How long an agent may take to hand a replica's chunks back to its source (a few GiB at
#: 100 Mbit/s).
HAND_BACK_S = 600.0


async def keep_remote(managed: ManagedVm, node: str, home: RemoteHome) -> DiskExchange:
    """A migration's source keeps disk ``node``: its replica here can never be written (a
    read-only space). The agent hands what the replica holds back to the source (the
    guest's I/O goes on, by remote access, as it did while the replica spilled), then serves
    the disk from there alone; the disk is recorded as living on that peer (``device swap``
    brings it home once this host has room). The stale replica stays where it is: its
    space cannot even delete it."""
    agent = managed.agent_for(node)
    disk, fetch = managed.request.disk(node), agent.backend
    if disk.lives_on == home:  # asked again (its answer was lost): done already
        return DiskExchange(vm=managed.name, device=node, duration_s=0.0, held_ms=0.0,
                            backend=repr(agent.backend), lives_on=home.peer.name)  # fmt: skip
    if not isinstance(fetch, FetchSpec):
        raise StateError(f"VM {managed.name}'s {node} is not a replica being fetched here")
    started = time.time()
    swapped = await agent.swap(fetch.remote, timeout=HAND_BACK_S)  # (it writes back first)
    agent.backend, agent.image = fetch.remote, str(home.path)
    task = managed.fetching.pop(node, None)
    if task is not None:
        task.cancel()
    stale = managed.images[node]
    managed.images[node] = home.path
    managed.request = managed.request.with_disk(node, msgspec.structs.replace(disk, lives_on=home))
    managed.save()
    managed.log.warning(
        "VM %s: %s lives on host %s now (export %s), by remote access; the replica %s is "
        "left where it is", managed.name, node, home.peer.name, home.export, stale,
    )  # fmt: skip
    return DiskExchange(
        vm=managed.name, device=node, duration_s=round(time.time() - started, 3),
        held_ms=round(swapped.hold_s * 1000, 3), backend=swapped.new,
        old_image=str(stale), lives_on=home.peer.name,
    )  # fmt: skip


async def settle(managed: ManagedVm, node: str) -> DiskExchange:
    """A migration's source lets disk ``node`` go: the replica here, complete, is served
    alone (as Local) from now on. The agent refuses (409) a replica that is not whole or
    whose space went read-only (it spills then: the source keeps the disk instead, by
    :func:`keep_remote`). Once it answers, the source's copy is stale: this is the
    migration's point of no return for the disk. Asked again, it is done already."""
    agent = managed.agent_for(node)
    fetch = agent.backend
    if fetch is None:  # served as Local already (its answer was lost, say)
        return DiskExchange(vm=managed.name, device=node, duration_s=0.0, held_ms=0.0,
                            backend=f"Local({str(managed.image_of(node))!r})")  # fmt: skip
    if not isinstance(fetch, FetchSpec) or managed.request.disk(node).lives_on is not None:
        raise StateError(f"VM {managed.name}'s {node} is not a migration's replica here")
    started = time.time()
    try:
        held_ms = (await agent.swap(LocalSpec(path=fetch.path))).hold_s * 1000
    except PeerError:  # its answer lost (the agent restarts, say): did it swap?
        status = await agent.status()
        if not isinstance(status.backend_status, LocalStatus):
            raise
        held_ms = 0.0  # (not known)
    agent.backend = None  # before the answer: the source lets its copy go on it
    managed.save()
    managed.log.info("VM %s: %s settled on its replica %s", managed.name, node, fetch.path)
    return DiskExchange(
        vm=managed.name, device=node, duration_s=round(time.time() - started, 3),
        held_ms=round(held_ms, 3), backend=f"Local({fetch.path!r})",
    )  # fmt: skip


async def swap_nic(managed: ManagedVm, node: str, tap: str) -> NicSwap:
    """Make the tap ``tap`` (on this host) a NIC's uplink without losing a frame."""
    nic = managed.nic_for(node)
    if tap == nic.tap:
        raise UsageError(f"VM {managed.name}'s {node} already uses tap {tap}")
    started = time.time()
    what = f"{nic.title()}: its status"
    before = from_peer(await nic.call("GET", "/status"), NetStatus, what=what)
    raw = await nic.call("POST", "/swap", {"uplink": {"kind": "tap", "name": tap}})
    swapped = from_peer(raw, SwapAnswer, what=f"{nic.title()}: its swap")
    old, nic.tap = nic.tap, tap  # a restarted agent opens the new tap
    managed.save()
    after = from_peer(await nic.call("GET", "/status"), NetStatus, what=what)
    managed.log.info("%s: uplink %s replaced by %s", nic.describe(), old, tap)
    return NicSwap(
        vm=managed.name,
        device=node,
        old_tap=old,
        tap=tap,
        duration_s=round(time.time() - started, 3),
        swapped=swapped,
        net_frames_lost=after.net_frames_lost - before.net_frames_lost,
    )
