"""Uplinks: where a VM NIC's frames really go, behind one small interface.

An :class:`Uplink` delivers the frames it receives from the network to a callback and sends
frames to the network.  :class:`TapUplink` is a Linux tap device (``/dev/net/tun`` with
``IFF_TAP | IFF_NO_PI``: one ``read`` is one Ethernet frame, no packet-info header).  The
agent attaches to a tap that already exists; whoever created it put it on a bridge, and it
outlives the agent (``ip tuntap add ... mode tap``), so an agent restart or an uplink swap
never changes the host's network.  :class:`MemoryUplink` is the fake: frames in and out of
Python lists, for unit tests of the agent without the kernel.

``stop_reading`` followed by ``drain`` is how a swap loses nothing: the frames already queued
in the old tap are read out before it is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable

import msgspec

from devagent.errors import EnvironmentProblem, NotFound, StateError, UsageError
from devagent.net.codec import Bytes, Limit
from devagent.net.messages import UplinkSpec, UplinkStatus
from devagent.wire import convert

log = logging.getLogger(__name__)

Deliver = Callable[[bytes], None]

#: ``linux/if_tun.h``: the ioctl and the flags of a tap without packet information.
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
#: ``struct ifreq``: the name, then the flags (the rest of the union is padding).
IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")
#: Frames read from a tap per wake-up, so that one busy tap cannot starve the loop.
READ_BATCH = 64


class Uplink(ABC):
    """The network side of one VM NIC."""

    name: str

    def __init__(self) -> None:
        self.stats: dict[str, int] = {
            "rx_frames": 0,
            "rx_bytes": 0,
            "tx_frames": 0,
            "tx_bytes": 0,
            "tx_dropped": 0,
        }

    @abstractmethod
    def start(self, deliver: Deliver) -> None:
        """Begin handing each frame received from the network to ``deliver``."""

    @abstractmethod
    def stop_reading(self) -> None:
        """Stop calling ``deliver``; frames that arrive meanwhile wait (see ``drain``)."""

    @abstractmethod
    def drain(self) -> list[bytes]:
        """The frames received but not delivered yet (after ``stop_reading``)."""

    @abstractmethod
    def send(self, frame: Bytes) -> bool:
        """Send one frame to the network; False (and counted) if it was dropped."""

    @abstractmethod
    async def close(self) -> None:
        """Let go of the device; idempotent."""

    def describe(self) -> UplinkStatus:
        stats = self.stats
        return UplinkStatus(
            kind=type(self).__name__, name=self.name, rx_frames=stats["rx_frames"],
            rx_bytes=stats["rx_bytes"], tx_frames=stats["tx_frames"],
            tx_bytes=stats["tx_bytes"], tx_dropped=stats["tx_dropped"],
        )  # fmt: skip

    def _received(self, frame: bytes) -> None:
        self.stats["rx_frames"] += 1
        self.stats["rx_bytes"] += len(frame)

    def _sent(self, frame: Bytes, ok: bool) -> bool:
        if ok:
            self.stats["tx_frames"] += 1
            self.stats["tx_bytes"] += len(frame)
        else:
            self.stats["tx_dropped"] += 1
        return ok


class TapUplink(Uplink):
    """An existing Linux tap device, opened through ``/dev/net/tun``."""

    def __init__(self, name: str, *, tun_path: str = "/dev/net/tun") -> None:
        super().__init__()
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
            raise UsageError(f"bad tap name {name!r} (1 to {IFNAMSIZ - 1} bytes, no '/')")
        self.name = name
        try:  # TUNSETIFF would make a new, unbridged tap of a name that does not exist
            socket.if_nametoindex(name)
        except OSError as err:
            raise NotFound(f"no network interface {name!r} in this namespace") from err
        try:
            fd = os.open(tun_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise EnvironmentProblem(f"{tun_path} is missing: no tap devices here") from err
        except OSError as err:
            raise EnvironmentProblem(f"cannot open {tun_path}: {err}") from err
        try:
            fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(name.encode(), IFF_TAP | IFF_NO_PI))
        except OSError as err:
            os.close(fd)
            if err.errno == errno.EBUSY:
                raise StateError(f"tap {name} is in use by another process") from err
            raise UsageError(f"cannot attach to {name} as a tap: {err}") from err
        self._fd: int | None = fd
        self.failed: str | None = None  # why reading stopped for good
        self._deliver: Deliver | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"TapUplink({self.name!r})"

    def start(self, deliver: Deliver) -> None:
        if self._fd is None:
            raise UsageError(f"tap {self.name} is closed")
        self._deliver = deliver
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._readable)

    def stop_reading(self) -> None:
        if self._loop is not None and self._fd is not None:
            self._loop.remove_reader(self._fd)
        self._deliver = None

    def _read_some(self, limit: int) -> list[bytes]:
        frames: list[bytes] = []
        while self._fd is not None and len(frames) < limit:
            try:
                frame = os.read(self._fd, Limit.MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:  # the tap was deleted under us, say
                log.error("tap %s: read failed, no more frames from it: %s", self.name, err)
                self.failed = str(err)
                self.stop_reading()
                break
            if not frame:
                break
            self._received(frame)
            frames.append(frame)
        return frames

    def _readable(self) -> None:
        for frame in self._read_some(READ_BATCH):
            if self._deliver is not None:
                self._deliver(frame)

    def drain(self) -> list[bytes]:
        return self._read_some(1 << 20)

    def send(self, frame: Bytes) -> bool:
        if self._fd is None:
            return self._sent(frame, False)
        try:
            written = os.write(self._fd, frame)
        except (BlockingIOError, InterruptedError):
            return self._sent(frame, False)
        except OSError as err:
            log.debug("tap %s: write failed: %s", self.name, err)
            return self._sent(frame, False)
        return self._sent(frame, written == len(frame))

    def describe(self) -> UplinkStatus:
        return msgspec.structs.replace(super().describe(), failed=self.failed)

    async def close(self) -> None:
        self.stop_reading()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class MemoryUplink(Uplink):
    """The fake uplink: ``inject`` plays the network sending a frame, ``sent`` is what the
    agent sent to it.  While reading is stopped, injected frames queue (as in a tap)."""

    def __init__(self, name: str = "memory") -> None:
        super().__init__()
        self.name = name
        self.sent: list[bytes] = []
        self.queued: list[bytes] = []
        self.closed = False
        self.accept = True  # False: every send is dropped (a full device)
        self._deliver: Deliver | None = None

    def __repr__(self) -> str:
        return f"MemoryUplink({self.name!r})"

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        queued, self.queued = self.queued, []
        for frame in queued:
            deliver(frame)

    def stop_reading(self) -> None:
        self._deliver = None

    def inject(self, frame: bytes, *, read_now: bool = True) -> None:
        """A frame arrives from the network; with ``read_now=False`` it waits in the device
        (as in a tap whose reader has not run yet) until the next frame read or ``drain``."""
        self._received(frame)
        self.queued.append(frame)
        if read_now and self._deliver is not None:
            queued, self.queued = self.queued, []
            for waiting in queued:
                self._deliver(waiting)

    def drain(self) -> list[bytes]:
        queued, self.queued = self.queued, []
        return queued

    def send(self, frame: Bytes) -> bool:
        if self.closed or not self.accept:
            return self._sent(frame, False)
        self.sent.append(bytes(frame))
        return self._sent(frame, True)

    async def close(self) -> None:
        self._deliver = None
        self.closed = True


def check_uplink_spec(spec: object, where: str = "uplink") -> UplinkSpec:
    """An uplink description as JSON (``{"kind": "tap", "name": "tap0"}``) as its type, or
    :class:`UsageError` naming what is wrong."""
    return convert(spec, UplinkSpec, what=f'{where} (expected {{"kind": "tap", "name": NAME}})')


def open_uplink(spec: UplinkSpec) -> Uplink:
    """Open the tap ``spec`` names."""
    return TapUplink(spec.name)
