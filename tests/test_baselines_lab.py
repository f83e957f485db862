"""QEMU's own storage migration (the benchmarks' baselines) on a real 2-host lab: each flow
moves a small VM that runs without a device agent, with ioprobe writing and verifying, and
the destination's disk must hold exactly what the guest last wrote."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from devagent.client import DaemonClient
from devagent.guest.build import GuestImage
from devagent.lab.lab import Lab
from devagent.orchestrate import migrate, start_vm, wait_heartbeats
from devagent.vocab import BASELINES
from tests.conftest import clean_lab, processes_mentioning, two_hosts, until_steady

pytestmark = [pytest.mark.vm, pytest.mark.lab]


@pytest.fixture
def lab(state_dir: Path, guest: GuestImage) -> Iterator[Lab]:
    with clean_lab("bnt", state_dir) as lab:
        yield lab


@pytest.mark.parametrize("strategy", BASELINES)
async def test_a_qemu_baseline_moves_vm_and_disk_intact(lab: Lab, strategy: str) -> None:
    a, b = two_hosts(lab)
    request = {"name": "q1", "disk_size": "64M", "storage": "local", "agent": False,
               "workload": "moderate,span=32M,prefill=16M"}  # fmt: skip
    await start_vm(a, request)
    await until_steady(a, "q1")
    report = await migrate(a, b, "q1", storage=strategy, link_rate_bps=lab.link_rate_bps)
    print(
        f"\n{strategy}: switchover {report.time_to_switchover_s} s, total "
        f"{report.total_time_s} s (limit {report.limit_s} s), max I/O gap "
        f"{report.max_io_gap_ms} ms, {report.bytes_between_hosts} B on the link"
    )
    assert report.status == "completed", report.error
    assert (report.guest_io_errors, report.guest_verify_failures) == (0, 0)
    assert report.integrity == "ok"
    assert report.io_gap_source == "probe heartbeats"
    # Nothing of the VM is left on a; it runs on b and goes on writing without errors.
    async with DaemonClient(a) as client:
        assert (await client.get("/v1/vms"))["vms"] == []
    assert not list(lab.host("a").dir.glob("disks/q1.*"))
    beats = await wait_heartbeats(b, "q1", 10)
    assert beats[-1].errors == 0 and beats[-1].verify_failures == 0


async def test_a_destination_dying_during_the_qemu_mirror_leaves_the_vm_on_the_source(
    lab: Lab,
) -> None:
    a, b = two_hosts(lab)
    lab.shape("a", "50mbit")  # a mirror long enough to be interrupted
    await start_vm(a, {"name": "q2", "disk_size": "128M", "storage": "local", "agent": False,
                       "workload": "moderate,span=64M,prefill=64M"})  # fmt: skip
    await until_steady(a, "q2")
    attempt = asyncio.create_task(migrate(a, b, "q2", storage="qemu-mirror"))
    await asyncio.sleep(1.5)
    b_daemon = lab.host("b").pid
    assert b_daemon is not None
    os.kill(b_daemon, signal.SIGKILL)
    failed = await attempt
    print(f"\nfailed as it should: {failed.error}")
    assert failed.status == "failed" and "host b" in (failed.error or "")

    # The VM runs on a, its mirror gone; its probe goes on without an error.
    async with DaemonClient(a) as client:
        assert (await client.get("/v1/vms/q2"))["state"] == "running"
    beats = await wait_heartbeats(a, "q2", 20)
    assert beats[-1].errors == 0 and beats[-1].verify_failures == 0

    # b's daemon comes back and removes the incoming QEMU and its image.
    await asyncio.to_thread(lab.restart_daemon, "b")
    async with DaemonClient(b) as client:
        assert (await client.get("/v1/vms"))["vms"] == []
    b_dir = lab.host("b").dir
    assert processes_mentioning(str(b_dir / "vms")) == []
    assert not list(b_dir.glob("disks/q2.*"))

    # and the next attempt succeeds, the disk intact.
    lab.shape("a", "1gbit")
    report = await migrate(a, b, "q2", storage="qemu-mirror", link_rate_bps=lab.link_rate_bps)
    assert report.status == "completed", report.error
    assert report.integrity == "ok"
