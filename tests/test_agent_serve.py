"""The block agent with real sockets and the asyncio client: concurrency, swaps, stops,
disconnects, broken peers."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_fakes import MemoryBackend, read_bytes, until
from devagent.agent.agent import AgentState, BlockAgent
from devagent.agent.backend import Local
from devagent.agent.journal import JournalClosed, JournalState
from devagent.errors import PeerError, UsageError
from devagent.nbd.client import TCP_USER_TIMEOUT_MS, NbdClient, NbdRequestFailed
from devagent.nbd.proto import CLIENT_FLAGS, Errno

SIZE = 4 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (SIZE // 256))
    return path


@pytest.fixture
async def served(image: Path, tmp_path: Path) -> AsyncIterator[tuple[BlockAgent, Path]]:
    agent = BlockAgent(Local(image), "disk")
    sock = tmp_path / "agent.sock"
    await agent.listen_unix(sock)
    try:
        yield agent, sock
    finally:
        await agent.stop()


async def test_round_trip_of_every_command(served: tuple[BlockAgent, Path], image: Path) -> None:
    agent, sock = served
    async with await NbdClient.connect(unix=sock, export="disk") as client:
        assert client.size == SIZE and client.structured
        assert await client.read(256, 4) == bytes([0, 1, 2, 3])
        await client.write(8192, b"\xab" * 4096, fua=True)
        assert await client.read(8192, 4096) == b"\xab" * 4096
        await client.write_zeroes(16384, 8192, no_hole=True)
        assert await client.read(16384, 8192) == bytes(8192)
        await client.trim(1 << 20, 1 << 20)  # punches a hole: reads back zero on a file
        await client.flush()
        extents = await client.block_status(0, SIZE)
        assert sum(length for length, _ in extents) == SIZE
        assert (1 << 20, 3) in extents  # the trimmed MiB is a hole
        assert (await client.block_status(0, SIZE, req_one=True))[0][0] <= SIZE
        with pytest.raises(NbdRequestFailed) as failed:
            await client.read(SIZE - 1, 2)
        assert failed.value.errno == Errno.EINVAL
        assert await client.read(0, 1) == b"\0"  # the connection survived the error
    assert read_bytes(image, 8192, 4096) == b"\xab" * 4096
    stats = agent.journal.stats()
    assert stats.counts["WRITE"] == 1 and stats.errors == 1


async def test_many_requests_in_flight_on_one_connection(tmp_path: Path) -> None:
    backend = MemoryBackend(hold=True)
    agent = BlockAgent(backend, "mem")
    sock = tmp_path / "mem.sock"
    await agent.listen_unix(sock)
    try:
        async with await NbdClient.connect(unix=sock, export="mem") as client:
            writes = [
                asyncio.create_task(client.write(i * 4096, bytes([i]) * 4096)) for i in range(64)
            ]
            # all 64 reach the backend before any is released: none waits for another
            await until(lambda: not (backend.started < 64))
            assert agent.journal.in_flight == 64
            backend.release.set()
            await asyncio.gather(*writes)
            reads = await asyncio.gather(*(client.read(i * 4096, 4096) for i in range(64)))
            assert reads == [bytes([i]) * 4096 for i in range(64)]
    finally:
        await agent.stop()


async def test_swap_backend_under_load_loses_and_fails_nothing(
    served: tuple[BlockAgent, Path], image: Path, tmp_path: Path
) -> None:
    agent, sock = served
    replica = tmp_path / "replica.img"
    replica.write_bytes(read_bytes(image))
    written: list[int] = []

    async def writer(client: NbdClient) -> None:
        for i in range(300):
            await client.write(i * 4096, i.to_bytes(2, "big") * 2048)
            written.append(i)

    async with await NbdClient.connect(unix=sock, export="disk") as client:
        load = asyncio.create_task(writer(client))
        await until(lambda: not (len(written) < 50))
        old = await agent.swap_backend(Local(replica))
        swapped_at = len(written)
        await load  # no write failed
        await old.close()
        assert await client.read(299 * 4096, 2) == (299).to_bytes(2, "big")
    # one write at a time: those done before the swap are in the image, later ones in the replica
    old_data, new_data = read_bytes(image), read_bytes(replica)
    assert 50 <= swapped_at < 300
    for i in range(swapped_at):
        assert old_data[i * 4096 : i * 4096 + 2] == i.to_bytes(2, "big")
    for i in range(swapped_at + 1, 300):
        assert new_data[i * 4096 : i * 4096 + 2] == i.to_bytes(2, "big")
    with pytest.raises(UsageError, match="bytes, the export is"):
        await agent.swap_backend(MemoryBackend(4096))


async def test_stop_answers_requests_in_flight_and_fails_waiting_ones(tmp_path: Path) -> None:
    backend = MemoryBackend(hold=True)
    agent = BlockAgent(backend, "mem")
    sock = tmp_path / "mem.sock"
    await agent.listen_unix(sock)
    client = await NbdClient.connect(unix=sock, export="mem")
    try:
        running = [asyncio.create_task(client.write(i * 512, b"x" * 512)) for i in range(8)]
        await until(lambda: not (backend.started < 8))
        quiesce = asyncio.create_task(agent.journal.quiesce())
        await until(lambda: agent.journal.state is JournalState.QUIESCING)
        held = asyncio.create_task(client.read(0, 512))  # arrives at a closed gate
        await until(lambda: not (agent.journal.waiting < 1))
        stop = asyncio.create_task(agent.stop())
        # the journal closes just before stop waits for what runs: then it is parked there
        await until(lambda: agent.journal.state is JournalState.CLOSED)
        assert agent.state is AgentState.STOPPING and not stop.done()
        backend.release.set()
        await asyncio.gather(*running)  # answered, with success
        with pytest.raises(NbdRequestFailed) as failed:
            await held
        assert failed.value.errno == Errno.ESHUTDOWN
        await stop
        with pytest.raises(JournalClosed):  # the stop overtook the quiesce
            await quiesce
        assert agent.state is AgentState.STOPPED and backend.closed
        assert not sock.exists()
        with pytest.raises(PeerError):
            await client.read(0, 1)
    finally:
        await client.close()


async def test_disconnect_cancels_requests_held_at_the_gate(tmp_path: Path) -> None:
    backend = MemoryBackend()
    agent = BlockAgent(backend, "mem")
    sock = tmp_path / "mem.sock"
    await agent.listen_unix(sock)
    try:
        client = await NbdClient.connect(unix=sock, export="mem")
        await agent.journal.quiesce()
        write = asyncio.create_task(client.write(0, b"stale" * 100))
        await until(lambda: not (agent.journal.waiting < 1))
        await client.close()  # the VM went away while its write was held
        with pytest.raises(PeerError):
            await write
        await until(lambda: not (agent.connections))
        agent.journal.resume()
        # requests are admitted in arrival order: once a later one is answered, a stale
        # write still queued would have been admitted and started before it
        async with await NbdClient.connect(unix=sock, export="mem") as later:
            await later.read(0, 512)
        assert not any(op == "write" for op, *_ in backend.log)  # the stale write never ran
        assert agent.journal.in_flight == 0
    finally:
        await agent.stop()


async def test_backend_error_is_answered_with_its_errno(tmp_path: Path) -> None:
    backend = MemoryBackend()
    backend.fail = Errno.ENOSPC
    agent = BlockAgent(backend, "mem")
    sock = tmp_path / "mem.sock"
    await agent.listen_unix(sock)
    try:
        async with await NbdClient.connect(unix=sock, export="mem") as client:
            with pytest.raises(NbdRequestFailed, match="ENOSPC") as failed:
                await client.write(0, b"x")
            assert failed.value.errno == Errno.ENOSPC
            backend.fail = None
            await client.write(0, b"y")
    finally:
        await agent.stop()


async def test_broken_handshake_closes_with_one_log_line_others_unharmed(
    served: tuple[BlockAgent, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _, sock = served
    async with await NbdClient.connect(unix=sock, export="disk") as healthy:
        caplog.set_level(logging.INFO, logger="devagent.agent")
        reader, writer = await asyncio.open_unix_connection(str(sock))
        await reader.readexactly(18)  # greeting
        writer.write(CLIENT_FLAGS.pack(0xFF00))
        assert await reader.read() == b""  # closed by the server
        writer.close()
        warnings = [
            r
            for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("devagent")
        ]
        assert len(warnings) == 1
        assert "broken handshake: unknown client flags 0xff00" in warnings[0].getMessage()
        assert await healthy.read(0, 4) == bytes([0, 1, 2, 3])


async def test_unknown_export_with_go_is_refused(served: tuple[BlockAgent, Path]) -> None:
    _, sock = served
    with pytest.raises(PeerError, match="refused export 'nope'"):
        await NbdClient.connect(unix=sock, export="nope")


async def test_tcp_listener(image: Path) -> None:
    agent = BlockAgent(Local(image), "disk")
    try:
        host, port = await agent.listen_tcp("127.0.0.1", 0)
        async with await NbdClient.connect(host=host, port=port, export="disk") as client:
            assert await client.read(1, 2) == bytes([1, 2])
            peer = client._writer.get_extra_info("sockname")
            assert peer[0] == "127.0.0.1"
            # A cut link is noticed in seconds, not after TCP's own retransmission back-off.
            tcp = client._writer.get_extra_info("socket")
            user_timeout = tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
            assert user_timeout == TCP_USER_TIMEOUT_MS
            assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert f"tcp:127.0.0.1:{port}" in agent.addresses
    finally:
        await agent.stop()
    with pytest.raises(OSError), socket.create_connection((host, port), timeout=1):
        pass


async def test_max_in_flight_bounds_requests_even_when_buffered(tmp_path: Path) -> None:
    backend = MemoryBackend(hold=True)
    agent = BlockAgent(backend, "mem", max_in_flight=4)
    sock = tmp_path / "mem.sock"
    await agent.listen_unix(sock)
    try:
        async with await NbdClient.connect(unix=sock, export="mem") as client:
            writes = [asyncio.create_task(client.write(i * 512, b"z" * 512)) for i in range(40)]
            (connection,) = agent.server
            # four running and the connection no longer reading: from here on only a server
            # that ignored its bound could start a fifth
            await until(lambda: backend.started >= 4 and connection.reading_paused, "the bound")
            await asyncio.sleep(0)  # a fifth task started by mistake would run now
            assert backend.started == 4 and agent.journal.in_flight == 4
            backend.release.set()
            await asyncio.gather(*writes)  # the rest were read and served as slots freed
            assert backend.started == 40
    finally:
        await agent.stop()


async def test_a_client_that_never_negotiates_is_closed(
    tmp_path: Path, image: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = BlockAgent(Local(image), "disk", handshake_timeout=0.2)
    sock = tmp_path / "agent.sock"
    await agent.listen_unix(sock)
    try:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        await reader.readexactly(18)  # greeting, then silence
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
        assert any("no handshake within" in r.getMessage() for r in caplog.records)
        async with await NbdClient.connect(unix=sock, export="disk") as client:
            # negotiated clients are not subject to it: asleep past the handshake deadline
            # (the loop runs timers in deadline order: the connection's, armed before the
            # handshake, would have fired first)
            await asyncio.sleep(agent.handshake_timeout)
            assert await client.read(0, 2) == bytes([0, 1])
    finally:
        await agent.stop()
