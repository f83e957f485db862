"""The net agent: forwards one VM NIC's Ethernet frames between QEMU and an uplink.

::

    QEMU  -netdev stream,server=on (unix SOCK)      peer agents (TCP, same framing)
       ▲  the agent connects, and reconnects              ▲ forward: uplink → peer
       │  4-byte length + frame                           │ frames from a peer → the VM
       └──────────────────── NetAgent ────────────────────┘
                                │ uplink (a tap on a bridge; swappable)

QEMU is the stream *server* and the agent its client: QEMU 7.2's client side has no
``reconnect`` and never comes back once its peer is gone, while its server side listens
again after each disconnect.  So an agent restart (or a broken stream, which the agent
answers by closing: see ``net.codec``) costs the NIC a pause, never its link for good.

Two directions, each a plain function call per frame on the loop (no queue, no task):

* **VM → uplink**: every frame QEMU sends goes to the current uplink.
* **→ VM** (frames from the uplink, or from a peer agent): to QEMU, unless the agent is
  **held**, in which case they wait in a bounded buffer (count and bytes; past either bound
  the newest frame is dropped and counted) until ``release`` delivers them in arrival order.
  With **forward** on, frames from the uplink go to the peer agent instead of the VM;
  forwarding that starts while held sends the kept frames first (a switchover's source).

A frame that cannot be delivered (no VM connected, a full socket buffer, a full hold buffer,
a dead peer) is dropped and counted in ``net_frames_lost`` with its reason: an Ethernet NIC
drops rather than queue without bound.  Frames a peer mangled are counted by kind of link
(vm, peer) and reason, and never reach anyone.  ``swap_uplink`` holds, stops the old
uplink, hands on the frames still queued in it, starts the new one and releases, in one
step of the loop: no frame in flight is lost or reordered.

This module owns those paths and the hold, forward and swap; each connection's framing and
its bad-frame accounting is a :class:`~devagent.net.link.Link` (:mod:`devagent.net.link`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from devagent.errors import PeerError, StateError, UsageError
from devagent.net.codec import (
    DropReason,
    Limit,
)
from devagent.net.link import Link, LinkRole
from devagent.net.messages import (
    HOLD_MAX_BYTES,
    HOLD_MAX_FRAMES,
    ForwardStatus,
    HoldStatus,
    NetStatus,
    ReleaseAnswer,
    StopForwardAnswer,
)
from devagent.net.uplink import Uplink
from devagent.tls import Tls, process_tls

log = logging.getLogger(__name__)

#: A hold nobody releases is released by the agent after this long (a dead daemon must
#: not cut its guest off the network for ever).
MAX_HOLD_S = 30.0
#: Bytes a link may have queued for sending before frames to it are dropped.  Above the
#: hold bound, so that a release never drops what the hold kept.
LINK_BACKLOG = HOLD_MAX_BYTES + (1 << 20)
#: First and longest pause between two attempts to reach QEMU's socket.
RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 1.0


class AgentState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class LostReason(enum.Enum):
    NO_VM = "no_vm"  # no QEMU connected, not held
    VM_BACKLOG = "vm_backlog"  # QEMU does not read fast enough
    HOLD_OVERFLOW = "hold_overflow"  # the hold buffer was full
    UPLINK = "uplink"  # the uplink refused the frame
    PEER = "peer"  # the forwarding peer's link was full or gone


@dataclass
class _Hold:
    """Frames for the VM kept while it is held."""

    max_frames: int
    max_bytes: int
    reason: str
    since: float = field(default_factory=time.time)
    frames: deque[bytes] = field(default_factory=deque)
    bytes: int = 0
    timer: asyncio.TimerHandle | None = None

    def status(self) -> HoldStatus:
        return HoldStatus(
            reason=self.reason, since=self.since, frames=len(self.frames), bytes=self.bytes,
            max_frames=self.max_frames, max_bytes=self.max_bytes,
        )  # fmt: skip


@dataclass
class _Forward:
    peer: str
    link: Link
    since: float = field(default_factory=time.time)
    frames: int = 0
    #: Wall clock of the last unicast frame sent to the peer.  Broadcast and multicast
    #: frames reach the peer's own uplink too: they say nothing about where the network
    #: believes the VM is (see ``devagent.daemon.migration.net``).
    last_at: float | None = None

    def status(self) -> ForwardStatus:
        return ForwardStatus(
            peer=self.peer, since=self.since, frames=self.frames, last_unicast_at=self.last_at
        )


def _counters() -> dict[str, int]:
    names = ("frames", "bytes")
    ways = ("from_vm", "to_vm", "from_uplink", "to_uplink", "from_peer")
    return {f"{way}_{name}": 0 for way in ways for name in names}


class NetAgent:
    """Serves one VM NIC: QEMU's stream netdev on one side, ``uplink`` on the other."""

    def __init__(
        self,
        uplink: Uplink,
        *,
        vm: str = "",
        nic: str = "net0",
        link_backlog: int = LINK_BACKLOG,
        max_hold_s: float = MAX_HOLD_S,
    ) -> None:
        self.uplink = uplink
        self.vm = vm
        self.nic = nic
        self.label = f"{vm or '?'}/{nic}"
        self.link_backlog = link_backlog
        self.max_hold_s = max_hold_s
        self.state = AgentState.CREATED
        self.counters = _counters()
        self.net_frames_buffered = 0
        self.net_frames_forwarded = 0
        self.delivered_from_hold = 0
        self.lost = {reason.value: 0 for reason in LostReason}
        self.bad = {role.value: {r.value: 0 for r in DropReason} for role in LinkRole}
        self.vm_link: Link | None = None
        self.vm_socket: Path | None = None
        self.vm_connects = 0
        self._peers: set[Link] = set()
        self._servers: list[asyncio.Server] = []
        self.peer_addresses: list[str] = []
        self._hold: _Hold | None = None
        self._forward: _Forward | None = None
        self._connector: asyncio.Task[None] | None = None
        self._swap_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"NetAgent({self.label}, {self.uplink!r}, {self.state.value})"

    def _require(self, *states: AgentState) -> None:
        if self.state not in states:
            raise StateError(f"net agent {self.label} is {self.state.value}")

    @property
    def net_frames_lost(self) -> int:
        return sum(self.lost.values())

    @property
    def held(self) -> bool:
        return self._hold is not None

    # -- starting ----------------------------------------------------------------------------

    def start(self) -> None:
        """Begin reading the uplink."""
        self._require(AgentState.CREATED)
        self.uplink.start(self._frame_from_uplink)
        self.state = AgentState.RUNNING
        log.info("[%s] started on uplink %r", self.label, self.uplink)

    def connect_vm(self, path: str | Path) -> None:
        """Connect to QEMU's stream socket at ``path``, and again whenever it drops."""
        self._require(AgentState.RUNNING)
        if self._connector is not None:
            raise StateError(f"net agent {self.label} already connects to {self.vm_socket}")
        self.vm_socket = Path(path)
        self._connector = asyncio.create_task(self._connect_loop(self.vm_socket))

    async def attach_vm(self, sock: socket.socket) -> None:
        """Serve QEMU (or a test's fake of it) on an already connected unix socket."""
        self._require(AgentState.RUNNING)
        if self.vm_link is not None:
            raise StateError(f"net agent {self.label} already has a VM connected")
        loop = asyncio.get_running_loop()
        await loop.create_unix_connection(lambda: Link(self, LinkRole.VM, "fd"), sock=sock)

    async def _connect_loop(self, path: Path) -> None:
        # The agent's own main loop, not a wait: it keeps QEMU's stream connected for the
        # agent's whole life (QEMU listens again after every drop, or comes up late), with a
        # capped backoff as its rate limit. No deadline by design; stop() cancels it.
        loop = asyncio.get_running_loop()
        pause = RECONNECT_MIN_S
        complained = False
        while self.state is AgentState.RUNNING:
            try:
                _, link = await loop.create_unix_connection(
                    lambda: Link(self, LinkRole.VM, str(path)), str(path)
                )
            except OSError as err:
                if not complained:
                    log.info("[%s] waiting for QEMU on %s (%s)", self.label, path, err)
                    complained = True
                await asyncio.sleep(pause)
                # Held (an incoming VM's NIC), the release is near and must find QEMU
                # connected: its frames would be lost otherwise. Try often meanwhile.
                held = self._hold is not None
                pause = RECONNECT_MIN_S if held else min(pause * 2, RECONNECT_MAX_S)
                continue
            complained, pause = False, RECONNECT_MIN_S
            await link.closed
            if self.state is AgentState.RUNNING:
                await asyncio.sleep(RECONNECT_MIN_S)

    async def listen_peer(
        self, host: str, port: int = 0, tls: Tls | None = None
    ) -> tuple[str, int]:
        """Accept peer agents on TCP: frames they send go to the VM. With ``tls``, only over
        TLS, from hosts ``tls`` admits."""
        self._require(AgentState.CREATED, AgentState.RUNNING)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Link(self, LinkRole.PEER, "?", admit=tls), host, port,
            ssl=tls.server if tls is not None else None,
        )  # fmt: skip
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        self.peer_addresses.append(f"tcp:{bound[0]}:{bound[1]}")
        log.info("[%s] accepting peer agents on %s:%d", self.label, bound[0], bound[1])
        return bound[0], bound[1]

    # -- links come and go -------------------------------------------------------------------

    def link_up(self, link: Link) -> None:
        if link.role is LinkRole.VM:
            if self.vm_link is not None or self.state is not AgentState.RUNNING:
                link.log.warning("refused: a VM is already connected")
                link.close()
                return
            self.vm_link = link
            self.vm_connects += 1
            link.log.info("VM connected")
        else:
            self._peers.add(link)
            link.log.info("peer connected")

    def link_down(self, link: Link, exc: Exception | None) -> None:
        why = f": {exc}" if exc else ""
        if link is self.vm_link:
            self.vm_link = None
            link.log.info("VM disconnected%s", why)
        elif link in self._peers:
            self._peers.discard(link)
            if self._forward is not None and self._forward.link is link:
                link.log.warning(
                    "forwarding peer lost%s after %d frames: uplink frames go to the VM again",
                    why,
                    self._forward.frames,
                )
                self._forward = None
            else:
                link.log.info("peer disconnected%s", why)

    def count_bad(self, role: LinkRole, reason: DropReason) -> None:
        self.bad[role.value][reason.value] += 1

    def _lose(self, reason: LostReason) -> None:
        self.lost[reason.value] += 1

    # -- the frame paths ---------------------------------------------------------------------

    def frame_from_link(self, link: Link, frame: bytes) -> None:
        if link.role is LinkRole.VM:
            self._frame_from_vm(frame)
        else:
            self.counters["from_peer_frames"] += 1
            self.counters["from_peer_bytes"] += len(frame)
            self._toward_vm(frame)

    def _frame_from_vm(self, frame: bytes) -> None:
        self.counters["from_vm_frames"] += 1
        self.counters["from_vm_bytes"] += len(frame)
        if self.uplink.send(frame):
            self.counters["to_uplink_frames"] += 1
            self.counters["to_uplink_bytes"] += len(frame)
        else:
            self._lose(LostReason.UPLINK)

    def _frame_from_uplink(self, frame: bytes) -> None:
        self.counters["from_uplink_frames"] += 1
        self.counters["from_uplink_bytes"] += len(frame)
        if not Limit.MIN_FRAME <= len(frame) <= Limit.MAX_FRAME:
            self._lose(LostReason.UPLINK)
            return
        forward = self._forward
        if forward is None:
            self._toward_vm(frame)
        elif forward.link.send(frame):
            forward.frames += 1
            if not frame[0] & 1:  # the group bit of the destination MAC
                forward.last_at = time.time()
            self.net_frames_forwarded += 1
        else:
            self._lose(LostReason.PEER)

    def _toward_vm(self, frame: bytes) -> None:
        hold = self._hold
        if hold is None:
            self._deliver_to_vm(frame)
        elif len(hold.frames) >= hold.max_frames or hold.bytes + len(frame) > hold.max_bytes:
            self._lose(LostReason.HOLD_OVERFLOW)
        else:
            hold.frames.append(frame)
            hold.bytes += len(frame)
            self.net_frames_buffered += 1

    def _deliver_to_vm(self, frame: bytes) -> bool:
        link = self.vm_link
        if link is None:
            self._lose(LostReason.NO_VM)
            return False
        if not link.send(frame):
            self._lose(LostReason.VM_BACKLOG)
            return False
        self.counters["to_vm_frames"] += 1
        self.counters["to_vm_bytes"] += len(frame)
        return True

    # -- hold and release --------------------------------------------------------------------

    def hold(
        self,
        *,
        max_frames: int = HOLD_MAX_FRAMES,
        max_bytes: int = HOLD_MAX_BYTES,
        reason: str = "hold",
    ) -> None:
        """Keep the frames for the VM (from the uplink and from peers) instead of delivering
        them, up to ``max_frames`` and ``max_bytes``, until :meth:`release`."""
        self._require(AgentState.RUNNING)
        if self._hold is not None:
            raise StateError(f"net agent {self.label} is already held ({self._hold.reason})")
        if max_frames < 1 or max_bytes < Limit.MAX_FRAME:
            raise UsageError(
                f"a hold needs room for one frame at least: max_frames >= 1, "
                f"max_bytes >= {Limit.MAX_FRAME} (got {max_frames}, {max_bytes})"
            )
        self._hold = _Hold(max_frames, max_bytes, reason)
        self._hold.timer = asyncio.get_running_loop().call_later(
            self.max_hold_s, self._hold_expired, self._hold
        )
        log.info(
            "[%s] held (%s): up to %d frames, %d bytes", self.label, reason, max_frames, max_bytes
        )

    def _hold_expired(self, hold: _Hold) -> None:
        if self._hold is hold:
            log.warning("[%s] held %.0f s without release: releasing", self.label, self.max_hold_s)
            self.release()

    def release(self) -> ReleaseAnswer:
        """Deliver the kept frames to the VM in arrival order, then deliver as they come."""
        hold = self._hold
        if hold is None:
            raise StateError(f"net agent {self.label} is not held")
        if hold.timer is not None:
            hold.timer.cancel()
        self._hold = None
        delivered = lost = 0
        while hold.frames:
            if self._deliver_to_vm(hold.frames.popleft()):
                delivered += 1
            else:
                lost += 1
        self.delivered_from_hold += delivered
        held_s = time.time() - hold.since
        log.info(
            "[%s] released after %.3f s (%s): %d frames delivered, %d lost",
            self.label,
            held_s,
            hold.reason,
            delivered,
            lost,
        )
        return ReleaseAnswer(delivered=delivered, lost=lost, held_s=round(held_s, 6))

    # -- forwarding to a peer ----------------------------------------------------------------

    async def forward(self, host: str, port: int, *, timeout: float = 5.0) -> int:
        """Send the frames from the uplink to the peer agent at ``host:port`` instead of to
        the VM, until :meth:`stop_forward`.

        If the agent is held, its kept frames go to the peer first, in order, and the hold
        ends: the source's half of a switchover (hold before the VM stops here, forward once
        it runs there) loses nothing that reached this agent.  Returns how many were handed
        over that way."""
        self._require(AgentState.RUNNING)
        if self._forward is not None:
            raise StateError(f"net agent {self.label} already forwards to {self._forward.peer}")
        loop = asyncio.get_running_loop()
        peer = f"{host}:{port}"
        tls = process_tls()  # the peer then presents the certificate of its address
        try:
            _, link = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Link(self, LinkRole.PEER, peer), host, port,
                    ssl=tls.client if tls is not None else None,
                ),
                timeout,
            )  # fmt: skip
        except (OSError, TimeoutError) as err:
            raise PeerError(f"net agent {self.label}: cannot reach peer {peer}: {err}") from err
        if self.state is not AgentState.RUNNING or self._forward is not None:
            link.close()  # stopped, or another forward won the race while we connected
            self._require(AgentState.RUNNING)
            winner = self._forward.peer if self._forward is not None else "?"
            raise StateError(f"net agent {self.label} already forwards to {winner}")
        if link not in self._peers:  # gone already
            raise PeerError(f"net agent {self.label}: peer {peer} went away at once")
        forward = self._forward = _Forward(peer, link)
        handed_over = 0
        hold, self._hold = self._hold, None
        if hold is not None:
            if hold.timer is not None:
                hold.timer.cancel()
            for frame in hold.frames:
                if link.send(frame):
                    handed_over += 1
                else:
                    self._lose(LostReason.PEER)
            forward.frames += handed_over
            if handed_over:
                forward.last_at = time.time()
            self.net_frames_forwarded += handed_over
        link.log.info(
            "forwarding uplink frames to the peer (%d held frames handed over)", handed_over
        )
        return handed_over

    async def stop_forward(self) -> StopForwardAnswer:
        """Deliver uplink frames to the local VM again; close the link once it has sent
        what it queued."""
        forward = self._forward
        if forward is None:
            raise StateError(f"net agent {self.label} is not forwarding")
        self._forward = None
        forward.link.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(forward.link.closed), 5.0)
        forward.link.log.info("forwarding stopped after %d frames", forward.frames)
        return StopForwardAnswer(peer=forward.peer, frames=forward.frames)

    # -- swapping the uplink -----------------------------------------------------------------

    async def swap_uplink(self, new: Uplink) -> Uplink:
        """Make ``new`` the uplink without losing or reordering a frame: hold, stop the old
        one, take the frames still queued in it, start the new one, release.  Returns the
        old uplink, closed."""
        self._require(AgentState.RUNNING)
        async with self._swap_lock:
            was_held = self._hold is not None
            if not was_held:
                self.hold(reason="swap")
            old = self.uplink
            old.stop_reading()
            for frame in old.drain():
                self._frame_from_uplink(frame)
            self.uplink = new
            new.start(self._frame_from_uplink)
            if not was_held:
                self.release()
        await old.close()
        log.info("[%s] uplink %r replaced by %r", self.label, old, new)
        return old

    # -- stopping ----------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop forwarding, drop every connection, let go of the uplink."""
        if self.state in (AgentState.STOPPING, AgentState.STOPPED):
            return
        self.state = AgentState.STOPPING
        if self._hold is not None:
            if self._hold.timer is not None:
                self._hold.timer.cancel()
            self.lost[LostReason.NO_VM.value] += len(self._hold.frames)
            self._hold = None
        self._forward = None
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connector
        for server in self._servers:
            server.close()
        links = [*self._peers, *([self.vm_link] if self.vm_link else [])]
        for link in links:
            link.close()
        if links:
            await asyncio.wait([asyncio.ensure_future(link.closed) for link in links], timeout=5)
        for server in self._servers:
            await server.wait_closed()
        self.uplink.stop_reading()
        await self.uplink.close()
        self.state = AgentState.STOPPED
        log.info("[%s] stopped", self.label)

    # -- figures -----------------------------------------------------------------------------

    def stats(self) -> NetStatus:
        """The figures ``GET /status`` answers."""
        hold, forward = self._hold, self._forward
        return NetStatus(
            vm=self.vm,
            nic=self.nic,
            state=self.state.value,
            uplink=self.uplink.describe(),
            vm_socket=str(self.vm_socket) if self.vm_socket else None,
            vm_connected=self.vm_link is not None,
            vm_connects=self.vm_connects,
            peer_addresses=list(self.peer_addresses),
            peers=len(self._peers),
            held=hold is not None,
            hold=None if hold is None else hold.status(),
            forward=None if forward is None else forward.status(),
            counters=dict(self.counters),
            net_frames_buffered=self.net_frames_buffered,
            net_frames_forwarded=self.net_frames_forwarded,
            net_frames_lost=self.net_frames_lost,
            delivered_from_hold=self.delivered_from_hold,
            lost=dict(self.lost),
            bad_frames={role: dict(reasons) for role, reasons in self.bad.items()},
            pid=os.getpid(),
        )
