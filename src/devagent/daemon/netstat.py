"""Byte counters of this host's links, for ``bytes_between_hosts``.

A daemon runs inside its host's network namespace, where ``/proc/net/dev`` lists only that
host's interfaces: the sum over every interface but ``lo`` is what crossed the host's link.
"""

from __future__ import annotations

from pathlib import Path

PROC_NET_DEV = Path("/proc/net/dev")


def parse_proc_net_dev(text: str) -> dict[str, tuple[int, int]]:
    """``{interface: (rx_bytes, tx_bytes)}`` from the text of /proc/net/dev."""
    counters: dict[str, tuple[int, int]] = {}
    for line in text.splitlines()[2:]:
        name, _, fields = line.partition(":")
        values = fields.split()
        if len(values) >= 9:
            counters[name.strip()] = (int(values[0]), int(values[8]))
    return counters


def link_bytes(loopback: bool) -> int | None:
    """Bytes received plus sent on every interface but ``lo``; None in a loopback lab."""
    if loopback:
        return None
    counters = parse_proc_net_dev(PROC_NET_DEV.read_text())
    return sum(rx + tx for name, (rx, tx) in counters.items() if name != "lo")
