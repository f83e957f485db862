"""QEMU's own storage migration (the benchmarks' baselines) on a real 2-host lab: each flow
moves a small VM that runs without a device agent, with ioprobe writing and verifying, and
the destination's disk must hold exactly what the guest last wrote."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devagent.client import DaemonClient, Endpoint
from devagent.daemon.migration import BASELINES
from devagent.guest.build import GuestImage
from devagent.lab.lab import Lab
from devagent.orchestrate import migrate, start_vm, wait_heartbeats
from tests.conftest import namespaces, processes_mentioning

pytestmark = [pytest.mark.vm, pytest.mark.lab]


@pytest.fixture
def lab(state_dir: Path, guest: GuestImage) -> Iterator[Lab]:
    lab = Lab.up(name="bnt", hosts=2, link_rate="1gbit")
    try:
        yield lab
    finally:
        lab.down()
    assert processes_mentioning(str(state_dir)) == []
    assert not [ns for ns in namespaces() if ns.startswith("da-bnt")]


@pytest.mark.parametrize("strategy", BASELINES)
async def test_a_qemu_baseline_moves_vm_and_disk_intact(lab: Lab, strategy: str) -> None:
    a, b = (Endpoint(url=h.url, token=lab.token, name=h.name) for h in lab.hosts)
    request = {"name": "q1", "disk_size": "64M", "storage": "local", "agent": False,
               "workload": "moderate,span=32M,prefill=16M"}  # fmt: skip
    await start_vm(a, request)
    while (await wait_heartbeats(a, "q1", 1, with_io=False))[-1]["phase"] != "run":
        pass
    await wait_heartbeats(a, "q1", 30)
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
    assert beats[-1]["errors"] == 0 and beats[-1]["verify_failures"] == 0
