"""The NICs' part of a live migration, as the source daemon runs it beside the disk's.

The order (each step on the report's timeline)::

    destination   tap + net agent, held from its start ......................... release,
                  (frames for the guest wait there)                              announce
    source        pause-before-switchover; at STOP: hold (net_held) ─ forward ─ stop forwarding
                  at pre-switchover: migrate-continue  (net_forward_started) (net_forward_stopped)

* While RAM migrates the guest's frames flow through the source's agent as always.
* QEMU stops the guest (its ``STOP`` event) and pauses before the switchover
  (``pause-before-switchover``): the source's agent holds what arrives for the guest from
  the ``STOP`` on (or at the pause at the latest), and QEMU is told to continue
  (:mod:`.ram`).  Frames
  the agent handed QEMU just before it stopped the guest and that QEMU never read stay in
  the old QEMU's socket and go with it: TCP resends them; a ping there goes unanswered.
* Once QEMU completed, the guest will run on the destination only: the source's agent
  forwards its kept frames, then everything its tap still receives, to the destination's
  agent (still held: the guest does not run there yet).
* The destination resumes the guest, releases its agent (its kept frames in order) and has
  QEMU announce the guest's MAC (``announce-self``); the bridges learn the guest's new port.
* The destination's announce may have been lost: one made while the source could not
  reach the destination (the commit's answer came more than :data:`ANNOUNCE_TRUST_S` after
  it: a link cut), or one a restarted source daemon knows nothing of, may have gone
  nowhere, and the bridges would send the guest's frames to the source for as long as they
  remember it there (minutes). The source then asks the destination to announce again,
  now that it answers, and waits for quiet after that announce.
* The source stops forwarding when the network has learned the new place, by
  :func:`forwarding_done`: no unicast frame came to forward for :data:`QUIET_S` after the
  destination's announce, or :data:`MAX_FORWARD_S` after it whatever comes.  (Broadcast and
  multicast frames are forwarded too, but they reach the destination's own tap as well:
  they say nothing about where the bridges believe the guest is.)  Its agent and tap go
  with the source's release.

A failure before the switchover releases the source's agent (the guest runs on there, its
held frames delivered); the destination's agent and tap go with its incoming VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from devagent.api_types import Announced, Devices, NicRow
from devagent.daemon.migration.context import MigratingVm, NicLink, Peer
from devagent.errors import DevagentError, PeerError
from devagent.net.messages import ForwardAnswer, NetStatus, StopForwardAnswer
from devagent.report import MigrationReport
from devagent.vocab import DestinationStep, Step
from devagent.wire import from_peer

#: The network has learned the guest's new place once nothing came to forward for this
#: long after the destination's announce (QEMU's announce rounds come 50, 150, 300 ms in).
QUIET_S = 0.5
#: Forwarding stops at the latest this long after the announce (a chatty broadcast
#: neighbour must not keep the source busy for ever).
MAX_FORWARD_S = 10.0
#: An announce made longer than this before the source heard the commit's answer may have
#: gone into a cut link (QEMU's announce rounds take 1.25 s).
ANNOUNCE_TRUST_S = 1.0
POLL_S = 0.05
NET_MEASURES = ("net_frames_buffered", "net_frames_forwarded", "net_frames_lost")


def forwarding_done(
    now: float,
    announced_at: float,
    last_frame_at: float | None,
    *,
    quiet_s: float = QUIET_S,
    max_s: float = MAX_FORWARD_S,
) -> bool:
    """Whether the source may stop forwarding at ``now``: ``quiet_s`` passed since both the
    announce and the last unicast frame forwarded, or ``max_s`` since the announce."""
    if now - announced_at >= max_s:
        return True
    quiet_since = max(announced_at, last_frame_at or announced_at)
    return now - quiet_since >= quiet_s


class NetMigration:
    """The NICs of one migrating VM, on its source; the job calls it at each step."""

    def __init__(
        self,
        managed: MigratingVm,
        report: MigrationReport,
        mark: Callable[..., None],
        log: logging.Logger,
    ) -> None:
        self.managed = managed
        self.report = report
        self.mark = mark
        self.log = log
        self.before: dict[str, NetStatus] = {}
        self.peers: dict[str, str] = {}
        self.held = False
        self.forwarding = False

    async def start(self) -> None:
        """The source agents' counters before the migration (the report counts from here)."""
        for nic in self.managed.nics:
            self.before[nic.node] = await _status(nic)

    def prepared(self, peers: dict[str, str]) -> None:
        """The destination's net agents, by NIC: where the frames go after the switchover."""
        for nic in self.managed.nics:
            peer = peers.get(nic.node)
            if not isinstance(peer, str):
                raise PeerError(f"the destination made no net agent for {nic.describe()}")
            self.peers[nic.node] = peer.removeprefix("tcp:")

    async def hold(self) -> None:
        """QEMU stopped the guest (its STOP event): keep what arrives for it from now."""
        if self.held:
            return
        for nic in self.managed.nics:
            await nic.call("POST", "/hold")
        self.held = True
        self.mark(Step.NET_HELD)

    async def switched_over(self) -> None:
        """The guest will run on the destination only: forward there, kept frames first."""
        for nic in self.managed.nics:
            try:
                raw = await nic.call("POST", "/forward", {"peer": self.peers[nic.node]})
                answer = from_peer(raw, ForwardAnswer, what=f"{nic.describe()}: its forward")
            except DevagentError as err:  # past the switchover: say it, go on
                self.log.error("%s cannot forward to %s: %s", nic.describe(), self.peers, err)
                continue
            self.log.info(
                "%s forwards to %s (%s kept frames handed over)",
                nic.describe(),
                self.peers[nic.node],
                answer.handed_over,
            )
            self.forwarding = True
        self.held = False
        self.mark(Step.NET_FORWARD_STARTED)

    async def finish(self, peer: Peer, steps: dict[str, float], heard_at: float) -> None:
        """After the destination announced the guest (and the source heard its commit at
        ``heard_at``): stop forwarding once the network has learned its place
        (:func:`forwarding_done`), then write the report's net figures."""
        announced_at = steps.get(DestinationStep.NIC_ANNOUNCED)  # none read back after a restart
        if announced_at is None or announced_at < heard_at - ANNOUNCE_TRUST_S:
            announced_at = await self._announce_again(peer, announced_at or heard_at)
        for nic in self.managed.nics:
            while True:
                forward = (await _status(nic)).forward
                if forward is None or forwarding_done(
                    time.time(), announced_at, forward.last_unicast_at
                ):
                    break
                await asyncio.sleep(POLL_S)
            if forward is not None:
                raw = await nic.call("POST", "/stop-forward")
                stopped = from_peer(raw, StopForwardAnswer, what=f"{nic.describe()}: its stop")
                self.log.info("%s stopped forwarding: %s", nic.describe(), stopped)
        self.forwarding = False
        self.mark(Step.NET_FORWARD_STOPPED)
        await self._figures(peer)

    async def _announce_again(self, peer: Peer, announced_at: float) -> float:
        """The destination's announce may have gone into a cut link: it announces again."""
        self.log.warning("VM %s: the destination announced it while it could not be reached: "
                         "asking for another announce", self.managed.name)  # fmt: skip
        try:
            raw = await peer.post(f"/v1/vms/{self.managed.name}/announce")
        except DevagentError as err:
            self.log.error("VM %s: the second announce failed: %s", self.managed.name, err)
            return announced_at
        self.mark(Step.NET_ANNOUNCED_AGAIN)
        return from_peer(raw, Announced, what="the destination's announce").announced_at

    async def _figures(self, peer: Peer) -> None:
        if any(nic.node not in self.before for nic in self.managed.nics):
            reason = "the counters before the migration died with a daemon that restarted"
            self.report.mark_missing(reason, *NET_MEASURES)
            return
        rows = {nic.node: self.report.device(nic.node, "nic") for nic in self.managed.nics}
        for nic in self.managed.nics:
            now, then, row = await _status(nic), self.before[nic.node], rows[nic.node]
            row.frames_buffered = now.net_frames_buffered - then.net_frames_buffered
            row.frames_forwarded = now.net_frames_forwarded - then.net_frames_forwarded
            row.frames_lost = now.net_frames_lost - then.net_frames_lost
            if now.hold is not None:  # it could not forward: what it keeps never reaches the guest
                row.frames_lost += now.hold.frames
            if now.net_frames_lost != then.net_frames_lost:
                self.log.warning("%s lost frames: %s", nic.describe(), now.lost)
        raw = await peer.get(f"/v1/vms/{self.managed.name}/devices")
        devices = from_peer(raw, Devices, what="the destination's devices").devices
        for device in devices:
            there = rows.get(device.device)
            if isinstance(device, NicRow) and device.agent is not None and there is not None:
                row = there
                agent = device.agent  # new for this migration: all its figures count
                row.frames_buffered = (row.frames_buffered or 0) + agent.net_frames_buffered
                row.frames_lost = (row.frames_lost or 0) + agent.net_frames_lost
                if agent.net_frames_lost:
                    self.log.warning("destination %s lost frames: %s", device.device, agent.lost)
        self.report.net_frames_buffered = sum(r.frames_buffered or 0 for r in rows.values())
        self.report.net_frames_forwarded = sum(r.frames_forwarded or 0 for r in rows.values())
        self.report.net_frames_lost = sum(r.frames_lost or 0 for r in rows.values())

    async def roll_back(self, *, unknown: bool = False) -> None:
        """Before the switchover: the guest stays here; deliver what was held for it.
        ``unknown``: a daemon that restarted cannot tell whether the agents hold or
        forward; both are undone (an agent with nothing to undo refuses: ignored)."""
        if unknown:
            self.held = self.forwarding = True
        for nic in self.managed.nics:
            if self.held:
                with contextlib.suppress(DevagentError):
                    await nic.call("POST", "/release")
            if self.forwarding:
                with contextlib.suppress(DevagentError):
                    await nic.call("POST", "/stop-forward")
        self.held = self.forwarding = False


async def _status(nic: NicLink) -> NetStatus:
    """A net agent's ``GET /status``, decoded."""
    raw = await nic.call("GET", "/status")
    return from_peer(raw, NetStatus, what=f"{nic.describe()}: its status")
