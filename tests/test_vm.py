"""A real boot of the test guest under QEMU, driven by the Vm object over QMP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from devagent.guest.build import GuestImage
from devagent.guest.probe import ConsoleParser, Heartbeat
from devagent.guest.workload import parse_workload
from devagent.qemu.config import DiskSpec, VmConfig
from devagent.qemu.vm import Vm, VmState, pid_alive
from tests.conftest import processes_mentioning

pytestmark = pytest.mark.vm


async def test_boot_probe_and_clean_stop(guest: GuestImage, state_dir: Path) -> None:
    disk = state_dir / "disk.img"
    with disk.open("wb") as f:
        f.truncate(64 << 20)
    config = VmConfig(
        name="boot1",
        kernel=str(guest.kernel),
        initrd=str(guest.initrd),
        append="console=ttyS0 quiet panic=-1 "
        + parse_workload("moderate,span=16M,rate=300").to_kernel_arg(),
        disks=(DiskSpec(path=str(disk)),),
    )
    parser = ConsoleParser()
    beats: list[Heartbeat] = []

    def on_console(data: bytes, when: float) -> None:
        beats.extend(e for e in parser.feed(data, when) if isinstance(e, Heartbeat))

    vm = Vm(config, state_dir / "vm", on_console=on_console)
    states = [vm.state]
    try:
        await vm.launch()
        states.append(vm.state)
        assert vm.pid is not None and pid_alive(vm.pid)
        assert (await vm.qmp("query-status"))["status"] == "running"
        started = vm.started_at or time.time()
        while not any(b.ops > 0 for b in beats):
            assert not vm.exited, vm.log_tail()
            assert time.time() - started < 90, "no heartbeat with I/O in 90 s"
            await asyncio.sleep(0.1)
        print(f"\nboot to the probe's first heartbeat: {beats[0].host_time - started:.2f} s")
        await asyncio.sleep(1.0)
        assert beats[-1].ops_total > 0
        assert beats[-1].errors == 0 and beats[-1].verify_failures == 0
        assert [b.hb for b in beats] == sorted(b.hb for b in beats)
    finally:
        pid = vm.pid
        await vm.stop()
    states.append(vm.state)
    assert states == [VmState.NEW, VmState.RUNNING, VmState.STOPPED]
    assert pid is not None and not pid_alive(pid)
    assert not vm.qmp_path.exists() and not vm.console_path.exists()
    assert processes_mentioning(str(state_dir)) == []


async def test_a_missing_kernel_fails_launch_cleanly(state_dir: Path) -> None:
    config = VmConfig(name="bad", kernel=str(state_dir / "no-such-kernel"))
    vm = Vm(config, state_dir / "bad")
    with pytest.raises(Exception, match=r"QEMU exited at launch|no QMP socket"):
        await vm.launch()
    assert vm.state in (VmState.FAILED, VmState.STOPPED)
    assert processes_mentioning(str(state_dir)) == []
