"""Real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy) against a live block agent."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_fakes import read_bytes
from devagent.agent.agent import BlockAgent
from devagent.agent.backend import Local
from devagent.nbd.client import NbdClient
from devagent.process import wait_exit


def test_the_real_clients_are_installed() -> None:
    """`make test` installs them; without them these tests would prove nothing."""
    missing = [t for t in ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy") if not shutil.which(t)]
    assert missing == []


SIZE = 8 << 20
MiB = 1 << 20


async def run(*argv: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode()
    if check:
        assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}: {text}"
    return text


def make_sparse(path: Path, size: int, data_at: dict[int, bytes]) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in data_at.items():
            f.seek(offset)
            f.write(data)


@pytest.fixture
async def export(tmp_path: Path) -> AsyncIterator[tuple[BlockAgent, Path, str]]:
    image = tmp_path / "disk.img"
    make_sparse(image, SIZE, {0: b"\x11" * MiB, 4 * MiB: b"\x22" * MiB})
    agent = BlockAgent(Local(image), "disk")
    sock = tmp_path / "agent.sock"
    await agent.listen_unix(sock)
    try:
        yield agent, image, f"nbd+unix:///disk?socket={sock}"
    finally:
        await agent.stop()


async def test_nbdinfo_json_reports_what_we_implement(export: tuple[BlockAgent, Path, str]) -> None:
    _, _, uri = export
    info = json.loads(await run("nbdinfo", "--json", uri))
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    (exp,) = info["exports"]
    assert exp["export-name"] == "disk" and exp["export-size"] == SIZE
    assert "base:allocation" in exp["contexts"]
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert exp[flag] is True, flag
    for flag in ("can_df", "can_cache", "can_fast_zero", "is_read_only"):
        assert exp[flag] is False, flag
    assert exp["block_size_maximum"] == 32 * MiB


async def test_nbdinfo_map_shows_data_and_holes(export: tuple[BlockAgent, Path, str]) -> None:
    _, _, uri = export
    rows = [line.split() for line in (await run("nbdinfo", "--map", uri)).splitlines()]
    extents = [(int(r[0]), int(r[1]), int(r[2])) for r in rows]
    assert sum(length for _, length, _ in extents) == SIZE
    assert (0, MiB, 0) in extents and (4 * MiB, MiB, 0) in extents
    assert (MiB, 3 * MiB, 3) in extents  # hole, reads as zero


async def test_qemu_img_info_convert_compare(
    export: tuple[BlockAgent, Path, str], tmp_path: Path
) -> None:
    agent, image, uri = export
    info = json.loads(await run("qemu-img", "info", "--output=json", uri))
    assert info["virtual-size"] == SIZE
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(SIZE))
    await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), uri)
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), uri)
    assert read_bytes(image) == read_bytes(source)
    out = tmp_path / "out.img"
    await run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out))
    assert read_bytes(out) == read_bytes(source)
    differs = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(out), uri, check=False)
    assert "Images are identical" in differs
    assert agent.journal.stats().errors == 0


async def test_qemu_io_many_async_pattern_writes_and_verified_reads(
    export: tuple[BlockAgent, Path, str],
) -> None:
    agent, image, uri = export
    block = 64 * 1024
    commands = []
    for i in range(96):
        commands += ["-c", f"aio_write -P {i + 1} {i * block} {block}"]
    commands += ["-c", "aio_flush"]
    for i in range(96):
        commands += ["-c", f"aio_read -P {i + 1} {i * block} {block}"]
    commands += ["-c", "aio_flush", "-c", f"write -z {SIZE - block} {block}"]
    out = await run("qemu-io", "-f", "raw", *commands, uri)
    assert "fail" not in out.lower() and "error" not in out.lower(), out
    assert out.count("read 65536/65536") == 96
    data = read_bytes(image)
    for i in range(96):
        assert data[i * block : (i + 1) * block] == bytes([i + 1]) * block
    assert data[SIZE - block :] == bytes(block)
    assert agent.journal.stats().counts["WRITE"] >= 96
    # a wrong pattern is noticed: the check above could fail
    wrong = await run("qemu-io", "-f", "raw", "-c", f"read -P 0x77 0 {block}", uri, check=False)
    assert "Pattern verification failed" in wrong


async def test_reads_across_data_and_holes_come_back_whole(
    export: tuple[BlockAgent, Path, str],
) -> None:
    """Reads spanning the image's data and its holes are answered as data and hole chunks:
    QEMU's client and ours put them together (one read of each ends in a hole, one starts
    in one, one is a hole alone)."""
    _, image, uri = export
    checks = [("0x11", MiB - 65536, 65536), ("0", MiB, 3 * MiB), ("0x22", 4 * MiB, 65536)]
    commands = [arg for p, at, n in checks for arg in ("-c", f"read -P {p} {at} {n}")]
    out = await run("qemu-io", "-f", "raw", "-r", *commands, uri)
    assert "fail" not in out.lower() and out.count("read ") == 3, out
    client = await NbdClient.connect(unix=image.parent / "agent.sock", export="disk")
    try:
        for at, n in ((MiB - 65536, 2 * 65536), (4 * MiB - 65536, 2 * 65536), (2 * MiB, 65536)):
            assert await client.read(at, n) == read_bytes(image, at, n)
    finally:
        await client.close()


async def test_nbdcopy_in_and_out(export: tuple[BlockAgent, Path, str], tmp_path: Path) -> None:
    _, image, uri = export
    source = tmp_path / "source.img"
    make_sparse(source, SIZE, {MiB: os.urandom(2 * MiB), 7 * MiB: os.urandom(MiB)})
    await run("nbdcopy", str(source), uri)
    assert read_bytes(image) == read_bytes(source)
    out = tmp_path / "out.img"
    make_sparse(out, SIZE, {})
    await run("nbdcopy", uri, str(out))
    assert read_bytes(out) == read_bytes(source)


async def test_nbdinfo_over_tcp(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    make_sparse(image, SIZE, {})
    agent = BlockAgent(Local(image), "tcpdisk")
    try:
        host, port = await agent.listen_tcp("127.0.0.1", 0)
        assert str(SIZE) in await run("nbdinfo", "--size", f"nbd://{host}:{port}/tcpdisk")
    finally:
        await agent.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_cli_serve_runs_in_foreground_and_stops_cleanly(
    tmp_path: Path, signum: signal.Signals
) -> None:
    image = tmp_path / "disk.img"
    make_sparse(image, SIZE, {0: b"cli!"})
    sock = tmp_path / "cli.sock"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devagent.cli.agent_cmd",
        "serve",
        str(image),
        "--unix",
        str(sock),
        "--name",
        "cli",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith(f"listening on unix:{sock}")
        assert f"nbd+unix:///cli?socket={sock}" in line
        out = await run(
            "qemu-io", "-f", "raw", "-c", "read -P 0x63 0 1", f"nbd+unix:///cli?socket={sock}"
        )
        assert "read 1/1" in out
        proc.send_signal(signum)
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0
        assert b"stopped" in rest
        assert not sock.exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_serve_needs_an_address(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    make_sparse(image, 4096, {})
    out = subprocess.run(
        [sys.executable, "-m", "devagent.cli.agent_cmd", "serve", str(image)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "give --unix PATH or --tcp HOST:PORT" in out.stderr


async def test_our_client_against_qemu_nbd(tmp_path: Path) -> None:
    """The asyncio client (the future Remote backend's) talks to a foreign server too."""
    image = tmp_path / "q.img"
    make_sparse(image, SIZE, {2 * MiB: b"\x33" * MiB})
    sock, pid_file = tmp_path / "q.sock", tmp_path / "q.pid"
    # --fork: the parent exits once the server listens (its exit is the readiness event)
    parent = await asyncio.create_subprocess_exec(
        "qemu-nbd", "-f", "raw", "-x", "q", "-k", str(sock), "-t", "--fork",
        f"--pid-file={pid_file}", str(image),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(parent.communicate(), 30)
    assert parent.returncode == 0, err
    server = int(pid_file.read_text())
    try:
        async with await NbdClient.connect(unix=sock, export="q") as client:
            assert client.size == SIZE and client.structured and client.contexts
            await asyncio.gather(
                *(client.write(i * 65536, bytes([i]) * 65536, fua=i % 2 == 0) for i in range(16))
            )
            reads = await asyncio.gather(*(client.read(i * 65536, 65536) for i in range(16)))
            assert reads == [bytes([i]) * 65536 for i in range(16)]
            await client.flush()
            extents = await client.block_status(MiB, 2 * MiB)
            assert extents[0][1] & 1  # a hole at 1 MiB
            assert any(flags == 0 for _, flags in extents)  # data at 2 MiB
    finally:
        os.kill(server, signal.SIGTERM)
        await wait_exit(server, 30, "qemu-nbd")
