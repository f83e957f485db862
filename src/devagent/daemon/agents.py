"""Agent processes as their host daemon supervises them.

Each VM disk is served by its own agent process (``devagent agent serve``), started in its
own session like QEMU, so that a daemon restart never touches guest I/O and one VM's agent
cannot stall another's. The daemon reaches an agent only through its control socket
(:mod:`devagent.agent.control`); the data path is QEMU ↔ agent over the NBD socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from devagent.errors import PeerError, StateError
from devagent.qemu.vm import pid_alive

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


@dataclass
class AgentProcess:
    """One agent process serving one disk of one VM."""

    vm: str
    node: str
    image: str
    run_dir: str
    pid: int | None = None
    listen_address: str | None = None  # also serve peers on TCP at this host address
    backend: dict[str, Any] | None = None  # backend spec; None: Local on ``image``
    tcp_address: str | None = None  # "tcp:HOST:PORT" once started with listen_address

    @property
    def nbd_socket(self) -> Path:
        return Path(self.run_dir) / f"{self.node}.nbd"

    @property
    def control_socket(self) -> Path:
        return Path(self.run_dir) / f"{self.node}.ctl"

    @property
    def log_file(self) -> Path:
        return Path(self.run_dir) / f"agent-{self.node}.log"

    @property
    def export(self) -> str:
        return self.node

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentProcess:
        return cls(**data)

    def argv(self) -> list[str]:
        # ``devagent agent serve``, through the agent's own command module: it imports only
        # what an agent needs, so the agent is up sooner (a migration waits for it).
        source = [self.image] if self.backend is None else []  # else the spec says it
        argv = [
            sys.executable, "-m", "devagent.cli.agent_cmd", "serve", *source,
            "--unix", str(self.nbd_socket),
            "--name", self.export,
            "--control", str(self.control_socket),
            "--label", f"vm={self.vm} device={self.node}",
        ]  # fmt: skip
        if self.listen_address:
            # a restarted agent takes the port it had, so peers reconnect to the same address
            port = self.tcp_address.rpartition(":")[2] if self.tcp_address else "0"
            argv += ["--tcp", f"{self.listen_address}:{port}"]
        if self.backend is not None:
            argv += ["--backend-json", json.dumps(self.backend)]
        return argv

    async def start(self) -> None:
        """Start the agent and return once its control socket answers."""
        for path in (self.nbd_socket, self.control_socket):
            path.unlink(missing_ok=True)
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
                raise PeerError(
                    f"agent for VM {self.vm} disk {self.node} exited at start: {self.tail()}"
                )
            if self.control_socket.exists() and self.nbd_socket.exists():
                with contextlib.suppress(PeerError):
                    status = await self.call("GET", "/status")
                    tcp = [a for a in status.get("addresses", []) if a.startswith("tcp:")]
                    self.tcp_address = tcp[0] if tcp else None
                    break
            if time.monotonic() > deadline:
                await self.kill()
                raise PeerError(f"agent for VM {self.vm} disk {self.node} did not start")
            await asyncio.sleep(0.02)
        # Reap the child when it exits, so it never lingers as a zombie.
        asyncio.get_running_loop().create_task(proc.wait())
        log.info(
            "agent for VM %s disk %s: pid %d on %s", self.vm, self.node, self.pid, self.nbd_socket
        )

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
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float = 60.0,
        **params: Any,
    ) -> Any:
        """One request on the control socket; failures become :class:`PeerError`."""
        connector = aiohttp.UnixConnector(path=str(self.control_socket))
        limit = aiohttp.ClientTimeout(total=timeout)
        url = f"http://agent{path}"
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=limit) as session,
                session.request(method, url, params=params or None, json=body) as resp,
            ):
                body = await resp.json(content_type=None)
                if resp.status == 409:
                    raise StateError(f"agent {self.vm}/{self.node}: {body.get('error')}")
                if resp.status >= 400:
                    raise PeerError(f"agent {self.vm}/{self.node}: {body.get('error')}")
                return body
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            raise PeerError(f"agent {self.vm}/{self.node} unreachable: {err!r}") from err

    async def stop(self) -> None:
        """Ask the agent to stop (it answers or fails every request), kill it if it lingers."""
        if not self.alive:
            return
        with contextlib.suppress(PeerError, StateError):
            await self.call("POST", "/stop")
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.kill()

    async def kill(self) -> None:
        if self.pid is not None and pid_alive(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            for _ in range(100):
                if not pid_alive(self.pid):
                    break
                await asyncio.sleep(0.02)
        for path in (self.nbd_socket, self.control_socket):
            path.unlink(missing_ok=True)
