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
process is made, so a crash midway leaves something to tear down.

This module owns the :class:`Lab` object: its state file, bringing it up in order, and what
a test does with a running lab (health, links, shaping, status). The parts live beside it:
names and paths in :mod:`~devagent.lab.layout`, free subnets and ports in
:mod:`~devagent.lab.addressing`, the kernel objects in :mod:`~devagent.lab.topology`, the
daemon processes in :mod:`~devagent.lab.daemons`, removal in :mod:`~devagent.lab.teardown`.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import enum
import ipaddress
import json
import os
import secrets
import ssl
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from devagent import pki
from devagent.errors import DevagentError, NotFound, PeerError, StateError, UsageError
from devagent.lab import addressing, daemons, libvirt, net, procs, teardown, topology
from devagent.lab.addressing import DAEMON_PORT, LOOPBACK_ADDRESS
from devagent.lab.daemons import HEALTH_PROBE_TIMEOUT_S, HEALTH_TIMEOUT_S
from devagent.lab.layout import (
    DEFAULT_LAB_NAME,
    GUEST_BRIDGE,
    MAX_HOSTS,
    NS_IFACE,
    LabHost,
    bridge_name,
    check_path_room,
    lab_names,
    labs_root,
    log,
    netns_name,
    require_root,
    validate_name,
    veth_name,
)
from devagent.tls import Tls, process_tls, use_tls
from devagent.vocab import parse_rate

STATE_VERSION = 1
OPERATOR = "operator"  # the name on a lab's operator certificate


class LabState(enum.Enum):
    STARTING = "starting"
    UP = "up"
    DOWN = "down"


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
        self._tls: Tls | None = None
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
        return None if self.loopback else bridge_name(self.name)

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
    def pki_dir(self) -> Path:
        """The lab's CA, its hosts' and its operator's certificates."""
        return self.dir / "pki"

    @property
    def secure(self) -> bool:
        """Its daemons speak HTTPS and its agents TLS (not made with ``--insecure``)."""
        return all(h.tls for h in self._hosts)

    def client_tls(self) -> Tls | None:
        """The lab's operator certificate, None in an insecure lab."""
        if self.secure and self._tls is None:
            self._tls = Tls(pki.operator_dir(self.pki_dir, OPERATOR))
        return self._tls

    def _use(self) -> Lab:
        """This process calls the lab's daemons with the lab's operator certificate."""
        use_tls(self.client_tls())
        return self

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
            "pki_dir": str(self.pki_dir) if self.secure else None,
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
        return lab_names()

    @classmethod
    def load(cls, name: str) -> Lab:
        validate_name(name)
        path = labs_root() / name / "lab.json"
        if not path.exists():
            labs = ", ".join(cls.list()) or "none"
            raise NotFound(f"no lab named {name!r} ({path} is absent; labs: {labs})")
        try:
            data = json.loads(path.read_text())
            lab = cls._from_json(name, data)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StateError(
                f"state of lab {name!r} in {path} is unreadable ({err}); "
                f"`devagent lab down --name {name}` removes what is left of it"
            ) from err
        return lab._use() if lab.state is LabState.UP else lab

    # ---- bringing up -----------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        name: str = DEFAULT_LAB_NAME,
        hosts: int = 2,
        link_rate: str | int | None = None,
        loopback: bool = False,
        subnet: str | None = None,
        insecure: bool = False,
        with_libvirt: bool = False,
    ) -> Lab:
        """Make the lab and start one devagentd per host; return when every daemon answers
        ``/v1/health``. On any failure, tear down what was made and re-raise. The lab has its
        own CA and a certificate per host (and one for its operator, this process's from
        now on); ``insecure``: none, plain HTTP and NBD. ``with_libvirt``: a libvirtd beside
        each devagentd (:mod:`devagent.lab.libvirt`), the daemon its client."""
        validate_name(name)
        if not 1 <= hosts <= MAX_HOSTS:
            raise UsageError(f"a lab has 1 to {MAX_HOSTS} hosts, not {hosts}")
        rate = None if link_rate is None else parse_rate(link_rate)
        if loopback and rate is not None:
            raise UsageError("a loopback lab has no links to shape: drop --link-rate")
        if loopback and subnet is not None:
            raise UsageError("a loopback lab has no subnet")
        if loopback and with_libvirt:
            raise UsageError("libvirt's hosts need namespaces: drop --loopback")
        if with_libvirt:
            libvirt.require_libvirt()
        binary = daemons.daemon_binary()
        if not loopback:
            require_root()
        labdir = labs_root() / name
        topology.refuse_existing(name, labdir, loopback)
        names = [chr(ord("a") + i) for i in range(hosts)]
        for host_name in names:
            check_path_room(labdir / "hosts" / host_name)

        if loopback:
            network = None
            ports = addressing.free_loopback_ports(name, hosts)
            lab_hosts = [
                LabHost(h, LOOPBACK_ADDRESS, port, labdir / "hosts" / h, tls=not insecure)
                for h, port in zip(names, ports, strict=True)
            ]
        else:
            network = addressing.choose_subnet(name, hosts, subnet)
            lab_hosts = [
                LabHost(
                    h,
                    str(network.network_address + i + 1),
                    DAEMON_PORT,
                    labdir / "hosts" / h,
                    netns=netns_name(name, h),
                    veth=veth_name(name, h),
                    link_rate_bps=rate,
                    tls=not insecure,
                    libvirt=with_libvirt,
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
        return lab._use()

    def _build(self, binary: Path) -> None:
        self._save()
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(secrets.token_urlsafe(32) + "\n")
        self.shared_dir.mkdir()
        for host in self._hosts:
            host.dir.mkdir(parents=True)
        if self.secure:
            pki.init_ca(self.pki_dir, common_name=f"devagent lab {self.name} CA")
            for host in self._hosts:
                pki.issue_host(self.pki_dir, host.name, [host.address])
            pki.issue_operator(self.pki_dir, OPERATOR)
        if not self.loopback:
            assert self.subnet is not None and self.bridge is not None
            assert self.mgmt_address is not None
            topology.make(self.subnet, self.bridge, self.mgmt_address, self._hosts)
        self._start_libvirtds()
        for host in self._hosts:
            self._start_daemon(binary, host)
        self._save()
        self._wait_healthy()
        self.state = LabState.UP
        self._save()
        self.log.info("lab %s up: %s", self.name, ", ".join(h.url for h in self._hosts))

    def _start_daemon(self, binary: Path, host: LabHost) -> None:
        args = [
            *("--token-file", str(self.token_file), "--shared-dir", str(self.shared_dir)),
            *self._guest_network_args(host),
            *self._tls_args(host),
            *self._libvirt_args(host),
        ]
        proc = daemons.start(binary, host, args)
        self._procs[host.name] = proc
        self._replace_host(dataclasses.replace(host, pid=proc.pid))
        self.log.debug("host %s: devagentd pid %d", host.name, proc.pid)

    def _start_libvirtds(self) -> None:
        """Each host's libvirtd, answering before its devagentd starts (it connects)."""
        started = []
        for host in self._hosts:
            if host.libvirt:
                certs = pki.host_dir(self.pki_dir, host.name) if host.tls else None
                libvirt.configure(host, self._hosts, certs)
                started.append((libvirt.start(host), host))
        self._procs.update({f"libvirtd-{host.name}": proc for proc, host in started})
        deadline = time.monotonic() + libvirt.START_TIMEOUT_S
        for proc, host in started:
            libvirt.wait_answering(proc, host, max(0.0, deadline - time.monotonic()))

    def _libvirt_args(self, host: LabHost) -> builtins.list[str]:
        if not host.libvirt:
            return []
        return ["--libvirt", libvirt.local_uri(host),
                "--libvirt-peer-uri", libvirt.peer_uri_template(host)]  # fmt: skip

    def _tls_args(self, host: LabHost) -> builtins.list[str]:
        """The host's certificate, and the lab's hosts as the peers its agents admit."""
        if not host.tls:
            return ["--insecure"]
        peers = [arg for h in self._hosts for arg in ("--tls-peer", h.name)]
        return ["--tls-dir", str(pki.host_dir(self.pki_dir, host.name)), *peers]

    def guest_addresses(self, host: str | LabHost) -> str | None:
        """The addresses host ``host`` gives its guests (``FIRST-LAST/PREFIX``), or None in
        a loopback lab (its VMs get no NIC)."""
        target = self.host(host)
        if self.loopback or self.subnet is None:
            return None
        names = [h.name for h in self._hosts]
        return addressing.guest_addresses(self.subnet, names.index(target.name), len(names))

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
        daemons.wait_answering(
            self._procs[host.name], host, self.token, self.name, timeout, self.client_context()
        )

    def client_context(self) -> ssl.SSLContext | None:
        """The operator certificate's client context (None in an insecure lab)."""
        tls = self.client_tls()
        return None if tls is None else tls.client

    def restart_daemon(self, host: str | LabHost) -> LabHost:
        """Stop one host's devagentd and start it again (its VMs and agents must survive:
        they run in their own sessions and the new daemon adopts them)."""
        target = self.host(host)
        if target.pid is not None:
            procs.terminate([target.pid])
        self._procs.pop(target.name, None)
        self._start_daemon(daemons.daemon_binary(), target)
        self._save()
        restarted = self.host(target.name)
        self._wait_answering(restarted, HEALTH_TIMEOUT_S)
        return restarted

    def restart_libvirtd(self, host: str | LabHost) -> None:
        """Start one host's libvirtd again (after it died: a test kills it), waiting until
        it answers; its daemon's connection opens again at its next call."""
        target = self.host(host)
        old = self._procs.pop(f"libvirtd-{target.name}", None)
        if old is not None and old.poll() is None:
            old.terminate()
            old.wait(timeout=10)
        proc = libvirt.start(target)
        self._procs[f"libvirtd-{target.name}"] = proc
        libvirt.wait_answering(proc, target, libvirt.START_TIMEOUT_S)

    def _replace_host(self, new: LabHost) -> None:
        self._hosts = [new if h.name == new.name else h for h in self._hosts]

    # ---- using -----------------------------------------------------------------------------

    def health(self, host: str | LabHost, timeout: float = 5.0) -> daemons.Health:
        """``GET /v1/health`` of a host's daemon, with the lab's token."""
        return daemons.health(self.host(host), self.token, timeout, self.client_context())

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
        topology.shape_link(target, bps)
        self._replace_host(dataclasses.replace(target, link_rate_bps=bps))
        self._save()

    def status(self) -> dict[str, Any]:
        """The state file's content plus, per host, what is true right now: daemon alive and
        answering, link up, the rates tc really applies."""
        data = self.to_json()
        rows = []
        for host in self._hosts:
            row = host.to_json()
            row["guest_addresses"] = self.guest_addresses(host)
            row["libvirt_uri"] = libvirt.local_uri(host) if host.libvirt else None
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
        """Stop everything of this lab and remove it; see :meth:`destroy`. Its operator's
        certificate stops being this process's."""
        try:
            Lab.destroy(self.name, known=self)
        finally:
            for proc in self._procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=1)
            self.state = LabState.DOWN
            if self._tls is not None and process_tls() is self._tls:
                use_tls(None)

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
        return teardown.destroy(name, labdir, lab.hosts if lab is not None else [])

    @classmethod
    def down_all(cls, name_prefix: str = "") -> builtins.list[str]:
        """Remove every devagent lab found by state folder or by the ``da-``/``dab-``/``dav-``
        name prefixes (only those whose lab name starts with ``name_prefix``). Returns the
        names of the labs removed."""
        chosen = teardown.leftover_names(name_prefix)
        problems = []
        for name in chosen:
            try:
                cls.destroy(name)
            except StateError as err:
                problems.append(str(err))
        if problems:
            raise StateError("; ".join(problems))
        return chosen
