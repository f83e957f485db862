"""VM NICs as their host daemon makes and supervises them: the tap on the host's guest
bridge and the NIC's net agent process (addresses and MACs: :mod:`devagent.daemon.guestnet`).
A VM keeps its address and MAC wherever it migrates: the destination makes a tap of its own
and a net agent held until the guest runs there (:mod:`devagent.daemon.netmigration`).

Each NIC's agent (``devagent agent net``) runs in its own session, like a disk's agent: a
daemon restart never touches the guest's network, a dead agent is restarted on the same
sockets (QEMU, the stream server, takes the new connection), and the agent is reached only
through its control socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from devagent.errors import EnvironmentProblem, PeerError, StateError, UsageError
from devagent.qemu.vm import pid_alive

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
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


def tap_exists(name: str) -> bool:
    return _ip("link", "show", "dev", name).returncode == 0


@dataclass
class NicAgent:
    """One NIC of one VM: its address, MAC, tap, and the net agent process serving it."""

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

    @property
    def control_socket(self) -> Path:
        return Path(self.run_dir) / f"{self.node}.ctl"

    @property
    def log_file(self) -> Path:
        return Path(self.run_dir) / f"agent-{self.node}.log"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NicAgent:
        return cls(**data)

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
        return argv

    async def start(self) -> None:
        """Start the agent; return once its control socket answers."""
        self.control_socket.unlink(missing_ok=True)
        with self.log_file.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *self.argv(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                cwd=self.run_dir,
            )
        self.pid = proc.pid
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.returncode is not None or not pid_alive(proc.pid):
                raise PeerError(f"net agent for {self.describe()} exited at start: {self.tail()}")
            if self.control_socket.exists():
                with contextlib.suppress(PeerError):
                    status = await self.call("GET", "/status")
                    tcp = [a for a in status.get("peer_addresses", []) if a.startswith("tcp:")]
                    self.peer_address = tcp[0] if tcp else None
                    break
            if time.monotonic() > deadline:
                await self.kill()
                raise PeerError(f"net agent for {self.describe()} did not start: {self.tail()}")
            await asyncio.sleep(0.02)
        asyncio.get_running_loop().create_task(proc.wait())  # reaped when it exits
        log.info("net agent for %s: pid %d", self.describe(), self.pid)

    def tail(self, lines: int = 5) -> str:
        try:
            text = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    @property
    def alive(self) -> bool:
        return self.pid is not None and pid_alive(self.pid)

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float = 30.0
    ) -> Any:
        """One request on the control socket; failures become :class:`PeerError` (a wrong
        state :class:`StateError`, a bad request :class:`UsageError`)."""
        connector = aiohttp.UnixConnector(path=str(self.control_socket))
        limit = aiohttp.ClientTimeout(total=timeout)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=limit) as session,
                session.request(method, f"http://agent{path}", json=body) as resp,
            ):
                answer = await resp.json(content_type=None)
                if resp.status == 409:
                    raise StateError(f"net agent {self.vm}/{self.node}: {answer.get('error')}")
                if resp.status == 400:  # e.g. a tap that is not on this host
                    raise UsageError(f"net agent {self.vm}/{self.node}: {answer.get('error')}")
                if resp.status >= 400:
                    raise PeerError(f"net agent {self.vm}/{self.node}: {answer.get('error')}")
                return answer
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            raise PeerError(f"net agent {self.vm}/{self.node} unreachable: {err!r}") from err

    async def stop(self) -> None:
        """Stop the agent (kill it if it lingers), then remove the tap the daemon made."""
        if self.alive:
            with contextlib.suppress(PeerError, StateError):
                await self.call("POST", "/stop")
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while self.alive and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        await self.kill()
        self.remove_tap()

    async def kill(self) -> None:
        if self.pid is not None and pid_alive(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            for _ in range(100):
                if not pid_alive(self.pid):
                    break
                await asyncio.sleep(0.02)
        self.control_socket.unlink(missing_ok=True)

    def remove_tap(self) -> None:
        if self.made_tap is not None:
            delete_tap(self.made_tap)
            log.info("%s: tap %s removed", self.describe(), self.made_tap)
