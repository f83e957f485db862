"""The block agent under a running guest: QEMU's virtio disk on the agent, ioprobe writing
and verifying, while the agent is quiesced and resumed again and again."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devagent.api_types import Integrity, VmStatus
from devagent.client import DaemonClient, Endpoint
from devagent.daemon.agents import AgentProcess
from devagent.errors import StateError
from devagent.guest.build import GuestImage
from devagent.lab.lab import Lab
from devagent.orchestrate import start_vm, wait_heartbeats, wait_past_phase
from devagent.report import largest_gap
from devagent.wait import wait_until

pytestmark = [pytest.mark.vm]

CYCLES = 100


@pytest.fixture
def lab(state_dir: Path, guest: GuestImage) -> Iterator[Lab]:
    lab = Lab.up(name="tagt", hosts=1, loopback=True)
    try:
        yield lab
    finally:
        lab.down()


async def test_100_quiesce_resume_cycles_under_a_writing_guest(lab: Lab) -> None:
    host = lab.hosts[0]
    a = Endpoint(url=host.url, token=lab.token, name=host.name)
    request = {"name": "q1", "disk_size": "64M", "workload": "moderate,rate=400,span=16M"}
    await start_vm(a, request)
    await wait_heartbeats(a, "q1", 10)
    async with DaemonClient(a) as client:
        devices = (await client.get("/v1/vms/q1/devices"))["devices"]
    assert [d["device"] for d in devices] == ["disk0"] and devices[0]["state"] == "serving"
    status = devices[0]["agent"]
    assert status["connections"] >= 1  # QEMU's NBD client
    run_dir = str(Path(devices[0]["nbd_socket"]).parent)
    agent = AgentProcess(vm="q1", node="disk0", image=devices[0]["image"], run_dir=run_dir)

    started = time.time()
    held = []
    for _ in range(CYCLES):
        drained = await agent.call("POST", "/quiesce")
        assert drained["drained_in_s"] >= 0
        held.append((await agent.call("POST", "/resume"))["held_s"])
    finished = time.time()
    after = await wait_heartbeats(a, "q1", 10)

    assert after[-1].errors == 0 and after[-1].verify_failures == 0
    async with DaemonClient(a) as client:
        done = (await client.get("/v1/vms/q1/completions", since=started - 1))["completions"]
    assert len([t for t in done if started <= t <= finished]) > 0  # I/O went on in between
    gap = largest_gap(done, started, finished) or 0
    print(
        f"\n{CYCLES} quiesce/resume cycles in {finished - started:.2f} s; longest hold "
        f"{max(held) * 1000:.1f} ms; largest completion gap {gap * 1000:.1f} ms"
    )
    with pytest.raises(StateError, match="released: cannot resume"):
        await agent.call("POST", "/resume")


async def test_an_agent_killed_under_a_writing_guest_is_restarted(lab: Lab) -> None:
    host = lab.hosts[0]
    a = Endpoint(url=host.url, token=lab.token, name=host.name)
    request = {"name": "k1", "disk_size": "64M", "workload": "moderate,rate=300,span=16M"}
    await start_vm(a, request)
    await wait_heartbeats(a, "k1", 10)
    async with DaemonClient(a) as client:
        before = (await client.get("/v1/vms/k1/devices"))["devices"][0]
    os.kill(before["agent_pid"], signal.SIGKILL)
    killed_at = time.time()

    # The daemon restarts the agent; QEMU's NBD client reconnects; the guest never errs.
    beats = await wait_heartbeats(a, "k1", 30, timeout=60)
    async with DaemonClient(a) as client:
        after = (await client.get("/v1/vms/k1/devices"))["devices"][0]
        verified = (await client.post("/v1/vms/k1/probe", {"command": "verify"}))["event"]
    assert after["agent_pid"] != before["agent_pid"] and after["state"] == "serving"
    assert beats[-1].errors == 0 and beats[-1].verify_failures == 0
    assert verified["failures"] == 0 and verified["blocks"] > 0
    async with DaemonClient(a) as client:
        around = (await client.get("/v1/vms/k1/heartbeats", since=killed_at - 1))["heartbeats"]
    with_io = [b["host_time"] for b in around if b["ops"] > 0]
    gap = largest_gap(with_io, killed_at - 1, max(with_io))
    assert gap is not None
    print(f"\nagent SIGKILLed and restarted: largest guest I/O gap {gap * 1000:.0f} ms")


async def test_a_vm_whose_qemu_was_killed_boots_again_on_its_disk_intact(lab: Lab) -> None:
    """A crash (QEMU SIGKILLed under a writing guest): the agent keeps the disk with every
    acknowledged write; ``restart`` boots the guest again on it, its probe adopting what
    the crashed boot wrote, and the disk holds exactly what the guest wrote since."""
    host = lab.hosts[0]
    a = Endpoint(url=host.url, token=lab.token, name=host.name)
    request = {"name": "c1", "disk_size": "64M", "workload": "moderate,rate=300,span=16M"}
    await start_vm(a, request)
    await wait_heartbeats(a, "c1", 10)
    async with DaemonClient(a) as client:
        before = await client.get_as("/v1/vms/c1", VmStatus)
        assert before.pid is not None
        os.kill(before.pid, signal.SIGKILL)
        crashed = await wait_until(lambda: _state(client, "c1", "failed"), timeout=10,
                                   what="the daemon to see QEMU die")  # fmt: skip
        assert crashed.agents[0].alive  # the disk stays served
        again = await client.post_as("/v1/vms/c1/restart", VmStatus)
        assert again.pid not in (None, before.pid)
    await wait_past_phase(a, "c1", "prefill")
    beats = await wait_heartbeats(a, "c1", 10)
    assert beats[-1].errors == 0 and beats[-1].verify_failures == 0
    async with DaemonClient(a) as client:
        checked = await client.post_as("/v1/vms/c1/integrity", Integrity)
        verified = (await client.post("/v1/vms/c1/probe", {"command": "verify"}))["event"]
    assert checked.integrity == "ok"
    assert verified["failures"] == 0 and verified["blocks"] >= beats[-1].written_blocks


async def _state(client: DaemonClient, name: str, state: str) -> VmStatus | None:
    status = await client.get_as(f"/v1/vms/{name}", VmStatus)
    return status if status.state == state else None
