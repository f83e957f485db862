"""The net agent with the fake uplink and a fake QEMU over socketpairs: both directions,
hold and release, bounds and counters, forwarding to a peer agent, swaps, garbage input,
reconnection, and the control API."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devagent.errors import PeerError, StateError, UsageError
from devagent.net.agent import AgentState, NetAgent
from devagent.net.codec import Limit, encode_frame
from devagent.net.control import serve_control
from devagent.net.messages import TapSpec
from devagent.net.uplink import MemoryUplink, Uplink
from devagent.tls import Tls, use_tls
from net_fakes import FakeVm, LogEvent, eth, until
from tls_helpers import make_pki


class Rig:
    def __init__(self, agent: NetAgent, vm: FakeVm, uplink: MemoryUplink) -> None:
        self.agent, self.vm, self.uplink = agent, vm, uplink


async def make_rig(name: str = "vm1", **kwargs: Any) -> Rig:
    uplink = MemoryUplink(f"{name}-up")
    agent = NetAgent(uplink, vm=name, nic="n0", **kwargs)
    agent.start()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    await agent.attach_vm(ours)
    vm = await FakeVm.over_socket(theirs)
    await until(lambda: agent.vm_link is not None)
    return Rig(agent, vm, uplink)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    made = await make_rig()
    yield made
    await made.vm.close()
    await made.agent.stop()


# --- the two directions -----------------------------------------------------------------


async def test_frames_from_the_vm_go_to_the_uplink_in_order(rig: Rig) -> None:
    frames = [eth(k, 60 + k) for k in range(200)]
    await rig.vm.send(*frames)
    await until(lambda: len(rig.uplink.sent) == 200)
    assert rig.uplink.sent == frames
    counters = rig.agent.stats().counters
    assert counters["from_vm_frames"] == counters["to_uplink_frames"] == 200
    assert counters["from_vm_bytes"] == sum(len(f) for f in frames)
    assert rig.agent.net_frames_lost == 0


async def test_frames_from_the_uplink_go_to_the_vm_in_order(rig: Rig) -> None:
    frames = [eth(k, 1514) for k in range(300)]
    for frame in frames:
        rig.uplink.inject(frame)
    assert await rig.vm.receive(300) == frames
    counters = rig.agent.stats().counters
    assert counters["from_uplink_frames"] == counters["to_vm_frames"] == 300
    assert counters["to_vm_bytes"] == 300 * 1514


async def test_largest_frame_passes_both_ways(rig: Rig) -> None:
    big = eth(1, Limit.MAX_FRAME)
    await rig.vm.send(big)
    rig.uplink.inject(big)
    assert await rig.vm.receive(1) == [big]
    await until(lambda: rig.uplink.sent == [big])


async def test_a_refusing_uplink_counts_its_losses(rig: Rig) -> None:
    rig.uplink.accept = False
    await rig.vm.send(eth(1), eth(2))
    await until(lambda: rig.agent.lost["uplink"] == 2)
    assert rig.agent.net_frames_lost == 2
    assert rig.uplink.stats["tx_dropped"] == 2


async def test_without_a_vm_frames_are_lost_and_counted() -> None:
    uplink = MemoryUplink()
    agent = NetAgent(uplink, vm="vm9")
    agent.start()
    try:
        uplink.inject(eth(1))
        uplink.inject(eth(2))
        assert agent.lost["no_vm"] == 2
        assert agent.stats().net_frames_lost == 2
        assert agent.stats().vm_connected is False
    finally:
        await agent.stop()
    assert agent.state is AgentState.STOPPED
    assert uplink.closed


# --- hold and release -------------------------------------------------------------------


async def test_hold_keeps_frames_and_release_delivers_them_in_order(rig: Rig) -> None:
    rig.uplink.inject(eth(0))
    assert await rig.vm.receive(1) == [eth(0)]
    rig.agent.hold()
    for k in range(1, 11):
        rig.uplink.inject(eth(k))
    assert await rig.vm.nothing_for(0.2)
    status = rig.agent.stats()
    assert status.held is True
    assert status.hold.frames == 10
    assert status.net_frames_buffered == 10
    # The VM's own frames still leave while it is held.
    await rig.vm.send(eth(100))
    await until(lambda: rig.uplink.sent == [eth(100)])
    result = rig.agent.release()
    assert (result.delivered, result.lost) == (10, 0)
    rig.uplink.inject(eth(11))
    assert await rig.vm.receive(12) == [eth(k) for k in range(12)]
    assert rig.agent.stats().held is False
    assert rig.agent.delivered_from_hold == 10


async def test_hold_is_bounded_by_count(rig: Rig) -> None:
    rig.agent.hold(max_frames=3)
    for k in range(5):
        rig.uplink.inject(eth(k))
    assert rig.agent.net_frames_buffered == 3
    assert rig.agent.lost["hold_overflow"] == 2
    rig.agent.release()
    assert await rig.vm.receive(3) == [eth(0), eth(1), eth(2)]  # the newest were dropped
    assert rig.agent.net_frames_lost == 2


async def test_hold_is_bounded_by_bytes(rig: Rig) -> None:
    rig.agent.hold(max_bytes=Limit.MAX_FRAME)
    rig.uplink.inject(eth(0, 40000))
    rig.uplink.inject(eth(1, 40000))  # would pass the byte bound
    rig.uplink.inject(eth(2, 20000))
    status = rig.agent.stats()
    assert (status.hold.frames, status.hold.bytes) == (2, 60000)
    assert status.lost["hold_overflow"] == 1
    rig.agent.release()
    assert await rig.vm.receive(2) == [eth(0, 40000), eth(2, 20000)]


async def test_hold_twice_and_release_unheld_are_state_errors(rig: Rig) -> None:
    with pytest.raises(StateError):
        rig.agent.release()
    rig.agent.hold()
    with pytest.raises(StateError, match="already held"):
        rig.agent.hold()
    rig.agent.release()


async def test_a_hold_too_small_for_one_frame_is_refused(rig: Rig) -> None:
    with pytest.raises(UsageError):
        rig.agent.hold(max_bytes=1000)
    with pytest.raises(UsageError):
        rig.agent.hold(max_frames=0)
    assert not rig.agent.held


async def test_a_forgotten_hold_releases_itself() -> None:
    made = await make_rig(max_hold_s=0.2)
    try:
        made.agent.hold()
        made.uplink.inject(eth(1))
        assert await made.vm.receive(1, timeout=3) == [eth(1)]
        assert not made.agent.held
    finally:
        await made.vm.close()
        await made.agent.stop()


async def test_frames_from_a_peer_are_held_too(rig: Rig) -> None:
    host, port = await rig.agent.listen_peer("127.0.0.1", 0)
    _reader, writer = await asyncio.open_connection(host, port)
    try:
        rig.agent.hold()
        writer.write(encode_frame(eth(1)) + encode_frame(eth(2)))
        await writer.drain()
        await until(lambda: rig.agent.net_frames_buffered == 2)
        assert await rig.vm.nothing_for(0.1)
        rig.agent.release()
        assert await rig.vm.receive(2) == [eth(1), eth(2)]
        assert rig.agent.counters["from_peer_frames"] == 2
    finally:
        writer.close()


# --- forwarding to a peer agent ---------------------------------------------------------


async def test_forward_sends_uplink_frames_to_the_peer_agent_and_stop_forward_ends_it() -> None:
    source, dest = await make_rig("src"), await make_rig("dst")
    try:
        host, port = await dest.agent.listen_peer("127.0.0.1", 0)
        await source.agent.forward(host, port)
        assert source.agent.stats().forward.peer == f"{host}:{port}"
        for k in range(50):
            source.uplink.inject(eth(k))
        assert await dest.vm.receive(50) == [eth(k) for k in range(50)]
        assert await source.vm.nothing_for(0.1)
        assert source.agent.net_frames_forwarded == 50
        assert dest.agent.counters["from_peer_frames"] == 50
        result = await source.agent.stop_forward()
        assert result.frames == 50
        source.uplink.inject(eth(99))
        assert await source.vm.receive(1) == [eth(99)]
        with pytest.raises(StateError):
            await source.agent.stop_forward()
    finally:
        for made in (source, dest):
            await made.vm.close()
            await made.agent.stop()


async def test_migration_order_hold_forward_release_loses_nothing() -> None:
    """The NIC's part of a switchover: the destination holds, the source forwards what its
    uplink still gets, the destination's VM resumes and the agent releases in order."""
    source, dest = await make_rig("src"), await make_rig("dst")
    try:
        host, port = await dest.agent.listen_peer("127.0.0.1", 0)
        dest.agent.hold()
        await source.agent.forward(host, port)
        for k in range(100):
            source.uplink.inject(eth(k))
        await until(lambda: dest.agent.net_frames_buffered == 100)
        dest.uplink.inject(eth(100))  # the destination's own uplink learns the VM's address
        await until(lambda: dest.agent.net_frames_buffered == 101)
        assert dest.agent.release().delivered == 101
        dest.uplink.inject(eth(101))
        assert await dest.vm.receive(102) == [eth(k) for k in range(102)]
        await source.agent.stop_forward()
        assert source.agent.net_frames_lost == dest.agent.net_frames_lost == 0
    finally:
        for made in (source, dest):
            await made.vm.close()
            await made.agent.stop()


async def test_forward_while_held_hands_the_kept_frames_over_first() -> None:
    """The source's half: held before its VM stops, forwarding once the VM runs on the
    destination; what the source kept reaches the destination before what follows."""
    source, dest = await make_rig("src"), await make_rig("dst")
    try:
        host, port = await dest.agent.listen_peer("127.0.0.1", 0)
        source.agent.hold()
        for k in range(5):
            source.uplink.inject(eth(k))
        assert await source.agent.forward(host, port) == 5
        assert not source.agent.held
        source.uplink.inject(eth(5))
        assert await dest.vm.receive(6) == [eth(k) for k in range(6)]
        assert await source.vm.nothing_for(0.1)
        assert source.agent.net_frames_forwarded == 6
        assert source.agent.delivered_from_hold == 0
    finally:
        for made in (source, dest):
            await made.vm.close()
            await made.agent.stop()


async def test_forward_to_nobody_is_a_peer_error(rig: Rig) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(PeerError, match="cannot reach"):
        await rig.agent.forward("127.0.0.1", port)
    assert rig.agent.stats().forward is None


async def test_two_forwards_at_once_leave_one_forwarding(rig: Rig) -> None:
    host, port = await rig.agent.listen_peer("127.0.0.1", 0)
    results = await asyncio.gather(
        rig.agent.forward(host, port), rig.agent.forward(host, port), return_exceptions=True
    )
    assert sorted(type(r).__name__ for r in results) == ["StateError", "int"]
    forward = rig.agent.stats().forward
    assert forward is not None and forward.peer == f"{host}:{port}"
    await rig.agent.stop_forward()


async def test_a_lost_forwarding_peer_sends_frames_back_to_the_vm(rig: Rig) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def peer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    try:
        await rig.agent.forward("127.0.0.1", server.sockets[0].getsockname()[1])
        await until(lambda: bool(accepted))
        accepted[0].transport.abort()
        await until(lambda: rig.agent.stats().forward is None)
        rig.uplink.inject(eth(7))
        assert await rig.vm.receive(1) == [eth(7)]
    finally:
        server.close()
        await server.wait_closed()


# --- swapping the uplink ----------------------------------------------------------------


async def test_swap_loses_and_reorders_nothing(rig: Rig) -> None:
    old = rig.uplink
    old.inject(eth(0))
    old.inject(eth(1), read_now=False)  # in the old tap, not read yet
    old.inject(eth(2), read_now=False)
    new = MemoryUplink("new")
    new.inject(eth(3), read_now=False)  # the new tap already had one waiting
    returned = await rig.agent.swap_uplink(new)
    assert returned is old and old.closed
    new.inject(eth(4))
    assert await rig.vm.receive(5) == [eth(k) for k in range(5)]
    await rig.vm.send(eth(50))
    await until(lambda: new.sent == [eth(50)])
    assert old.sent == []
    assert rig.agent.uplink is new
    assert not rig.agent.held
    assert rig.agent.net_frames_lost == 0


async def test_swap_while_held_stays_held(rig: Rig) -> None:
    rig.agent.hold()
    rig.uplink.inject(eth(0), read_now=False)
    await rig.agent.swap_uplink(MemoryUplink("new"))
    assert rig.agent.held
    assert rig.agent.stats().hold.frames == 1
    rig.agent.release()
    assert await rig.vm.receive(1) == [eth(0)]


async def test_swap_under_traffic_delivers_every_frame() -> None:
    made = await make_rig()
    try:
        uplinks = [made.uplink, *(MemoryUplink(f"u{k}") for k in range(1, 5))]
        sent = 0
        for current, following in itertools.pairwise(uplinks):
            for _ in range(20):
                current.inject(eth(sent), read_now=sent % 3 != 0)
                sent += 1
            await made.agent.swap_uplink(following)
        assert await made.vm.receive(sent) == [eth(k) for k in range(sent)]
        assert made.agent.net_frames_lost == 0
    finally:
        await made.vm.close()
        await made.agent.stop()


# --- garbage from the peer --------------------------------------------------------------


async def test_runts_from_the_vm_are_dropped_and_counted_in_sync(rig: Rig) -> None:
    await rig.vm.send_raw(struct.pack(">I", 0) + struct.pack(">I", 3) + b"abc")
    await rig.vm.send(eth(1))
    await until(lambda: rig.uplink.sent == [eth(1)])
    assert rig.agent.stats().bad_frames["vm"]["runt"] == 2


async def test_an_oversized_length_from_the_vm_closes_its_link_and_the_agent_lives_on(
    rig: Rig,
) -> None:
    await rig.vm.send(eth(1))
    await rig.vm.send_raw(struct.pack(">I", 0xFFFFFFF0) + b"\x00" * 100)
    assert await rig.vm.closed_by_peer()
    assert rig.agent.stats().bad_frames["vm"]["oversized"] == 1
    assert rig.uplink.sent == [eth(1)]
    await until(lambda: rig.agent.vm_link is None)
    rig.uplink.inject(eth(2))
    assert rig.agent.lost["no_vm"] == 1
    assert rig.agent.state is AgentState.RUNNING


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00",  # EOF inside a header
        struct.pack(">I", 60) + b"x" * 10,  # EOF inside a frame
        struct.pack(">I", Limit.MAX_FRAME + 1),
        bytes(range(256)) * 20,
    ],
)
async def test_garbage_from_a_peer_never_reaches_the_vm(rig: Rig, garbage: bytes) -> None:
    host, port = await rig.agent.listen_peer("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(garbage)
    writer.write_eof()
    await writer.drain()
    assert await reader.read() == b""  # the agent closes its side
    writer.close()
    await until(lambda: rig.agent.stats().peers == 0)
    bad = rig.agent.stats().bad_frames["peer"]
    assert sum(bad.values()) >= 1
    assert rig.agent.counters["to_vm_frames"] == 0
    assert await rig.vm.nothing_for(0.05)
    rig.uplink.inject(eth(1))  # the agent still serves its VM
    assert await rig.vm.receive(1) == [eth(1)]


# --- QEMU's socket: connecting and reconnecting -----------------------------------------


async def test_the_agent_connects_to_qemus_socket_and_reconnects_after_a_drop(
    tmp_path: Path,
) -> None:
    connections: asyncio.Queue[FakeVm] = asyncio.Queue()

    async def qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await connections.put(FakeVm(reader, writer))

    path = tmp_path / "n0.sock"
    uplink = MemoryUplink()
    agent = NetAgent(uplink, vm="vm1", nic="n0")
    agent.start()
    with LogEvent("devagent.net.agent", "waiting for QEMU") as waiting:
        agent.connect_vm(path)  # QEMU is not there yet: the agent waits for it
        await asyncio.wait_for(waiting.wait(), 5)
    server = await asyncio.start_unix_server(qemu, str(path))
    try:
        first = await asyncio.wait_for(connections.get(), 5)
        uplink.inject(eth(1))
        assert await first.receive(1) == [eth(1)]
        await first.close()  # QEMU drops the connection (it listens again)
        second = await asyncio.wait_for(connections.get(), 5)
        await until(lambda: agent.vm_link is not None)
        uplink.inject(eth(2))
        assert await second.receive(1) == [eth(2)]
        await second.send(eth(3))
        await until(lambda: uplink.sent == [eth(3)])
        assert agent.stats().vm_connects == 2
        with pytest.raises(StateError):
            agent.connect_vm(path)
        await second.close()
    finally:
        await agent.stop()
        server.close()
        await server.wait_closed()


async def test_a_held_agent_finds_a_late_qemu_at_once(tmp_path: Path) -> None:
    """An incoming VM's NIC: held from its start, its QEMU coming up later than the backoff
    would wait out. Held, the agent tries often: it is connected well before its release,
    so the frames it kept reach the guest (a 3-disk guest's postcopy once released its NIC
    before the agent's next try, and lost the 21 frames kept)."""
    path = tmp_path / "n0.sock"
    uplink = MemoryUplink()
    agent = NetAgent(uplink, vm="vm1", nic="n0")
    agent.start()
    agent.hold()
    agent.connect_vm(path)
    await asyncio.sleep(2.5)  # unheld, the backoff would be at its 1 s by now
    connected: asyncio.Queue[FakeVm] = asyncio.Queue()

    async def qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await connected.put(FakeVm(reader, writer))

    server = await asyncio.start_unix_server(qemu, str(path))
    try:
        started = asyncio.get_running_loop().time()
        vm = await asyncio.wait_for(connected.get(), 5)
        assert asyncio.get_running_loop().time() - started < 0.3
        uplink.inject(eth(1))
        await until(lambda: agent.vm_link is not None)
        assert agent.release().delivered == 1
        assert await vm.receive(1) == [eth(1)]
        await vm.close()
    finally:
        await agent.stop()
        server.close()
        await server.wait_closed()


async def test_a_second_vm_connection_is_refused(rig: Rig) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(StateError):
        await rig.agent.attach_vm(ours)
    ours.close()
    theirs.close()


# --- the control API --------------------------------------------------------------------


class Control:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {} if body is None else {"json": body}
        async with self.session.request(method, f"http://agent{path}", **kwargs) as response:
            return response.status, await response.json()


async def test_control_api(rig: Rig, tmp_path: Path) -> None:
    opened: list[MemoryUplink] = []

    def opener(spec: TapSpec) -> Uplink:
        opened.append(MemoryUplink(spec.name))
        return opened[-1]

    stop = asyncio.Event()
    sock = tmp_path / "ctl.sock"
    runner = await serve_control(rig.agent, sock, stop, opener)
    try:
        assert sock.stat().st_mode & 0o777 == 0o600
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s:
            control = Control(s)
            status, body = await control.call("GET", "/status")
            assert status == 200
            for key in ("net_frames_buffered", "net_frames_forwarded", "net_frames_lost"):
                assert body[key] == 0
            assert (body["vm"], body["nic"], body["vm_connected"]) == ("vm1", "n0", True)

            assert (await control.call("POST", "/hold", {"max_frames": 2}))[0] == 200
            assert (await control.call("POST", "/hold"))[0] == 409
            for k in range(3):
                rig.uplink.inject(eth(k))
            status, body = await control.call("GET", "/status")
            assert (body["net_frames_buffered"], body["net_frames_lost"]) == (2, 1)
            status, body = await control.call("POST", "/release")
            assert (status, body["delivered"]) == (200, 2)
            assert await rig.vm.receive(2) == [eth(0), eth(1)]
            assert (await control.call("POST", "/release"))[0] == 409

            bad_holds: list[Any] = [{"max_frames": -1}, {"max_bytes": "x"}, [1]]
            for bad in bad_holds:
                assert (await control.call("POST", "/hold", bad))[0] == 400

            status, body = await control.call("POST", "/swap", {"uplink": {"kind": "tap"}})
            assert status == 400
            status, body = await control.call(
                "POST", "/swap", {"uplink": {"kind": "tap", "name": "tap9"}}
            )
            assert status == 200 and body["new"] == "MemoryUplink('tap9')"
            assert rig.agent.uplink is opened[0]

            assert (await control.call("POST", "/forward", {"peer": "nonsense"}))[0] == 400
            unreachable = {"peer": "127.0.0.1:1"}
            assert (await control.call("POST", "/forward", unreachable))[0] == 502
            assert (await control.call("POST", "/stop-forward"))[0] == 409
            host, port = await rig.agent.listen_peer("127.0.0.1", 0)
            status, body = await control.call("POST", "/forward", {"peer": f"tcp:{host}:{port}"})
            assert status == 200
            status, body = await control.call("POST", "/stop-forward")
            assert (status, body["frames"]) == (200, 0)

            assert (await control.call("POST", "/stop"))[0] == 200
            assert stop.is_set()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("who", "forwards"), [("b", True), ("c", False)])
async def test_the_peer_link_is_tls_and_admits_only_expected_hosts(
    tmp_path: Path, who: str, forwards: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Host a's agent accepts peers over TLS only, from hosts a and b: b's frames arrive,
    c's connection is closed before a frame passes, and a's agent goes on serving."""
    certs = make_pki(tmp_path)
    source, dest = await make_rig("src"), await make_rig("dst")
    use_tls(certs.host(who))
    try:
        tls = Tls(certs.dir("a"), peers=("a", "b"))
        host, port = await dest.agent.listen_peer("127.0.0.1", 0, tls=tls)
        if forwards:
            await source.agent.forward(host, port)
            source.uplink.inject(eth(1))
            assert await dest.vm.receive(1) == [eth(1)]
        else:  # its handshake may end before a's check closes the link
            with contextlib.suppress(PeerError):
                await source.agent.forward(host, port)
            await until(lambda: "host c is not among this one's peers (a, b)" in caplog.text)
            await until(lambda: source.agent.stats().forward is None)
        plain_reader, plain_writer = await asyncio.open_connection(host, port)
        plain_writer.write(encode_frame(eth(2)))  # no TLS: closed, nothing gets through
        assert await asyncio.wait_for(plain_reader.read(), 10) == b""
        plain_writer.close()
        dest.uplink.inject(eth(3))
        expected = [eth(1), eth(3)] if forwards else [eth(3)]
        assert await dest.vm.receive(len(expected)) == expected
        assert dest.agent.counters["from_peer_frames"] == (1 if forwards else 0)
    finally:
        use_tls(None)
        for made in (source, dest):
            await made.vm.close()
            await made.agent.stop()
