"""Where a host's VM NICs go, and what address and MAC each guest gets (pure).

A host that may give VMs NICs is started with a **guest network**: the bridge its VM taps
join (in a lab, the bridge in the host's namespace that also holds its ``eth0``) and the
block of addresses of the lab's subnet its VMs get: :func:`guest_block` splits the lab's
guest range (.100 to .199) between its hosts, so two hosts never hand out one address.

A VM keeps its address wherever it migrates, and its home host does not learn when it
stops elsewhere: :class:`AddressLedger` remembers (in a file, across daemon restarts) the
addresses of the block that VMs which migrated away still use, so they are never handed out
again, until such a VM comes back.

Used by the daemon (which addresses its VMs get) and by the lab (each host's block): it
imports nothing of either.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from devagent.errors import StateError, UsageError

#: The part of a lab's /24 its guests get addresses from (.100 to .199).
GUEST_RANGE = (100, 200)
TAP_PREFIX = "dt"


@dataclass(frozen=True)
class GuestNetwork:
    """Where this host's VM NICs go: ``bridge`` (in this host's network namespace), and the
    addresses ``first``..``last`` of ``prefix``-long network its guests get."""

    bridge: str
    first: ipaddress.IPv4Address
    last: ipaddress.IPv4Address
    prefix: int

    @classmethod
    def parse(cls, bridge: str, block: str) -> GuestNetwork:
        """``block`` is ``FIRST-LAST/PREFIX``, e.g. ``10.213.7.100-10.213.7.132/24``."""
        try:
            span, _, prefix = block.partition("/")
            first, _, last = span.partition("-")
            network = cls(
                bridge, ipaddress.IPv4Address(first), ipaddress.IPv4Address(last), int(prefix)
            )
        except ValueError as err:
            raise UsageError(f"bad guest address block {block!r}: {err}") from err
        if network.first > network.last or not 8 <= network.prefix <= 30:
            raise UsageError(f"bad guest address block {block!r}: FIRST-LAST/PREFIX")
        return network

    def describe(self) -> str:
        return f"{self.first}-{self.last}/{self.prefix}"


def guest_block(
    subnet: ipaddress.IPv4Network, index: int, hosts: int
) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None:
    """The addresses host number ``index`` (0-based) of ``hosts`` hands to its guests: an
    equal share of the subnet's guest range, or None when the subnet has no such range."""
    low, high = GUEST_RANGE
    if subnet.num_addresses < high + 1 or not 0 <= index < hosts:
        return None
    share = (high - low) // hosts
    if share < 1:
        return None
    base = subnet.network_address + low + index * share
    return base, base + share - 1


def pick_address(
    network: GuestNetwork, used: Iterable[ipaddress.IPv4Address]
) -> ipaddress.IPv4Address:
    """The lowest address of the block not in ``used``."""
    taken = set(used)
    address = network.first
    while address <= network.last:
        if address not in taken:
            return address
        address += 1
    raise StateError(
        f"no guest address left in {network.describe()}: every one is in use on this host"
    )


class AddressLedger:
    """The addresses (``ADDR/PREFIX``) of this host's block that VMs which migrated away
    still use, kept in ``path`` (a JSON list)."""

    def __init__(self, path: Path):
        self.path = path
        self._lent: set[str] = set()
        with contextlib.suppress(OSError, ValueError, TypeError):
            self._lent = {str(a) for a in json.loads(path.read_text())}

    @property
    def lent(self) -> frozenset[str]:
        return frozenset(self._lent)

    def lend(self, *addresses: str) -> None:
        """VMs that migrated away use ``addresses``."""
        self._update(self._lent | set(addresses))

    def take_back(self, *addresses: str) -> None:
        """VMs that use ``addresses`` arrived here again."""
        self._update(self._lent - set(addresses))

    def pick(self, network: GuestNetwork, in_use: Iterable[str]) -> ipaddress.IPv4Address:
        """A new VM's address: the lowest of the block that no VM here uses (``in_use``,
        ``ADDR/PREFIX``) and none that migrated away took along."""
        taken = [ipaddress.IPv4Interface(a).ip for a in (*in_use, *self._lent)]
        return pick_address(network, taken)

    def _update(self, lent: set[str]) -> None:
        if lent == self._lent:
            return
        self._lent = lent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(lent)))
        tmp.replace(self.path)


def mac_for(address: ipaddress.IPv4Address) -> str:
    """A locally administered MAC made of the address's last three bytes (QEMU's 52:54:00
    prefix), so that the lab's addresses and MACs are unique together."""
    last = address.packed[1:]
    return "52:54:00:" + ":".join(f"{b:02x}" for b in last)


def tap_name(vm: str, nic: str) -> str:
    """A tap name for ``vm``'s ``nic`` under the kernel's 15-byte limit."""
    return f"{TAP_PREFIX}{zlib.crc32(f'{vm}/{nic}'.encode()):08x}{nic[-1:]}"
