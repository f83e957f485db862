"""The Vm's state as QMP events move it, without a QEMU: when the guest resumed is QEMU's
own time of the RESUME event (the source's STOP is taken the same way), not when this
process got round to reading it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from devagent.qemu.answers import Event, Timestamp
from devagent.qemu.config import VmConfig
from devagent.qemu.vm import Vm, VmState


def paused_vm(tmp_path: Path) -> Vm:
    vm = Vm(VmConfig(name="ev1", kernel="/nonexistent"), tmp_path)
    vm.state = VmState.PAUSED
    return vm


def test_resumed_at_is_the_time_qemu_stamped_on_its_resume_event(tmp_path: Path) -> None:
    vm = paused_vm(tmp_path)
    vm._on_event(
        Event(event="RESUME", timestamp=Timestamp(seconds=1_700_000_000, microseconds=250_000))
    )
    assert vm.state is VmState.RUNNING
    assert vm.resumed_at == 1_700_000_000.25


def test_a_resume_event_without_a_timestamp_takes_the_time_it_was_read(tmp_path: Path) -> None:
    vm = paused_vm(tmp_path)
    before = time.time()
    vm._on_event(Event(event="RESUME"))
    assert vm.state is VmState.RUNNING
    assert vm.resumed_at is not None and before <= vm.resumed_at <= time.time()


async def _child_as_qemu(vm: Vm) -> None:
    """A stand-in process watched as the VM's QEMU is (its exit moves the state)."""
    vm._proc = await asyncio.create_subprocess_exec("sleep", "30")
    vm.pid = vm._proc.pid
    vm._tasks.append(asyncio.create_task(vm._watch_exit()))


@pytest.mark.parametrize("state", [VmState.MIGRATED, VmState.RUNNING, VmState.PAUSED])
async def test_a_qemu_killed_on_purpose_is_stopped_not_said_to_exit_unexpectedly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, state: VmState
) -> None:
    vm = paused_vm(tmp_path)
    vm.state = state  # (the source's inert instance after a migration: MIGRATED)
    await _child_as_qemu(vm)
    with caplog.at_level(logging.WARNING):
        await vm.kill()
    assert vm.exited and vm.state is VmState.STOPPED
    assert "unexpectedly" not in caplog.text


async def test_a_qemu_that_dies_by_itself_is_said_to_and_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vm = paused_vm(tmp_path)
    await _child_as_qemu(vm)
    assert vm.pid is not None
    with caplog.at_level(logging.WARNING):
        os.kill(vm.pid, signal.SIGKILL)
        assert await vm.wait_exit(5.0)
    assert vm.state is VmState.FAILED
    assert "QEMU exited unexpectedly (code -9)" in caplog.text
    await vm.kill()  # (nothing left to kill: it stays failed)
    assert vm.state is VmState.FAILED
