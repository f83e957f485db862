"""Remote device access and device dynamic exchange on a real 2-host lab, with ioprobe
writing and verifying in the guest throughout: a swap under load, a VM on host b running on
a disk that lives on host a through a 5 s link cut, a fetched replica completing while the
guest writes (with its agent SIGKILLed halfway), and a disk moved to another host."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devagent.agent.fetch import HEADER_SIZE as BITMAP_HEADER_SIZE
from devagent.client import DaemonClient, Endpoint
from devagent.guest.build import GuestImage
from devagent.guest.probe import disk_digest
from devagent.lab.lab import Lab
from devagent.orchestrate import start_vm, wait_heartbeats
from tests.conftest import clean_lab, two_hosts

pytestmark = [pytest.mark.vm, pytest.mark.lab]

LONG = 600.0


@pytest.fixture
def lab(state_dir: Path, guest: GuestImage) -> Iterator[Lab]:
    with clean_lab("tex", state_dir) as lab:
        yield lab


def durable_bytes(replica: Path, chunk_size: int) -> int:
    """Bytes the presence bitmap file beside a Fetch replica says are present."""
    bits = Path(f"{replica}.present").read_bytes()[BITMAP_HEADER_SIZE:]
    return sum(bin(byte).count("1") for byte in bits) * chunk_size


def every_block_is_the_guests_or_zero(image: Path) -> int:
    """Byte for byte: each 4 KiB block is a valid probe block at its own index (which the
    digest check ties to the generation the guest last wrote) or zeros; returns the count
    of probe blocks."""
    found = disk_digest(image)
    assert found.invalid_crc_blocks == 0 and found.misplaced_blocks == 0
    zero, probe = bytes(4096), 0
    with image.open("rb") as f:
        while block := f.read(4096):
            if block != zero:
                probe += 1
    assert probe == found.valid_blocks, "a block is neither the guest's nor zero"
    return probe


async def verified_clean(at: Endpoint, vm: str, image: Path | None = None) -> dict[str, Any]:
    """The probe read back every block it wrote, the disk holds what it last wrote, and
    (given the image) nothing else is on it."""
    async with DaemonClient(at, timeout=LONG) as client:
        verified = (await client.post(f"/v1/vms/{vm}/probe", {"command": "verify"}))["event"]
        paused = (await client.post(f"/v1/vms/{vm}/probe", {"command": "pause"}))["event"]
        try:
            if image is not None:
                blocks = every_block_is_the_guests_or_zero(image)
                assert blocks == paused["written_blocks"]
        finally:
            await client.post(f"/v1/vms/{vm}/probe", {"command": "resume"})
        integrity = (await client.post(f"/v1/vms/{vm}/integrity"))["integrity"]
        last = (await client.get(f"/v1/vms/{vm}"))["last_heartbeat"]
    assert verified["failures"] == 0 and verified["blocks"] > 0
    assert integrity == "ok"
    assert last["errors"] == 0 and last["verify_failures"] == 0
    return verified


async def test_swap_under_load(lab: Lab, state_dir: Path) -> None:
    a, _ = two_hosts(lab)
    await start_vm(a, {"name": "sw1", "disk_size": "128M", "storage": "local",
                       "workload": "heavy,span=64M,prefill=32M"})  # fmt: skip
    await wait_heartbeats(a, "sw1", 20)
    target = state_dir / "swapped.img"
    async with DaemonClient(a, timeout=LONG) as client:
        result = await client.post("/v1/vms/sw1/devices/disk0/swap", {"to": str(target)})
        devices = (await client.get("/v1/vms/sw1/devices"))["devices"]
    print(f"\nswap under load: {result}")
    assert devices[0]["image"] == str(target)
    assert devices[0]["agent"]["backend_status"] == {
        "kind": "local", "path": str(target), "read_only": False
    }  # fmt: skip
    assert result["copied_bytes"] > 0 and result["held_ms"] > 0
    await wait_heartbeats(a, "sw1", 10)
    await verified_clean(a, "sw1", target)


async def test_remote_disk_through_a_link_cut(lab: Lab) -> None:
    a, b = two_hosts(lab)
    await start_vm(b, {"name": "rd1", "disk_size": "64M", "disk_from": a.to_json(),
                       "workload": "moderate,span=16M"})  # fmt: skip
    await wait_heartbeats(b, "rd1", 20)
    lab.set_link("a", False)
    cut = time.time()
    await asyncio.sleep(5)
    lab.set_link("a", True)
    after = await wait_heartbeats(b, "rd1", 20, timeout=60)
    async with DaemonClient(b) as client:
        beats = (await client.get("/v1/vms/rd1/heartbeats", since=cut - 1))["heartbeats"]
        device = (await client.get("/v1/vms/rd1/devices"))["devices"][0]
    stalled = [x["hb"] for x in beats if cut + 0.5 < x["host_time"] < cut + 4.5 and x["ops"] == 0]
    assert stalled, "the guest's I/O did not stall during the cut: was the link really cut?"
    assert after[-1].errors == 0 and after[-1].verify_failures == 0
    link = device["agent"]["backend_status"]
    assert link["kind"] == "remote" and link["connected"] and link["timeouts"] == 0
    print(
        f"\nlink cut 5 s: guest I/O stalled in {len(stalled)} heartbeats, then went on; "
        f"reconnects {link['reconnects']} (TCP itself may ride out a short cut)"
    )
    await verified_clean(b, "rd1")


async def test_fetched_replica_completes_while_the_guest_writes_and_survives_sigkill(
    lab: Lab, state_dir: Path
) -> None:
    a, b = two_hosts(lab)
    await start_vm(b, {"name": "fh1", "disk_size": "256M", "disk_from": a.to_json(),
                       "workload": "moderate,rate=300,span=64M,prefill=64M"})  # fmt: skip
    await wait_heartbeats(b, "fh1", 10)
    async with DaemonClient(a) as client:  # the source: where the disk lives now
        export = (await client.get("/v1/exports"))["exports"][0]
    replica = state_dir / "home.img"

    async def bring_home() -> dict[str, Any]:
        async with DaemonClient(b, timeout=LONG) as client:
            body = {"to": str(replica), "rate_limit": 32 << 20}
            result: dict[str, Any] = await client.post("/v1/vms/fh1/devices/disk0/swap", body)
            return result

    # A slow background copy so that the kill lands in the middle of it.
    swap = asyncio.create_task(bring_home())
    killed = 0
    for _ in range(300):
        await asyncio.sleep(0.05)
        async with DaemonClient(b) as client:
            device = (await client.get("/v1/vms/fh1/devices"))["devices"][0]
        backend = device.get("agent", {}).get("backend_status", {})
        if backend.get("kind") == "fetch" and 0 < backend["present_bytes"] < backend["size"]:
            os.kill(device["agent_pid"], signal.SIGKILL)
            # What survives the kill is the bitmap file (in-memory progress runs ahead of it:
            # fetched chunks become durable only once their data is synced).
            killed = durable_bytes(replica, backend["chunk_size"])
            print(f"\nagent SIGKILLed with {backend['present_bytes']:,} of "
                  f"{backend['size']:,} bytes present, {killed:,} of them durable")  # fmt: skip
            break
    assert killed, "the kill did not land in the middle of the background copy"
    while True:  # the restarted agent resumes from its persisted bitmap, not from zero
        async with DaemonClient(b) as client:
            again = (await client.get("/v1/vms/fh1/devices"))["devices"][0]
        status = again.get("agent", {}).get("backend_status", {})
        if again["agent_pid"] != device["agent_pid"] and status.get("kind") == "fetch":
            assert status["present_bytes"] >= killed
            print(f"restarted agent resumed with {status['present_bytes']:,} bytes present")
            break
        if status.get("kind") == "local":  # finished already: nothing to compare
            break
        await asyncio.sleep(0.05)
    result = await asyncio.wait_for(swap, LONG)
    print(f"fetch home: {result}")
    assert result["released"] == "a"
    await wait_heartbeats(b, "fh1", 10)
    await verified_clean(b, "fh1", replica)
    async with DaemonClient(a) as client:
        assert (await client.get("/v1/exports"))["exports"] == []  # the source is released
    assert not Path(export["image"]).exists()


async def test_attach_remote_moves_a_running_disk_to_another_host(
    lab: Lab, state_dir: Path
) -> None:
    a, b = two_hosts(lab)
    await start_vm(a, {"name": "ar1", "disk_size": "64M", "storage": "local",
                       "workload": "moderate,span=16M,prefill=16M"})  # fmt: skip
    await wait_heartbeats(a, "ar1", 20)
    async with DaemonClient(a, timeout=LONG) as client:
        result = await client.post("/v1/vms/ar1/devices/disk0/attach-remote", {"from": b.to_json()})
    print(f"\nattach-remote: {result}")
    assert result["lives_on"] == "b"
    async with DaemonClient(b) as client:
        exports = (await client.get("/v1/exports"))["exports"]
    assert [e["name"] for e in exports] == ["ar1"]
    await wait_heartbeats(a, "ar1", 10)
    await verified_clean(a, "ar1", Path(exports[0]["image"]))
    assert Path(exports[0]["image"]).stat().st_size == 64 << 20
