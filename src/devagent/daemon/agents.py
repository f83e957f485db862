"""Agent processes as their host daemon supervises them.

Each VM disk is served by its own agent process (``devagent agent serve``), started in its
own session like QEMU, so that a daemon restart never touches guest I/O and one VM's agent
cannot stall another's. The daemon reaches an agent only through its control socket
(:mod:`devagent.agent.control`), one method per route here, each request and answer a type
of :mod:`devagent.agent.messages`; the data path is QEMU ↔ agent over the NBD socket.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from devagent.agent.messages import (
    BackendSpec,
    CompletionsAnswer,
    CutoverAnswer,
    CutoverRequest,
    FenceAnswer,
    FlushAnswer,
    MirrorCancelled,
    MirrorRate,
    MirrorRequest,
    MirrorStarted,
    MirrorStopped,
    RetireAnswer,
    StatusAnswer,
    SwapAnswer,
    SwapRequest,
    UnfenceAnswer,
)
from devagent.daemon import standby
from devagent.daemon.supervised import Supervised
from devagent.wire import convert, to_json


@dataclass
class AgentProcess(Supervised):
    """One agent process serving one disk of one VM."""

    vm: str
    node: str
    image: str
    run_dir: str
    pid: int | None = None
    listen_address: str | None = None  # also serve peers on TCP at this host address
    backend: BackendSpec | None = None  # what it serves; None: Local on ``image``
    tcp_address: str | None = None  # "tcp:HOST:PORT" once started with listen_address

    @property
    def nbd_socket(self) -> Path:
        return Path(self.run_dir) / f"{self.node}.nbd"

    @property
    def export(self) -> str:
        return self.node

    def to_json(self) -> Any:
        """Its record in ``vm.json`` (and an export's ``export.json``): its fields, the
        backend spec as the agent takes it."""
        return to_json(self)

    @classmethod
    def from_json(cls, data: object) -> AgentProcess:
        return convert(data, cls, what="a saved agent record")

    def title(self) -> str:
        return f"agent for VM {self.vm} disk {self.node}"

    def sockets(self) -> tuple[Path, ...]:
        return (self.nbd_socket, self.control_socket)

    async def check_started(self) -> None:
        tcp = [a for a in (await self.status()).addresses if a.startswith("tcp:")]
        self.tcp_address = tcp[0] if tcp else None

    def argv(self) -> list[str]:
        # ``devagent agent serve``, through the agent's own command module: it imports only
        # what an agent needs, so the agent is up sooner (a migration waits for it).
        source = [self.image] if self.backend is None else []  # else the spec says it
        argv = [
            sys.executable, "-m", standby.MODULE, "serve", *source,
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
            argv += ["--backend-json", msgspec.json.encode(self.backend).decode()]
        return argv + self.tls_args()

    # --- the control API, one method per route ------------------------------------------

    async def status(self) -> StatusAnswer:
        return await self.ask("GET", "/status", into=StatusAnswer)

    async def completions(self, since: float) -> CompletionsAnswer:
        return await self.ask("GET", "/completions", into=CompletionsAnswer, since=since)

    async def swap(self, backend: BackendSpec, *, timeout: float = 60.0) -> SwapAnswer:
        """Serve ``backend`` from now on (the guest's I/O held meanwhile)."""
        body = SwapRequest(backend=backend)
        return await self.ask("POST", "/swap", body, into=SwapAnswer, timeout=timeout)

    async def mirror(self, request: MirrorRequest) -> MirrorStarted:
        return await self.ask("POST", "/mirror", request, into=MirrorStarted)

    async def cutover(self, *, keep_source: bool = False, timeout: float = 60.0) -> CutoverAnswer:
        body = CutoverRequest(keep_source=keep_source)
        return await self.ask("POST", "/mirror/cutover", body, into=CutoverAnswer, timeout=timeout)

    async def cancel_mirror(self) -> MirrorCancelled:
        return await self.ask("POST", "/mirror/cancel", into=MirrorCancelled)

    async def stop_mirror(self) -> MirrorStopped:
        return await self.ask("POST", "/mirror/stop", into=MirrorStopped)

    async def mirror_rate(self, rate_limit: float | None) -> MirrorRate:
        return await self.ask("POST", "/mirror/rate", MirrorRate(rate_limit=rate_limit),
                              into=MirrorRate)  # fmt: skip

    async def flush(self, *, timeout: float = 60.0) -> FlushAnswer:
        return await self.ask("POST", "/flush", into=FlushAnswer, timeout=timeout)

    async def fence(self) -> FenceAnswer:
        return await self.ask("POST", "/fence", into=FenceAnswer)

    async def unfence(self) -> UnfenceAnswer:
        """Serve the VM's QEMU again after a fence (a roll-back after a daemon restart)."""
        return await self.ask("POST", "/unfence", into=UnfenceAnswer)

    async def retire(self, *, timeout: float = 60.0) -> RetireAnswer:
        return await self.ask("POST", "/retire", into=RetireAnswer, timeout=timeout)
