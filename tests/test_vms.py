"""The VM manager's parts without QEMU or root: the typed request, the role's moves and the
state a VM shows, the address ledger, a status that never waits on a silent agent, and a
process exit awaited on its pidfd."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web

from devagent.agent.messages import (
    FetchSpec,
    LocalSpec,
    LocalStatus,
    RemoteSpec,
    StatusAnswer,
    SwapAnswer,
)
from devagent.client import Endpoint
from devagent.daemon.agents import AgentProcess
from devagent.daemon.nics import NicAgent
from devagent.daemon.supervised import wait_exit
from devagent.daemon.vms import (
    DiskRequest,
    ManagedVm,
    VmManager,
    VmRequest,
    VmRole,
    exchange,
    incoming,
)
from devagent.daemon.vms.request import RemoteHome, decode_vm_request
from devagent.errors import PeerError, StateError, UsageError
from devagent.guest.probe import Paused
from devagent.guestnet import AddressLedger, GuestNetwork
from devagent.qemu.config import DiskSpec, VmConfig
from devagent.qemu.vm import VmState

# --- the request -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "words", "path"),
    [
        ({"name": "ok", "ram_mb": 10}, "'ram_mb' must be an integer from 64 to 65536", "$.ram_mb"),
        ({"name": "ok", "ram_mb": True}, "'ram_mb'", "$.ram_mb"),
        ({"name": "Bad!"}, "'name' must be 1-32 characters", "$.name"),
        ({"name": "ok", "storage": "cloud"}, "'storage' must be 'shared' or 'local'", "$.storage"),
        ({"name": "ok", "nics": 5}, "'nics' must be from 0 to 4", "$.nics"),
        ({"name": "ok", "nic": "yes"}, "'nic' must be true or false", "$.nic"),
        ({"name": "ok", "nic": True, "nics": 1}, "or give 'nics', not both", "$.nic"),
        ({"name": "ok", "disk_size": "1K"}, "'disk_size' must be from 1M to 1T", "$.disk_size"),
        ({"name": "ok", "disk_from": "a"}, "a peer must be given", "$.disk_from"),
        ({"name": "ok", "colour": "red"}, "unknown field `colour`", "$"),
        ([1, 2], "the request body must be a JSON object", "$"),
    ],
)
def test_a_bad_vm_request_names_the_field_and_its_path(body: Any, words: str, path: str) -> None:
    with pytest.raises(UsageError) as caught:
        decode_vm_request(json.dumps(body).encode())
    assert words in str(caught.value) and f"at {path}" in str(caught.value)


def test_a_vm_request_takes_sizes_the_nic_alias_and_keeps_the_cross_field_rules() -> None:
    request = decode_vm_request(b'{"name": "v", "disk_size": "2G", "nic": true}')
    assert (request.disks, request.nics, request.workload) == (
        (DiskRequest(size=2 << 30),),
        1,
        "moderate",
    )
    with pytest.raises(UsageError, match="missing required field `name`"):
        decode_vm_request(b"")  # an empty body is {}
    user = decode_vm_request(b'{"name": "u", "disk": "/img", "workload": "heavy"}')
    assert user.workload is None and not user.has_probe
    with pytest.raises(UsageError, match="give 'disk' too"):
        decode_vm_request(b'{"name": "u", "kernel": "/vmlinuz"}')
    with pytest.raises(UsageError, match="no 'disk' with it"):
        decode_vm_request(b'{"name": "u", "disk": "/x", "disk_from": {"url": "http://a"}}')
    with pytest.raises(UsageError, match="size '12Q'"):
        decode_vm_request(b'{"name": "u", "disk_size": "12Q"}')


def test_a_vm_request_takes_several_disks_in_order() -> None:
    """The user's images first (``disk``, one or a list), else a new first disk; then the
    new data disks; or ``disks`` as a record writes it."""
    test_guest = decode_vm_request(b'{"name": "v", "data_disks": ["2G", "512M"]}')
    assert [d.size for d in test_guest.disks] == [1 << 30, 2 << 30, 512 << 20]
    assert test_guest.nodes() == ["disk0", "disk1", "disk2"] and test_guest.has_probe
    user = decode_vm_request(b'{"name": "u", "disk": ["/a.qcow2", "/b.raw"], "data_disks": ["1G"]}')
    assert user.disks == (
        DiskRequest(image="/a.qcow2"),
        DiskRequest(image="/b.raw"),
        DiskRequest(size=1 << 30),
    )
    assert not user.has_probe and user.disk("disk1").image == "/b.raw"
    assert VmRequest.from_json(user.to_json()) == user  # a record's "disks"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"data_disks": ["1K"]}, "'data_disks' must be from 1M to 1T (at $.data_disks[0])"),
        ({"data_disks": ["1G"] * 8}, "a VM has 1 to 8 disks, not 9"),
        ({"disk": "/a", "disk_size": "1G"}, "'disk_size' is for a new disk"),
        ({"disks": [{"size": 1 << 30}], "disk": "/a"}, "give 'disks', or 'disk'"),
        ({"disks": []}, "a VM has 1 to 8 disks, not 0"),
        ({"disks": [{"size": 1 << 30, "image": "/a"}]}, "either a size (a new disk) or an image"),
        ({"disk": 3}, "'disk' must be an image's path, or a list of them"),
        ({"data_disks": ["1G"], "disk_from": {"url": "http://a"}}, "one new disk on the peer"),
        ({"name": "web-disk1"}, "cannot end in -diskN"),  # VM web's disk1 file and export
    ],
)
def test_a_bad_set_of_disks_is_refused_clearly(body: dict[str, Any], words: str) -> None:
    with pytest.raises(UsageError) as caught:
        decode_vm_request(json.dumps({"name": "v", **body}).encode())
    assert words in str(caught.value)


def test_a_record_saved_by_the_previous_version_still_loads() -> None:
    """``vm.json`` as the dataclass ``VmRequest`` wrote it (``asdict``: every field)."""
    old = {
        "name": "v1", "ram_mb": 256, "disk_size": 1 << 30, "workload": "moderate",
        "disk": None, "kernel": None, "initrd": None, "append": None, "storage": "local",
        "agent": True, "disk_from": {"url": "http://10.0.0.1:7480", "token": "t", "name": "a"},
        "nics": 1,
    }  # fmt: skip
    request = VmRequest.from_json(old)
    home = RemoteHome(peer=Endpoint(url="http://10.0.0.1:7480", token="t", name="a"), export="v1")
    assert request.disks == (DiskRequest(size=1 << 30, lives_on=home),)
    assert VmRequest.from_json(request.to_json()) == request
    at_home = request.with_disk("disk0", DiskRequest(size=1 << 30))
    assert at_home.remote_disks() == {}
    user = VmRequest.from_json({**old, "disk": "/img", "disk_from": None})  # disk_size unused
    assert user.disks == (DiskRequest(image="/img"),)


# --- the role, and the state a VM shows --------------------------------------------------------


def _managed(tmp_path: Path, role: VmRole, agents: list[AgentProcess] | None = None) -> ManagedVm:
    request = VmRequest(name="v1", disks=(DiskRequest(image="/img"),))
    config = VmConfig(name="v1", disks=(DiskSpec(node="disk0", path="/img"),))
    return ManagedVm(request, config, tmp_path, role, {"disk0": Path("/img")}, agents)


async def test_a_release_deletes_the_replicas_devagent_made_never_the_users_image(
    tmp_path: Path,
) -> None:
    """A migrated user's guest: the replicas of its images on this host are devagent's
    (deleted with the release); the user's image itself never is."""
    manager = VmManager("a", tmp_path, None, "127.0.0.1")
    users = tmp_path / "mine.qcow2"
    replica = tmp_path / "disks" / "v1-disk1.img"
    replica.parent.mkdir()
    for path in (users, replica):
        path.write_bytes(b"x")
    request = VmRequest(name="v1", disks=(DiskRequest(image=str(users)),) * 2)
    config = VmConfig(name="v1", disks=(DiskSpec(node="disk0", path=str(users)),))
    folder = tmp_path / "vms" / "v1"
    folder.mkdir(parents=True)
    images = {"disk0": users, "disk1": replica}
    manager.vms["v1"] = ManagedVm(request, config, folder, VmRole.RUNNING, images)
    await manager.remove("v1", delete_disk=True)
    assert users.exists() and not replica.exists()


def _saved_role(run_dir: Path) -> str:
    role: str = json.loads((run_dir / "vm.json").read_text())["role"]
    return role


def test_the_role_moves_only_as_the_table_says(tmp_path: Path) -> None:
    arriving = _managed(tmp_path, VmRole.INCOMING)
    with pytest.raises(StateError, match=r"is incoming here .* cannot have arrived"):
        arriving.arrived()  # not without the commit's mark
    arriving.commit_began()
    assert _saved_role(tmp_path) == "committing"  # saved at once, before the guest runs
    with pytest.raises(StateError, match="cannot have begun its commit"):
        arriving.commit_began()
    arriving.arrived()
    assert arriving.role is VmRole.RUNNING
    with pytest.raises(StateError, match=r"is running here \(QEMU new\): it cannot have arrived"):
        arriving.arrived()
    arriving.migrated_away()
    assert arriving.role is VmRole.MIGRATED and arriving.role == "migrated"
    assert _saved_role(tmp_path) == "migrated"  # a restarted daemon keeps the copy
    with pytest.raises(StateError, match=r"migrated here .* cannot have migrated away"):
        arriving.migrated_away()
    legacy = _managed(tmp_path, "running")  # the migration code assigns strings for now
    legacy.role = "migrated"
    assert legacy.role is VmRole.MIGRATED
    with pytest.raises(StateError):
        _managed(tmp_path, "incoming").role = "migrated"


async def test_a_qemu_killed_as_the_commit_began_is_a_crash_here_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its ``cont`` fails as its QMP socket closes, and its exit is known only a moment
    later: the commit waits for that moment and records the crash (the guest lives here
    now, ``vm restart`` boots it), rather than stay committing with a passing error that
    the source would be given again at each try (a chaos run stuck for 310 s)."""
    managed = _managed(tmp_path, VmRole.INCOMING)
    vm = managed.vm

    async def query(command: str, into: type[Any], **_: Any) -> Any:
        return SimpleNamespace(status="paused")  # the RAM arrived

    async def qmp(command: str, **_: Any) -> Any:
        assert command == "cont"
        asyncio.get_running_loop().call_later(0.2, vm._on_exit, -9)  # reaped a bit later
        raise PeerError("VM v1: QMP cont failed: EOF")

    monkeypatch.setattr(vm, "query", query)
    monkeypatch.setattr(vm, "qmp", qmp)
    with pytest.raises(StateError, match="VM v1 crashed here as its commit began"):
        await incoming.commit_incoming(managed, {})
    assert managed.role is VmRole.RUNNING and _saved_role(tmp_path) == "running"
    assert vm.state is VmState.FAILED


async def test_the_receivers_retire_while_qemu_still_loads_the_guest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source stopped its push before it asked for the commit: a push's receiver
    retires at once, not after the migration arrived (here it never does)."""
    managed = _managed(tmp_path, VmRole.INCOMING)
    seen: list[str] = []

    async def query(command: str, into: type[Any], **_: Any) -> Any:
        seen.append("inmigrate")
        return SimpleNamespace(status="inmigrate")

    class Receiver:
        async def retire(self, timeout: float) -> None:
            seen.append("retired")

        async def stop(self) -> None:
            seen.append("stopped")

    monkeypatch.setattr(managed.vm, "query", query)
    monkeypatch.setattr(incoming, "ARRIVAL_TIMEOUT_S", 0.05)
    managed.receivers["disk0"] = Receiver()  # type: ignore[assignment]
    with pytest.raises(PeerError, match="did not arrive"):
        await incoming.commit_incoming(managed, {})
    last_look = max(i for i, step in enumerate(seen) if step == "inmigrate")
    assert seen.index("retired") < last_look  # while QEMU was still inmigrate
    assert managed.receivers == {}


async def test_the_disks_swap_while_qemu_still_loads_the_guest_and_only_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source fenced its agents before it asked for the commit: each disk's agent
    swaps to its Fetch replica while QEMU is still ``inmigrate`` (not after, on the
    guest's pause). A commit that failed (the migration did not arrive in time) ends once
    its disks' steps did, and one asked again does not swap a disk a second time."""
    seen: list[str] = []

    class Agent:
        node = "disk0"
        backend: object = None

        async def swap(self, spec: FetchSpec) -> None:
            seen.append("asked")
            await asyncio.sleep(0.1)  # longer than the wait for the arrival
            seen.append("swapped")

    async def query(command: str, into: type[Any], **_: Any) -> Any:
        seen.append("inmigrate")
        return SimpleNamespace(status="inmigrate")

    async def watch(vm: Any, agent: Any) -> None:
        await asyncio.Event().wait()  # the replica's watch: until the VM goes

    managed = _managed(tmp_path, VmRole.INCOMING, [cast(AgentProcess, Agent())])
    monkeypatch.setattr(managed.vm, "query", query)
    monkeypatch.setattr(incoming, "ARRIVAL_TIMEOUT_S", 0.05)
    monkeypatch.setattr(incoming, "await_local", watch)
    fetch = FetchSpec(path=str(tmp_path / "replica"), remote=LocalSpec(path="/img"))
    with pytest.raises(PeerError, match="did not arrive"):
        await incoming.commit_incoming(managed, {"disk0": fetch})
    last_look = max(i for i, step in enumerate(seen) if step == "inmigrate")
    assert seen.index("asked") < last_look  # while QEMU was still inmigrate
    assert seen[-1] == "swapped"  # the failed commit ended once its disk had swapped
    assert managed.agent_for("disk0").backend == fetch
    with pytest.raises(PeerError, match="did not arrive"):
        await incoming.commit_incoming(managed, {"disk0": fetch})
    assert seen.count("swapped") == 1
    managed.fetching.pop("disk0").cancel()


def test_a_copy_left_behind_says_it_migrated_and_serves_its_disk(tmp_path: Path) -> None:
    serving = AgentProcess(vm="v1", node="disk0", image="/img", run_dir=str(tmp_path))
    serving.pid = os.getpid()  # alive
    managed = _managed(tmp_path, VmRole.RUNNING, [serving])
    managed.vm.state = VmState.RUNNING
    assert managed.api_status().state == "running"
    managed.migrated_away()
    managed.vm.state = VmState.FAILED  # its QEMU was killed past the switchover
    status = managed.api_status()
    assert (status.state, status.role) == (
        "migrated, serving its disk to the destination",
        "migrated",
    )
    serving.pid = None  # its agent stopped: the destination has the whole disk
    assert managed.api_status().state == "migrated"
    shared = _managed(tmp_path, VmRole.RUNNING, [serving])
    serving.pid = os.getpid()
    shared.migrated_away(serves_disk=False)
    assert shared.api_status().state == "migrated"


# --- addresses lent to VMs that migrated away --------------------------------------------------


def test_the_ledger_keeps_lent_addresses_across_restarts(tmp_path: Path) -> None:
    network = GuestNetwork.parse("br0", "10.213.7.100-10.213.7.103/24")
    ledger = AddressLedger(tmp_path / "lent.json")
    assert str(ledger.pick(network, ["10.213.7.100/24"])) == "10.213.7.101"
    ledger.lend("10.213.7.101/24", "10.213.7.102/24")
    again = AddressLedger(tmp_path / "lent.json")
    assert again.lent == {"10.213.7.101/24", "10.213.7.102/24"}
    assert str(again.pick(network, ["10.213.7.100/24"])) == "10.213.7.103"
    again.take_back("10.213.7.101/24")
    assert AddressLedger(tmp_path / "lent.json").lent == {"10.213.7.102/24"}
    with pytest.raises(StateError, match="no guest address left"):
        again.pick(network, ["10.213.7.100/24", "10.213.7.101/24", "10.213.7.103/24"])
    assert AddressLedger(tmp_path / "none.json").lent == frozenset()


def test_the_manager_lends_through_the_ledger(tmp_path: Path) -> None:
    network = GuestNetwork.parse("br0", "10.213.7.100-10.213.7.102/24")
    manager = VmManager("a", tmp_path, None, "10.213.7.1", network)
    manager.addresses.lend("10.213.7.100/24")
    nic = manager._plan_nics(VmRequest(name="v2", nics=1), None)[0]
    assert (nic.address, nic.mac) == ("10.213.7.101/24", "52:54:00:d5:07:65")


# --- a status never waits on a silent agent ----------------------------------------------------


async def _silent_agent(socket: Path, never: asyncio.Event) -> web.AppRunner:
    async def status(request: web.Request) -> web.Response:
        await never.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(socket)).start()
    return runner


async def test_devices_answer_within_a_second_when_agents_are_silent(tmp_path: Path) -> None:
    disk = AgentProcess(vm="v1", node="disk0", image="/img", run_dir=str(tmp_path))
    nic = NicAgent(
        vm="v1", node="net0", run_dir=str(tmp_path), address="10.213.7.100/24",
        mac="52:54:00:d5:07:64", tap="dt0",
    )  # fmt: skip
    managed = _managed(tmp_path, VmRole.RUNNING, [disk])
    managed.nics = [nic]
    never = asyncio.Event()
    runners = [await _silent_agent(a.control_socket, never) for a in (disk, nic)]
    try:
        started = time.monotonic()
        rows = await managed.devices()
        elapsed = time.monotonic() - started
    finally:
        never.set()
        for runner in runners:
            await runner.cleanup()
    assert [(r.device, r.state) for r in rows] == [
        ("disk0", "unreachable (no answer in 1 s)"),
        ("net0", "unreachable (no answer in 1 s)"),
    ]
    assert 0.9 < elapsed < 1.8  # both asked at once, each for a second


async def test_an_agent_without_a_socket_is_unreachable_at_once(tmp_path: Path) -> None:
    disk = AgentProcess(vm="v1", node="disk0", image="/img", run_dir=str(tmp_path))
    rows = await _managed(tmp_path, VmRole.RUNNING, [disk]).devices()
    assert rows[0].state.startswith("unreachable: agent v1/disk0 unreachable")


# --- a process exit, awaited ------------------------------------------------------------------


async def test_wait_exit_follows_the_pidfd() -> None:
    proc = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        assert not await wait_exit(proc.pid, 0.1)
        proc.kill()
        started = time.monotonic()
        assert await wait_exit(proc.pid, 5.0)
        assert time.monotonic() - started < 1.0
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert await wait_exit(proc.pid, 0.1)  # reaped: no such process


def test_a_copy_left_behind_keeps_its_disk_agents_supervised_while_it_serves(
    tmp_path: Path,
) -> None:
    """A source agent that dies during a post-copy tail is restarted (the destination reads
    through it); once the copy serves nothing, or for a VM whose QEMU is gone, none is."""
    from devagent.daemon.vms.manager import _supervised

    agent = AgentProcess(vm="v1", node="disk0", image="/img", run_dir=str(tmp_path))
    nic = NicAgent(vm="v1", node="net0", run_dir=str(tmp_path), address="10.0.0.100/24",
                   mac="52:54:00:00:00:64", tap="t0")  # fmt: skip
    managed = _managed(tmp_path, VmRole.RUNNING, [agent])
    managed.nics = [nic]
    managed.vm.state = VmState.RUNNING
    assert _supervised(managed) == [agent, nic]
    managed.migrated_away(serves_disk=True)
    managed.vm.state = VmState.FAILED  # its QEMU killed past the switchover
    assert managed.serves_disk and _supervised(managed) == [agent]
    done = _managed(tmp_path, VmRole.RUNNING, [agent])
    done.migrated_away(serves_disk=False)
    done.vm.state = VmState.STOPPED
    assert not done.serves_disk and _supervised(done) == []


# --- integrity ----------------------------------------------------------------------------------


async def test_integrity_says_when_the_guest_memory_disagrees_with_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's running digest against its block table's: a guest that resumed from
    memory with a lost update fails integrity even when its disk matches that digest."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 16))  # no probe block: the empty digest
    managed = _managed(tmp_path, VmRole.RUNNING)
    managed.images = {"disk0": image}
    empty = "0" * 16
    answers: list[Paused] = []

    async def probe(command: str, timeout: float = 30.0) -> Paused:
        return answers[0]

    monkeypatch.setattr(managed, "probe_command", probe)
    answers.append(Paused(empty, 0, 5, 1.0, empty))
    assert (await managed.check_integrity()).integrity == "ok"
    answers[0] = Paused(empty, 0, 5, 1.0, "00000000000000ff")
    found = (await managed.check_integrity()).integrity
    assert found.startswith("mismatch: the guest's memory disagrees with itself")
    assert "00000000000000ff" in found
    answers[0] = Paused(empty, 0, 5, 1.0)  # a probe older than the table digest
    assert (await managed.check_integrity()).integrity == "ok"


async def test_integrity_is_checked_disk_by_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each disk against the digest the probe gives it by node; a disk that differs is
    named, and one the probe never named is a mismatch, not a pass."""
    managed = _managed(tmp_path, VmRole.RUNNING)
    managed.request = VmRequest(name="v1", disks=(DiskRequest(size=1 << 20),) * 2)
    managed.images = {}
    for node in ("disk0", "disk1"):
        managed.images[node] = tmp_path / f"{node}.img"
        managed.images[node].write_bytes(bytes(1 << 16))  # the empty digest
    empty, other = "0" * 16, "00000000000000aa"
    answer = Paused(empty, 0, 5, 1.0, empty, {"disk0": empty, "disk1": empty})

    async def probe(command: str, timeout: float = 30.0) -> Paused:
        return answer

    monkeypatch.setattr(managed, "probe_command", probe)
    assert (await managed.check_integrity()).integrity == "ok"
    answer = Paused(other, 0, 5, 1.0, other, {"disk0": empty, "disk1": other})
    found = (await managed.check_integrity()).integrity
    assert found == f"mismatch: disk1: the guest last wrote digest {other}, the disk holds {empty}"
    answer = Paused(empty, 0, 5, 1.0, empty, {"disk0": empty})
    assert "disk1: the guest last wrote digest None" in (await managed.check_integrity()).integrity


async def test_a_pause_left_unanswered_is_followed_by_a_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe may have paused all the same: it is told to go on."""
    managed = _managed(tmp_path, VmRole.RUNNING)
    sent: list[str] = []

    async def probe(command: str, timeout: float = 30.0) -> Paused:
        sent.append(command)
        if command == "pause":
            raise PeerError("VM v1: ioprobe did not answer 'pause' in 30 s")
        raise StateError("and the resume fails too")

    monkeypatch.setattr(managed, "probe_command", probe)
    with pytest.raises(PeerError, match="did not answer 'pause'"):
        await managed.check_integrity()
    assert sent == ["pause", "resume"]


async def test_a_disk_kept_on_the_source_is_served_from_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """keep-remote: the agent goes from its Fetch replica to the replica's remote alone,
    the disk is recorded as living on the source, and the replica's watch ends."""
    remote = RemoteSpec(address="tcp:10.0.0.1:4000", export="disk0")
    fetch = FetchSpec(path=str(tmp_path / "v1.img"), remote=remote, copier=True, then_local=True)
    agent = AgentProcess(vm="v1", node="disk0", image=fetch.path, run_dir=str(tmp_path),
                         backend=fetch)  # fmt: skip
    managed = _managed(tmp_path, VmRole.RUNNING, [agent])
    managed.request = VmRequest(name="v1")
    swapped: list[object] = []

    async def swap(backend: object, timeout: float = 60.0) -> SwapAnswer:
        swapped.append(backend)
        return SwapAnswer(old="Fetch", new="Remote", hold_s=0.002)

    monkeypatch.setattr(agent, "swap", swap)
    watch = asyncio.create_task(asyncio.sleep(3600))
    managed.fetching["disk0"] = watch
    home = RemoteHome(peer=Endpoint(url="http://a", name="a"), export="v1")
    done = await exchange.keep_remote(managed, "disk0", home)
    await asyncio.sleep(0)
    assert swapped == [remote] and agent.backend == remote and watch.cancelled()
    assert managed.request.remote_disks() == {"disk0": home}
    assert managed.images["disk0"] == Path("/remote/a/v1") and done.lives_on == "a"
    saved = json.loads((tmp_path / "vm.json").read_text())
    assert saved["request"]["disks"][0]["lives_on"]["export"] == "v1"
    again = await exchange.keep_remote(managed, "disk0", home)  # an answer that was lost
    assert again.lives_on == "a" and swapped == [remote]
    other = RemoteHome(peer=Endpoint(url="http://c", name="c"), export="v1")
    with pytest.raises(StateError, match="not a replica being fetched"):
        await exchange.keep_remote(managed, "disk0", other)


@pytest.mark.parametrize("answer_lost", [False, True])
async def test_a_settled_replica_is_recorded_as_local_before_the_source_hears_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer_lost: bool
) -> None:
    """settle: the agent swaps its Fetch to Local on the replica, and the VM's record says
    so before the answer (a restarted agent opens the replica alone, never the source that
    is let go next). An agent whose answer was lost but who swapped counts as settled; one
    that did not is an error, and the record keeps the Fetch."""
    remote = RemoteSpec(address="tcp:10.0.0.1:4000", export="disk0")
    fetch = FetchSpec(path="/img", remote=remote)
    agent = AgentProcess(vm="v1", node="disk0", image="/img", run_dir=str(tmp_path),
                         backend=fetch)  # fmt: skip
    managed = _managed(tmp_path, VmRole.RUNNING, [agent])
    served: list[object] = []

    async def swap(backend: object, timeout: float = 60.0) -> SwapAnswer:
        served.append(backend)
        if answer_lost:
            raise PeerError("agent v1/disk0 unreachable")
        return SwapAnswer(old="Fetch", new="Local", hold_s=0.004)

    async def status(**_: Any) -> StatusAnswer:
        local = LocalStatus(path="/img", read_only=False)
        return cast(StatusAnswer, SimpleNamespace(backend_status=local))

    monkeypatch.setattr(agent, "swap", swap)
    monkeypatch.setattr(agent, "status", status)
    done = await exchange.settle(managed, "disk0")
    assert served == [LocalSpec(path="/img")] and agent.backend is None
    assert json.loads((tmp_path / "vm.json").read_text())["agents"][0]["backend"] is None
    assert done.held_ms == (0.0 if answer_lost else 4.0)
    again = await exchange.settle(managed, "disk0")  # asked again: done already
    assert again.duration_s == 0.0 and len(served) == 1

    agent.backend, answer_lost = fetch, True

    async def not_swapped(**_: Any) -> StatusAnswer:
        return cast(StatusAnswer, SimpleNamespace(backend_status=None))

    monkeypatch.setattr(agent, "status", not_swapped)
    with pytest.raises(PeerError, match="unreachable"):
        await exchange.settle(managed, "disk0")
    assert agent.backend == fetch


class FakeReceiver:
    """A receiver's process: its start waits for ``go`` (and fails with ``fail``); what
    was done to it goes in ``seen``."""

    tcp_address = "tcp:127.0.0.1:4001"

    def __init__(self, node: str, seen: list[str], go: asyncio.Event) -> None:
        self.node, self.seen, self.go = node, seen, go
        self.export = f"receive-{node}"
        self.fail: Exception | None = None

    async def start(self) -> None:
        self.seen.append(f"start {self.node}")
        await self.go.wait()
        if self.fail is not None:
            raise self.fail
        self.seen.append(f"serving {self.node}")

    async def kill(self) -> None:
        self.seen.append(f"kill {self.node}")

    async def retire(self, timeout: float) -> None:
        self.seen.append(f"retired {self.node}")

    async def stop(self) -> None:
        self.seen.append(f"stopped {self.node}")

    def to_json(self) -> dict[str, str]:  # (saved with the VM)
        return {"node": self.node}


def _incoming_with_replica(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: Exception | None = None
) -> tuple[VmManager, ManagedVm, list[str], asyncio.Event]:
    """An incoming VM whose disk0 and disk1 are replicas this host made, without receivers
    (a fast link's hybrid prepare); receivers asked for are fakes that start once ``go``
    is set."""
    manager = VmManager("b", tmp_path, None, "127.0.0.1")
    (tmp_path / "disks").mkdir()
    replicas = {node: tmp_path / "disks" / f"v1-{node}.img" for node in ("disk0", "disk1")}
    for replica in replicas.values():
        replica.write_bytes(b"")
    request = VmRequest(name="v1", disks=(DiskRequest(image="/img"),) * 2)
    config = VmConfig(name="v1", disks=tuple(
        DiskSpec(node=node, path=str(replica)) for node, replica in replicas.items()))  # fmt: skip
    folder = tmp_path / "vms" / "v1"
    folder.mkdir(parents=True)
    managed = ManagedVm(request, config, folder, VmRole.INCOMING, replicas)
    manager.vms["v1"] = managed
    seen: list[str] = []
    go = asyncio.Event()

    def receiver(_: Any, __: Any, image: Path, node: str) -> FakeReceiver:
        seen.append(f"made {node}")
        made = FakeReceiver(node, seen, go)
        made.fail = fail
        return made

    monkeypatch.setattr(incoming, "_receiver", receiver)
    return manager, managed, seen, go


async def test_receivers_asked_for_as_a_push_begins_start_once_and_the_commit_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push that begins beside RAM asks for its receivers then (the prepare made none):
    asked twice at once, one starts; a commit that comes meanwhile retires it only once it
    serves (its process known), never before."""
    manager, managed, seen, go = _incoming_with_replica(tmp_path, monkeypatch)
    asked = [asyncio.ensure_future(incoming.add_receivers(manager, managed, ["disk0"]))
             for _ in range(2)]  # fmt: skip
    readying = asyncio.ensure_future(incoming._ready_disks(managed, {}))
    await asyncio.sleep(0.05)
    assert not readying.done() and not any(a.done() for a in asked)
    assert seen == ["made disk0", "start disk0"]
    go.set()
    await asyncio.wait_for(asyncio.gather(*asked), 1)
    steps = await asyncio.wait_for(readying, 1)
    await asyncio.gather(*managed.retiring)
    assert seen == ["made disk0", "start disk0", "serving disk0", "retired disk0", "stopped disk0"]
    assert "receiver_retired" in steps and managed.receivers == {}


async def test_receivers_asked_for_while_others_start_are_refused_until_asked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager, managed, seen, go = _incoming_with_replica(tmp_path, monkeypatch)
    first = asyncio.ensure_future(incoming.add_receivers(manager, managed, ["disk0"]))
    await asyncio.sleep(0.02)
    both = asyncio.ensure_future(incoming.add_receivers(manager, managed, ["disk0", "disk1"]))
    await asyncio.sleep(0.02)
    go.set()
    await first
    with pytest.raises(StateError, match="none of disk1 yet: ask again"):
        await both
    await incoming.add_receivers(manager, managed, ["disk0", "disk1"])
    assert sorted(managed.receivers) == ["disk0", "disk1"]
    assert seen.count("made disk0") == 1 and seen.count("made disk1") == 1


async def test_receivers_are_asked_for_replicas_of_an_incoming_vm_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager, managed, seen, _go = _incoming_with_replica(tmp_path, monkeypatch)
    with pytest.raises(UsageError, match="no replica of 'disk9'"):
        await incoming.add_receivers(manager, managed, ["disk9"])
    managed.images["disk0"] = Path("/img")  # the user's own image, not one made here
    with pytest.raises(UsageError, match="no replica of 'disk0'"):
        await incoming.add_receivers(manager, managed, ["disk0"])
    managed.images["disk0"] = tmp_path / "disks" / "v1-disk0.img"
    managed.commit_began()  # (nothing lands here any more)
    with pytest.raises(StateError, match="not an incoming VM"):
        await incoming.add_receivers(manager, managed, ["disk0"])
    assert seen == [] and managed.receivers == {}


async def test_receivers_that_fail_to_start_are_killed_and_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail = PeerError("receive-disk0 exited at start: no room")
    manager, managed, seen, go = _incoming_with_replica(tmp_path, monkeypatch, fail)
    go.set()
    with pytest.raises(PeerError, match="no room"):
        await incoming.add_receivers(manager, managed, ["disk0"])
    assert seen == ["made disk0", "start disk0", "kill disk0"] and managed.receivers == {}
    with pytest.raises(PeerError, match="no room"):  # asked again: tried again
        await incoming.add_receivers(manager, managed, ["disk0"])
    assert seen.count("start disk0") == 2


async def test_a_removal_waits_for_receivers_still_starting_then_stops_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source rolled back while the receivers it asked for were starting: the VM's
    removal stops them once their processes are known, rather than leave one running."""
    manager, managed, seen, go = _incoming_with_replica(tmp_path, monkeypatch)
    asked = asyncio.ensure_future(incoming.add_receivers(manager, managed, ["disk0"]))
    await asyncio.sleep(0.02)
    removing = asyncio.ensure_future(manager.remove("v1"))
    await asyncio.sleep(0.05)
    assert not removing.done()
    go.set()
    await asyncio.wait_for(removing, 1)
    await asyncio.wait_for(asked, 1)
    assert seen == ["made disk0", "start disk0", "serving disk0", "stopped disk0"]
