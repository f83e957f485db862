"""``devagent agent bench``: the block agent against qemu-nbd on one image, one client.

Both servers serve the same image from unix sockets; ``qemu-img bench`` drives each in turn
with the same arguments.  Each workload runs ``rounds`` times alternating agent / qemu-nbd
(so load from other processes hits both alike) and the best run of each counts.

``qemu-img bench`` has no random mode: the "random" 4 KiB workloads step through the image
with a large prime stride (``STRIDE`` x 4 KiB), which scatters requests over the whole
image rather than streaming; the 1 MiB workloads are sequential.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from devagent.errors import EnvironmentProblem, PeerError

EXPORT = "bench"
STRIDE = 2503  # pages: a prime, so the strided walk visits pages all over the image
_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")


@dataclass(frozen=True)
class Workload:
    name: str
    block: int
    write: bool
    count: int
    unit: str  # "ops/s" or "MB/s"


@dataclass(frozen=True)
class Result:
    name: str
    unit: str
    agent: float
    qemu_nbd: float

    @property
    def ratio(self) -> float:
        return self.agent / self.qemu_nbd if self.qemu_nbd else 0.0


def workloads(count_small: int, count_large: int) -> list[Workload]:
    return [
        Workload("randread-4k-qd16", 4096, False, count_small, "ops/s"),
        Workload("randwrite-4k-qd16", 4096, True, count_small, "ops/s"),
        Workload("seqread-1m-qd16", 1 << 20, False, count_large, "MB/s"),
        Workload("seqwrite-1m-qd16", 1 << 20, True, count_large, "MB/s"),
    ]


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerError(f"{what} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            return
        time.sleep(0.05)
    raise PeerError(f"{what} did not listen on {path} within 20 s")


@contextlib.contextmanager
def _server(argv: list[str], sock: Path, what: str) -> Iterator[None]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_socket(sock, proc, what)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _image_opts(sock: Path) -> str:
    return (
        f"driver=raw,file.driver=nbd,file.server.type=unix,"
        f"file.server.path={sock},file.export={EXPORT}"
    )


def bench_argv(workload: Workload, sock: Path, image_size: int) -> list[str]:
    argv = ["qemu-img", "bench", "-c", str(workload.count), "-d", "16", "-s", str(workload.block)]
    if workload.block == 4096:
        argv += ["-S", str(STRIDE * 4096 % image_size)]
    if workload.write:
        argv.append("-w")
    return [*argv, "--image-opts", _image_opts(sock)]


def _run_one(workload: Workload, sock: Path, image_size: int) -> float:
    argv = bench_argv(workload, sock, image_size)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    match = _COMPLETED.search(out.stdout)
    if out.returncode != 0 or match is None:
        raise PeerError(f"{' '.join(argv)} failed: {out.stderr.strip() or out.stdout.strip()}")
    seconds = float(match.group(1))
    if workload.unit == "ops/s":
        return workload.count / seconds
    return workload.count * workload.block / seconds / 1e6


def _make_image(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.truncate(size)


def _server_argvs(image: Path, agent_sock: Path, qemu_sock: Path) -> tuple[list[str], list[str]]:
    """The command lines of the two servers compared: the agent and qemu-nbd."""
    agent = [sys.executable, "-m", "devagent.cli.agent_cmd", "serve", str(image),
             "--unix", str(agent_sock), "--name", EXPORT, "--quiet"]  # fmt: skip
    qemu = ["qemu-nbd", "-f", "raw", "-x", EXPORT, "-k", str(qemu_sock), "-t",
            "--cache=writeback", "--aio=threads", "-e", "4", str(image)]  # fmt: skip
    return agent, qemu


def run_bench(
    *,
    size: int = 256 << 20,
    count_small: int = 40000,
    count_large: int = 1000,
    rounds: int = 3,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Serve one image with the agent and with qemu-nbd; measure both; return a report."""
    for tool in ("qemu-img", "qemu-nbd"):
        if shutil.which(tool) is None:
            raise EnvironmentProblem(f"{tool} is not installed (Debian package qemu-utils)")
    with tempfile.TemporaryDirectory(prefix="devagent-bench-", dir=workdir) as tmp:
        root = Path(tmp)
        image = root / "bench.img"
        _make_image(image, size)
        agent_sock, qemu_sock = root / "agent.sock", root / "qemu.sock"
        agent_argv, qemu_argv = _server_argvs(image, agent_sock, qemu_sock)
        results = []
        with (
            _server(agent_argv, agent_sock, "devagent agent"),
            _server(qemu_argv, qemu_sock, "qemu-nbd"),
        ):
            for workload in workloads(count_small, count_large):
                best = {"agent": 0.0, "qemu": 0.0}
                for _ in range(rounds):
                    best["agent"] = max(best["agent"], _run_one(workload, agent_sock, size))
                    best["qemu"] = max(best["qemu"], _run_one(workload, qemu_sock, size))
                results.append(Result(workload.name, workload.unit, best["agent"], best["qemu"]))
        example = " ".join(bench_argv(workloads(count_small, count_large)[0], agent_sock, size))
    return {
        "image_size": size,
        "rounds": rounds,
        "client": example,
        "results": [asdict(r) | {"ratio": round(r.ratio, 3)} for r in results],
    }
