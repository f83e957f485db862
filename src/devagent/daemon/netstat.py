"""Byte counters of this host's links, for ``bytes_between_hosts``.

A daemon runs inside its host's network namespace, where ``/proc/net/dev`` lists only that
host's interfaces: the sum over every interface but ``lo``, the host's bridges and its VMs'
taps (whose bytes also cross ``eth0``, a port of the bridge) is what crossed the host's link.
"""

from __future__ import annotations

from pathlib import Path

PROC_NET_DEV = Path("/proc/net/dev")
SYS_CLASS_NET = Path("/sys/class/net")


def parse_proc_net_dev(text: str) -> dict[str, tuple[int, int]]:
    """``{interface: (rx_bytes, tx_bytes)}`` from the text of /proc/net/dev."""
    counters: dict[str, tuple[int, int]] = {}
    for line in text.splitlines()[2:]:
        name, _, fields = line.partition(":")
        values = fields.split()
        if len(values) >= 9:
            counters[name.strip()] = (int(values[0]), int(values[8]))
    return counters


def is_link(name: str, sys_class_net: Path = SYS_CLASS_NET) -> bool:
    """Whether interface ``name`` is one of the host's links: not ``lo``, not a bridge, not
    a tap (whose bytes a link port of the bridge counts too)."""
    device = sys_class_net / name
    return name != "lo" and not (device / "bridge").exists() and not (device / "tun_flags").exists()


def link_bytes(loopback: bool) -> int | None:
    """Bytes received plus sent on the host's links; None in a loopback lab."""
    if loopback:
        return None
    counters = parse_proc_net_dev(PROC_NET_DEV.read_text())
    return sum(rx + tx for name, (rx, tx) in counters.items() if is_link(name))
