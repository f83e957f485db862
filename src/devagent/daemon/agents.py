"""Agent processes as their host daemon supervises them.

Each VM disk is served by its own agent process (``devagent agent serve``), started in its
own session like QEMU, so that a daemon restart never touches guest I/O and one VM's agent
cannot stall another's. The daemon reaches an agent only through its control socket
(:mod:`devagent.agent.control`); the data path is QEMU ↔ agent over the NBD socket.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from devagent.daemon.supervised import Supervised


@dataclass
class AgentProcess(Supervised):
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
    def export(self) -> str:
        return self.node

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentProcess:
        return cls(**data)

    def title(self) -> str:
        return f"agent for VM {self.vm} disk {self.node}"

    def sockets(self) -> tuple[Path, ...]:
        return (self.nbd_socket, self.control_socket)

    def started(self, status: dict[str, Any]) -> None:
        tcp = [a for a in status.get("addresses", []) if a.startswith("tcp:")]
        self.tcp_address = tcp[0] if tcp else None

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
