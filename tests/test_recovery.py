"""A daemon restarted mid-migration finishes it or rolls it back by one rule: the
destination's commit, saved as begun before the guest runs, is the point of no return.

Destination: ``adopt_all`` discards an incoming VM whose commit never began and runs one
whose commit began; a source VM with an unsettled record is kept though its QEMU is gone.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from devagent.agent.messages import FetchSpec, RemoteSpec, StatusAnswer
from devagent.daemon.agents import AgentProcess
from devagent.daemon.vms import ManagedVm, VmManager, VmRequest, VmRole
from devagent.daemon.vms import manager as manager_module
from devagent.daemon.vms.incoming import commit_incoming
from devagent.qemu.config import DiskSpec, VmConfig
from devagent.qemu.vm import Vm, VmState

# --- a restarted destination (and a source's VM kept for its record) --------------------------


@pytest.fixture
async def sleeper() -> AsyncIterator[asyncio.subprocess.Process]:
    """A live process standing as a VM's QEMU (its pid is all the records hold)."""
    proc = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def write_vm_json(root: Path, role: str, pid: int, agents: list[AgentProcess]) -> Path:
    folder = root / "vms" / "v1"
    folder.mkdir(parents=True)
    config = VmConfig(name="v1", disks=(DiskSpec(node="disk0", path=str(root / "v1.img")),))
    record = {
        "request": VmRequest(name="v1").to_json(), "config": config.to_json(), "pid": pid,
        "role": role, "image": str(root / "disks" / "v1.img"),
        "agents": [a.to_json() for a in agents], "nics": [], "receiver": None,
    }  # fmt: skip
    (folder / "vm.json").write_text(json.dumps(record))
    return folder


class FakeQmp:
    """Stands for QEMU's QMP on an adopted VM: paused, and ``cont`` runs it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[str] = []

        async def adopt(vm: Vm, pid: int) -> None:
            vm.pid, vm.state = pid, VmState.PAUSED

        async def qmp(vm: Vm, command: str, **args: Any) -> Any:
            self.sent.append(command)
            if command == "cont":
                vm.state = VmState.RUNNING
            return {}

        monkeypatch.setattr(Vm, "adopt", adopt)
        monkeypatch.setattr(Vm, "qmp", qmp)


async def test_the_commit_is_saved_as_begun_before_the_guest_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roles_at_cont: list[str] = []

    async def qmp(vm: Vm, command: str, **args: Any) -> Any:
        if command == "query-status":
            return {"status": "paused"}  # the RAM arrived
        if command == "cont":
            roles_at_cont.append(json.loads((tmp_path / "vm.json").read_text())["role"])
            vm.state = VmState.PAUSED
            vm._move(VmState.RUNNING)  # as its RESUME event does
        return {}

    monkeypatch.setattr(Vm, "qmp", qmp)
    config = VmConfig(name="v1", disks=(DiskSpec(node="disk0", path="/img"),))
    managed = ManagedVm(VmRequest(name="v1", disk="/img"), config, tmp_path, VmRole.INCOMING,
                        Path("/img"))  # fmt: skip
    steps = await commit_incoming(managed, None)
    assert roles_at_cont == ["committing"]  # on disk before the guest ran: no way back
    assert managed.role is VmRole.RUNNING and steps["resumed_at"] == managed.vm.resumed_at
    assert json.loads((tmp_path / "vm.json").read_text())["role"] == "running"


async def test_a_destination_restart_discards_an_incoming_vm_whose_commit_never_began(
    tmp_path: Path, sleeper: asyncio.subprocess.Process
) -> None:
    folder = write_vm_json(tmp_path, "incoming", sleeper.pid, [])
    manager = VmManager("b", tmp_path, None, "127.0.0.1")
    await manager.adopt_all()
    assert manager.vms == {} and not folder.exists()
    assert await asyncio.wait_for(sleeper.wait(), 5.0) == -9  # its QEMU killed


async def test_a_destination_restart_runs_a_vm_whose_commit_began_and_watches_its_replica(
    tmp_path: Path, sleeper: asyncio.subprocess.Process, monkeypatch: pytest.MonkeyPatch
) -> None:
    qmp = FakeQmp(monkeypatch)
    watched: list[str] = []

    async def await_local(vm: Any, agent: AgentProcess) -> StatusAnswer:
        watched.append(agent.node)
        return cast(StatusAnswer, None)

    monkeypatch.setattr(manager_module, "await_local", await_local)
    fetch = FetchSpec(path=str(tmp_path / "v1.img"), remote=RemoteSpec(address="tcp:a:1",
                      export="disk0"), copier=True, then_local=True)  # fmt: skip
    agent = AgentProcess(vm="v1", node="disk0", image="/img", run_dir="/r", backend=fetch)
    folder = write_vm_json(tmp_path, "committing", sleeper.pid, [agent])
    manager = VmManager("b", tmp_path, None, "127.0.0.1")
    await manager.adopt_all()
    managed = manager.get("v1")
    assert qmp.sent == ["cont"] and managed.vm.state is VmState.RUNNING  # forward, only
    assert managed.role is VmRole.RUNNING and managed.api_status().role == "running"
    assert json.loads((folder / "vm.json").read_text())["role"] == "running"
    assert managed.fetching is not None
    await managed.fetching
    assert watched == ["disk0"]


@pytest.mark.parametrize("migrating", [True, False])
async def test_a_source_vm_whose_qemu_is_gone_is_kept_only_for_its_migration(
    tmp_path: Path, migrating: bool
) -> None:
    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()  # a pid that is gone
    folder = write_vm_json(tmp_path, "migrated", proc.pid, [])
    if migrating:
        (folder / "migration.json").write_text("{}")
    manager = VmManager("a", tmp_path, None, "127.0.0.1")
    await manager.adopt_all()
    if migrating:  # its agents may still serve the destination; the routes take it up
        managed = manager.get("v1")
        assert managed.vm.exited and managed.role is VmRole.MIGRATED and managed.serves_disk
    else:
        assert manager.vms == {} and not folder.exists()
