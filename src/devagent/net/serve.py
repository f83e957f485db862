"""Run one net agent in the foreground until ``stop`` is set or the task is cancelled."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

from devagent.net.agent import MAX_HOLD_S, NetAgent
from devagent.net.control import UplinkOpener, serve_control
from devagent.net.messages import UplinkSpec
from devagent.net.uplink import open_uplink
from devagent.tls import Tls


async def serve(
    vm_socket: str | Path,
    uplink_spec: UplinkSpec,
    *,
    vm: str = "",
    nic: str = "net0",
    peer_listen: tuple[str, int] | None = None,
    control: str | Path | None = None,
    on_ready: Callable[[NetAgent], None] | None = None,
    stop: asyncio.Event | None = None,
    opener: UplinkOpener = open_uplink,
    hold: bool = False,
    max_hold_s: float = MAX_HOLD_S,
    tls: Tls | None = None,
) -> None:
    """Attach to the uplink, connect to QEMU's stream socket ``vm_socket`` (and reconnect
    whenever it drops), accept peer agents on ``peer_listen``, serve ``control``."""
    uplink = opener(uplink_spec)
    agent = NetAgent(uplink, vm=vm, nic=nic, max_hold_s=max_hold_s)
    stop = stop if stop is not None else asyncio.Event()
    runner = None
    try:
        agent.start()
        if hold:
            agent.hold(reason="incoming")
        if peer_listen is not None:
            await agent.listen_peer(*peer_listen, tls=tls)
        agent.connect_vm(vm_socket)
        if control is not None:
            runner = await serve_control(agent, Path(control), stop, opener)
        if on_ready is not None:
            on_ready(agent)
        await stop.wait()
    finally:
        await asyncio.shield(agent.stop())
        if runner is not None:
            await runner.cleanup()
            with contextlib.suppress(FileNotFoundError):
                Path(control or "").unlink()
