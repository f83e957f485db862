"""Random and mutated byte streams: to the codec (hypothesis, >= 10,000 streams in all) and,
a bounded number, to a live agent while a healthy client keeps working."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_fakes import read_bytes
from devagent.agent.agent import BlockAgent
from devagent.agent.backend import Local
from devagent.errors import PeerError
from devagent.nbd.client import NbdClient
from devagent.nbd.client_codec import ClientConnection
from devagent.nbd.codec import Export, NeedData
from devagent.nbd.proto import (
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    OPTION_HEADER,
    REQUEST,
    Command,
    NbdProtocolError,
    Option,
)
from devagent.nbd.server_codec import BadRequest, Request, ServerConnection, ServerState
from nbd_helpers import FLAGS, HANDSHAKE, events, go, meta, opt, req

SIZE = 1 << 20
EXPORT = Export("disk", SIZE)

SEEDS = [
    HANDSHAKE
    + req(Command.WRITE, 1, 4096, data=b"w" * 64)
    + req(Command.READ, 2, 0, 512)
    + req(Command.BLOCK_STATUS, 3, 0, 8192, 8)
    + req(Command.WRITE_ZEROES, 4, 0, 4096, 2)
    + req(Command.TRIM, 5, 8192, 4096)
    + req(Command.FLUSH, 6)
    + req(Command.DISC, 7),
    FLAGS
    + opt(Option.LIST)
    + go("disk", (3,), Option.INFO)
    + opt(Option.EXPORT_NAME, b"disk")
    + req(Command.READ, 9, SIZE - 512, 512),
    FLAGS
    + opt(Option.STRUCTURED_REPLY)
    + meta(Option.LIST_META_CONTEXT, queries=())
    + opt(Option.ABORT),
]


def drive_server(stream: bytes, cuts: list[int]) -> None:
    """Feed ``stream`` in pieces; check every event against the bounds."""
    server = ServerConnection({"disk": EXPORT})
    server.data_to_send()
    bound = max(OPTION_HEADER.size + MAX_OPTION_LENGTH, REQUEST.size + MAX_PAYLOAD)
    pos = 0
    for cut in [*sorted(cuts), len(stream)]:
        piece, pos = stream[pos:cut], max(pos, cut)
        if piece:
            server.receive_data(piece)
        while True:
            try:
                event = server.next_event()
            except NbdProtocolError:
                assert server.state is ServerState.CLOSED
                return
            if isinstance(event, NeedData):
                break
            if isinstance(event, Request):
                assert event.offset + event.length <= SIZE
                assert event.length <= MAX_PAYLOAD
                if event.command is Command.WRITE:
                    assert event.data is not None and len(event.data) == event.length
                assert event.command not in (Command.DISC, Command.CACHE, Command.RESIZE)
            elif isinstance(event, BadRequest):
                assert event.errno != 0
            server.data_to_send()
        assert server.buffered <= bound
    server.receive_data(b"")
    while True:
        try:
            if isinstance(server.next_event(), NeedData):
                break
        except NbdProtocolError:
            break
    assert server.state is ServerState.CLOSED or server.buffered == 0


def mutate(seed: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    data = bytearray(seed)
    for position, kind, value in edits:
        at = position % (len(data) + 1)
        if kind == 0 and at < len(data):
            data[at] ^= value or 1
        elif kind == 1:
            data[at:at] = bytes([value])
        elif kind == 2:
            del data[at : at + 1 + value % 8]
        else:
            data[at:at] = data[: value % 64]  # duplicate a run (repeated headers)
    return bytes(data)


edits = st.lists(
    st.tuples(st.integers(0, 1 << 12), st.integers(0, 3), st.integers(0, 255)), max_size=6
)
cuts = st.lists(st.integers(0, 600), max_size=4)


@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), cuts)
def test_random_streams_only_ever_raise_protocol_errors(stream: bytes, at: list[int]) -> None:
    drive_server(stream, at)
    drive_server(FLAGS + stream, at)  # past the client flags too


@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), edits, cuts)
def test_mutated_sessions_stay_within_bounds(
    seed: bytes, changes: list[tuple[int, int, int]], at: list[int]
) -> None:
    drive_server(mutate(seed, changes), at)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=400))
def test_client_codec_on_random_server_bytes(stream: bytes) -> None:
    client = ClientConnection("disk")
    client.receive_data(stream)
    try:
        while not isinstance(client.next_event(), NeedData):
            pass
    except NbdProtocolError:
        pass


async def _attack(sock: Path, stream: bytes) -> None:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        writer.write(stream)
        await writer.drain()
        writer.write_eof()
        while await reader.read(1 << 20):  # the server must end the connection
            pass
    except ConnectionError:
        pass
    finally:
        writer.close()


async def test_live_agent_survives_mutated_streams(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SIZE))
    agent = BlockAgent(Local(image), "disk")
    sock = tmp_path / "agent.sock"
    await agent.listen_unix(sock)
    rng = random.Random(20260)
    healthy_ops = 0
    stop = asyncio.Event()

    async def healthy(client: NbdClient) -> None:
        nonlocal healthy_ops
        block = os.urandom(4096)
        while not stop.is_set():
            await client.write(SIZE - 4096, block)
            assert await client.read(SIZE - 4096, 4096) == block
            healthy_ops += 1

    try:
        async with await NbdClient.connect(unix=sock, export="disk") as client:
            worker = asyncio.create_task(healthy(client))
            for batch in range(15):
                streams = []
                for _ in range(10):
                    seed = rng.choice(SEEDS)
                    changes = [
                        (rng.randrange(4096), rng.randrange(4), rng.randrange(256))
                        for _ in range(rng.randrange(1, 6))
                    ]
                    streams.append(mutate(seed, changes))
                if batch == 0:
                    streams.append(os.urandom(5000))
                    streams.append(FLAGS + opt(Option.GO, b"\xff" * 64))
                await asyncio.wait_for(asyncio.gather(*(_attack(sock, s) for s in streams)), 60)
            stop.set()
            await worker
        assert healthy_ops > 0
        # the agent still serves new clients
        async with await NbdClient.connect(unix=sock, export="disk") as fresh:
            assert len(await fresh.read(0, 4096)) == 4096
        assert agent.connections == 0 or agent.connections == 1
    finally:
        await agent.stop()
    assert image.stat().st_size == SIZE
    assert len(read_bytes(image)) == SIZE


async def _one_bad_server(tmp_path: Path, answer: bytes | None) -> asyncio.Server:
    """A server that negotiates, reads one request and then sends ``answer`` (None: it
    closes the connection instead)."""
    tmp_path.mkdir(exist_ok=True)
    sock = tmp_path / "bad.sock"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server = ServerConnection({"disk": Export("disk", 1 << 20)})
        while not any(isinstance(e, Request) for e in events(server)):
            writer.write(server.data_to_send())
            data = await reader.read(65536)
            if not data:  # the client left during the handshake
                break
            server.receive_data(data)
        if answer is not None:
            writer.write(answer)
        writer.close()

    return await asyncio.start_unix_server(serve, str(sock))


async def test_our_client_fails_its_requests_when_the_server_breaks_or_leaves(
    tmp_path: Path,
) -> None:
    """Replies go to their waiters in the transport's callback: garbage from the server,
    or its leaving, must still fail every waiter and end the connection."""
    for answer, error in ((b"\x00" * 64, "magic"), (None, "closed the connection")):
        folder = tmp_path / str(bool(answer))
        async with await _one_bad_server(folder, answer):
            client = await NbdClient.connect(unix=folder / "bad.sock", export="disk")
            with pytest.raises(PeerError, match=error):
                await asyncio.wait_for(client.read(0, 4096), 10)
            await asyncio.wait_for(client.wait_closed(), 10)
            with pytest.raises(PeerError, match="closed"):
                await client.read(0, 1)
            await client.close()
