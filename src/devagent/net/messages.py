"""Every message of a net agent's control API (:mod:`devagent.net.control`), as declared
types (msgspec Structs), in the style of the block agent's (:mod:`devagent.agent.messages`).

A request body is decoded once, at the HTTP edge (:func:`decode`), into one of the request
types below; a bad body becomes a :class:`UsageError` naming the field's path
(``Expected `int` >= 1, got `0` - at `$.max_frames```). Answers are Structs too, encoded as
the same JSON objects as ever; the daemon decodes them with :func:`devagent.wire.convert`.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec

from devagent.errors import DevagentError
from devagent.vocab import parse_hostport

T = TypeVar("T")

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]

#: Defaults of a hold: enough for a few seconds of a busy guest NIC, bounded.
HOLD_MAX_FRAMES = 4096
HOLD_MAX_BYTES = 8 << 20

# -- requests ---------------------------------------------------------------------------


class HoldRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /hold``: keep the frames for the VM, up to these bounds."""

    max_frames: PositiveInt = HOLD_MAX_FRAMES
    max_bytes: PositiveInt = HOLD_MAX_BYTES


class ForwardRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /forward``: send the uplink's frames to the peer agent at ``peer``
    (``HOST:PORT``, or ``tcp:HOST:PORT`` as the agents report their addresses)."""

    peer: str

    def __post_init__(self) -> None:
        try:
            parse_hostport(self.peer.removeprefix("tcp:"))
        except DevagentError as err:
            raise ValueError(f"peer: {err}") from None

    def hostport(self) -> tuple[str, int]:
        return parse_hostport(self.peer.removeprefix("tcp:"))


class TapSpec(msgspec.Struct, tag="tap", tag_field="kind", forbid_unknown_fields=True):
    """An uplink: an existing tap device of this host."""

    name: Annotated[str, msgspec.Meta(min_length=1)]


UplinkSpec = TapSpec  # the only kind so far; a union (tag ``kind``) once there are more


class SwapRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /swap``: make the uplink ``uplink`` describes the agent's."""

    uplink: UplinkSpec


# -- answers ----------------------------------------------------------------------------


class UplinkStatus(msgspec.Struct, omit_defaults=True):
    """An uplink's figures (``Uplink.describe``); ``failed`` only for a tap."""

    kind: str
    name: str
    rx_frames: int
    rx_bytes: int
    tx_frames: int
    tx_bytes: int
    tx_dropped: int
    failed: str | None = None  # why a tap stopped being read, for good


class HoldStatus(msgspec.Struct):
    reason: str
    since: float
    frames: int
    bytes: int
    max_frames: int
    max_bytes: int


class ForwardStatus(msgspec.Struct):
    peer: str
    since: float
    frames: int
    #: Wall clock of the last unicast frame sent to the peer (see ``net.agent._Forward``).
    last_unicast_at: float | None


class NetStatus(msgspec.Struct):
    """``GET /status``: the agent's figures. ``counters`` are frames and bytes each way
    (``from_vm_frames``, ``to_uplink_bytes``…), ``lost`` the lost frames by reason,
    ``bad_frames`` the mangled ones by kind of link and reason."""

    vm: str
    nic: str
    state: str
    uplink: UplinkStatus
    vm_socket: str | None
    vm_connected: bool
    vm_connects: int
    peer_addresses: list[str]
    peers: int
    held: bool
    hold: HoldStatus | None
    forward: ForwardStatus | None
    counters: dict[str, int]
    net_frames_buffered: int
    net_frames_forwarded: int
    net_frames_lost: int
    delivered_from_hold: int
    lost: dict[str, int]
    bad_frames: dict[str, dict[str, int]]
    pid: int


class HoldAnswer(msgspec.Struct):
    held: bool
    hold: HoldStatus | None


class ReleaseAnswer(msgspec.Struct):
    delivered: int
    lost: int
    held_s: float


class ForwardAnswer(msgspec.Struct):
    forwarding: str
    handed_over: int


class StopForwardAnswer(msgspec.Struct):
    peer: str
    frames: int


class SwapAnswer(msgspec.Struct):
    old: str
    new: str


class StopAnswer(msgspec.Struct):
    stopping: bool
