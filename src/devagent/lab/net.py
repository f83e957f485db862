"""Thin, synchronous wrappers over ip(8) and tc(8) for the lab.

Everything the lab does to the kernel's network goes through :func:`run`, so a failing command
becomes one :class:`CommandFailed` that names the command and quotes its stderr. Link rates are
plain ``int`` bits per second inside devagent; :func:`parse_rate` is the one place that reads
the ``100mbit`` notation. Shaping uses ``tbf`` because this kernel has no ``netem``.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from collections.abc import Sequence
from typing import TypeVar

import msgspec

from devagent.errors import EnvironmentProblem

log = logging.getLogger(__name__)
T = TypeVar("T")


# tbf needs a bucket of at least one (GSO-sized) packet and at least one timer tick of tokens;
# 10 ms worth of bytes, never under 64 KiB, satisfies both at every rate we allow.
TBF_MIN_BURST_BYTES = 64 * 1024
TBF_BURST_SECONDS = 0.010
TBF_LATENCY = "50ms"


class CommandFailed(EnvironmentProblem):
    """An ``ip``/``tc`` command exited non-zero; carries argv, exit code and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"`{' '.join(argv)}` failed (exit {returncode}): {self.stderr}")


def run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one command, capture its output; raise :class:`CommandFailed` when ``check``."""
    log.debug("run %s", " ".join(argv))
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    except FileNotFoundError as err:
        raise EnvironmentProblem(f"{argv[0]} is not installed (package iproute2)") from err
    except subprocess.TimeoutExpired as err:
        raise EnvironmentProblem(f"`{' '.join(argv)}` did not finish in 30 s") from err
    if check and done.returncode != 0:
        raise CommandFailed(argv, done.returncode, done.stderr)
    return done


class AddrInfo(msgspec.Struct):
    local: str | None = None
    prefixlen: int | None = None


class IpItem(msgspec.Struct):
    """One object of ``ip -j`` output, as far as the lab reads it: a namespace (``name``), a
    link (``ifname``, ``flags``, ``address``: its MAC), its addresses or a route (``dst``)."""

    name: str | None = None
    ifname: str | None = None
    flags: list[str] = msgspec.field(default_factory=list)
    address: str | None = None
    addr_info: list[AddrInfo] = msgspec.field(default_factory=list)
    dst: str | None = None


class Route(msgspec.Struct):
    """One route of ``ip -j route show``, as far as :func:`quick_acks` reads it (a metric
    may be a number or a word: ``congctl``)."""

    dst: str | None = None
    metrics: list[dict[str, object]] = msgspec.field(default_factory=list)


class QdiscOptions(msgspec.Struct):
    rate: int | str | None = None  # tbf: bytes per second


class Qdisc(msgspec.Struct):
    """One object of ``tc -j qdisc show``."""

    kind: str = ""
    root: bool = False
    options: QdiscOptions = msgspec.field(default_factory=QdiscOptions)


def _json(argv: Sequence[str], into: type[T]) -> list[T]:
    """``argv``'s JSON output (a list of objects), decoded as ``into`` items."""
    out = run(argv).stdout.strip()
    if not out:
        return []
    try:
        return msgspec.json.decode(out, type=list[into])  # type: ignore[valid-type]
    except msgspec.DecodeError as err:
        raise EnvironmentProblem(f"`{' '.join(argv)}` printed unexpected JSON: {err}") from None


def ns_prefix(netns: str | None) -> list[str]:
    """The argv prefix that runs a command inside ``netns`` (nothing for the root namespace)."""
    return ["ip", "netns", "exec", netns] if netns else []


def netns_names() -> list[str]:
    items = _json(["ip", "-j", "netns", "list"], IpItem)
    return [item.name for item in items if item.name is not None]


def link_names(netns: str | None = None) -> list[str]:
    argv = ["ip", "-j", *(["-n", netns] if netns else []), "link", "show"]
    return [item.ifname for item in _json(argv, IpItem) if item.ifname is not None]


def link_is_up(dev: str) -> bool:
    """Whether ``dev`` (root namespace) is administratively up."""
    items = _json(["ip", "-j", "link", "show", "dev", dev], IpItem)
    return bool(items) and "UP" in items[0].flags


def pin_bridge_address(bridge: str, netns: str | None = None) -> None:
    """Fix ``bridge``'s MAC address at the one it has now.

    A Linux bridge otherwise takes the lowest MAC of its ports, and changes it whenever a
    port comes or goes: a VM's tap added to a host's bridge, or removed after a migration.
    Peers keep the old MAC in their neighbour tables (for 15-45 s, then as long as the
    stale entry takes to probe out); a frame sent to a MAC that now belongs to another port
    (or to none) is not for the bridge's own address, and its IP packets are dropped. Every
    connection to the host then stalls for up to a minute. A MAC set by hand never changes.
    """
    ns = ["-n", netns] if netns else []
    (item,) = _json(["ip", "-j", *ns, "link", "show", "dev", bridge], IpItem)
    run(["ip", *ns, "link", "set", "dev", bridge, "address", str(item.address)])


def netns_pids(netns: str) -> set[int]:
    done = run(["ip", "netns", "pids", netns], check=False)
    return {int(word) for word in done.stdout.split() if word.isdigit()}


def used_ipv4_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the root namespace has an address in or a route to."""
    nets: list[ipaddress.IPv4Network] = []
    for item in _json(["ip", "-j", "-4", "addr", "show"], IpItem):
        for addr in item.addr_info:
            if addr.local is not None and addr.prefixlen is not None:
                iface = ipaddress.IPv4Interface(f"{addr.local}/{addr.prefixlen}")
                nets.append(iface.network)
    for route in _json(["ip", "-j", "-4", "route", "show"], IpItem):
        dst = route.dst
        if dst is not None and dst != "default":
            try:
                nets.append(ipaddress.IPv4Network(dst, strict=False))
            except ValueError:
                continue
    return nets


def ack_at_once(subnet: str, dev: str, src: str, netns: str) -> None:
    """Make the route to ``subnet`` in ``netns`` acknowledge every segment at once
    (``quickack 1``: no delayed ACKs).

    QEMU 7.2 serving NBD over TLS writes a structured reply's header and its payload as two
    TLS records on a socket with Nagle on; the second waits for the client's ACK of the
    first, which the client delays by up to 40 ms. A stream of holes (``block-stream``
    over a sparse disk) then crawls at ~30 requests a second. Without delayed ACKs the
    wait is gone; devagent's own sockets (TCP_NODELAY) are not affected either way.
    """
    run(
        [
            *("ip", "-n", netns, "route", "change", subnet, "dev", dev),
            *("proto", "kernel", "scope", "link", "src", src, "quickack", "1"),
        ]
    )


def quick_acks(subnet: str, netns: str) -> bool:
    """Whether the route to ``subnet`` in ``netns`` has ``quickack 1``."""
    for route in _json(["ip", "-j", "-n", netns, "-4", "route", "show", subnet], Route):
        if route.dst == subnet:
            return any(m.get("quickack") == 1 for m in route.metrics)
    return False


def shape(dev: str, rate_bps: int | None, netns: str | None = None) -> None:
    """Limit the egress of ``dev`` to ``rate_bps`` with tbf, or remove the limit (None)."""
    where = ["-n", netns] if netns else []
    if rate_bps is None:
        run(["tc", *where, "qdisc", "del", "dev", dev, "root"], check=False)
        return
    burst = max(TBF_MIN_BURST_BYTES, int(rate_bps / 8 * TBF_BURST_SECONDS))
    run(
        [
            *("tc", *where, "qdisc", "replace", "dev", dev, "root", "tbf"),
            *("rate", f"{rate_bps}bit", "burst", str(burst), "latency", TBF_LATENCY),
        ]
    )


def shaped_rate(dev: str, netns: str | None = None) -> int | None:
    """The tbf rate (bits/s) at the root of ``dev``'s egress, or None when unshaped."""
    where = ["-n", netns] if netns else []
    try:
        items = _json(["tc", "-j", *where, "qdisc", "show", "dev", dev], Qdisc)
    except CommandFailed:
        return None
    for item in items:
        if item.root and item.kind == "tbf":
            rate = item.options.rate
            if isinstance(rate, int):
                return rate * 8  # tc -j reports bytes per second
    return None
