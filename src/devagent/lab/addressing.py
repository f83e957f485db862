"""Addresses a new lab may take without clashing: its /24 subnet (namespace mode), its
loopback ports (loopback mode), and the block of each host's subnet its guests get.

It reads the other labs' state files and the machine's own networks; it makes nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import zlib
from typing import Any

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


def other_labs_json(skip: str) -> list[dict[str, Any]]:
    """The state files of every lab but ``skip`` (those that can be read)."""
    found = []
    for name in lab_names():
        if name == skip:
            continue
        with contextlib.suppress(OSError, ValueError):
            data = json.loads((labs_root() / name / "lab.json").read_text())
            if isinstance(data, dict):
                found.append(data)
    return found


def choose_subnet(name: str, hosts: int, given: str | None) -> ipaddress.IPv4Network:
    """``given`` if it is free and big enough, else a free /24 of ``SUBNET_BASE``.0.0/16
    (the first after one derived from the lab's name)."""
    used = net.used_ipv4_networks()
    for data in other_labs_json(skip=name):
        with contextlib.suppress(TypeError, ValueError):
            used.append(ipaddress.IPv4Network(data["subnet"]))
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
    for data in other_labs_json(skip=name):
        for item in data.get("hosts", []):
            with contextlib.suppress(KeyError, TypeError, ValueError):
                taken.add(int(item["port"]))
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
