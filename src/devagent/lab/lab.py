"""The lab: several devagent hosts on one machine, each with its own devagentd.

Namespace mode (root): host ``h`` of lab ``L`` is the network namespace ``da-L-h``; its ``eth0``
is one end of a veth pair whose root-side end ``dav-L-h`` is a port of the bridge ``dab-L``.
Inside the host, ``eth0`` is a port of the host's own bridge ``br0``, which holds the host's
address and the taps of its VMs' NICs: a guest is on the lab's network with an address of the
lab's subnet (each host hands out its share of .100-.199), and after a migration the bridges
learn its MAC on the new host's port from QEMU's announce.
The bridge holds the management address (``.254`` of the lab's /24), so this process reaches
every daemon directly; hosts reach each other through the bridge, and shaping a host's link
means a tbf on both ends of its veth. Loopback mode: hosts are folders, daemons listen on
127.0.0.1 on distinct ports, and there is no link to cut or shape.

``<state root>/labs/L/lab.json`` records the lab, and is written *before* any kernel object or
process is made, so a crash midway leaves something to tear down. Teardown does not trust it
alone: it also sweeps by name (``da-L-*``, ``dav-L-*``, ``dab-L``) and by process (see
:mod:`devagent.lab.procs`), so it works on a partial or missing state file and is idempotent.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import enum
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from devagent.daemon.guestnet import guest_block
from devagent.errors import (
    DevagentError,
    EnvironmentProblem,
    NotFound,
    PeerError,
    StateError,
    UsageError,
)
from devagent.lab import net, procs
from devagent.vocab import parse_rate
from devagent.wait import wait_until_blocking

log = logging.getLogger(__name__)

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
DAEMON_PORT = 7480
LOOPBACK_ADDRESS = "127.0.0.1"
LOOPBACK_FIRST_PORT = 7481
SUBNET_BASE = "10.213"

UNIX_PATH_MAX = 107
# Room left under a host folder for the daemon's sockets (vms/<vm>/<device>.sock and such):
# below MIN we refuse, below WANTED we warn.
SOCKET_ROOM_MIN = 24
SOCKET_ROOM_WANTED = 48

HEALTH_TIMEOUT_S = 30.0
HEALTH_PROBE_TIMEOUT_S = 1.0
HEALTH_RETRY_S = 0.1
STATE_VERSION = 1
LOG_TAIL_LINES = 15

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LabState(enum.Enum):
    STARTING = "starting"
    UP = "up"
    DOWN = "down"


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

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

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


def default_lab_name() -> str:
    return os.environ.get(LAB_ENV) or DEFAULT_LAB_NAME


def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UsageError(
            f"bad lab name {name!r}: 1 to 6 characters among a-z and 0-9 "
            "(it goes into 15-byte interface names)"
        )
    return name


def daemon_binary() -> Path:
    """The devagentd console script installed beside the running interpreter."""
    path = Path(sys.executable).parent / "devagentd"
    if not os.access(path, os.X_OK):
        raise EnvironmentProblem(f"devagentd not found at {path}: install devagent (make venv)")
    return path


def _require_root() -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem(
            "a namespace lab needs root (network namespaces, veths, a bridge); "
            "run as root or use --loopback"
        )


def _check_path_room(host_dir: Path) -> None:
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


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK_ADDRESS, port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _other_labs_json(skip: str) -> list[dict[str, Any]]:
    found = []
    for name in Lab.list():
        if name == skip:
            continue
        with contextlib.suppress(OSError, ValueError):
            data = json.loads((labs_root() / name / "lab.json").read_text())
            if isinstance(data, dict):
                found.append(data)
    return found


def _choose_subnet(name: str, hosts: int, given: str | None) -> ipaddress.IPv4Network:
    used = net.used_ipv4_networks()
    for data in _other_labs_json(skip=name):
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


class Lab:
    """A running (or starting) lab. Make one with :meth:`up`, find one with :meth:`load`."""

    def __init__(
        self,
        name: str,
        *,
        loopback: bool,
        hosts: list[LabHost],
        subnet: ipaddress.IPv4Network | None = None,
        state: LabState = LabState.STARTING,
    ) -> None:
        self.name = validate_name(name)
        self.dir = labs_root() / name
        self.loopback = loopback
        self.subnet = subnet
        self.state = state
        self._hosts = list(hosts)
        self._token: str | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.log = log.getChild(name)

    # ---- names and paths -------------------------------------------------------------------

    @property
    def hosts(self) -> list[LabHost]:
        return list(self._hosts)

    @property
    def link_rate_bps(self) -> int | None:
        """The rate (bits/s) that bounds traffic between any two hosts: the slowest shaped
        link; None when no link is shaped (or in loopback mode)."""
        rates = [h.link_rate_bps for h in self._hosts if h.link_rate_bps is not None]
        return min(rates) if rates else None

    @property
    def bridge(self) -> str | None:
        return None if self.loopback else f"{BRIDGE_PREFIX}{self.name}"

    @property
    def mgmt_address(self) -> str | None:
        """The bridge's address in the lab subnet (.254 of a /24): how this machine reaches
        the hosts."""
        return None if self.subnet is None else str(self.subnet.broadcast_address - 1)

    @property
    def state_file(self) -> Path:
        return self.dir / "lab.json"

    @property
    def token_file(self) -> Path:
        return self.dir / "token"

    @property
    def shared_dir(self) -> Path:
        return self.dir / "shared"

    @property
    def token(self) -> str:
        if self._token is None:
            try:
                self._token = self.token_file.read_text().strip()
            except OSError as err:
                raise StateError(f"lab {self.name}: cannot read {self.token_file}: {err}") from err
        return self._token

    def host(self, name: str | LabHost) -> LabHost:
        wanted = name.name if isinstance(name, LabHost) else name
        for host in self._hosts:
            if host.name == wanted:
                return host
        names = ", ".join(h.name for h in self._hosts)
        raise NotFound(f"lab {self.name} has no host {wanted!r} (hosts: {names})")

    def __repr__(self) -> str:
        mode = "loopback" if self.loopback else str(self.subnet)
        return f"<Lab {self.name} {self.state.value} {mode} hosts={[h.name for h in self._hosts]}>"

    # ---- state file ------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "name": self.name,
            "state": self.state.value,
            "loopback": self.loopback,
            "dir": str(self.dir),
            "subnet": None if self.subnet is None else str(self.subnet),
            "bridge": self.bridge,
            "link_rate_bps": self.link_rate_bps,
            "mgmt_address": self.mgmt_address,
            "token_file": str(self.token_file),
            "shared_dir": str(self.shared_dir),
            "hosts": [host.to_json() for host in self._hosts],
        }

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(self.state_file)

    @classmethod
    def _from_json(cls, name: str, data: dict[str, Any]) -> Lab:
        subnet = data.get("subnet")
        return cls(
            name,
            loopback=bool(data["loopback"]),
            hosts=[LabHost.from_json(item) for item in data["hosts"]],
            subnet=None if subnet is None else ipaddress.IPv4Network(subnet),
            state=LabState(data.get("state", LabState.STARTING.value)),
        )

    @classmethod
    def list(cls) -> list[str]:
        """Names of the labs that have a state folder under the state root."""
        root = labs_root()
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir() and NAME_RE.match(p.name))

    @classmethod
    def load(cls, name: str) -> Lab:
        validate_name(name)
        path = labs_root() / name / "lab.json"
        if not path.exists():
            labs = ", ".join(cls.list()) or "none"
            raise NotFound(f"no lab named {name!r} ({path} is absent; labs: {labs})")
        try:
            data = json.loads(path.read_text())
            return cls._from_json(name, data)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StateError(
                f"state of lab {name!r} in {path} is unreadable ({err}); "
                f"`devagent lab down --name {name}` removes what is left of it"
            ) from err

    # ---- bringing up -----------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        name: str = DEFAULT_LAB_NAME,
        hosts: int = 2,
        link_rate: str | int | None = None,
        loopback: bool = False,
        subnet: str | None = None,
    ) -> Lab:
        """Make the lab and start one devagentd per host; return when every daemon answers
        ``/v1/health``. On any failure, tear down what was made and re-raise."""
        validate_name(name)
        if not 1 <= hosts <= MAX_HOSTS:
            raise UsageError(f"a lab has 1 to {MAX_HOSTS} hosts, not {hosts}")
        rate = None if link_rate is None else parse_rate(link_rate)
        if loopback and rate is not None:
            raise UsageError("a loopback lab has no links to shape: drop --link-rate")
        if loopback and subnet is not None:
            raise UsageError("a loopback lab has no subnet")
        binary = daemon_binary()
        if not loopback:
            _require_root()
        labdir = labs_root() / name
        cls._refuse_existing(name, labdir, loopback)
        names = [chr(ord("a") + i) for i in range(hosts)]
        for host_name in names:
            _check_path_room(labdir / "hosts" / host_name)

        if loopback:
            network = None
            ports = cls._free_loopback_ports(name, hosts)
            lab_hosts = [
                LabHost(h, LOOPBACK_ADDRESS, port, labdir / "hosts" / h)
                for h, port in zip(names, ports, strict=True)
            ]
        else:
            network = _choose_subnet(name, hosts, subnet)
            lab_hosts = [
                LabHost(
                    h,
                    str(network.network_address + i + 1),
                    DAEMON_PORT,
                    labdir / "hosts" / h,
                    netns=f"{NETNS_PREFIX}{name}-{h}",
                    veth=f"{VETH_PREFIX}{name}-{h}",
                    link_rate_bps=rate,
                )
                for i, h in enumerate(names)
            ]

        labdir.parent.mkdir(parents=True, exist_ok=True)
        try:
            labdir.mkdir()
        except FileExistsError as err:
            raise StateError(f"lab {name!r} already exists ({labdir})") from err
        lab = cls(name, loopback=loopback, hosts=lab_hosts, subnet=network)
        try:
            lab._build(binary)
        except BaseException:
            lab.log.warning("setup of lab %s failed; tearing down what was made", name)
            try:
                lab.down()
            except DevagentError as err:
                lab.log.error("teardown after failed setup: %s", err)
            raise
        return lab

    @classmethod
    def _refuse_existing(cls, name: str, labdir: Path, loopback: bool) -> None:
        hint = f"run `devagent lab down --name {name}` first"
        if labdir.exists():
            raise StateError(f"lab {name!r} already exists ({labdir}); {hint}")
        if loopback:
            return
        bridge = f"{BRIDGE_PREFIX}{name}"
        leftovers = [ns for ns in net.netns_names() if ns.startswith(f"{NETNS_PREFIX}{name}-")]
        leftovers += [
            link
            for link in net.link_names()
            if link == bridge or link.startswith(f"{VETH_PREFIX}{name}-")
        ]
        if leftovers:
            raise StateError(
                f"network objects of a lab {name!r} exist ({', '.join(leftovers)}), perhaps "
                f"under another {STATE_ENV}; {hint}"
            )

    @classmethod
    def _free_loopback_ports(cls, name: str, count: int) -> builtins.list[int]:
        taken: set[int] = set()
        for data in _other_labs_json(skip=name):
            for item in data.get("hosts", []):
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    taken.add(int(item["port"]))
        ports: builtins.list[int] = []
        port = LOOPBACK_FIRST_PORT
        while len(ports) < count:
            if port > 65535:
                raise EnvironmentProblem("no free TCP ports on 127.0.0.1 for a loopback lab")
            if port not in taken and _port_free(port):
                ports.append(port)
            port += 1
        return ports

    def _build(self, binary: Path) -> None:
        self._save()
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(secrets.token_urlsafe(32) + "\n")
        self.shared_dir.mkdir()
        for host in self._hosts:
            host.dir.mkdir(parents=True)
        if not self.loopback:
            self._make_network()
        for host in self._hosts:
            self._start_daemon(binary, host)
        self._save()
        self._wait_healthy()
        self.state = LabState.UP
        self._save()
        self.log.info("lab %s up: %s", self.name, ", ".join(h.url for h in self._hosts))

    def _make_network(self) -> None:
        assert self.subnet is not None and self.bridge is not None
        prefix = self.subnet.prefixlen
        net.run(["ip", "link", "add", self.bridge, "type", "bridge"])
        net.run(["ip", "addr", "add", f"{self.mgmt_address}/{prefix}", "dev", self.bridge])
        net.run(["ip", "link", "set", self.bridge, "up"])
        for host in self._hosts:
            assert host.netns is not None and host.veth is not None
            ns = host.netns
            net.run(["ip", "netns", "add", ns])
            net.run(
                [
                    *("ip", "link", "add", host.veth, "type", "veth"),
                    *("peer", "name", NS_IFACE, "netns", ns),
                ]
            )
            net.run(["ip", "link", "set", host.veth, "master", self.bridge])
            net.run(["ip", "link", "set", host.veth, "up"])
            net.run(["ip", "-n", ns, "link", "set", "lo", "up"])
            net.run(["ip", "-n", ns, "link", "add", GUEST_BRIDGE, "type", "bridge"])
            net.run(["ip", "-n", ns, "link", "set", NS_IFACE, "master", GUEST_BRIDGE])
            net.run(
                ["ip", "-n", ns, "addr", "add", f"{host.address}/{prefix}", "dev", GUEST_BRIDGE]
            )
            net.run(["ip", "-n", ns, "link", "set", NS_IFACE, "up"])
            net.run(["ip", "-n", ns, "link", "set", GUEST_BRIDGE, "up"])
            if host.link_rate_bps is not None:
                self._shape_link(host, host.link_rate_bps)

    def _start_daemon(self, binary: Path, host: LabHost) -> None:
        argv = run_in_host(
            host,
            [
                *(str(binary), "--host-name", host.name),
                *("--listen", f"{host.address}:{host.port}", "--dir", str(host.dir)),
                *("--token-file", str(self.token_file), "--shared-dir", str(self.shared_dir)),
                *self._guest_network_args(host),
            ],
        )
        with open(host.dir / "devagentd.log", "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=host.dir,
                start_new_session=True,
            )
        self._procs[host.name] = proc
        self._replace_host(dataclasses.replace(host, pid=proc.pid))
        self.log.debug("host %s: devagentd pid %d", host.name, proc.pid)

    def guest_addresses(self, host: str | LabHost) -> str | None:
        """The addresses host ``host`` gives its guests (``FIRST-LAST/PREFIX``), or None in
        a loopback lab (its VMs get no NIC)."""
        target = self.host(host)
        if self.loopback or self.subnet is None:
            return None
        names = [h.name for h in self._hosts]
        block = guest_block(self.subnet, names.index(target.name), len(names))
        if block is None:
            return None
        return f"{block[0]}-{block[1]}/{self.subnet.prefixlen}"

    def _guest_network_args(self, host: LabHost) -> builtins.list[str]:
        block = self.guest_addresses(host)
        if block is None:
            return []
        return ["--guest-bridge", GUEST_BRIDGE, "--guest-addresses", block]

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        for host in self._hosts:
            self._wait_answering(host, max(0.0, deadline - time.monotonic()))

    def _wait_answering(self, host: LabHost, timeout: float) -> None:
        """Until ``host``'s devagentd answers ``/v1/health`` as that host; raises at once if
        it exits or another daemon answers, and after ``timeout`` with its log's tail."""
        proc = self._procs[host.name]
        logfile = host.dir / "devagentd.log"

        def answering() -> bool:
            if proc.poll() is not None:
                raise PeerError(
                    f"devagentd of host {host.name} (lab {self.name}) exited with status "
                    f"{proc.returncode} before answering; last lines of {logfile}:\n"
                    + _tail(logfile)
                )
            try:
                answer = self.health(host, timeout=HEALTH_PROBE_TIMEOUT_S)
            except PeerError:
                return False
            if answer.get("host") != host.name:
                raise PeerError(
                    f"{host.url} answered as host {answer.get('host')!r}, not {host.name!r}: "
                    "another daemon holds that address"
                )
            return True

        wait_until_blocking(
            answering,
            timeout=timeout,
            what=f"devagentd of host {host.name} (lab {self.name}) answering {host.url}/v1/health",
            interval=HEALTH_RETRY_S,
            detail=lambda: f"last lines of {logfile}:\n" + _tail(logfile),
        )

    def restart_daemon(self, host: str | LabHost) -> LabHost:
        """Stop one host's devagentd and start it again (its VMs and agents must survive:
        they run in their own sessions and the new daemon adopts them)."""
        target = self.host(host)
        if target.pid is not None:
            procs.terminate([target.pid])
        self._procs.pop(target.name, None)
        self._start_daemon(daemon_binary(), target)
        self._save()
        restarted = self.host(target.name)
        self._wait_answering(restarted, HEALTH_TIMEOUT_S)
        return restarted

    def _replace_host(self, new: LabHost) -> None:
        self._hosts = [new if h.name == new.name else h for h in self._hosts]

    # ---- using -----------------------------------------------------------------------------

    def health(self, host: str | LabHost, timeout: float = 5.0) -> dict[str, Any]:
        """``GET /v1/health`` of a host's daemon, with the lab's token."""
        target = self.host(host)
        request = urllib.request.Request(
            f"{target.url}/v1/health", headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                data = json.load(response)
        except (OSError, ValueError) as err:  # URLError and HTTPError are OSErrors
            raise PeerError(f"host {target.name}: {target.url}/v1/health failed: {err}") from err
        if not isinstance(data, dict):
            raise PeerError(f"host {target.name}: /v1/health answered {data!r}")
        return data

    def daemon_alive(self, host: str | LabHost) -> bool:
        """Whether the host's recorded devagentd pid is alive and is still that daemon."""
        target = self.host(host)
        return (
            target.pid is not None
            and procs.alive(target.pid)
            and procs.uses_path(target.pid, target.dir)
        )

    def _link_host(self, host: str | LabHost) -> LabHost:
        target = self.host(host)
        if target.veth is None or target.netns is None:
            raise UsageError(f"lab {self.name} is a loopback lab: host {target.name} has no link")
        return target

    def set_link(self, host: str | LabHost, up: bool) -> None:
        """Cut (``up=False``) or restore a host's link, at the root-side end of its veth."""
        target = self._link_host(host)
        assert target.veth is not None
        net.run(["ip", "link", "set", target.veth, "up" if up else "down"])

    def link_is_up(self, host: str | LabHost) -> bool:
        target = self._link_host(host)
        assert target.veth is not None
        return net.link_is_up(target.veth)

    def link_counters(self, host: str | LabHost) -> tuple[int, int]:
        """``(rx, tx)`` bytes of a host's link *as the host sees it*: rx is what reached the
        host, tx what it sent. Read from the root-side veth, whose rx/tx are the reverse."""
        target = self._link_host(host)
        stats = Path("/sys/class/net") / str(target.veth) / "statistics"
        try:
            veth_rx = int((stats / "rx_bytes").read_text())
            veth_tx = int((stats / "tx_bytes").read_text())
        except OSError as err:
            raise StateError(f"host {target.name}: no link {target.veth}: {err}") from err
        return veth_tx, veth_rx

    def shape(self, host: str | LabHost, rate: str | int | None) -> None:
        """Limit a host's link to ``rate`` in both directions (``None`` lifts the limit)."""
        target = self._link_host(host)
        bps = None if rate is None else parse_rate(rate)
        self._shape_link(target, bps)
        self._replace_host(dataclasses.replace(target, link_rate_bps=bps))
        self._save()

    def _shape_link(self, host: LabHost, bps: int | None) -> None:
        assert host.veth is not None and host.netns is not None
        net.shape(NS_IFACE, bps, netns=host.netns)  # host → bridge
        net.shape(host.veth, bps)  # bridge → host

    def status(self) -> dict[str, Any]:
        """The state file's content plus, per host, what is true right now: daemon alive and
        answering, link up, the rates tc really applies."""
        data = self.to_json()
        rows = []
        for host in self._hosts:
            row = host.to_json()
            row["guest_addresses"] = self.guest_addresses(host)
            row["alive"] = self.daemon_alive(host)
            try:
                self.health(host, timeout=HEALTH_PROBE_TIMEOUT_S)
                row["healthy"] = True
            except (PeerError, StateError):
                row["healthy"] = False
            if host.veth is not None and host.netns is not None:
                try:
                    row["link_up"] = net.link_is_up(host.veth)
                    row["rate_out_bps"] = net.shaped_rate(NS_IFACE, netns=host.netns)
                    row["rate_in_bps"] = net.shaped_rate(host.veth)
                except DevagentError:
                    row["link_up"] = False
                    row["rate_out_bps"] = row["rate_in_bps"] = None
            else:
                row["link_up"] = row["rate_out_bps"] = row["rate_in_bps"] = None
            rows.append(row)
        data["hosts"] = rows
        return data

    # ---- tearing down ----------------------------------------------------------------------

    def down(self) -> None:
        """Stop everything of this lab and remove it; see :meth:`destroy`."""
        try:
            Lab.destroy(self.name, known=self)
        finally:
            for proc in self._procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=1)
            self.state = LabState.DOWN

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    @classmethod
    def destroy(cls, name: str, known: Lab | None = None) -> bool:
        """Remove lab ``name`` whatever is left of it: kill its processes (daemons, the sessions
        they lead, everything in its namespaces or working under its folder), delete its
        namespaces, veths and bridge, then its folder. Idempotent. Returns whether anything
        was found. Raises :class:`StateError` naming what could not be removed."""
        validate_name(name)
        labdir = known.dir if known is not None else labs_root() / name
        lab = known
        if lab is None:
            with contextlib.suppress(NotFound, StateError):
                lab = cls.load(name)
        hosts = lab.hosts if lab is not None else []
        is_root = os.geteuid() == 0
        have_ip = shutil.which("ip") is not None

        bridge = f"{BRIDGE_PREFIX}{name}"
        namespaces: set[str] = set()
        links: set[str] = set()
        if have_ip:
            ns_prefix = f"{NETNS_PREFIX}{name}-"
            present_ns = set(net.netns_names())
            namespaces = {ns for ns in present_ns if ns.startswith(ns_prefix)}
            namespaces |= {h.netns for h in hosts if h.netns and h.netns in present_ns}
            links = {
                link
                for link in net.link_names()
                if link == bridge or link.startswith(f"{VETH_PREFIX}{name}-")
            }
        found = bool(namespaces or links or labdir.exists())

        problems: list[str] = []
        daemons = [h.pid for h in hosts if h.pid]
        for grace in (5.0, 1.0):  # a second sweep for anything started during the first
            victims = procs.session_of(daemons, labdir) | procs.under_path(labdir)
            for ns in namespaces:
                victims |= net.netns_pids(ns)
            if not victims:
                break
            found = True
            cls._log_victims(name, victims)
            stuck = procs.terminate(victims, grace_s=grace)
            if stuck:
                problems.append(f"processes that would not die: {sorted(stuck)}")
                break

        if (namespaces or links) and not is_root:
            problems.append(
                f"namespaces/links {sorted(namespaces | links)} remain: deleting them needs root"
            )
        elif namespaces or links:
            for ns in sorted(namespaces):
                net.run(["ip", "netns", "del", ns], check=False)
            # Deleting a namespace destroys its veth pairs; the bridge goes last.
            for link in sorted(links, key=lambda n: n == bridge):
                net.run(["ip", "link", "del", link], check=False)
            left = [ns for ns in net.netns_names() if ns in namespaces]
            left += [link for link in net.link_names() if link in links]
            if left:
                problems.append(f"network objects not deleted: {left}")

        if labdir.exists():
            try:
                shutil.rmtree(labdir)
            except OSError as err:
                problems.append(f"folder {labdir} not removed: {err}")
        if problems:
            raise StateError(f"teardown of lab {name!r} incomplete: " + "; ".join(problems))
        if found:
            log.info("lab %s removed", name)
        return found

    @staticmethod
    def _log_victims(name: str, pids: set[int]) -> None:
        for pid in sorted(pids):
            log.debug("lab %s: stopping pid %d: %s", name, pid, " ".join(procs.cmdline(pid)))

    @classmethod
    def down_all(cls, name_prefix: str = "") -> builtins.list[str]:
        """Remove every devagent lab found by state folder or by the ``da-``/``dab-``/``dav-``
        name prefixes (only those whose lab name starts with ``name_prefix``). Returns the
        names of the labs removed."""
        names = set(cls.list())
        if shutil.which("ip") is not None:
            for ns in net.netns_names():
                if ns.startswith(NETNS_PREFIX):
                    names.add(ns[len(NETNS_PREFIX) :].split("-", 1)[0])
            for link in net.link_names():
                if link.startswith(BRIDGE_PREFIX):
                    names.add(link[len(BRIDGE_PREFIX) :])
                elif link.startswith(VETH_PREFIX):
                    names.add(link[len(VETH_PREFIX) :].split("-", 1)[0])
        chosen = sorted(n for n in names if NAME_RE.match(n) and n.startswith(name_prefix))
        problems = []
        for name in chosen:
            try:
                cls.destroy(name)
            except StateError as err:
                problems.append(str(err))
        if problems:
            raise StateError("; ".join(problems))
        return chosen
