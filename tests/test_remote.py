"""Remote backend against live block agents on TCP: pipelined I/O, a peer killed and restarted
mid-stream (requests re-issued, nothing lost), a peer away past io_timeout (EIO), close."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from devagent.agent.agent import BlockAgent
from devagent.agent.backend import BackendError, Local
from devagent.agent.remote import Remote
from devagent.errors import PeerError, UsageError
from devagent.nbd.proto import Errno
from devagent.vocab import parse_address

SIZE = 8 << 20
BLOCK = 4096


async def until(condition: Callable[[], bool], what: str = "condition") -> None:
    """Poll until ``condition()`` holds; a hang guard (30 s), not a timing assertion."""
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} never became true")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(3).randbytes(SIZE))
    return path


@pytest.fixture
async def agent(image: Path) -> AsyncIterator[tuple[BlockAgent, int]]:
    served = BlockAgent(Local(image), "disk")
    _, port = await served.listen_tcp("127.0.0.1", 0)
    try:
        yield served, port
    finally:
        await served.stop()


async def test_addresses_are_checked() -> None:
    assert parse_address("tcp:10.0.0.1:10809") == ("tcp", "10.0.0.1", 10809)
    assert parse_address("unix:/run/x.sock") == ("unix", "/run/x.sock", 0)
    for bad in ("10.0.0.1:10809", "tcp:host", "tcp:host:0", "unix:", "udp:a:1"):
        with pytest.raises(UsageError):
            parse_address(bad)
    with pytest.raises(PeerError, match="cannot reach"):
        await Remote.open(f"tcp:127.0.0.1:{free_port()}", "disk", connect_timeout=0.3)


async def test_many_concurrent_writes_and_reads(agent: tuple[BlockAgent, int], image: Path) -> None:
    served, port = agent
    remote = await Remote.open(f"tcp:127.0.0.1:{port}", "disk")
    try:
        assert remote.size == SIZE and remote.connected and remote.peer.endswith(str(port))
        rng = random.Random(4)
        blocks = rng.sample(range(SIZE // BLOCK), 400)
        payload = {b: rng.randbytes(BLOCK) for b in blocks}
        await asyncio.gather(*(remote.write(b * BLOCK, payload[b]) for b in blocks))
        assert served.journal.stats().counts["WRITE"] == 400
        got = await asyncio.gather(*(remote.read(b * BLOCK, BLOCK) for b in blocks))
        assert got == [payload[b] for b in blocks]
        await remote.flush()
        await remote.write_zeroes(0, 2 * BLOCK)
        assert await remote.read(0, 2 * BLOCK) == bytes(2 * BLOCK)
        extents = await remote.block_status(0, SIZE)
        assert extents[0].zero  # the punched range comes back as a hole
        assert sum(e.length for e in extents) <= SIZE
        with pytest.raises(BackendError) as failed:
            await remote.read(SIZE - 1, 2)  # the peer's own error is passed on, not retried
        assert failed.value.errno == Errno.EINVAL
    finally:
        await remote.close()
    data = image.read_bytes()
    for b in blocks:
        if b >= 2:
            assert data[b * BLOCK : (b + 1) * BLOCK] == payload[b]


async def test_a_sparse_range_read_in_pieces_brings_only_its_data(
    agent: tuple[BlockAgent, int],
) -> None:
    """Our server sends a read's zero blocks as hole chunks: read in pieces, a range of
    scattered 4 KiB blocks is those blocks, and the remote learns it answers sparsely."""
    _, port = agent
    remote = await Remote.open(f"tcp:127.0.0.1:{port}", "disk")
    try:
        assert not remote.answers_sparsely
        await remote.write_zeroes(0, 64 * BLOCK)
        blocks = {3: b"c" * BLOCK, 4: b"d" * BLOCK, 40: b"x" * BLOCK}
        for b, data in blocks.items():
            await remote.write(b * BLOCK, data)
        pieces = await remote.read_pieces(0, 64 * BLOCK)
        assert pieces == [(3 * BLOCK, b"c" * BLOCK + b"d" * BLOCK), (40 * BLOCK, b"x" * BLOCK)]
        assert remote.answers_sparsely
        whole = await remote.read(0, 64 * BLOCK)  # a plain read still has every byte
        assert whole[3 * BLOCK : 5 * BLOCK] == b"c" * BLOCK + b"d" * BLOCK
        assert whole.count(0) == 61 * BLOCK
    finally:
        await remote.close()


@pytest.fixture
def agent_process(image: Path) -> Callable[[int], subprocess.Popen[bytes]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "devagent.cli.agent_cmd", "serve", str(image)),
                *("--tcp", f"127.0.0.1:{port}", "--name", "disk", "--quiet"),
            ],
            stdout=subprocess.DEVNULL,
        )
        started.append(proc)
        return proc

    yield start  # type: ignore[misc]
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def test_a_peer_killed_and_restarted_mid_stream_loses_nothing(
    agent_process: Callable[[int], subprocess.Popen[bytes]], image: Path
) -> None:
    port = free_port()
    first = agent_process(port)
    remote = await Remote.open(f"tcp:127.0.0.1:{port}", "disk", io_timeout=60)
    try:
        rng = random.Random(5)
        blocks = rng.sample(range(SIZE // BLOCK), 1200)
        payload = {b: rng.randbytes(BLOCK) for b in blocks}
        done = 0
        gate = asyncio.Semaphore(48)

        async def write_then_read(b: int) -> bytes:
            nonlocal done
            async with gate:
                await remote.write(b * BLOCK, payload[b])
                got = await remote.read(b * BLOCK, BLOCK)
                done += 1
                return got

        tasks = [asyncio.create_task(write_then_read(b)) for b in blocks]
        await until(lambda: done >= 200, "200 writes through the first agent")
        os.kill(first.pid, signal.SIGKILL)  # requests in flight lose their replies
        first.wait()
        await until(lambda: not remote.connected, "the Remote noticing the loss")
        stalled = done
        # every task through the gate waits for a connection: from here on only a Remote
        # that answered without its peer could complete anything
        await until(
            lambda: remote.waiting == min(48, len(blocks) - done),
            "every request through the gate waiting for a connection",
        )
        assert done - stalled < 48  # nothing completes without a peer (bar replies in transit)
        agent_process(port)  # a new agent on the same port and image
        results = await asyncio.gather(*tasks)
        assert results == [payload[b] for b in blocks]
        assert remote.reconnects >= 1 and remote.connected
        assert remote.retries >= 1  # requests in flight at the kill were sent again
        assert remote.last_error
    finally:
        await remote.close()
    data = image.read_bytes()
    for b in blocks:
        assert data[b * BLOCK : (b + 1) * BLOCK] == payload[b]


async def test_a_peer_away_past_io_timeout_fails_with_eio_then_recovers(
    image: Path, caplog: pytest.LogCaptureFixture
) -> None:
    served = BlockAgent(Local(image), "disk")
    _, port = await served.listen_tcp("127.0.0.1", 0)
    remote = await Remote.open(f"tcp:127.0.0.1:{port}", "disk", io_timeout=0.5)
    try:
        await served.stop()
        await until(lambda: not remote.connected, "the Remote noticing the stop")
        with (
            caplog.at_level(logging.ERROR, logger="devagent.agent.remote"),
            pytest.raises(BackendError) as failed,
        ):
            await remote.read(0, BLOCK)
        assert failed.value.errno == Errno.EIO
        assert f"tcp:127.0.0.1:{port}" in str(failed.value) and "'disk'" in str(failed.value)
        assert any(f"127.0.0.1:{port}" in r.getMessage() for r in caplog.records)
        assert remote.timeouts == 1
        # the peer comes back: later requests go through on a new connection
        served = BlockAgent(Local(image), "disk")
        await served.listen_tcp("127.0.0.1", port)
        assert await remote.read(BLOCK, BLOCK) == image.read_bytes()[BLOCK : 2 * BLOCK]
        assert remote.reconnects == 1
    finally:
        await remote.close()
        await served.stop()


async def test_a_peer_back_with_another_size_is_refused(image: Path, tmp_path: Path) -> None:
    served = BlockAgent(Local(image), "disk")
    _, port = await served.listen_tcp("127.0.0.1", 0)
    remote = await Remote.open(f"tcp:127.0.0.1:{port}", "disk", io_timeout=1.0)
    other = tmp_path / "other.img"
    other.write_bytes(bytes(SIZE // 2))
    try:
        await served.stop()
        served = BlockAgent(Local(other), "disk")
        await served.listen_tcp("127.0.0.1", port)
        with pytest.raises(BackendError, match="size changed"):
            await remote.read(0, BLOCK)
        assert not remote.connected
    finally:
        await remote.close()
        await served.stop()


async def test_close_fails_waiters_and_never_hangs(image: Path) -> None:
    served = BlockAgent(Local(image), "disk")
    _, port = await served.listen_tcp("127.0.0.1", 0)
    remote = await Remote.open(f"tcp:127.0.0.1:{port}", "disk", io_timeout=60)
    await served.stop()
    await until(lambda: not remote.connected, "the Remote noticing the stop")
    waiters = [asyncio.create_task(remote.read(0, BLOCK)) for _ in range(5)]
    await until(lambda: remote.waiting == 5, "the reads waiting for a connection")
    await asyncio.wait_for(remote.close(), 10)  # a hang guard, not a timing assertion
    for waiter in waiters:
        with pytest.raises(BackendError) as failed:
            await waiter
        assert failed.value.errno == Errno.ESHUTDOWN
    with pytest.raises(BackendError):
        await remote.write(0, b"x")
