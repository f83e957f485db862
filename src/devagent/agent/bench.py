"""``devagent agent bench``: the block agent against qemu-nbd on one image, one client.

Both servers serve the same image from unix sockets (with ``tls``: on TCP, TLS required, as
host ``a`` of a PKI made for the run, the client presenting host ``b``'s certificate);
``qemu-img bench`` drives each in turn with the same arguments. Each workload runs
``rounds`` times alternating agent / qemu-nbd (so load from other processes hits both alike)
and the best run of each counts.

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


def workloads(count_small: int, count_large: int, tls: bool = False) -> list[Workload]:
    """The four workloads; over TLS ``nbdcopy`` drives them, sequentially through the whole
    image (``qemu-img bench`` cannot take TLS credentials), so every one is sequential."""
    small = "seq" if tls else "rand"
    return [
        Workload(f"{small}read-4k-qd16", 4096, False, count_small, "ops/s"),
        Workload(f"{small}write-4k-qd16", 4096, True, count_small, "ops/s"),
        Workload("seqread-1m-qd16", 1 << 20, False, count_large, "MB/s"),
        Workload("seqwrite-1m-qd16", 1 << 20, True, count_large, "MB/s"),
    ]


@dataclass(frozen=True)
class Served:
    """Where a server listens: a unix socket, or a TCP port on 127.0.0.1 with TLS (the
    client's certificate folder ``tls_dir``)."""

    sock: Path | None = None
    port: int = 0
    tls_dir: Path | None = None

    def connect(self) -> None:
        if self.sock is not None:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(self.sock))
        else:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()

    def image_opts(self) -> str:
        """``qemu-img bench``'s ``--image-opts`` (a unix socket)."""
        server = f"file.server.type=unix,file.server.path={self.sock}"
        return f"driver=raw,file.driver=nbd,{server},file.export={EXPORT}"

    def uri(self) -> str:
        """``nbdcopy``'s URI (TCP, with TLS)."""
        return f"nbds://127.0.0.1:{self.port}/{EXPORT}?tls-certificates={self.tls_dir}"


def _wait_listening(served: Served, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerError(f"{what} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError):
            served.connect()
            return
        time.sleep(0.05)
    raise PeerError(f"{what} did not listen on {served} within 20 s")


@contextlib.contextmanager
def _server(argv: list[str], served: Served, what: str) -> Iterator[None]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_listening(served, proc, what)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_argv(workload: Workload, served: Served, image_size: int, source: Path) -> list[str]:
    """The client's command line: ``qemu-img bench`` on a unix socket; over TLS ``nbdcopy``
    reading the whole export (to ``null:``) or writing ``source`` over it."""
    if served.tls_dir is not None:
        copy = ["nbdcopy", "--no-extents", f"--request-size={workload.block}",
                "--requests=16", "--connections=1"]  # fmt: skip
        if workload.write:
            return [*copy, str(source), served.uri()]
        return [*copy, served.uri(), "null:"]
    argv = ["qemu-img", "bench", "-c", str(workload.count), "-d", "16", "-s", str(workload.block)]
    if workload.block == 4096:
        argv += ["-S", str(STRIDE * 4096 % image_size)]
    if workload.write:
        argv.append("-w")
    return [*argv, "--image-opts", served.image_opts()]


def _run_one(workload: Workload, served: Served, image_size: int, source: Path) -> float:
    argv = bench_argv(workload, served, image_size, source)
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - started
    match = _COMPLETED.search(out.stdout)
    if out.returncode != 0 or (match is None and served.tls_dir is None):
        raise PeerError(f"{' '.join(argv)} failed: {out.stderr.strip() or out.stdout.strip()}")
    if match is not None:
        seconds, count = float(match.group(1)), workload.count
    else:  # nbdcopy: the whole image, timed from outside (its start is a few ms of it)
        seconds, count = elapsed, image_size // workload.block
    if workload.unit == "ops/s":
        return count / seconds
    return count * workload.block / seconds / 1e6


def _make_image(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.truncate(size)


def _server_argvs(
    image: Path, agent: Served, qemu: Served, tls_dir: Path | None
) -> tuple[list[str], list[str]]:
    """The command lines of the two servers compared: the agent and qemu-nbd (on TCP with
    TLS, as the host whose certificate folder is ``tls_dir``)."""
    agent_argv = [sys.executable, "-m", "devagent.cli.agent_cmd", "serve", str(image),
                  "--name", EXPORT, "--quiet"]  # fmt: skip
    qemu_argv = ["qemu-nbd", "-f", "raw", "-x", EXPORT, "-t",
                 "--cache=writeback", "--aio=threads", "-e", "4", str(image)]  # fmt: skip
    if tls_dir is None:
        agent_argv += ["--unix", str(agent.sock)]
        qemu_argv += ["-k", str(qemu.sock)]
    else:
        agent_argv += ["--tcp", f"127.0.0.1:{agent.port}", "--tls-dir", str(tls_dir)]
        qemu_argv += [
            "-b", "127.0.0.1", "-p", str(qemu.port), "--tls-creds", "tls0", "--object",
            f"tls-creds-x509,id=tls0,endpoint=server,dir={tls_dir},verify-peer=on",
        ]  # fmt: skip
    return agent_argv, qemu_argv


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _endpoints(root: Path, tls: bool) -> tuple[Served, Served, Path | None]:
    """Where the agent and qemu-nbd listen, and the servers' certificate folder (TLS: a PKI
    made in ``root``, the servers host a, the client host b)."""
    if not tls:
        return Served(sock=root / "agent.sock"), Served(sock=root / "qemu.sock"), None
    from devagent import pki  # cryptography: only when certificates are made

    pki.init_ca(root / "pki")
    server, client = (pki.issue_host(root / "pki", h, ["127.0.0.1"]) for h in ("a", "b"))
    return (
        Served(port=_free_port(), tls_dir=client),
        Served(port=_free_port(), tls_dir=client),
        server,
    )


def run_bench(
    *,
    size: int = 256 << 20,
    count_small: int = 40000,
    count_large: int = 1000,
    rounds: int = 3,
    workdir: Path | None = None,
    tls: bool = False,
) -> dict[str, Any]:
    """Serve one image with the agent and with qemu-nbd; measure both; return a report.
    ``tls``: both on TCP with TLS required, mutual x509."""
    for tool in ("qemu-img", "qemu-nbd", "nbdcopy"):
        if shutil.which(tool) is None:
            raise EnvironmentProblem(f"{tool} is not installed (Debian package qemu-utils)")
    with tempfile.TemporaryDirectory(prefix="devagent-bench-", dir=workdir) as tmp:
        root = Path(tmp)
        image, source = root / "bench.img", root / "source.img"
        _make_image(image, size)
        if tls:
            _make_image(source, size)  # what nbdcopy writes
        agent, qemu, tls_dir = _endpoints(root, tls)
        agent_argv, qemu_argv = _server_argvs(image, agent, qemu, tls_dir)
        results = []
        with (
            _server(agent_argv, agent, "devagent agent"),
            _server(qemu_argv, qemu, "qemu-nbd"),
        ):
            for workload in workloads(count_small, count_large, tls):
                best = {"agent": 0.0, "qemu": 0.0}
                for _ in range(rounds):
                    best["agent"] = max(best["agent"], _run_one(workload, agent, size, source))
                    best["qemu"] = max(best["qemu"], _run_one(workload, qemu, size, source))
                results.append(Result(workload.name, workload.unit, best["agent"], best["qemu"]))
        first = workloads(count_small, count_large, tls)[0]
        example = " ".join(bench_argv(first, agent, size, source))
    return {
        "image_size": size,
        "rounds": rounds,
        "transport": "tcp+tls" if tls else "unix",
        "client": example,
        "results": [asdict(r) | {"ratio": round(r.ratio, 3)} for r in results],
    }
