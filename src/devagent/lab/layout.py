"""What a lab and its hosts are called and where they live: the naming scheme of namespaces,
veths and bridges, the state root and a lab's folder, and :class:`LabHost`, one host as the
lab's state file records it.

Every other lab module agrees on names through this one, so that teardown can find by name
what setup made, even without a state file.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devagent.errors import EnvironmentProblem, UsageError
from devagent.lab import net

log = logging.getLogger("devagent.lab.lab")

STATE_ENV = "DEVAGENT_STATE"
DEFAULT_STATE_ROOT = Path("/var/lib/devagent")
LAB_ENV = "DEVAGENT_LAB"
DEFAULT_LAB_NAME = "lab"

NETNS_PREFIX = "da-"
BRIDGE_PREFIX = "dab-"
VETH_PREFIX = "dav-"
NS_IFACE = "eth0"
GUEST_BRIDGE = "br0"  # in each host's namespace: eth0 and the VMs' taps

NAME_RE = re.compile(r"^[a-z0-9]{1,6}$")
MAX_HOSTS = 26

UNIX_PATH_MAX = 107
# Room left under a host folder for the daemon's sockets (vms/<vm>/<device>.sock and such):
# below MIN we refuse, below WANTED we warn. (An agent binds its socket under a staging name
# 5 bytes longer first: agent/listener.py.)
SOCKET_ROOM_MIN = 29
SOCKET_ROOM_WANTED = 48


@dataclass(frozen=True)
class LabHost:
    """One host of a lab. ``netns`` and ``veth`` are None in loopback mode; ``veth`` is the
    root-side end of the host's link; ``pid`` is its devagentd's."""

    name: str
    address: str
    port: int
    dir: Path
    netns: str | None = None
    veth: str | None = None
    pid: int | None = None
    link_rate_bps: int | None = None
    tls: bool = True  # its daemon speaks HTTPS (False: a lab made with --insecure)
    libvirt: bool = False  # a libvirtd runs beside its devagentd (lab up --libvirt)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "port": self.port,
            "url": self.url,
            "dir": str(self.dir),
            "netns": self.netns,
            "veth": self.veth,
            "pid": self.pid,
            "link_rate_bps": self.link_rate_bps,
            "tls": self.tls,
            "libvirt": self.libvirt,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabHost:
        return cls(
            name=str(data["name"]),
            address=str(data["address"]),
            port=int(data["port"]),
            dir=Path(data["dir"]),
            netns=_opt_str(data.get("netns")),
            veth=_opt_str(data.get("veth")),
            pid=_opt_int(data.get("pid")),
            link_rate_bps=_opt_int(data.get("link_rate_bps")),
            tls=bool(data.get("tls", False)),
            libvirt=bool(data.get("libvirt", False)),
        )


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def run_in_host(host: LabHost, argv: Sequence[str]) -> list[str]:
    """``argv`` made to run inside ``host`` (prefixed with ``ip netns exec NS`` if needed)."""
    return [*net.ns_prefix(host.netns), *argv]


def state_root() -> Path:
    return Path(os.environ.get(STATE_ENV) or DEFAULT_STATE_ROOT)


def labs_root() -> Path:
    return state_root() / "labs"


def lab_names() -> list[str]:
    """Names of the labs that have a state folder under the state root."""
    root = labs_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and NAME_RE.match(p.name))


def default_lab_name() -> str:
    return os.environ.get(LAB_ENV) or DEFAULT_LAB_NAME


def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UsageError(
            f"bad lab name {name!r}: 1 to 6 characters among a-z and 0-9 "
            "(it goes into 15-byte interface names)"
        )
    return name


def netns_name(lab: str, host: str) -> str:
    return f"{NETNS_PREFIX}{lab}-{host}"


def veth_name(lab: str, host: str) -> str:
    return f"{VETH_PREFIX}{lab}-{host}"


def bridge_name(lab: str) -> str:
    return f"{BRIDGE_PREFIX}{lab}"


def present_objects(lab: str) -> tuple[set[str], set[str]]:
    """The network namespaces and links (veths, bridge) of lab ``lab`` that exist now, found
    by name alone."""
    namespaces = {ns for ns in net.netns_names() if ns.startswith(f"{NETNS_PREFIX}{lab}-")}
    links = {
        link
        for link in net.link_names()
        if link == bridge_name(lab) or link.startswith(f"{VETH_PREFIX}{lab}-")
    }
    return namespaces, links


def require_root() -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem(
            "a namespace lab needs root (network namespaces, veths, a bridge); "
            "run as root or use --loopback"
        )


def check_path_room(host_dir: Path) -> None:
    room = UNIX_PATH_MAX - len(os.fsencode(host_dir)) - 1
    if room < SOCKET_ROOM_MIN:
        raise UsageError(
            f"host folder {host_dir} is too long for unix sockets under it "
            f"({UNIX_PATH_MAX}-byte limit, {room} bytes left): set {STATE_ENV} to a shorter path"
        )
    if room < SOCKET_ROOM_WANTED:
        log.warning(
            "host folder %s leaves only %d bytes for unix socket names; a shorter %s is safer",
            host_dir,
            room,
            STATE_ENV,
        )
