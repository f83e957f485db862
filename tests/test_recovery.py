"""A daemon restarted mid-migration finishes it or rolls it back, deterministically, by the
rule of ``job.py``'s docstring: the destination's commit is the point of no return.

Source: the job's record is saved before each phase move (read back from a tmp folder); a
record left in each phase is taken up by a new job under the same id, against the fakes of
``tests/migration_fakes.py`` standing as the world the killed daemon left (the source's QEMU
paused after RAM, its agent fenced, the destination's VM incoming or running), and it goes
forward when the destination's commit began, or back (destination emptied first, then the
fence lifted and the guest resumed) when it never did.

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
from aiohttp.test_utils import make_mocked_request

from devagent.agent.messages import FetchSpec, RemoteSpec, StatusAnswer
from devagent.daemon.agents import AgentProcess
from devagent.daemon.exports import ExportManager
from devagent.daemon.host import Host
from devagent.daemon.migration import job as job_module
from devagent.daemon.migration import running as running_module
from devagent.daemon.migration.job import MigrationJob, Phase
from devagent.daemon.migration.messages import RemoteDisk
from devagent.daemon.migration.net import NetMigration
from devagent.daemon.migration.plans import Handover
from devagent.daemon.migration.record import MigrationRecord, load_record, record_path
from devagent.daemon.migration.recovery import RESTARTED, TAKEN_UP, recovered_jobs
from devagent.daemon.migration.routes import MigrationRoutes
from devagent.daemon.vms import DiskRequest, ManagedVm, VmManager, VmRequest, VmRole
from devagent.daemon.vms import manager as manager_module
from devagent.daemon.vms.incoming import commit_incoming
from devagent.errors import PeerError, StateError
from devagent.qemu.answers import StatusInfo
from devagent.qemu.config import DiskSpec, VmConfig
from devagent.qemu.vm import Vm, VmState
from devagent.report import MigrationReport
from devagent.vocab import Step, Strategy
from migration_fakes import PUSH_LINK, FakeHost, FakeVm, make_job

PRESENT = "/w=="  # the chunks a hybrid push landed, as the switchover handed them over


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(running_module, "FORWARD_RETRY_PAUSE_S", 0.001)
    monkeypatch.setattr("devagent.daemon.migration.plans.POLL_S", 0.001)
    monkeypatch.setattr("devagent.daemon.migration.pushing.POLL_S", 0.001)


# --- the source's record -----------------------------------------------------------------------


async def test_the_record_is_saved_before_each_phase_move_and_goes_once_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, vm, _ = make_job(tmp_path, Strategy.HYBRID, link_rate_bps=PUSH_LINK)
    seen: list[tuple[Phase, Phase, MigrationRecord | None]] = []
    save = job_module.save_record

    def spy(run_dir: Path, record: MigrationRecord) -> None:
        save(run_dir, record)
        seen.append((record.phase, job.phase, load_record(run_dir)))  # on disk, before

    monkeypatch.setattr(job_module, "save_record", spy)
    await job.run()
    assert job.phase is Phase.COMPLETED, job.report.error
    recorded = [phase for phase, _, _ in seen]
    assert recorded == [Phase.PREPARING, Phase.RAM, Phase.SWITCHOVER, Phase.FINISHING]
    assert [then for _, then, _ in seen] == [Phase.PREPARING, *recorded[:-1]]
    assert all(back is not None and back.phase is phase for phase, _, back in seen)
    switchover = seen[2][2]
    assert switchover is not None and switchover.id == job.id
    assert switchover.handover is not None and switchover.handover.present  # the push's chunks
    assert switchover.source_disks == {
        "disk0": RemoteDisk(address="tcp:10.9.0.1:4000", export="disk0", host="a")
    }
    assert Step.RAM_COMPLETED in switchover.report.timeline
    assert not record_path(vm.run_dir).exists()  # settled


async def test_a_roll_back_removes_the_record_and_a_failure_past_the_switchover_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    back, vm, host = make_job(tmp_path / "a", Strategy.HYBRID)
    vm.vm.statuses = ("active", "failed")
    await back.run()
    assert back.phase is Phase.FAILED and not record_path(vm.run_dir).exists()
    monkeypatch.setattr(running_module, "FORWARD_RETRY_S", 0.05)
    (tmp_path / "b").mkdir()
    forward, vm, host = make_job(tmp_path / "b", Strategy.POSTCOPY)
    host.destination.failures["POST /v1/incoming/v1/commit"] = PeerError("unreachable")
    host.destination.failures["DELETE /v1/incoming/v1"] = PeerError("unreachable")
    await forward.run()
    assert forward.phase is Phase.FAILED
    kept = load_record(vm.run_dir)  # a daemon restart takes it up again
    assert kept is not None and kept.phase is Phase.SWITCHOVER and kept.id == forward.id


# --- a restarted source ------------------------------------------------------------------------

#: The source as the killed daemon left it at each recorded phase: its QEMU's run state.
QEMU_AT = {
    Phase.PREPARING: "running",
    Phase.RAM: "postmigrate",  # RAM completed; the daemon died before the switchover's record
    Phase.SWITCHOVER: "postmigrate",
    Phase.FINISHING: "postmigrate",
}


def left_behind(
    tmp_path: Path, strategy: Strategy, phase: Phase, destination: str | None
) -> tuple[MigrationJob, FakeVm, FakeHost]:
    """A job recorded at ``phase`` by a daemon that died there (the world as it left it:
    the destination's VM ``destination``, or none), and the job a restarted daemon builds
    from the record, not started."""
    old, vm, host = make_job(tmp_path, strategy)
    if vm.agents:
        old.source_disks = {"disk0": RemoteDisk(address="tcp:10.9.0.1:4000", export="disk0")}
        old.disk_sizes = {"disk0": 4 << 20}
    old.mark(Step.DESTINATION_READY)
    if phase is not Phase.PREPARING:
        old.mark(Step.RAM_COMPLETED)
        vm.vm.current = "completed"
    if phase in (Phase.SWITCHOVER, Phase.FINISHING) and strategy is Strategy.HYBRID:
        old.handover = Handover(present={"disk0": PRESENT}, chunk_size=256 << 10)
    old.record(phase)
    vm.vm.status = QEMU_AT[phase]
    if vm.agents and phase is not Phase.PREPARING and old.plan.moves_disk:
        vm.agents[0].fenced = True  # fenced after RAM (the record of RAM may predate it)
    if destination is not None:
        host.destination.vms[vm.name] = destination
    host.destination.everything = vm.vm.commands  # one log: the peer's, QEMU's, the agent's
    (job,) = recovered_jobs(host.context(), [vm])
    assert job.id == old.id and job.phase is phase
    return job, vm, host


def went_forward(job: MigrationJob, vm: FakeVm, host: FakeHost) -> None:
    assert job.phase is Phase.COMPLETED, job.report.error
    assert job.report.status == "completed" and Step.RELEASED in job.report.timeline
    assert host.destination.vms == {vm.name: "running"}  # never removed there
    assert vm.name not in host.vms and vm.vm.exited  # released here, its QEMU gone
    assert "cont" not in vm.vm.commands  # never resumed here
    assert all("/unfence" not in a.calls for a in vm.agents)
    assert TAKEN_UP in job.report.timeline and not record_path(vm.run_dir).exists()


def rolled_back(job: MigrationJob, vm: FakeVm, host: FakeHost, was: Phase) -> None:
    assert job.phase is Phase.FAILED
    assert (job.report.error or "").startswith("rolled back after a daemon restart")
    assert vm.vm.status == "running" and not vm.vm.exited and vm.name in host.vms
    assert host.destination.vms == {}
    log = vm.vm.commands
    removed = [i for i, c in enumerate(log) if c == "peer DELETE /v1/incoming/v1"]
    if removed:  # the destination is emptied before anything here is undone
        assert removed[-1] < log.index("migrate_cancel")
    if vm.agents and job.plan.moves_disk:
        assert not vm.agents[0].fenced
        assert log.index("agent /unfence") < log.index("migrate_cancel")
    if QEMU_AT[was] != "running":
        assert log.index("migrate_cancel") < log.index("cont")
    assert not record_path(vm.run_dir).exists()  # settled


@pytest.mark.parametrize(
    ("phase", "destination", "forward"),
    [
        (Phase.PREPARING, "incoming", False),
        (Phase.PREPARING, None, False),  # the destination never made it
        (Phase.RAM, "incoming", False),  # RAM completed, the agent fenced: still back
        (Phase.SWITCHOVER, "incoming", False),  # its commit never began there
        (Phase.SWITCHOVER, None, False),  # the destination's daemon discarded it
        (Phase.SWITCHOVER, "running", True),  # its commit began there
        (Phase.FINISHING, "running", True),  # the disk's tail, the release
    ],
)
async def test_a_restarted_source_goes_the_way_the_destination_says(
    tmp_path: Path, phase: Phase, destination: str | None, forward: bool
) -> None:
    job, vm, host = left_behind(tmp_path, Strategy.HYBRID, phase, destination)
    await job.run()
    if forward:
        went_forward(job, vm, host)
        assert Step.DISK_LOCAL in job.report.timeline  # waited for the tail before release
    else:
        rolled_back(job, vm, host, phase)
        assert "cont" in vm.vm.commands or phase is Phase.PREPARING


@pytest.mark.parametrize("strategy", list(Strategy))
@pytest.mark.parametrize("destination", ["incoming", "running"])
async def test_every_strategy_is_taken_up_both_ways(
    tmp_path: Path, strategy: Strategy, destination: str
) -> None:
    job, vm, host = left_behind(tmp_path, strategy, Phase.SWITCHOVER, destination)
    await job.run()
    if destination == "running":
        went_forward(job, vm, host)
        missing = job.report.missing
        if vm.request.has_probe:  # figured from the source's heartbeats, which died
            assert job.report.io_rate_ratio is None and missing["io_rate_ratio"] == RESTARTED
    else:
        rolled_back(job, vm, host, Phase.SWITCHOVER)
        if strategy in (Strategy.QEMU_MIRROR, Strategy.QEMU_MIRROR_ACTIVE):
            assert "blockdev-del" in vm.vm.commands  # QEMU's own mirror ended here
        if strategy is Strategy.QEMU_COR_STREAM:
            assert "nbd-server-stop" in vm.vm.commands


async def test_a_commit_under_way_on_the_destination_is_followed_forward(tmp_path: Path) -> None:
    """The killed daemon's last commit request runs there: the abort is refused, and the
    job waits for that commit rather than lifting the fence."""
    job, vm, host = left_behind(tmp_path, Strategy.POSTCOPY, Phase.SWITCHOVER, "incoming")
    host.destination.commit_under_way = True
    await job.run()
    went_forward(job, vm, host)
    assert "peer DELETE /v1/incoming/v1" in vm.vm.commands  # asked, and refused


async def test_an_unreachable_destination_past_the_switchover_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(running_module, "FORWARD_RETRY_S", 0.05)
    job, vm, host = left_behind(tmp_path, Strategy.HYBRID, Phase.SWITCHOVER, "incoming")
    host.destination.failures["GET /v1/vms/v1"] = PeerError("connection refused")
    await job.run()
    assert job.phase is Phase.FAILED and "cannot be asked" in (job.report.error or "")
    assert vm.vm.status == "postmigrate" and "cont" not in vm.vm.commands
    assert vm.agents[0].fenced and "/unfence" not in vm.agents[0].calls
    kept = load_record(vm.run_dir)
    assert kept is not None and kept.phase is Phase.SWITCHOVER  # the next restart asks again


async def test_an_unreachable_destination_never_asked_to_commit_is_rolled_back_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(running_module, "FORWARD_RETRY_S", 0.05)
    job, vm, host = left_behind(tmp_path, Strategy.HYBRID, Phase.RAM, "incoming")
    host.destination.failures["GET /v1/vms/v1"] = PeerError("connection refused")
    await job.run()
    error = job.report.error or ""
    assert job.phase is Phase.FAILED and "never been asked to commit" in error
    assert "removing the incoming VM on b failed" in error
    assert vm.vm.status == "running" and not vm.agents[0].fenced
    assert load_record(vm.run_dir) is not None  # the incoming VM there is still to remove


async def test_a_source_whose_qemu_is_gone_commits_on_the_destination(tmp_path: Path) -> None:
    """Past the switchover with no QEMU left here, forward is the only way: the commit is
    asked now, with the hand-over the record kept."""
    job, vm, host = left_behind(tmp_path, Strategy.HYBRID, Phase.SWITCHOVER, "incoming")
    vm.vm.killed = True  # killed because its fence failed, just before the daemon died
    await job.run()
    went_forward(job, vm, host)
    body = host.destination.bodies["/v1/incoming/v1/commit"]
    fetch = body["fetches"]["disk0"]
    assert fetch["present"] == PRESENT and fetch["chunk_size"] == 256 << 10


async def test_a_source_whose_qemu_is_gone_before_the_switchover_says_so(tmp_path: Path) -> None:
    job, vm, host = left_behind(tmp_path, Strategy.PRECOPY, Phase.RAM, "incoming")
    vm.vm.killed = True
    await job.run()
    assert job.phase is Phase.FAILED and "nothing can resume" in (job.report.error or "")
    assert host.destination.vms == {"v1": "incoming"}  # the guest's RAM is there: left be
    assert "POST /v1/incoming/v1/commit" not in host.destination.requests


async def test_the_routes_take_records_up_under_their_ids(tmp_path: Path) -> None:
    job, vm, fake = left_behind(tmp_path, Strategy.POSTCOPY, Phase.FINISHING, "running")
    routes = MigrationRoutes(Host(name="a", address="127.0.0.1", port=0, root=tmp_path / "h"))
    routes.host.vms.vms[vm.name] = cast(Any, vm)
    (taken,) = await routes.recover(fake.context())
    assert taken.id == job.id and routes.jobs == {job.id: taken}
    assert taken.task is not None
    await taken.task
    request = make_mocked_request("GET", f"/v1/migrations/{job.id}", match_info={"id": job.id})
    shown = json.loads(cast(Any, await routes.get_migration(request)).body)
    assert (shown["id"], shown["phase"], shown["report"]["status"]) == (
        job.id, "completed", "completed",
    )  # fmt: skip


async def test_a_net_roll_back_after_a_restart_undoes_both_hold_and_forward() -> None:
    calls: list[str] = []

    class Nic:
        node, address, mac = "net0", "10.0.0.5/24", "52:54:00:00:00:05"

        def describe(self) -> str:
            return "nic net0"

        async def call(self, method: str, path: str, body: object = None, **_: Any) -> Any:
            calls.append(path)
            raise StateError("nothing held")  # an agent with nothing to undo refuses

    vm = cast(Any, FakeVm(image=Path("/i"), run_dir=Path("/r"), nics=[Nic()]))
    report = MigrationReport(vm="v1", source="a", destination="b", storage="hybrid")
    net = NetMigration(vm, report, lambda *a: None, job_module.log)
    await net.roll_back()
    assert calls == []  # the old process's flags said nothing was held
    await net.roll_back(unknown=True)
    assert calls == ["/release", "/stop-forward"]


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
    request = VmRequest(name="v1", disks=(DiskRequest(image="/img"),))
    managed = ManagedVm(request, config, tmp_path, VmRole.INCOMING, {"disk0": Path("/img")})
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
    assert list(managed.fetching) == ["disk0"]
    await managed.fetching["disk0"]
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


async def test_a_disk_kept_as_an_export_is_no_longer_its_vms_after_a_restart(
    tmp_path: Path,
) -> None:
    """A keep the daemon's end interrupted: the export's agent ran and was recorded, the
    VM's record still had the disk. The restart gives it to the export alone (the VM
    neither restarts its agent on the export's address nor deletes its image); an export
    whose agent never started is dropped (the VM's agent still serves the disk)."""
    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()  # the migrated VM's QEMU: gone
    image = str(tmp_path / "disks" / "v1.img")
    agent = AgentProcess(vm="v1", node="disk0", image=image, run_dir=str(tmp_path / "r"))
    folder = write_vm_json(tmp_path, "migrated", proc.pid, [agent])
    (folder / "migration.json").write_text("{}")
    manager = VmManager("a", tmp_path, None, "127.0.0.1")
    await manager.adopt_all(kept={"v1": image})
    managed = manager.get("v1")
    assert managed.agents == [] and "disk0" not in managed.images

    exports = ExportManager("a", tmp_path, "127.0.0.1")
    claimed = tmp_path / "exports" / "v2"
    claimed.mkdir(parents=True)
    never = AgentProcess(vm="v2", node="disk0", image=image, run_dir=str(claimed))
    (claimed / "export.json").write_text(json.dumps(never.to_json()))
    await exports.adopt_all()
    assert exports.exports == {} and not claimed.exists()


async def test_a_source_qemu_whose_migration_completed_unwatched_is_adopted_as_migrated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAM completed while no daemon watched: QEMU says ``postmigrate``. Adopting it must
    not fail (it once raised "no transition launching -> migrated" and kept the daemon
    from starting at all)."""

    async def query(vm: Vm, command: str, into: Any, **args: Any) -> Any:
        return StatusInfo(status="postmigrate", running=False)

    monkeypatch.setattr(Vm, "query", query)
    vm = Vm(VmConfig(name="v1"), tmp_path)
    vm._move(VmState.LAUNCHING)
    assert await vm.refresh_state() is VmState.MIGRATED


async def test_one_vm_that_cannot_be_adopted_does_not_keep_the_daemon_from_starting(
    tmp_path: Path, sleeper: asyncio.subprocess.Process, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def adopt(vm: Vm, pid: int) -> None:
        raise StateError(f"VM {vm.config.name}: no transition launching -> nowhere")

    monkeypatch.setattr(Vm, "adopt", adopt)
    write_vm_json(tmp_path, "running", sleeper.pid, [])
    manager = VmManager("a", tmp_path, None, "127.0.0.1")
    await manager.adopt_all()  # logged, not raised
    assert manager.vms == {}


def test_the_logs_of_a_vm_leaving_the_host_are_kept_and_the_oldest_pruned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_module, "LOGS_KEPT", 2)
    logs = tmp_path / "logs"
    for n in range(3):
        run_dir = tmp_path / f"vm{n}"
        run_dir.mkdir()
        (run_dir / "qemu.log").write_text(f"boot {n}\n")
        (run_dir / "qmp.sock").write_text("")
        manager_module.keep_logs(run_dir, logs, f"vm{n}-migrated")
        assert not (run_dir / "qemu.log").exists() and (run_dir / "qmp.sock").exists()
    kept = sorted(logs.iterdir())
    assert [p.name.split("-")[0] for p in kept] == ["vm1", "vm2"]  # the oldest went
    assert (kept[-1] / "qemu.log").read_text() == "boot 2\n"
    manager_module.keep_logs(tmp_path / "vm0", logs, "vm0-running")  # nothing left: no folder
    assert len(list(logs.iterdir())) == 2
