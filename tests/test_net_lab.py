"""End to end: VM NICs as the daemons make them, on a 3-host lab (namespaces, a devagentd in
each, the guest's tap on its host's bridge).  From host c, a 10 ms ping and a TCP echo
stream checked byte for byte run while the daemon migrates the VM from a to b; and a NIC
swap to another tap under a running stream.  Everything goes, even on failure."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devagent.client import DaemonClient, Endpoint
from devagent.errors import NotFound
from devagent.guest.build import GuestImage
from devagent.lab.lab import Lab
from devagent.lab.layout import GUEST_BRIDGE
from devagent.lab.traffic import EchoStream, Pinger, ping_max_gap, wait_for_ping
from devagent.orchestrate import locate_vm, migrate, start_vm
from tests.conftest import clean_lab, kill_daemon_during_ram, processes_mentioning

pytestmark = [
    pytest.mark.vm,
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and taps need root"),
]


@pytest.fixture
def lab(request: pytest.FixtureRequest, state_dir: Path, guest: GuestImage) -> Iterator[Lab]:
    name = {"stream": "ntmig", "swap": "ntswp", "destination": "ntrb"}[
        request.node.name.split("_")[2]
    ]
    with clean_lab(name, state_dir, hosts=3, show_logs=True) as lab:
        yield lab


def ip(netns: str, *args: str) -> str:
    done = subprocess.run(["ip", "-n", netns, *args], capture_output=True, text=True, check=True)
    return done.stdout


def endpoints(lab: Lab) -> list[Endpoint]:
    return [Endpoint(url=h.url, token=lab.token, name=h.name) for h in lab.hosts]


async def boot_with_nic(a: Endpoint, name: str, netns: str) -> str:
    """Start the test guest with a NIC on ``a``; its address once it answers a ping."""
    status = await start_vm(a, {"name": name, "disk_size": "64M", "workload": "idle", "nic": True})
    assert len(status.status.nics) == 1
    address: str = status.status.nics[0].address.split("/")[0]
    await asyncio.to_thread(wait_for_ping, netns, address, 90.0)
    return address


def lost_pings_outside(answers: list[tuple[float, int]], low: float, high: float) -> list[int]:
    """The icmp_seq of every unanswered ping whose neighbours' answers are not both within
    [low, high] (a ping lost at the switchover is one whose neighbours straddle it)."""
    lost = []
    for (before, seq), (after, nxt) in itertools.pairwise(answers):
        if nxt - seq > 1 and not (before >= low and after <= high):
            lost.extend(range(seq + 1, nxt))
    return lost


async def nic_device(endpoint: Endpoint, vm: str) -> dict[str, Any]:
    async with DaemonClient(endpoint) as client:
        devices = (await client.get(f"/v1/vms/{vm}/devices"))["devices"]
    (nic,) = [d for d in devices if d.get("kind") == "nic"]
    result: dict[str, Any] = nic
    return result


async def test_tcp_stream_and_ping_through_a_live_migration(lab: Lab, state_dir: Path) -> None:
    a, b, c = endpoints(lab)
    netns_c = lab.host("c").netns
    assert netns_c is not None
    address = await boot_with_nic(a, "nvm1", netns_c)
    before = await nic_device(a, "nvm1")
    assert before["state"] == "serving" and before["agent"]["vm_connected"]

    with (
        Pinger(netns_c, address, state_dir / "ping.log") as pinger,
        EchoStream(netns_c, address, seed=7, rate=256 << 10) as stream,
    ):
        await asyncio.sleep(3)  # the stream under way, the pings answered
        started = time.time()
        report = await migrate(a, b, "nvm1", storage="shared", link_rate_bps=1_000_000_000)
        ended = time.time()
        await asyncio.sleep(2)  # the stream goes on from b
        echo = await asyncio.to_thread(stream.finish)
        answers = pinger.stop()

    print(f"\n{report.to_json()}\necho: {echo}")
    assert report.status == "completed", report.error
    assert echo.reset is False and echo.first_difference is None, echo
    assert echo.received == echo.sent > 1 << 20 and echo.intact, echo
    assert report.net_frames_lost == 0
    assert report.net_frames_buffered is not None and report.net_frames_forwarded is not None
    assert report.net_frames_buffered > 0  # the switchover kept frames of the stream
    for step in ("net_held", "net_forward_started", "net_forward_stopped"):
        assert step in report.timeline, report.timeline
    assert report.timeline["net_held"] <= report.timeline["net_forward_started"]

    # Pings are answered throughout but for the switchover: none lost before or after it,
    # every 10 ms before and after the migration; the gap it makes is short.
    window = (started + report.timeline["source_stopped"] - 0.1,
              started + report.timeline["net_forward_stopped"] + 0.1)  # fmt: skip
    assert lost_pings_outside(answers, *window) == []
    for low, high in ((started - 2.0, started), (ended + 0.5, ended + 1.5)):
        inside = [at for at, _ in answers if low <= at <= high]
        assert len(inside) > 0.5 * (high - low) / 0.01, (low, high, len(inside))
    gap = ping_max_gap(answers, *window)
    assert gap is not None
    print(f"ping: {len(answers)} answers, the switchover's gap {gap[1] * 1000:.0f} ms;", end=" ")
    print(f"the migration's largest {(ping_max_gap(answers, started, ended) or gap)[1] * 1000:.0f}")
    assert gap[1] < 3.0

    # The VM and its NIC live on b only; a removed its agent and tap.
    where, vm = await locate_vm([a, b, c], "nvm1")
    assert where.name == "b" and vm.nics[0].address.startswith(address)
    async with DaemonClient(a) as client:
        with pytest.raises(NotFound):
            await client.get("/v1/vms/nvm1")
    netns_a = lab.host("a").netns
    assert netns_a is not None
    links = ip(netns_a, "-o", "link", "show", "master", GUEST_BRIDGE)
    assert "dt" not in links, links  # only eth0 is left on a's bridge
    after = await nic_device(b, "nvm1")
    assert after["agent"]["held"] is False and after["agent"]["vm_connected"]

    # and back to a with its disk (hybrid), where it takes its address again (b's tap goes,
    # a makes a new one).
    back = await migrate(b, a, "nvm1", storage="hybrid", link_rate_bps=1_000_000_000)
    assert back.status == "completed" and back.net_frames_lost == 0, back.error
    assert back.integrity == "ok" and "net_forward_stopped" in back.timeline
    await asyncio.to_thread(wait_for_ping, netns_c, address, 10.0)
    netns_b = lab.host("b").netns
    assert netns_b is not None
    assert "dt" not in ip(netns_b, "-o", "link", "show", "master", GUEST_BRIDGE)
    home = await nic_device(a, "nvm1")
    assert home["address"].startswith(address) and home["state"] == "serving"


async def test_nic_swap_under_a_running_stream_loses_nothing(lab: Lab, state_dir: Path) -> None:
    a, _, _ = endpoints(lab)
    netns_a, netns_c = lab.host("a").netns, lab.host("c").netns
    assert netns_a is not None and netns_c is not None
    address = await boot_with_nic(a, "nvm2", netns_c)
    ip(netns_a, "tuntap", "add", "dev", "swap0", "mode", "tap")
    ip(netns_a, "link", "set", "swap0", "master", GUEST_BRIDGE, "up")
    before = await nic_device(a, "nvm2")

    with EchoStream(netns_c, address, seed=11, rate=512 << 10) as stream:
        await asyncio.sleep(3)
        async with DaemonClient(a) as client:
            swapped = await client.post("/v1/vms/nvm2/devices/net0/swap", {"to": "swap0"})
        await asyncio.sleep(3)
        echo = await asyncio.to_thread(stream.finish)

    print(f"\nswap: {swapped}\necho: {echo}")
    assert swapped["tap"] == "swap0" and swapped["net_frames_lost"] == 0
    assert echo.reset is False and echo.received == echo.sent > 1 << 20, echo
    assert echo.intact, echo
    after = await nic_device(a, "nvm2")
    assert after["tap"] == "swap0" and after["agent"]["uplink"]["name"] == "swap0"
    assert after["agent"]["uplink"]["rx_frames"] > 100  # the stream's second half came in there
    assert after["agent"]["net_frames_lost"] == before["agent"]["net_frames_lost"]

    with EchoStream(netns_c, address, seed=12, rate=512 << 10) as stream:
        # The NIC's agent dies mid-stream: the daemon restarts it on its tap (swap0 now),
        # QEMU takes the new connection, TCP resends what the gap dropped.
        await asyncio.sleep(2)
        killed = after["agent_pid"]
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (nic := await nic_device(a, "nvm2"))["agent_pid"] == killed or "agent" not in nic:
            assert time.monotonic() < deadline, nic
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        again = await asyncio.to_thread(stream.finish)
    print(f"after the agent's restart: {again}")
    assert not again.reset and again.intact and again.received > 256 << 10, again
    assert nic["agent"]["uplink"]["name"] == "swap0" and nic["agent"]["vm_connected"]

    # A daemon restart adopts the VM with its NIC's agent, untouched.
    await asyncio.to_thread(lab.restart_daemon, "a")
    adopted = await nic_device(a, "nvm2")
    assert adopted["agent_pid"] == nic["agent_pid"] and adopted["state"] == "serving", adopted


async def test_a_destination_that_dies_leaves_the_vm_and_its_nic_on_the_source(
    lab: Lab, state_dir: Path
) -> None:
    a, b, _ = endpoints(lab)
    netns_b, netns_c = lab.host("b").netns, lab.host("c").netns
    assert netns_b is not None and netns_c is not None
    address = await boot_with_nic(a, "nvm3", netns_c)
    lab.shape("a", "50mbit")  # a RAM migration long enough to be interrupted
    with EchoStream(netns_c, address, seed=13, rate=128 << 10) as stream:
        await asyncio.sleep(2)
        attempt = asyncio.create_task(migrate(a, b, "nvm3", storage="shared"))
        await kill_daemon_during_ram(lab, a, "b")  # b made the NIC's tap and agent
        failed = await attempt
        await asyncio.sleep(2)  # the stream goes on from a
        echo = await asyncio.to_thread(stream.finish)

    print(f"\nfailed as it should: {failed.error}\necho: {echo}")
    assert failed.status == "failed" and "host b" in (failed.error or "")
    assert echo.reset is False and echo.intact and echo.received > 256 << 10, echo
    nic = await nic_device(a, "nvm3")
    assert nic["state"] == "serving" and nic["agent"]["vm_connected"], nic

    # b's daemon comes back and removes what the attempt made: VM, net agent, tap.
    await asyncio.to_thread(lab.restart_daemon, "b")
    async with DaemonClient(b) as client:
        assert (await client.get("/v1/vms"))["vms"] == []
    assert processes_mentioning(str(lab.host("b").dir / "vms")) == []
    assert "dt" not in ip(netns_b, "-o", "link", "show", "master", GUEST_BRIDGE)
