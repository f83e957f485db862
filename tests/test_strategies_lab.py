"""Live migration with the disk moving between hosts that share no storage — postcopy,
precopy and hybrid — on a real 2-host lab, with ioprobe writing and verifying throughout;
and a migration whose destination daemon dies before the switchover."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from devagent.api_types import MigrationStatus, VmStatus
from devagent.client import DaemonClient
from devagent.guest.build import GuestImage
from devagent.lab.lab import Lab
from devagent.orchestrate import follow_migration, locate_vm, migrate, start_vm, wait_heartbeats
from devagent.report import MigrationReport
from devagent.wait import wait_until
from tests.conftest import clean_lab, processes_mentioning, two_hosts, until_steady

pytestmark = [pytest.mark.vm, pytest.mark.lab]


@pytest.fixture
def lab(state_dir: Path, guest: GuestImage) -> Iterator[Lab]:
    with clean_lab("tstr", state_dir) as lab:
        yield lab


def check(report: MigrationReport) -> None:
    assert report.status == "completed", report.error
    print(
        f"\n{report.storage} {report.source}→{report.destination}: switchover "
        f"{report.time_to_switchover_s} s, total {report.total_time_s} s (limit "
        f"{report.limit_s} s), downtime {report.downtime_ms} ms, max I/O gap "
        f"{report.max_io_gap_ms} ms, disk moved {report.disk_bytes_moved:,} B"
    )
    assert report.status == "completed", report.error
    assert (report.guest_io_errors, report.guest_verify_failures) == (0, 0)
    assert report.integrity == "ok"
    assert report.io_gap_source == "agent journals"
    # QEMU's own figure, read once QEMU has worked it out (read at its "completed" event,
    # it is 0): stopping the guest and sending its last pages takes some milliseconds.
    assert report.downtime_ms is not None and report.downtime_ms > 0


@pytest.mark.parametrize("strategy", ["postcopy", "precopy", "hybrid"])
async def test_the_disk_moves_with_the_vm_and_back(lab: Lab, strategy: str) -> None:
    a, b = two_hosts(lab)
    request = {"name": "m1", "disk_size": "256M", "storage": "local",
               "workload": "moderate,span=64M,prefill=64M"}  # fmt: skip
    await start_vm(a, request)
    await until_steady(a, "m1")
    there = await migrate(a, b, "m1", storage=strategy, link_rate_bps=lab.link_rate_bps)
    check(there)
    assert there.disk_bytes_moved is not None and there.disk_bytes_moved > 0
    # Nothing of the VM is left on a: no QEMU, no agent, no disk.
    async with DaemonClient(a) as client:
        assert (await client.get("/v1/vms"))["vms"] == []
    assert not list(lab.host("a").dir.glob("disks/m1.img*"))
    await wait_heartbeats(b, "m1", 10)
    back = await migrate(b, a, "m1", storage=strategy, link_rate_bps=lab.link_rate_bps)
    check(back)
    where, _ = await locate_vm([a, b], "m1")
    assert where.name == "a"


async def test_a_destination_dying_before_switchover_leaves_the_vm_on_the_source(
    lab: Lab,
) -> None:
    a, b = two_hosts(lab)
    lab.shape("a", "50mbit")  # a RAM migration long enough to be interrupted
    await start_vm(a, {"name": "rb1", "disk_size": "128M", "storage": "local",
                       "workload": "moderate,span=32M,prefill=32M"})  # fmt: skip
    await until_steady(a, "rb1")
    attempt = asyncio.create_task(migrate(a, b, "rb1", storage="hybrid"))
    await asyncio.sleep(1.5)
    b_daemon = lab.host("b").pid
    assert b_daemon is not None
    os.kill(b_daemon, signal.SIGKILL)
    failed = await attempt
    print(f"\nfailed as it should: {failed.error}")
    assert failed.status == "failed" and "host b" in (failed.error or "")

    # The VM runs on a, untouched: its probe goes on without an error.
    _, vm = await locate_vm([a], "rb1")
    assert vm.state == "running"
    beats = await wait_heartbeats(a, "rb1", 20)
    assert beats[-1].errors == 0 and beats[-1].verify_failures == 0

    # b's daemon comes back and leaves nothing of the attempt: no VM, no agent, no replica.
    await asyncio.to_thread(lab.restart_daemon, "b")
    async with DaemonClient(b) as client:
        assert (await client.get("/v1/vms"))["vms"] == []
    b_dir = lab.host("b").dir
    assert processes_mentioning(str(b_dir / "vms")) == []
    assert not list(b_dir.glob("disks/rb1.img*"))

    # and the next attempt succeeds.
    lab.shape("a", "1gbit")
    check(await migrate(a, b, "rb1", storage="hybrid", link_rate_bps=lab.link_rate_bps))


async def tool(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a QEMU tool off the event loop; a failure to create or write is the test's own."""
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True)
    if argv[1] != "compare":
        assert done.returncode == 0, done.stderr
    return done


async def test_a_users_own_guest_moves_with_every_strategy(
    lab: Lab, guest: GuestImage, state_dir: Path
) -> None:
    """A user's qcow2 guest (no ioprobe) goes a→b→a→b with postcopy, precopy and hybrid;
    its disk arrives byte for byte each time (the guest itself never writes to it)."""
    a, b = two_hosts(lab)
    image = state_dir / "user.qcow2"
    await tool(
        "qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(image), "64M"
    )
    pattern = "write -P 0x5a 0 3M"  # data the destination must have, in qcow2 clusters
    await tool("qemu-io", "-f", "qcow2", "-c", pattern, str(image))
    reference = state_dir / "reference.qcow2"
    shutil.copy(image, reference)
    await start_vm(a, {"name": "u1", "disk": str(image), "kernel": str(guest.kernel),
                       "initrd": str(guest.initrd), "append": "console=ttyS0 quiet"})  # fmt: skip
    hosts = [a, b, a, b]
    for strategy, (source, destination) in zip(
        ("postcopy", "precopy", "hybrid"), pairwise(hosts), strict=True
    ):
        report = await migrate(
            source, destination, "u1", storage=strategy, link_rate_bps=lab.link_rate_bps
        )
        assert report.status == "completed", report.error
        assert report.io_gap_source == "agent journals" and report.max_io_gap_ms is not None
        assert "ioprobe" in report.missing["integrity"]
        where, status = await locate_vm([a, b], "u1")
        assert where.name == destination.name and status.state == "running"
        compared = await tool("qemu-img", "compare", "-q", str(reference), status.disk)
        assert compared.returncode == 0, f"{strategy}: {compared.stdout}{compared.stderr}"


async def test_a_source_agent_killed_in_the_post_copy_tail_is_restarted(lab: Lab) -> None:
    """The destination reads what it lacks through the source's agent after the
    switchover. That agent SIGKILLed there is restarted by its daemon on the same port
    (the copy left behind is supervised while it serves its disk): the destination's
    Remote reconnects, and the migration ends with no guest error and the disk intact."""
    a, b = two_hosts(lab)
    lab.shape("a", "100mbit")  # a tail of several seconds: 256 MiB written to fetch
    await start_vm(a, {"name": "tail1", "disk_size": "512M", "storage": "local",
                       "workload": "moderate,prefill=256M"})  # fmt: skip
    await until_steady(a, "tail1")
    async with DaemonClient(a) as client:
        agent_pid = (await client.get_as("/v1/vms/tail1", VmStatus)).agents[0].pid
        body = {"to": b.to_json(), "storage": "postcopy", "link_rate_bps": 100_000_000}
        job = await client.post_as("/v1/vms/tail1/migrate", MigrationStatus, body)

        async def in_the_tail() -> MigrationStatus | None:
            now = await client.get_as(f"/v1/migrations/{job.id}", MigrationStatus)
            assert now.finished_at is None, now.report.error  # still in its tail
            return now if "resumed" in now.report.timeline else None

        await wait_until(in_the_tail, timeout=120, interval=0.05, what="the switchover")
        assert agent_pid is not None
        os.kill(agent_pid, signal.SIGKILL)
        report = await follow_migration(client, job.id)
    print(f"\nsource agent killed in the tail: total {report.total_time_s} s, max I/O gap "
          f"{report.max_io_gap_ms} ms at {report.max_io_gap_at_s} s, {report.error}")  # fmt: skip
    assert report.status == "completed", report.error
    assert (report.guest_io_errors, report.guest_verify_failures) == (0, 0)
    assert report.integrity == "ok"
    log = (lab.host("a").dir / "devagentd.log").read_text()
    assert "agent for disk0 died" in log and "tail1" in log  # it was restarted, not waited out
