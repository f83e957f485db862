"""The kernel objects of a namespace lab: the lab's bridge, each host's namespace, the veth
that links it to the bridge, the host's own bridge for its VMs' taps, and the shaping of
each link. Only ``ip`` and ``tc`` commands, through :mod:`devagent.lab.net`.

::

    root namespace: bridge dab-L (mgmt address .254) ── dav-L-h (veth, shaped)
    namespace da-L-h:                       eth0 ── br0 (host address, VMs' taps)

Both bridges' MAC addresses are pinned (:func:`devagent.lab.net.pin_bridge_address`): a
bridge whose MAC follows its ports cuts every connection to its host for up to a minute
when a VM's tap comes or goes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path

from devagent.errors import StateError
from devagent.lab import net
from devagent.lab.layout import GUEST_BRIDGE, NS_IFACE, STATE_ENV, LabHost, present_objects


def refuse_existing(name: str, labdir: Path, loopback: bool) -> None:
    """Raise if lab ``name`` has a folder, or (namespace mode) network objects, already."""
    hint = f"run `devagent lab down --name {name}` first"
    if labdir.exists():
        raise StateError(f"lab {name!r} already exists ({labdir}); {hint}")
    if loopback:
        return
    namespaces, links = present_objects(name)
    leftovers = sorted(namespaces) + sorted(links)
    if leftovers:
        raise StateError(
            f"network objects of a lab {name!r} exist ({', '.join(leftovers)}), perhaps "
            f"under another {STATE_ENV}; {hint}"
        )


def make(
    subnet: ipaddress.IPv4Network, bridge: str, mgmt_address: str, hosts: Sequence[LabHost]
) -> None:
    """The bridge with the management address, then per host its namespace, veth and own
    bridge (its route to the lab without delayed ACKs), each link shaped to the host's
    ``link_rate_bps``."""
    prefix = subnet.prefixlen
    net.run(["ip", "link", "add", bridge, "type", "bridge"])
    net.pin_bridge_address(bridge)
    net.run(["ip", "addr", "add", f"{mgmt_address}/{prefix}", "dev", bridge])
    net.run(["ip", "link", "set", bridge, "up"])
    for host in hosts:
        assert host.netns is not None and host.veth is not None
        ns = host.netns
        net.run(["ip", "netns", "add", ns])
        net.run(
            [
                *("ip", "link", "add", host.veth, "type", "veth"),
                *("peer", "name", NS_IFACE, "netns", ns),
            ]
        )
        net.run(["ip", "link", "set", host.veth, "master", bridge])
        net.run(["ip", "link", "set", host.veth, "up"])
        net.run(["ip", "-n", ns, "link", "set", "lo", "up"])
        net.run(["ip", "-n", ns, "link", "add", GUEST_BRIDGE, "type", "bridge"])
        net.run(["ip", "-n", ns, "link", "set", NS_IFACE, "master", GUEST_BRIDGE])
        net.pin_bridge_address(GUEST_BRIDGE, ns)  # eth0's MAC, whatever taps come and go
        net.run(["ip", "-n", ns, "addr", "add", f"{host.address}/{prefix}", "dev", GUEST_BRIDGE])
        net.run(["ip", "-n", ns, "link", "set", NS_IFACE, "up"])
        net.run(["ip", "-n", ns, "link", "set", GUEST_BRIDGE, "up"])
        net.ack_at_once(str(subnet), GUEST_BRIDGE, host.address, ns)  # see its docstring
        if host.link_rate_bps is not None:
            shape_link(host, host.link_rate_bps)


def shape_link(host: LabHost, bps: int | None) -> None:
    """Limit ``host``'s link to ``bps`` both ways (None lifts the limit)."""
    assert host.veth is not None and host.netns is not None
    net.shape(NS_IFACE, bps, netns=host.netns)  # host → bridge
    net.shape(host.veth, bps)  # bridge → host
