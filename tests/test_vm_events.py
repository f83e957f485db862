"""The Vm's state as QMP events move it, without a QEMU: when the guest resumed is QEMU's
own time of the RESUME event (the source's STOP is taken the same way), not when this
process got round to reading it."""

from __future__ import annotations

import time
from pathlib import Path

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
