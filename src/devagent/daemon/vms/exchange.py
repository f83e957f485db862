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
from typing import TYPE_CHECKING, Any

from devagent.agent.messages import RemoteSpec
from devagent.client import DaemonClient, Endpoint
from devagent.daemon.agents import AgentProcess
from devagent.errors import NotFound, PeerError, StateError, UsageError
from devagent.report import largest_gap

from .incoming import fetch_home

if TYPE_CHECKING:
    from .managed import ManagedVm

MIRROR_TIMEOUT_S = 3600.0
MIRROR_CONVERGE_BYTES = 1 << 20  # left for the last copy, done with the guest's I/O held
SETTLE_S = 0.5  # completions after the pivot arrive within this


async def mirror_and_pivot(
    managed: ManagedVm,
    agent: AgentProcess,
    target: dict[str, Any],
    *,
    target_zeroed: bool,
    sync: bool,
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
    await asyncio.sleep(SETTLE_S)  # a pause on purpose, not a poll
    times = (await agent.call("GET", "/completions", since=held_from - 1.0))["completions"]
    gap = largest_gap(times, held_from - SETTLE_S, held_from + held_s + SETTLE_S)
    return {
        "vm": managed.name,
        "device": agent.node,
        "duration_s": round(time.time() - started, 3),
        "copied_bytes": done["mirror"]["copied_bytes"],
        "held_ms": round(held_s * 1000, 3),
        "io_gap_ms": round(gap * 1000, 3) if gap is not None else None,
        "backend": done["new"],
    }


async def swap_disk(
    managed: ManagedVm,
    node: str,
    path: Path,
    *,
    sync: bool = False,
    rate_limit: int | None = None,
) -> dict[str, Any]:
    """Move the live disk onto ``path`` (a file or block device of this host) without the
    guest noticing. A disk that lives on another host comes home through a fetched replica
    instead of a mirror."""
    if managed.request.disk_from is not None:
        return await fetch_home(managed, node, path, rate_limit=rate_limit)
    agent = managed.agent_for(node)
    if path.resolve() == Path(agent.image).resolve() and agent.backend is None:
        raise UsageError(f"VM {managed.name}'s {node} already lives on {path}")
    size = int((await agent.call("GET", "/status"))["size"])
    zeroed = not path.exists()
    if zeroed:
        with path.open("wb") as f:
            f.truncate(size)
    elif path.is_file() and path.stat().st_size != size:
        raise UsageError(f"{path} is {path.stat().st_size} bytes; the disk is {size}")
    result = await mirror_and_pivot(
        managed, agent, {"kind": "local", "path": str(path)}, target_zeroed=zeroed, sync=sync
    )
    result["old_image"] = agent.image
    agent.image, agent.backend = str(path), None
    if node == "disk0":
        managed.image = path
    managed.save()
    return result


async def attach_remote(
    managed: ManagedVm, node: str, peer: Endpoint, *, sync: bool = False
) -> dict[str, Any]:
    """Remote device access for a running VM: move its disk to host ``peer`` (an export
    there) and go on using it from here, over the network."""
    agent = managed.agent_for(node)
    if managed.request.disk_from is not None:
        raise StateError(f"VM {managed.name}'s disk already lives on another host")
    size = int((await agent.call("GET", "/status"))["size"])
    async with DaemonClient(peer) as client:
        export = await client.post("/v1/exports", {"name": managed.name, "size": size})
    target = {"kind": "remote", "address": export["address"], "export": export["export"]}
    try:
        result = await mirror_and_pivot(managed, agent, target, target_zeroed=True, sync=sync)
    except BaseException:
        async with DaemonClient(peer) as client:
            with contextlib.suppress(PeerError, NotFound):
                await client.delete(f"/v1/exports/{managed.name}")
        raise
    result["old_image"] = agent.image
    result["lives_on"] = peer.name
    agent.backend = RemoteSpec(address=target["address"], export=target["export"])
    managed.request = managed.request.replace(disk_from=peer.to_json())
    managed.save()
    return result


async def swap_nic(managed: ManagedVm, node: str, tap: str) -> dict[str, Any]:
    """Make the tap ``tap`` (on this host) a NIC's uplink without losing a frame."""
    nic = managed.nic_for(node)
    if tap == nic.tap:
        raise UsageError(f"VM {managed.name}'s {node} already uses tap {tap}")
    started = time.time()
    before = await nic.call("GET", "/status")
    swapped = await nic.call("POST", "/swap", {"uplink": {"kind": "tap", "name": tap}})
    old, nic.tap = nic.tap, tap  # a restarted agent opens the new tap
    managed.save()
    after = await nic.call("GET", "/status")
    managed.log.info("%s: uplink %s replaced by %s", nic.describe(), old, tap)
    return {
        "vm": managed.name,
        "device": node,
        "old_tap": old,
        "tap": tap,
        "duration_s": round(time.time() - started, 3),
        "swapped": swapped,
        "net_frames_lost": after["net_frames_lost"] - before["net_frames_lost"],
    }
