"""Addresses a new lab may take without clashing: its /24 subnet (namespace mode), its
loopback ports (loopback mode), and the block of each host's subnet its guests get.

It reads the other labs' state files and the machine's own networks; it makes nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import zlib

import msgspec

from devagent.errors import EnvironmentProblem, UsageError
from devagent.guestnet import guest_block
from devagent.lab import net
from devagent.lab.layout import lab_names, labs_root

DAEMON_PORT = 7480
LOOPBACK_ADDRESS = "127.0.0.1"
LOOPBACK_FIRST_PORT = 7481
SUBNET_BASE = "10.213"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK_ADDRESS, port))
        except OSError:
            return False
    return True


class TakenPort(msgspec.Struct):
    port: int


class OtherLab(msgspec.Struct):
    """What another lab's state file says it holds: its subnet, its hosts' ports."""

    subnet: str | None = None
    hosts: list[TakenPort] = msgspec.field(default_factory=list)


def other_labs(skip: str) -> list[OtherLab]:
    """What every lab but ``skip`` holds (the state files that can be read)."""
    found = []
    for name in lab_names():
        if name == skip:
            continue
        with contextlib.suppress(OSError, msgspec.DecodeError):
            found.append(msgspec.json.decode((labs_root() / name / "lab.json").read_bytes(),
                                             type=OtherLab))  # fmt: skip
    return found


def choose_subnet(name: str, hosts: int, given: str | None) -> ipaddress.IPv4Network:
    """``given`` if it is free and big enough, else a free /24 of ``SUBNET_BASE``.0.0/16
    (the first after one derived from the lab's name)."""
    used = net.used_ipv4_networks()
    for other in other_labs(skip=name):
        if other.subnet is not None:
            with contextlib.suppress(ValueError):
                used.append(ipaddress.IPv4Network(other.subnet))
    if given is not None:
        try:
            subnet = ipaddress.IPv4Network(given)
        except ValueError as err:
            raise UsageError(f"bad subnet {given!r}: {err}") from err
        if subnet.num_addresses < hosts + 4:
            raise UsageError(f"subnet {subnet} is too small for {hosts} hosts and a bridge")
        clash = [str(other) for other in used if subnet.overlaps(other)]
        if clash:
            raise UsageError(f"subnet {subnet} overlaps networks in use: {', '.join(clash)}")
        return subnet
    start = zlib.crc32(name.encode()) % 256
    for step in range(256):
        subnet = ipaddress.IPv4Network(f"{SUBNET_BASE}.{(start + step) % 256}.0/24")
        if not any(subnet.overlaps(other) for other in used):
            return subnet
    raise EnvironmentProblem(f"no free /24 left in {SUBNET_BASE}.0.0/16 for lab {name!r}")


def free_loopback_ports(name: str, count: int) -> list[int]:
    """``count`` ports on 127.0.0.1 that no other lab records and nothing listens on."""
    taken: set[int] = set()
    for lab in other_labs(skip=name):
        taken.update(host.port for host in lab.hosts)
    ports: list[int] = []
    for port in range(LOOPBACK_FIRST_PORT, 65536):
        if port not in taken and _port_free(port):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise EnvironmentProblem("no free TCP ports on 127.0.0.1 for a loopback lab")


def guest_addresses(subnet: ipaddress.IPv4Network, index: int, hosts: int) -> str | None:
    """The addresses host number ``index`` of ``hosts`` gives its guests
    (``FIRST-LAST/PREFIX``), or None when the subnet leaves it none."""
    block = guest_block(subnet, index, hosts)
    if block is None:
        return None
    return f"{block[0]}-{block[1]}/{subnet.prefixlen}"
