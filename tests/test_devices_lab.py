"""End to end: a test guest with every kind of device a real VM has, several of each: three
disks of three sizes (its probe writes all of them at once) and two NICs on its host's guest
network (echo on each), on a 3-host lab of namespaces with a devagentd in each. It migrates
a→b→a with each of devagent's strategies, a TCP stream through each NIC all along; and a
destination daemon killed during RAM leaves the whole set on the source. Everything goes,
even on failure."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from devagent.api_types import Devices, DiskRow, Integrity, NicRow
from devagent.client import DaemonClient, Endpoint
from devagent.guest.build import GuestImage
from devagent.lab.lab import Lab
from devagent.lab.layout import GUEST_BRIDGE
from devagent.lab.traffic import EchoStream, wait_for_ping
from devagent.orchestrate import migrate, start_vm, wait_heartbeats
from devagent.report import MigrationReport
from tests.conftest import clean_lab, kill_daemon_during_ram, processes_mentioning

pytestmark = [pytest.mark.vm, pytest.mark.lab]

LAB = "dvset"
DISKS = {"disk0": 1 << 30, "disk1": 2 << 30, "disk2": 512 << 20}
LINK = 1_000_000_000
BODY = {
    "disk_size": DISKS["disk0"], "data_disks": [DISKS["disk1"], DISKS["disk2"]], "nics": 2,
    "storage": "local", "workload": "moderate,span=64M",
}  # fmt: skip


@pytest.fixture
def lab(state_dir: Path, guest: GuestImage) -> Iterator[Lab]:
    with clean_lab(LAB, state_dir, hosts=3, show_logs=True) as lab:
        yield lab


def endpoint(lab: Lab, name: str) -> Endpoint:
    host = lab.host(name)
    return Endpoint(url=host.url, token=lab.token, name=host.name)


def taps(lab: Lab, host: str) -> list[str]:
    netns = lab.host(host).netns
    assert netns is not None
    out = subprocess.run(
        ["ip", "-n", netns, "-o", "link", "show", "master", GUEST_BRIDGE],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if "dt" in line]


def holds_nothing(lab: Lab, host: str, vm: str) -> None:
    """Host ``host`` keeps nothing of ``vm``: no process, replica, folder or tap."""
    where = lab.host(host).dir
    assert processes_mentioning(str(where / "vms" / vm)) == []
    assert not list((where / "disks").glob(f"{vm}*")), list((where / "disks").iterdir())
    assert not (where / "vms" / vm).exists()
    assert taps(lab, host) == []


async def boot(lab: Lab, name: str) -> list[str]:
    """The set's VM on a, its probe writing; its NICs' addresses once each answers."""
    started = await start_vm(endpoint(lab, "a"), {"name": name, **BODY})
    assert [agent.node for agent in started.status.agents] == list(DISKS)
    assert [n.node for n in started.status.nics] == ["net0", "net1"]
    addresses = [n.address.split("/")[0] for n in started.status.nics]
    netns = lab.host("c").netns
    assert netns is not None and len(set(addresses)) == 2
    for address in addresses:
        await asyncio.to_thread(wait_for_ping, netns, address, 90.0)
    await wait_heartbeats(endpoint(lab, "a"), name, 5)
    return addresses


async def test_three_disks_and_two_nics_move_as_one_set_with_each_strategy(lab: Lab) -> None:
    a, b = endpoint(lab, "a"), endpoint(lab, "b")
    addresses = await boot(lab, "set1")
    async with DaemonClient(a) as client:
        devices = (await client.get_as("/v1/vms/set1/devices", Devices)).devices
        disks = [d for d in devices if isinstance(d, DiskRow)]
        assert [(d.device, d.state) for d in disks] == [(n, "serving") for n in DISKS]
        assert [d.agent.size for d in disks if d.agent] == list(DISKS.values())
        assert [d.device for d in devices if isinstance(d, NicRow)] == ["net0", "net1"]
        await wait_heartbeats(a, "set1", 20)  # the probe wrote every disk ...
        checked = await client.post_as("/v1/vms/set1/integrity", Integrity)
        assert checked.integrity == "ok"  # ... and each holds what it last wrote there
    images = [lab.host("a").dir / "disks" / f"set1{s}.img" for s in ("", "-disk1", "-disk2")]
    assert [i.stat().st_size for i in images] == list(DISKS.values())
    assert all(i.stat().st_blocks > 0 for i in images)

    netns = lab.host("c").netns
    assert netns is not None
    hops = [(a, b, "a", "b"), (b, a, "b", "a")]
    for strategy in ("hybrid", "postcopy", "precopy"):
        for source, destination, there, here in hops:
            with ExitStack() as streams:
                echoes = [
                    streams.enter_context(EchoStream(netns, address, seed=seed, rate=128 << 10))
                    for seed, address in enumerate(addresses, start=1)
                ]
                await asyncio.sleep(1.0)
                report = await migrate(
                    source, destination, "set1", storage=strategy, link_rate_bps=LINK
                )
                await asyncio.sleep(1.0)  # the streams go on from the destination
                results = [await asyncio.to_thread(e.finish) for e in echoes]
            hop = f"{strategy} {there}→{here}"
            print(f"\n{hop}: {report.status} switchover {report.time_to_switchover_s} s, "
                  f"total {report.total_time_s} s, gap {report.max_io_gap_ms} ms")  # fmt: skip
            checked_hop(report, hop)
            for result in results:
                assert result.intact and not result.reset, (hop, result)
                assert result.received == result.sent > 0, (hop, result)
            holds_nothing(lab, there, "set1")
            assert len(taps(lab, here)) == 2

    # Devices by node: disk2 alone moves to host c (remote access), then comes home.
    c = endpoint(lab, "c")
    async with DaemonClient(a) as client:
        await client.post("/v1/vms/set1/devices/disk2/attach-remote", {"from": c.to_json()})
        status = await client.get("/v1/vms/set1")
        assert status["disk"].split(", ")[2] == "host c (remote)", status["disk"]
        assert (await client.post_as("/v1/vms/set1/integrity", Integrity)).disks == {
            node: "ok" for node in DISKS
        }  # disk2's digest asked of host c
        home = lab.host("a").dir / "disks" / "set1-disk2-home.img"
        await client.post("/v1/vms/set1/devices/disk2/swap", {"to": str(home), "sync": True})
        assert (await client.post_as("/v1/vms/set1/integrity", Integrity)).integrity == "ok"
    async with DaemonClient(c) as client:
        assert (await client.get("/v1/exports"))["exports"] == []


def checked_hop(report: MigrationReport, hop: str) -> None:
    assert report.status == "completed", (hop, report.error)
    assert (report.guest_io_errors, report.guest_verify_failures) == (0, 0), hop
    assert report.integrity == "ok", (hop, report.integrity)  # every disk
    assert report.guest_ops_lost == 0, hop
    assert report.net_frames_lost == 0, hop  # both NICs


async def test_a_destination_killed_during_ram_leaves_the_whole_set_on_the_source(
    lab: Lab,
) -> None:
    a, b = endpoint(lab, "a"), endpoint(lab, "b")
    await boot(lab, "set2")
    lab.shape("a", "50mbit")  # RAM long enough to be interrupted
    attempt = asyncio.create_task(migrate(a, b, "set2", storage="hybrid"))
    await kill_daemon_during_ram(lab, a, "b")
    async with DaemonClient(a) as client:
        failed = await attempt
        assert failed.status == "failed" and "host b" in (failed.error or ""), failed.error
        await wait_heartbeats(a, "set2", 10)  # the guest goes on here, on all three disks
        devices = (await client.get_as("/v1/vms/set2/devices", Devices)).devices
        disks = [d for d in devices if isinstance(d, DiskRow)]
        assert [(d.device, d.state) for d in disks] == [(n, "serving") for n in DISKS]
        assert all(d.agent and d.agent.backend.startswith("Local") for d in disks), disks
        assert (await client.post_as("/v1/vms/set2/integrity", Integrity)).integrity == "ok"
    # b's daemon comes back and removes what the attempt made: VM, agents, replicas, taps.
    await asyncio.to_thread(lab.restart_daemon, "b")
    async with DaemonClient(b) as client:
        assert (await client.get("/v1/vms"))["vms"] == []
    holds_nothing(lab, "b", "set2")


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=300)


async def written(images: list[Path], at_least: int) -> None:
    """Until each image holds ``at_least`` bytes on disk and has not grown for a second (the
    guest's prefill is done: it writes nothing more)."""
    sizes: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = [image.stat().st_blocks * 512 for image in images]
        if now == sizes and all(size > at_least for size in now):
            return
        sizes = now
        await asyncio.sleep(1.0)
    raise AssertionError(f"the guest's prefill did not end: {sizes}")


async def test_a_users_guest_with_two_qcow2_disks_moves_byte_for_byte(
    lab: Lab, guest: GuestImage, tmp_path: Path
) -> None:
    """The user's own guest (no probe for the host to read): two qcow2 disks, which its
    kernel command line has the test guest's ioprobe prefill and then leave alone. A copy
    of each is made while the VM is paused; after each migration (hybrid a→b, postcopy
    b→a, precopy a→b) the disks the VM runs on equal those copies byte for byte."""
    a = endpoint(lab, "a")
    images = [lab.shared_dir / f"user-{n}.qcow2" for n in ("system", "data")]
    for image in images:  # (preallocated: through its agent a qcow2 cannot grow)
        made = qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata",
                        str(image), "256M")  # fmt: skip
        assert made.returncode == 0, made.stderr
    prefill = 32 << 20
    append = (f"console=ttyS0 quiet devagent.probe=idle:0:4096:0:0:{prefill} "
              "devagent.disks=disk0,disk1")  # fmt: skip
    body = {
        "name": "user2", "disk": [str(i) for i in images], "storage": "local",
        "kernel": str(guest.kernel), "initrd": str(guest.initrd), "append": append,
    }  # fmt: skip
    await start_vm(a, body)
    await written(images, prefill)
    copies = [tmp_path / f"copy-{i.name}" for i in images]
    async with DaemonClient(a) as client:
        await client.post("/v1/vms/user2/suspend")
        for image, copy in zip(images, copies, strict=True):
            done = qemu_img("convert", "-U", "-f", "qcow2", "-O", "qcow2", str(image), str(copy))
            assert done.returncode == 0, done.stderr
        await client.post("/v1/vms/user2/resume")
    hops = [("hybrid", "a", "b"), ("postcopy", "b", "a"), ("precopy", "a", "b")]
    for strategy, there, here in hops:
        report = await migrate(
            endpoint(lab, there), endpoint(lab, here), "user2", storage=strategy,
            link_rate_bps=LINK,
        )  # fmt: skip
        assert report.status == "completed", (strategy, report.error)
        assert [d.node for d in report.devices] == ["disk0", "disk1"]
        async with DaemonClient(endpoint(lab, here)) as client:
            await client.post("/v1/vms/user2/suspend")  # nothing moves while it is compared
            devices = (await client.get_as("/v1/vms/user2/devices", Devices)).devices
            disks = [Path(d.image) for d in devices if isinstance(d, DiskRow)]
            assert all(d.is_relative_to(lab.host(here).dir / "disks") for d in disks), disks
            for disk, copy in zip(disks, copies, strict=True):
                same = qemu_img("compare", "-U", "-f", "qcow2", "-F", "qcow2", str(copy), str(disk))
                assert same.returncode == 0, (strategy, disk, same.stdout, same.stderr)
            await client.post("/v1/vms/user2/resume")
        holds_nothing(lab, there, "user2")
