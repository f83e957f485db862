"""The pure parts of the daemon's NICs: the lab's guest address blocks, addresses and MACs,
tap names, the rule that ends the source's forwarding, ping output, the link counters that
leave bridges and taps out, the NIC in a VM request and in its QEMU configuration; and the
agent's side of it (held from the start, the last unicast frame it forwarded)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import pytest

from devagent.api_types import Announced, Devices, DiskRow, NicRow
from devagent.daemon.migration.net import MAX_FORWARD_S, QUIET_S, NetMigration, forwarding_done
from devagent.daemon.netstat import is_link
from devagent.daemon.nics import NicAgent, NicIdentity
from devagent.daemon.vms import VmManager, VmRequest, build_config, disk_spec
from devagent.errors import PeerError, StateError, UsageError
from devagent.guestnet import (
    GuestNetwork,
    guest_block,
    mac_for,
    pick_address,
    tap_name,
)
from devagent.lab.traffic import parse_ping, ping_max_gap
from devagent.net.agent import NetAgent
from devagent.net.messages import (
    ForwardAnswer,
    ForwardStatus,
    NetStatus,
    StopForwardAnswer,
    TapSpec,
    UplinkStatus,
)
from devagent.net.serve import serve
from devagent.net.uplink import MemoryUplink
from devagent.report import MigrationReport
from devagent.wire import to_json
from net_fakes import ETH_HEADER, eth, until

A = ipaddress.IPv4Address
SUBNET = ipaddress.IPv4Network("10.213.7.0/24")


# --- addresses -------------------------------------------------------------------------------


def test_hosts_share_the_guest_range_without_overlap() -> None:
    blocks = [guest_block(SUBNET, i, 3) for i in range(3)]
    assert blocks == [
        (A("10.213.7.100"), A("10.213.7.132")),
        (A("10.213.7.133"), A("10.213.7.165")),
        (A("10.213.7.166"), A("10.213.7.198")),
    ]
    one = guest_block(SUBNET, 0, 1)
    assert one == (A("10.213.7.100"), A("10.213.7.199"))
    seen: set[A] = set()
    for count in (2, 5, 26):
        seen.clear()
        for i in range(count):
            block = guest_block(SUBNET, i, count)
            assert block is not None
            span = {block[0] + k for k in range(int(block[1]) - int(block[0]) + 1)}
            assert not span & seen and all(100 <= int(a) - int(SUBNET[0]) < 200 for a in span)
            seen |= span


def test_no_guest_block_in_a_small_subnet_or_for_a_host_outside_the_lab() -> None:
    assert guest_block(ipaddress.IPv4Network("10.0.0.0/25"), 0, 2) is None
    assert guest_block(SUBNET, 3, 3) is None
    assert guest_block(SUBNET, 0, 101) is None


def test_pick_address_takes_the_lowest_free_and_says_when_none_is_left() -> None:
    network = GuestNetwork.parse("br0", "10.213.7.100-10.213.7.102/24")
    assert pick_address(network, []) == A("10.213.7.100")
    assert pick_address(network, [A("10.213.7.100"), A("10.213.7.102")]) == A("10.213.7.101")
    with pytest.raises(
        StateError, match=r"no guest address left in 10\.213\.7\.100-10\.213\.7\.102"
    ):
        pick_address(network, [A("10.213.7.100"), A("10.213.7.101"), A("10.213.7.102")])


@pytest.mark.parametrize(
    "block", ["10.213.7.100/24", "10.213.7.9-10.213.7.1/24", "x-y/24", "10.0.0.1-10.0.0.2/31"]
)
def test_a_bad_guest_block_is_a_usage_error(block: str) -> None:
    with pytest.raises(UsageError, match="guest address block"):
        GuestNetwork.parse("br0", block)


def test_mac_and_tap_names() -> None:
    assert mac_for(A("10.213.216.100")) == "52:54:00:d5:d8:64"
    names = {tap_name(f"vm{i}", "net0") for i in range(1000)}
    assert len(names) == 1000 and all(len(n) <= 15 and n.startswith("dt") for n in names)
    assert tap_name("a-very-long-vm-name-of-32-chars-x", "net0") == tap_name(
        "a-very-long-vm-name-of-32-chars-x", "net0"
    )


# --- the rule that ends forwarding -----------------------------------------------------------


def test_forwarding_ends_after_a_quiet_spell_following_the_announce() -> None:
    announced = 100.0
    assert not forwarding_done(announced, announced, None)
    assert not forwarding_done(announced + QUIET_S - 0.01, announced, None)
    assert forwarding_done(announced + QUIET_S, announced, None)
    # a frame forwarded before the announce does not count; one after it restarts the spell
    assert forwarding_done(announced + QUIET_S, announced, announced - 5.0)
    assert not forwarding_done(announced + QUIET_S, announced, announced + 0.3)
    assert forwarding_done(announced + 0.3 + QUIET_S, announced, announced + 0.3)


def test_forwarding_ends_at_the_bound_whatever_keeps_coming() -> None:
    announced = 100.0
    now = announced + MAX_FORWARD_S
    assert not forwarding_done(now - 0.01, announced, now - 0.02)
    assert forwarding_done(now, announced, now - 0.001)
    assert forwarding_done(2.0, 1.0, 1.9, quiet_s=0.05, max_s=1.0)


# --- ping output -----------------------------------------------------------------------------

PING = """PING 10.0.0.100 (10.0.0.100) 56(84) bytes of data.
[1700000000.010000] 64 bytes from 10.0.0.100: icmp_seq=1 ttl=64 time=0.52 ms
[1700000000.020000] 64 bytes from 10.0.0.100: icmp_seq=2 ttl=64 time=0.50 ms
[1700000000.260000] 64 bytes from 10.0.0.100: icmp_seq=26 ttl=64 time=1.10 ms
[1700000000.270000] 64 bytes from 10.0.0.100: icmp_seq=27 ttl=64 time=0.40 ms
[1700000000.280000] From 10.0.0.1 icmp_seq=28 Destination Host Unreachable
[1700000000.2900

--- 10.0.0.100 ping statistics ---
"""


def test_ping_output_is_parsed_and_its_largest_gap_found() -> None:
    answers = parse_ping(PING)
    assert answers == [
        (1700000000.01, 1),
        (1700000000.02, 2),
        (1700000000.26, 26),
        (1700000000.27, 27),
    ]
    gap = ping_max_gap(answers, 1700000000.0, 1700000001.0)
    assert gap is not None and gap[0] == 1700000000.02 and abs(gap[1] - 0.24) < 1e-6
    assert ping_max_gap(answers, 1700000000.265, 1700000000.3) == pytest.approx(
        (1700000000.26, 0.01)
    )
    assert ping_max_gap([], 0, 1) is None


# --- link counters ---------------------------------------------------------------------------


def test_link_counters_leave_lo_bridges_and_taps_out(tmp_path: Path) -> None:
    for name, marker in (("eth0", None), ("br0", "bridge"), ("dt1234", "tun_flags"), ("lo", None)):
        (tmp_path / name).mkdir()
        if marker == "bridge":
            (tmp_path / name / marker).mkdir()
        elif marker:
            (tmp_path / name / marker).write_text("0x1002\n")
    assert [n for n in ("eth0", "br0", "dt1234", "lo") if is_link(n, tmp_path)] == ["eth0"]


# --- requests and configurations -------------------------------------------------------------


def test_a_vm_request_takes_a_nic() -> None:
    assert VmRequest.from_json({"name": "v"}).nics == 0
    assert VmRequest.from_json({"name": "v", "nic": True}).nics == 1
    assert VmRequest.from_json({"name": "v", "nics": 1}).nics == 1
    assert VmRequest.from_json({"name": "v", "nics": 2}).nics == 2
    assert VmRequest.from_json({"name": "v", "nic": False}).nics == 0
    for bad in ({"nic": "yes"}, {"nics": 5}, {"nics": True}, {"nic": True, "nics": 1}):
        with pytest.raises(UsageError, match="'nic"):
            VmRequest.from_json({"name": "v", **bad})
    assert VmRequest.from_json(VmRequest.from_json({"name": "v", "nic": True}).to_json()).nics == 1


def test_the_guest_gets_its_nic_and_its_address(tmp_path: Path) -> None:
    (tmp_path / "d.img").write_bytes(bytes(4096))
    request = VmRequest.from_json({"name": "v", "disk": str(tmp_path / "d.img"), "nic": True})
    nic = NicAgent(
        vm="v", node="net0", run_dir=str(tmp_path), address="10.213.7.100/24",
        mac="52:54:00:d5:07:64", tap="dt0", made_tap="dt0",
    )  # fmt: skip
    disk = disk_spec("disk0", tmp_path / "d.img", None, "raw")
    config = build_config(request, (disk,), (nic,))
    assert [n.stream_socket for n in config.nics] == [str(tmp_path / "net0.sock")]
    args = config.qemu_args()
    assert f"stream,id=net0,server=on,addr.type=unix,addr.path={tmp_path}/net0.sock" in args
    assert "virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:d5:07:64" in args
    argv = nic.argv()
    assert argv[argv.index("--tap") + 1] == "dt0" and "--hold" not in argv
    assert NicAgent.from_json(nic.to_json()) == nic


# --- the agent's side ------------------------------------------------------------------------


async def test_an_agent_started_held_keeps_the_first_frame(tmp_path: Path) -> None:
    """A migration's destination: nothing from its tap reaches the incoming QEMU before the
    release, not even what came before the daemon could have asked for a hold."""
    uplink = MemoryUplink("dst-up")
    agents: list[NetAgent] = []

    async def run() -> None:
        await serve(
            tmp_path / "none.sock", TapSpec(name="dst-up"),
            opener=lambda spec: uplink, on_ready=agents.append, hold=True, max_hold_s=60,
        )  # fmt: skip

    task = asyncio.create_task(run())
    try:
        await until(lambda: bool(agents))
        (agent,) = agents
        assert agent.held and agent.max_hold_s == 60
        uplink.inject(eth(1))
        assert agent.stats().hold.frames == 1 and agent.net_frames_lost == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_forward_notes_when_its_last_unicast_frame_went() -> None:
    uplink = MemoryUplink("src-up")
    source = NetAgent(uplink, vm="v", nic="net0")
    dest = NetAgent(MemoryUplink("dst-up"), vm="v", nic="net0")
    source.start()
    dest.start()
    try:
        host, port = await dest.listen_peer("127.0.0.1", 0)
        await source.forward(host, port)
        assert source.stats().forward.last_unicast_at is None
        broadcast = b"\xff" * 6 + ETH_HEADER[6:] + bytes(46)
        uplink.inject(broadcast)
        assert source.stats().forward.last_unicast_at is None
        assert source.net_frames_forwarded == 1
        uplink.inject(eth(1))
        stamp = source.stats().forward.last_unicast_at
        assert stamp is not None and source.net_frames_forwarded == 2
        await asyncio.sleep(0)
    finally:
        await source.stop()
        await dest.stop()


# --- the NICs' steps of a migration, with fake agents ----------------------------------------


def net_status(**changes: Any) -> NetStatus:
    """A net agent's status: nothing counted yet, then ``changes``."""
    uplink = UplinkStatus(kind="TapUplink", name="tap0", rx_frames=0, rx_bytes=0, tx_frames=0,
                          tx_bytes=0, tx_dropped=0)  # fmt: skip
    status = NetStatus(
        vm="v", nic="net0", state="running", uplink=uplink, vm_socket=None, vm_connected=True,
        vm_connects=1, peer_addresses=[], peers=0, held=False, hold=None, forward=None,
        counters={}, net_frames_buffered=0, net_frames_forwarded=0, net_frames_lost=0,
        delivered_from_hold=0, lost={}, bad_frames={}, pid=1,
    )  # fmt: skip
    return msgspec.structs.replace(status, **changes)


class FakeNic:
    """A NIC agent's control API as NetMigration uses it: records the calls."""

    def __init__(self, node: str = "net0") -> None:
        self.node, self.address, self.mac = node, "10.213.7.100/24", "52:54:00:d5:07:64"
        self.calls: list[str] = []
        self.status = net_status()

    def describe(self) -> str:
        return f"VM v NIC {self.node}"

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        self.calls.append(path if method == "POST" else f"GET {path}")
        status = self.status
        if path == "/forward":
            forward = ForwardStatus(peer=body["peer"], since=0.0, frames=3, last_unicast_at=None)
            self.status = msgspec.structs.replace(
                status, forward=forward, net_frames_forwarded=status.net_frames_forwarded + 3
            )
            return to_json(ForwardAnswer(forwarding=body["peer"], handed_over=3))
        if path == "/stop-forward":
            self.status = msgspec.structs.replace(status, forward=None)
            return to_json(StopForwardAnswer(peer="p", frames=3))
        if path == "/hold":
            self.status = msgspec.structs.replace(
                status, net_frames_buffered=status.net_frames_buffered + 3
            )
        return to_json(self.status)


class FakeQemu:
    def __init__(self) -> None:
        self.commands: list[str] = []

    async def qmp(self, command: str, **args: Any) -> dict[str, Any]:
        self.commands.append(command)
        return {}


class FakePeer:
    def __init__(self) -> None:
        self.posts: list[str] = []

    async def post(self, path: str, body: Any = None) -> Any:
        self.posts.append(path)
        return to_json(Announced(announced_at=time.time() - QUIET_S))

    async def get(self, path: str, **params: Any) -> dict[str, Any]:
        disk = DiskRow(vm="v", device="disk0", image="/img", state="direct")
        nic = NicRow(vm="v", device="net0", address="10.213.7.100/24", mac="52:54:00:d5:07:64",
                     tap="tap1", agent_pid=2, stream_socket="/s", state="held",
                     agent=net_status(net_frames_buffered=2))  # fmt: skip
        return to_json(Devices(devices=[disk, nic]))


def fake_migration() -> tuple[NetMigration, FakeNic, FakeQemu, list[str], MigrationReport]:
    nic, qemu, marks = FakeNic(), FakeQemu(), []
    managed: Any = SimpleNamespace(name="v", nics=[nic], vm=qemu)
    report = MigrationReport(vm="v", source="a", destination="b", storage="shared")
    net = NetMigration(managed, report, lambda step: marks.append(step), logging.getLogger("t"))
    return net, nic, qemu, marks, report


async def test_the_nic_steps_in_order_and_the_figures() -> None:
    net, nic, qemu, marks, report = fake_migration()
    await net.start()
    net.prepared({"net0": "tcp:10.213.7.2:4242"})
    await net.hold()  # QEMU's STOP event
    await net.hold()  # and its pre-switchover pause
    assert qemu.commands == [] and marks == ["net_held"]
    await net.switched_over()
    peer = FakePeer()
    await net.finish(cast(Any, peer), {"nic_announced": time.time() - QUIET_S}, time.time())
    assert peer.posts == []  # the announce came as the commit was heard: the network heard it
    assert [c for c in nic.calls if not c.startswith("GET")] == [
        "/hold", "/forward", "/stop-forward",
    ]  # fmt: skip
    assert marks == ["net_held", "net_forward_started", "net_forward_stopped"]
    assert (report.net_frames_buffered, report.net_frames_forwarded, report.net_frames_lost) == (
        5, 3, 0,
    )  # fmt: skip


@pytest.mark.parametrize("steps", [{"nic_announced": time.time() - 20}, {}])
async def test_an_announce_made_while_the_link_was_cut_is_made_again(
    steps: dict[str, float],
) -> None:
    """The commit's answer came long after the destination announced (a cut link), or a
    restarted daemon does not know when it did: the destination announces again."""
    net, _, _, marks, _ = fake_migration()
    await net.start()
    net.prepared({"net0": "tcp:10.213.7.2:4242"})
    await net.switched_over()
    peer = FakePeer()
    await net.finish(cast(Any, peer), steps, time.time())
    assert peer.posts == ["/v1/vms/v/announce"]
    assert marks == ["net_forward_started", "net_announced_again", "net_forward_stopped"]


async def test_a_destination_without_the_nic_agent_is_refused() -> None:
    net, *_ = fake_migration()
    with pytest.raises(PeerError, match="no net agent"):
        net.prepared({})


async def test_roll_back_after_the_hold_releases_the_source() -> None:
    net, nic, _, marks, _ = fake_migration()
    await net.roll_back()
    assert nic.calls == []  # nothing held: nothing to release
    net.prepared({"net0": "tcp:10.213.7.2:4242"})
    await net.hold()
    await net.roll_back()
    assert [c for c in nic.calls if not c.startswith("GET")] == ["/hold", "/release"]
    assert marks == ["net_held"]


def test_an_address_a_migrated_vm_took_away_is_not_handed_out_again(tmp_path: Path) -> None:
    network = GuestNetwork.parse("br0", "10.213.7.100-10.213.7.102/24")
    manager = VmManager("a", tmp_path, None, "10.213.7.1", network)
    first = manager._plan_nics(VmRequest(name="v1", nics=1), None)
    assert [(n.address, n.mac, n.made_tap) for n in first] == [
        ("10.213.7.100/24", "52:54:00:d5:07:64", tap_name("v1", "net0"))
    ]
    manager.addresses.lend("10.213.7.100/24")  # v1 migrated away with it
    again = VmManager("a", tmp_path, None, "10.213.7.1", network)  # and the daemon restarted
    assert again._plan_nics(VmRequest(name="v2", nics=1), None)[0].address == "10.213.7.101/24"
    back = again._plan_nics(
        VmRequest(name="v1", nics=1),
        [NicIdentity(node="net0", address="10.213.7.100/24", mac="52:54:00:d5:07:64")],
    )
    assert [(n.address, n.hold, n.peer_listen) for n in back] == [
        ("10.213.7.100/24", True, "10.213.7.1")
    ]
    assert again.addresses.lent == frozenset()
    assert (
        VmManager("a", tmp_path, None, "10.213.7.1", None)._plan_nics(VmRequest(name="v3"), None)
        == []
    )
    with pytest.raises(UsageError, match="no guest network"):
        VmManager("a", tmp_path, None, "127.0.0.1", None)._plan_nics(
            VmRequest(name="v3", nics=1), None
        )
