"""The block agent's control API as the daemon sees it: the JSON answers, 400s naming the
bad field's path, 409s from the hold's, the mirror job's and the agent's state tables."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from devagent.agent.agent import AgentState, BlockAgent
from devagent.agent.backend import Local
from devagent.agent.control import build_control_app
from devagent.agent.defaults import FETCH_CHUNK
from devagent.agent.hold import HoldState
from devagent.agent.mirror_job import JobState
from devagent.errors import StateError
from devagent.nbd.client import NbdClient
from devagent.wait import wait_until

SIZE = 1 << 20


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[TestClient, BlockAgent, Path]]:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SIZE))
    agent = BlockAgent(Local(image), "disk")
    await agent.listen_unix(tmp_path / "disk.sock")
    client = TestClient(TestServer(build_control_app(agent, asyncio.Event())))
    await client.start_server()
    try:
        yield client, agent, tmp_path
    finally:
        await client.close()
        await agent.stop()


async def test_quiesce_and_resume_follow_the_hold_table(
    rig: tuple[TestClient, BlockAgent, Path],
) -> None:
    client, agent, _ = rig
    answer = await (await client.post("/quiesce")).json()
    assert set(answer) == {"drained_in_s"} and agent.hold.state is HoldState.HELD
    status = await (await client.get("/status")).json()
    assert status["held"] is True and status["size"] == SIZE
    again = await client.post("/quiesce")
    assert again.status == 409 and "is held: cannot quiesce" in (await again.json())["error"]
    swap = await client.post("/swap", json={"backend": {"kind": "local", "path": "/x"}})
    assert swap.status == 409
    answer = await (await client.post("/resume")).json()
    assert set(answer) == {"held_s"} and agent.hold.state is HoldState.RELEASED
    assert agent.hold.lifecycle.history == [
        HoldState.RELEASED,
        HoldState.DRAINING,
        HoldState.HELD,
        HoldState.RELEASED,
    ]
    late = await client.post("/resume")
    assert late.status == 409 and "is released: cannot resume" in (await late.json())["error"]


async def test_bad_bodies_name_the_field_path(rig: tuple[TestClient, BlockAgent, Path]) -> None:
    client, _, _ = rig
    cases = [
        (
            {"target": {"kind": "local", "path": 3}},
            "Expected `str`, got `int` - at `$.target.path`",
        ),
        ({"target": {"kind": "local", "path": "/x"}, "parallel": 0}, "at `$.parallel`"),
        ({}, "missing required field `target`"),
    ]
    for body, message in cases:
        response = await client.post("/mirror", json=body)
        assert response.status == 400 and message in (await response.json())["error"]
    response = await client.post("/swap", data=b"{nope")
    assert response.status == 400 and "JSON" in (await response.json())["error"]


async def test_a_mirror_job_from_start_to_cancel(rig: tuple[TestClient, BlockAgent, Path]) -> None:
    client, agent, tmp_path = rig
    target = tmp_path / "target.img"
    target.write_bytes(bytes(SIZE))
    assert (await client.post("/mirror/cancel")).status == 409  # none yet
    started = await client.post("/mirror", json={"target": {"kind": "local", "path": str(target)}})
    assert started.status == 202
    answer = await started.json()
    assert set(answer) == {"mirror", "target"} and answer["mirror"]["state"] == "copying"
    status = await (await client.get("/status")).json()
    assert status["backend_status"]["kind"] == "mirror"
    assert status["backend_status"]["source"]["kind"] == "local"
    second = await client.post("/mirror", json={"target": {"kind": "local", "path": str(target)}})
    assert second.status == 409
    rated = await client.post("/mirror/rate", json={"rate_limit": 1000000})
    assert rated.status == 200 and (await rated.json()) == {"rate_limit": 1000000}
    assert agent.mirror_job is not None and agent.mirror_job.mirror.pace.rate == 1000000
    refused = await client.post("/mirror/rate", json={"rate_limit": -1})
    assert refused.status == 400
    cancelled = await (await client.post("/mirror/cancel")).json()
    assert cancelled["cancelled"] is True and set(cancelled["mirror"]) >= {"copied_bytes"}
    job = agent.mirror_job
    assert job is not None and job.lifecycle.history == [
        JobState.STARTING,
        JobState.RUNNING,
        JobState.ENDING,
        JobState.ENDED,
    ]
    assert (await client.post("/mirror/stop")).status == 409  # ended
    assert (await client.post("/mirror/rate", json={})).status == 409


async def test_fence_is_a_state_of_the_agent(rig: tuple[TestClient, BlockAgent, Path]) -> None:
    client, agent, tmp_path = rig
    await agent.backend.write_zeroes(0, 9 * FETCH_CHUNK)  # punched: chunks 0-8 are holes
    answer = await (await client.post("/fence")).json()
    assert answer["fenced"] is True and answer["dropped"] == 0
    assert agent.state is AgentState.FENCED
    assert answer["chunk_size"] == FETCH_CHUNK and SIZE == 16 * FETCH_CHUNK
    assert base64.b64decode(answer["zeroes"]) == bytes([0xFF, 0b1])  # the disk's holes
    assert not (tmp_path / "disk.sock").exists()
    with pytest.raises(StateError, match="is fenced: cannot listen on a unix socket"):
        await agent.listen_unix(tmp_path / "again.sock")
    assert (await client.post("/fence")).status == 200  # again: nothing more to drop
    await agent.listen_tcp("127.0.0.1", 0)  # peers may still be served
    assert agent.state is AgentState.FENCED


async def test_unfence_serves_the_local_vm_again_and_is_idempotent(
    rig: tuple[TestClient, BlockAgent, Path],
) -> None:
    """A migration rolled back after a daemon restart: the fenced agent serves its unix
    socket again, where it was (QEMU's NBD client reconnects there)."""
    client, agent, tmp_path = rig
    socket = tmp_path / "disk.sock"
    nothing = await (await client.post("/unfence")).json()  # never fenced: nothing to undo
    assert nothing == {"unfenced": False, "listening": []} and agent.state is AgentState.SERVING
    await client.post("/fence")
    assert not socket.exists()
    answer = await (await client.post("/unfence")).json()
    assert answer == {"unfenced": True, "listening": [f"unix:{socket}"]}
    assert agent.state is AgentState.SERVING and f"unix:{socket}" in agent.addresses
    reader, writer = await asyncio.open_unix_connection(str(socket))
    try:
        assert await asyncio.wait_for(reader.readexactly(8), 5.0) == b"NBDMAGIC"  # served
    finally:
        writer.close()
    assert agent.lifecycle.history == [AgentState.CREATED, AgentState.SERVING,
                                       AgentState.FENCED, AgentState.SERVING]  # fmt: skip
    again = await (await client.post("/unfence")).json()
    assert again == {"unfenced": False, "listening": []}  # its socket is not opened twice
    await client.post("/fence")  # and it can be fenced again
    assert not socket.exists() and agent.state is AgentState.FENCED
    await agent.stop()
    stopped = await client.post("/unfence")
    assert stopped.status == 409 and "is stopped: cannot unfence" in (await stopped.json())["error"]


async def test_cancelling_a_mirror_whose_target_vanished_frees_the_guest_at_once(
    rig: tuple[TestClient, BlockAgent, Path],
) -> None:
    """The target's agent went away while the mirror writes through (a destination removed
    by a roll-back): the guest's write waits on the target's reconnects, for up to the
    remote's I/O timeout (120 s); a cancel closes the target first, so the write and the
    cancel both end at once, the guest's data on the source."""
    client, _, tmp_path = rig
    target_image = tmp_path / "target.img"
    target_image.write_bytes(bytes(SIZE))
    target = BlockAgent(Local(target_image), "receive")
    host, port = await target.listen_tcp("127.0.0.1")
    spec = {"kind": "remote", "address": f"tcp:{host}:{port}", "export": "receive"}
    body = {"target": spec, "converge_bytes": SIZE, "active": True}
    assert (await client.post("/mirror", json=body)).status == 202

    async def through() -> bool:
        status = await (await client.get("/status")).json()
        return status["backend_status"]["state"] == "converged"

    await wait_until(through, timeout=10, what="the mirror to write through")
    await target.stop()  # gone: the mirror's target reconnects in vain
    guest = await NbdClient.connect(unix=tmp_path / "disk.sock", export="disk")
    try:
        write = asyncio.create_task(guest.write(0, b"\x5a" * 4096))
        await asyncio.sleep(0.5)
        assert not write.done()  # held on the target
        cancelled = await asyncio.wait_for(client.post("/mirror/cancel"), 10)
        assert cancelled.status == 200
        await asyncio.wait_for(write, 10)
        assert await guest.read(0, 4096) == b"\x5a" * 4096
    finally:
        await guest.close()
