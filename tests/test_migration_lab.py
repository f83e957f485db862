"""A real live migration between two hosts of a lab (network namespaces, a devagentd in
each), with ioprobe writing and verifying in the guest throughout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from devagent.api_types import VmStatus
from devagent.client import DaemonClient, Endpoint
from devagent.errors import NotFound, StateError
from devagent.guest.build import GuestImage
from devagent.lab.lab import Lab
from devagent.orchestrate import locate_vm, migrate, start_vm, wait_heartbeats
from tests.conftest import clean_lab, two_hosts

pytestmark = [pytest.mark.vm, pytest.mark.lab]


@pytest.fixture
def lab(state_dir: Path, guest: GuestImage) -> Iterator[Lab]:
    with clean_lab("tmig", state_dir) as lab:
        yield lab


async def test_the_real_daemon_refuses_no_token_and_bad_json(lab: Lab) -> None:
    a, _ = two_hosts(lab)
    connector = aiohttp.TCPConnector(ssl=lab.client_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"{a.url}/v1/vms") as resp:
            assert resp.status == 401
        headers = {"Authorization": f"Bearer {lab.token}"}
        async with session.post(f"{a.url}/v1/vms", data=b"{oops", headers=headers) as resp:
            assert resp.status == 400
            assert "not valid JSON" in (await resp.json())["error"]


async def test_a_suspended_vm_does_nothing_is_not_migrated_and_resumes(lab: Lab) -> None:
    a, b = two_hosts(lab)
    await start_vm(a, {"name": "sus1", "disk_size": "64M", "workload": "moderate,span=16M"})
    await wait_heartbeats(a, "sus1", 5)
    async with DaemonClient(a) as client:
        assert (await client.post("/v1/vms/sus1/suspend"))["state"] == "paused"
        await asyncio.sleep(0.3)  # a heartbeat already on its way may still land
        since = time.time()
        await asyncio.sleep(1.0)
        quiet = await client.get("/v1/vms/sus1/heartbeats", since=since)
        assert quiet["heartbeats"] == []
        with pytest.raises(StateError, match="paused"):
            await client.post("/v1/vms/sus1/suspend")  # already suspended
    with pytest.raises(StateError, match="paused"):
        await migrate(a, b, "sus1", storage="shared")
    async with DaemonClient(a) as client:
        assert (await client.post("/v1/vms/sus1/resume"))["state"] == "running"
    beats = await wait_heartbeats(a, "sus1", 5)
    assert sum(beat.errors for beat in beats) == 0


async def test_shared_storage_migration_a_to_b(lab: Lab) -> None:
    a, b = two_hosts(lab)
    request = {"name": "mig1", "disk_size": "256M", "workload": "moderate,span=32M"}
    status = await start_vm(a, request)
    print(f"\nboot to first heartbeat: {status.boot_s} s")
    await wait_heartbeats(a, "mig1", 20)

    report = await migrate(a, b, "mig1", storage="shared", link_rate_bps=1_000_000_000)
    print(report.to_json())
    assert report.status == "completed", report.error
    assert report.guest_io_errors == 0
    assert report.guest_verify_failures == 0
    assert report.integrity == "ok"
    assert report.downtime_ms is not None and report.downtime_ms > 0
    assert report.max_io_gap_ms is not None and report.max_io_gap_ms > 0
    assert report.time_to_switchover_s is not None and report.total_time_s is not None
    assert 0 < report.time_to_switchover_s <= report.total_time_s
    assert report.bytes_between_hosts is not None
    assert report.bytes_between_hosts > (report.ram_transferred_bytes or 0) > 0

    # The VM now runs on b, and only there; its probe goes on.
    where, vm = await locate_vm([a, b], "mig1")
    assert where.name == "b" and vm.state == "running"
    async with DaemonClient(a) as client:
        with pytest.raises(NotFound):
            await client.get("/v1/vms/mig1")
    beats = await wait_heartbeats(b, "mig1", 10)
    assert all(beat.errors == 0 and beat.verify_failures == 0 for beat in beats)

    # and it can come back.
    back = await migrate(b, a, "mig1", storage="shared", link_rate_bps=1_000_000_000)
    assert back.status == "completed", back.error
    assert (back.guest_io_errors, back.guest_verify_failures, back.integrity) == (0, 0, "ok")


async def test_a_migration_to_a_dead_destination_leaves_the_vm_on_the_source(lab: Lab) -> None:
    a, _ = two_hosts(lab)
    await start_vm(a, {"name": "mig2", "disk_size": "64M", "workload": "moderate,span=16M"})
    ghost = Endpoint(url="https://127.0.0.1:9", token=lab.token, name="ghost")
    report = await migrate(a, ghost, "mig2", storage="shared")
    assert report.status == "failed" and report.error and "ghost" in report.error
    _, vm = await locate_vm([a], "mig2")
    assert vm.state == "running"
    beats = await wait_heartbeats(a, "mig2", 5)
    assert beats[-1].errors == 0
    await asyncio.sleep(0)


async def test_a_daemon_restart_leaves_the_guest_untouched(lab: Lab) -> None:
    a, b = two_hosts(lab)
    status = await start_vm(
        a, {"name": "rst1", "disk_size": "64M", "workload": "moderate,span=16M"}
    )
    qemu_pid = status.status.pid
    await wait_heartbeats(a, "rst1", 5)
    old_daemon = lab.host("a").pid
    restarted = await asyncio.to_thread(lab.restart_daemon, "a")
    assert restarted.pid is not None and restarted.pid != old_daemon

    # The new daemon adopted the same QEMU; the probe's counters went on, with no error.
    async with DaemonClient(a) as client:
        vm = await client.get_as("/v1/vms/rst1", VmStatus)
    assert vm.pid == qemu_pid and vm.state == "running"
    beats = await wait_heartbeats(a, "rst1", 10)
    assert beats[0].hb > 10  # heartbeat numbers continue from before the restart
    assert all(beat.errors == 0 and beat.verify_failures == 0 for beat in beats)
    # and the adopted VM still migrates.
    report = await migrate(a, b, "rst1", storage="shared")
    assert report.status == "completed", report.error
    assert report.integrity == "ok"
