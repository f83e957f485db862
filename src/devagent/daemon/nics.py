"""VM NICs as their host daemon makes and supervises them: the tap on the host's guest
bridge and the NIC's net agent process (addresses and MACs: :mod:`devagent.guestnet`).
A VM keeps its address and MAC wherever it migrates: the destination makes a tap of its own
and a net agent held until the guest runs there (:mod:`devagent.daemon.migration.net`).

Each NIC's agent (``devagent agent net``) runs in its own session, like a disk's agent: a
daemon restart never touches the guest's network, a dead agent is restarted on the same
sockets (QEMU, the stream server, takes the new connection), and the agent is reached only
through its control socket.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from devagent.daemon.supervised import Supervised
from devagent.errors import EnvironmentProblem, UsageError
from devagent.wire import convert, to_json

log = logging.getLogger(__name__)

#: A migration's destination holds its NIC from its start until the guest runs there: as
#: long as a migration may take (the agent's own default, 30 s, is for a forgotten hold).
INCOMING_MAX_HOLD_S = 900.0


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError as err:
        raise EnvironmentProblem("ip is not installed (package iproute2)") from err


def make_tap(name: str, bridge: str) -> None:
    """A new tap ``name`` on ``bridge``, up."""
    if _ip("link", "show", "dev", bridge).returncode != 0:
        raise EnvironmentProblem(f"bridge {bridge} for guest NICs is not on this host")
    _ip("link", "del", name)  # a tap a dead daemon left behind
    for args in (
        ("tuntap", "add", "dev", name, "mode", "tap"),
        ("link", "set", name, "master", bridge),
        ("link", "set", name, "up"),
    ):
        done = _ip(*args)
        if done.returncode != 0:
            _ip("link", "del", name)
            raise EnvironmentProblem(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def delete_tap(name: str) -> None:
    _ip("link", "del", name)


class NicIdentity(msgspec.Struct):
    """What makes a VM's NIC the same on another host: its node, address and MAC (a
    migration's destination makes it again from these)."""

    node: str
    address: str
    mac: str


class NetAgentAddresses(msgspec.Struct):
    """What the daemon keeps of a net agent's first ``GET /status``: where peers reach it."""

    peer_addresses: list[str] = msgspec.field(default_factory=list)


@dataclass
class NicAgent(Supervised):
    """One NIC of one VM: its address, MAC, tap, and the net agent process serving it."""

    kind = "net agent"
    bad_request = UsageError  # e.g. a tap that is not on this host

    vm: str
    node: str  # the NIC's id: net0
    run_dir: str
    address: str  # the guest's, ADDR/PREFIX
    mac: str
    tap: str  # the agent's uplink now
    made_tap: str | None = None  # the tap the daemon made for it (removed with the VM)
    peer_listen: str | None = None  # accept frames from peer agents on this host address
    hold: bool = False  # start held (a migration's destination)
    pid: int | None = None
    peer_address: str | None = None  # "tcp:HOST:PORT" once started with peer_listen

    @property
    def stream_socket(self) -> Path:
        return Path(self.run_dir) / f"{self.node}.sock"

    def to_json(self) -> Any:
        """Its record in ``vm.json``: its fields."""
        return to_json(self)

    @classmethod
    def from_json(cls, data: object) -> NicAgent:
        return convert(data, cls, what="a saved NIC record")

    def describe(self) -> str:
        return f"VM {self.vm} NIC {self.node} (tap {self.tap}, {self.address})"

    def argv(self) -> list[str]:
        argv = [
            sys.executable, "-m", "devagent.cli.net_cmd",
            "--vm-socket", str(self.stream_socket),
            "--tap", self.tap,
            "--control", str(self.control_socket),
            "--vm", self.vm,
            "--nic", self.node,
        ]  # fmt: skip
        if self.peer_listen:
            # a restarted agent takes the port it had, so a peer reconnects to the same place
            port = self.peer_address.rpartition(":")[2] if self.peer_address else "0"
            argv += ["--peer-listen", f"{self.peer_listen}:{port}"]
        if self.hold:
            argv += ["--hold", "--max-hold", str(INCOMING_MAX_HOLD_S)]
        return argv + self.tls_args()

    def title(self) -> str:
        return f"net agent for {self.describe()}"

    async def check_started(self) -> None:
        status = await self.ask("GET", "/status", into=NetAgentAddresses)
        tcp = [a for a in status.peer_addresses if a.startswith("tcp:")]
        self.peer_address = tcp[0] if tcp else None

    async def stop(self) -> None:
        """Stop the agent (kill it if it lingers), then remove the tap the daemon made."""
        await super().stop()
        self.remove_tap()

    def remove_tap(self) -> None:
        if self.made_tap is not None:
            delete_tap(self.made_tap)
            log.info("%s: tap %s removed", self.describe(), self.made_tap)
