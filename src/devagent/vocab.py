"""The words every layer shares: sizes, link rates, addresses and migration strategies.

This module imports nothing of devagent but its errors, so the CLI, the lab, the daemons and
the agents can all read ``"1G"``, ``"100mbit"``, ``"tcp:HOST:PORT"`` or ``"hybrid"`` the same
way without importing each other. Each ``parse_*`` raises :class:`UsageError` with the bad
text in it; each ``format_*`` is its inverse where one exists.
"""

from __future__ import annotations

import re
from enum import StrEnum

from devagent.errors import UsageError

# -- sizes: powers of 1024 -------------------------------------------------------------------

_SIZE_RE = re.compile(r"(\d+)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(value: str | int) -> int:
    """Bytes from ``4096``, ``4K``, ``256M``, ``1G`` (also ``KiB``, ``MB``: powers of
    1024). A plain ``int`` is bytes already."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE_RE.fullmatch(str(value).strip())
    if match is None:
        raise UsageError(f"size {value!r} is not a number with an optional K, M or G suffix")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def format_size(size: int) -> str:
    """``4096`` → ``4 KiB``; sizes that are not whole units stay in bytes."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


# -- link rates: decimal bits per second, as tc writes them ----------------------------------

RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|tbit)?\s*$", re.IGNORECASE)
MIN_RATE_BPS = 8_000
MAX_RATE_BPS = 100 * 10**9


def parse_rate(text: str | int) -> int:
    """``"100mbit"`` → ``100_000_000`` bits/s. Units are decimal (tc's): bit, kbit, mbit, gbit,
    tbit; a bare number is bits/s. Raises :class:`UsageError` for anything else."""
    if isinstance(text, int):
        value = float(text)
    else:
        match = _RATE_RE.match(text)
        if not match:
            raise UsageError(
                f"bad link rate {text!r}: give a number and a unit among "
                f"{', '.join(RATE_UNITS)} (e.g. 100mbit, 1gbit)"
            )
        value = float(match.group(1)) * RATE_UNITS[(match.group(2) or "bit").lower()]
    bps = int(value)
    if not MIN_RATE_BPS <= bps <= MAX_RATE_BPS:
        raise UsageError(
            f"link rate {text!r} is out of range ({format_rate(MIN_RATE_BPS)}"
            f"..{format_rate(MAX_RATE_BPS)})"
        )
    return bps


def format_rate(bps: int) -> str:
    """``100_000_000`` → ``"100mbit"`` (the largest unit that divides exactly)."""
    for unit, factor in sorted(RATE_UNITS.items(), key=lambda kv: -kv[1]):
        if bps % factor == 0:
            return f"{bps // factor}{unit}"
    return f"{bps}bit"


# -- addresses ---------------------------------------------------------------------------------


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) into its parts; an empty host is 127.0.0.1."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_address(address: str) -> tuple[str, str, int]:
    """An agent's address, ``tcp:HOST:PORT`` or ``unix:/path``, into (kind, host or path,
    port); a unix address has port 0."""
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return "unix", rest, 0
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        if sep and host and port.isdigit() and 0 < int(port) < 65536:
            return "tcp", host.strip("[]"), int(port)
    raise UsageError(f"expected tcp:HOST:PORT or unix:/PATH, got {address!r}")


# -- migration strategies ----------------------------------------------------------------------


class Strategy(StrEnum):
    """How a migration moves the VM's disk; RAM always moves with QEMU's own migration.

    devagent's four go through the device agents; the three ``qemu-*`` are QEMU's own storage
    migration, run side by side in the benchmarks as baselines.
    """

    SHARED = "shared"  # both hosts see one image: RAM only
    POSTCOPY = "postcopy"  # the destination fetches the disk after the switchover
    PRECOPY = "precopy"  # the source mirrors the disk before RAM moves
    HYBRID = "hybrid"  # a push before, a fetch of what is left after
    QEMU_MIRROR = "qemu-mirror"  # blockdev-mirror to an NBD export, then RAM
    QEMU_MIRROR_ACTIVE = "qemu-mirror-active"  # the same, copy-mode=write-blocking
    QEMU_COR_STREAM = "qemu-cor-stream"  # copy-on-read overlay + block-stream

    @property
    def is_baseline(self) -> bool:
        return self.value.startswith("qemu-")

    @classmethod
    def parse(cls, text: str) -> Strategy:
        try:
            return cls(text)
        except ValueError:
            raise UsageError(
                f"storage {text!r} is not available: choose one of {', '.join(cls)}"
            ) from None


#: devagent's own strategies, in the order the CLI lists them.
STRATEGIES: tuple[Strategy, ...] = tuple(s for s in Strategy if not s.is_baseline)
#: QEMU's own storage migration, the benchmarks' baselines.
BASELINES: tuple[Strategy, ...] = tuple(s for s in Strategy if s.is_baseline)


class Step(StrEnum):
    """A migration's steps as its report's ``timeline`` names them (seconds from the migrate
    command), in the order they happen (but ``destination_ready``, which comes before
    ``mirror_started`` for ``hybrid``, after it for ``precopy``, whose mirror starts while
    the destination's QEMU starts; and on a fast link ``hybrid``'s ``receivers_started``
    and ``mirror_started``, which come after ``ram_started``: its push begins once RAM
    leaves it room, if ever); the plot draws its phases from them. The destination's own
    steps come back prefixed ``destination_``."""

    #: hybrid on a fast link: the receivers its push asked for as it began (once RAM left
    #: it room) serve on the destination
    RECEIVERS_STARTED = "receivers_started"
    #: precopy, hybrid: the push began (precopy's once the destination's receivers serve,
    #: its QEMU maybe still starting; hybrid's once that QEMU listens)
    MIRROR_STARTED = "mirror_started"
    DESTINATION_READY = "destination_ready"  # the incoming QEMU (and agents) listen
    #: precopy: the guest dirtied the disk faster than the mirror copied it (or the passes
    #: ran out); from here its writes go to both copies, at the link's pace (the report's
    #: ``io_rate_ratio`` says how much that slowed it).
    DISK_WRITES_PACED = "disk_writes_paced"
    DISK_CONVERGED = "disk_converged"  # precopy: little left to copy, writes go to both
    RAM_STARTED = "ram_started"
    SOURCE_STOPPED = "source_stopped"  # QEMU stopped the guest on the source (its STOP)
    NET_HELD = "net_held"  # the source's NICs keep the frames for the guest
    RAM_COMPLETED = "ram_completed"
    MIRROR_ENDED = "mirror_ended"  # the push stopped (hybrid) or cut over (precopy)
    SOURCE_FENCED = "source_fenced"  # the old instance can never write the disk again
    NET_FORWARD_STARTED = "net_forward_started"
    RESUMED = "resumed"  # the guest runs on the destination
    COMMITTED = "committed"  # the destination answered the commit
    NET_ANNOUNCED_AGAIN = "net_announced_again"  # the destination's first announce was doubtful
    NET_FORWARD_STOPPED = "net_forward_stopped"
    DISK_LOCAL = "disk_local"  # each replica serves alone there: the disks' point of no return
    #: The destination needs nothing of the source any more: no byte of the VM's devices
    #: there that it still reads, no frame still to forward (``total_time_s`` ends here).
    RELEASED = "released"
    SOURCE_CLEANED = "source_cleaned"  # the source's QEMU, agents and copy of the VM gone


class DestinationStep(StrEnum):
    """The destination's steps of a commit, on its own clock (wall clock, same machine)."""

    COMMIT = "commit"  # the commit request came
    ARRIVED = "arrived"  # QEMU left ``inmigrate``
    RECEIVER_RETIRED = "receiver_retired"  # a push's receiver finished and closed
    DISK_SWAPPED = "disk_swapped"  # the agent serves the replica (Fetch or Local)
    NIC_RELEASED = "nic_released"  # the held frames went to the guest
    NIC_ANNOUNCED = "nic_announced"  # QEMU announced the guest's MAC
