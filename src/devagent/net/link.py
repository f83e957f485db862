"""One framed stream connection of a net agent: QEMU's stream netdev, or a peer agent.

A :class:`Link` is an ``asyncio.Protocol``: it decodes the 4-byte-length framing with
:class:`~devagent.net.codec.FrameDecoder`, hands each whole frame to its owner, counts and
logs what it drops as bad (closing the connection when the stream itself is broken), and
sends frames with a bound on what may queue. What to do with a frame, and with a link that
comes or goes, is its owner's business (:class:`LinkOwner`, in practice
:class:`~devagent.net.agent.NetAgent`): this module knows nothing of holds or forwarding.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import MutableMapping
from typing import Any, Protocol

from devagent.net.codec import (
    NEED_DATA,
    Bytes,
    Closed,
    Dropped,
    DropReason,
    Frame,
    FrameDecoder,
    StreamProtocolError,
    frame_header,
)
from devagent.tls import Tls, peer_of_transport

log = logging.getLogger("devagent.net.agent")


class LinkRole(enum.Enum):
    VM = "vm"  # the connection to QEMU's stream netdev
    PEER = "peer"  # a connection from or to another agent


class LinkOwner(Protocol):
    """What a link needs of the agent it serves."""

    label: str
    link_backlog: int

    def link_up(self, link: Link) -> None: ...

    def link_down(self, link: Link, exc: Exception | None) -> None: ...

    def count_bad(self, role: LinkRole, reason: DropReason) -> None: ...

    def frame_from_link(self, link: Link, frame: bytes) -> None: ...


class _LinkAdapter(logging.LoggerAdapter[logging.Logger]):
    """Prefixes each record with the VM/NIC and the link."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        where = self.extra["where"] if self.extra else "?"
        return f"[{where}] {msg}", kwargs


class Link(asyncio.Protocol):
    """One framed stream connection: QEMU's, or a peer agent's."""

    def __init__(
        self, agent: LinkOwner, role: LinkRole, name: str, admit: Tls | None = None
    ) -> None:
        self.agent = agent
        self.role = role
        self.name = name
        self.admit = admit  # a TLS peer link's server side: whose certificates it admits
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.log: logging.LoggerAdapter[logging.Logger] = _LinkAdapter(
            log, {"where": f"{agent.label} {role.value} {name}"}
        )
        self.sent_frames = 0
        self.dropped = 0  # frames of this link's peer dropped as bad (logged once, then summed)

    # -- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.name = f"{peer[0]}:{peer[1]}"
            self.log.extra = {"where": f"{self.agent.label} {self.role.value} {self.name}"}
        if self.admit is not None:
            refusal = self.admit.refusal(peer_of_transport(transport))
            if refusal is not None:
                self.log.warning("closing: %s", refusal)
                transport.abort()  # never up: its owner never hears of it
                return
        self.agent.link_up(self)

    def data_received(self, data: bytes) -> None:
        self.decoder.receive_data(data)
        self._pump()

    def eof_received(self) -> bool:
        self.decoder.receive_data(b"")
        self._pump()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.dropped > 1:
            self.log.warning("%d bad frames dropped on this connection in all", self.dropped)
        self.agent.link_down(self, exc)
        if not self.closed.done():
            self.closed.set_result(None)

    # -- frames ------------------------------------------------------------------------------

    def _pump(self) -> None:
        while True:
            try:
                event = self.decoder.next_event()
            except StreamProtocolError as err:
                self.agent.count_bad(self.role, err.reason)
                self.log.warning("closing: %s", err)
                if self.transport is not None:
                    self.transport.abort()
                return
            if event is NEED_DATA or isinstance(event, Closed):
                return
            if isinstance(event, Dropped):
                self.agent.count_bad(self.role, event.reason)
                self.dropped += 1
                self.log.log(
                    logging.WARNING if self.dropped == 1 else logging.DEBUG,
                    "dropped a %s frame (declared %s bytes, %d came)",
                    event.reason.value,
                    event.length,
                    event.received,
                )
            elif isinstance(event, Frame):
                self.agent.frame_from_link(self, event.data)

    def send(self, frame: Bytes) -> bool:
        """Queue one frame; False when the link is gone or its backlog is full."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if transport.get_write_buffer_size() + len(frame) > self.agent.link_backlog:
            return False
        transport.writelines((frame_header(len(frame)), frame))
        self.sent_frames += 1
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
