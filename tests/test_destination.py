"""The destination's commit happens once per incoming VM: a repeat (the source trying again
after a lost answer) waits for the first one and gets its answer, and a client that goes
away cannot stop it half-way. A commit and an abort exclude each other: a source daemon that
restarted and asks for the abort while the last commit runs is refused. A prepare for a push
may answer early, once its receivers serve: the rest of the start is then waited for apart
(or ended by an abort)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from devagent.daemon.migration import destination
from devagent.daemon.migration.destination import Commits
from devagent.daemon.migration.messages import (
    CommitAnswer,
    CommitRequest,
    IncomingDisk,
    IncomingRequest,
)
from devagent.daemon.vms import VmRole
from devagent.daemon.vms import incoming as incoming_vm
from devagent.daemon.vms.request import DiskRequest, VmRequest
from devagent.errors import NotFound, PeerError, StateError
from devagent.qemu.config import VmConfig


@dataclass
class FakeVm:
    name: str
    role: VmRole = VmRole.INCOMING


@dataclass
class FakeVms:
    """The host's VM table (``vms``, by name, as the VM manager's)."""

    vms: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        if name not in self.vms:
            raise NotFound(f"no VM {name!r}")
        return self.vms[name]

    async def remove(self, name: str) -> None:
        if name not in self.vms:
            raise NotFound(f"no VM {name!r}")
        del self.vms[name]


@dataclass
class FakeHost:
    vms: FakeVms = field(default_factory=FakeVms)


class Readier:
    """Readies a VM (the real one swaps the disk and runs the guest): counts the times it
    ran, and finishes when the test says."""

    def __init__(self) -> None:
        self.runs = 0
        self.go = asyncio.Event()

    async def __call__(self, vm: Any, request: CommitRequest) -> CommitAnswer:
        self.runs += 1
        await self.go.wait()
        vm.role = VmRole.RUNNING
        return CommitAnswer(resumed_at=100.0 + self.runs)


def commits(host: FakeHost, readier: Readier) -> Commits:
    return Commits(cast(Any, host), ready=readier)


async def test_a_repeated_commit_waits_for_the_first_and_gets_its_answer() -> None:
    host, readier = FakeHost(), Readier()
    host.vms.vms["v1"] = FakeVm("v1")
    made = commits(host, readier)
    first = asyncio.create_task(made.commit("v1", CommitRequest()))
    again = asyncio.create_task(made.commit("v1", CommitRequest()))  # during the first
    await asyncio.sleep(0)
    readier.go.set()
    answers = await asyncio.gather(first, again)
    later = await made.commit("v1", CommitRequest())  # after it: the same answer
    assert readier.runs == 1
    assert [a.resumed_at for a in [*answers, later]] == [101.0, 101.0, 101.0]


class FailingOnce(Readier):
    """The first commit fails: before its point of no return (a disk the agent could not
    reach), or after it (the VM committing when the failure came)."""

    def __init__(self, role_on_failure: VmRole) -> None:
        super().__init__()
        self.go.set()
        self.role_on_failure = role_on_failure

    async def __call__(self, vm: Any, request: CommitRequest) -> CommitAnswer:
        if self.runs == 0:
            self.runs += 1
            vm.role = self.role_on_failure
            raise PeerError("cannot reach NBD export 'disk0': no NBD handshake within 10 s")
        return await super().__call__(vm, request)


async def test_a_commit_asked_is_known_so_that_no_receiver_starts_after_it() -> None:
    """The receivers a push asks for as it begins must not start once the commit (which
    retires them) was asked: the route asks :meth:`Commits.known` first. A VM of that name
    that comes back by a later migration is another VM: its receivers may start."""
    host, readier = FakeHost(), Readier()
    host.vms.vms["v1"] = FakeVm("v1")
    made = commits(host, readier)
    assert not made.known("v1")
    committing = asyncio.create_task(made.commit("v1", CommitRequest()))
    await asyncio.sleep(0)
    assert made.known("v1")
    readier.go.set()
    await committing
    host.vms.vms["v1"] = FakeVm("v1")  # the same name come back here by a later migration
    assert not made.known("v1")


async def test_a_commit_that_failed_before_it_began_runs_again_when_asked_again() -> None:
    host, readier = FakeHost(), FailingOnce(VmRole.INCOMING)
    host.vms.vms["v1"] = FakeVm("v1")
    made = commits(host, readier)
    with pytest.raises(PeerError, match="no NBD handshake"):
        await made.commit("v1", CommitRequest())
    assert (await made.commit("v1", CommitRequest())).resumed_at == 102.0
    assert (await made.commit("v1", CommitRequest())).resumed_at == 102.0  # once it worked
    assert readier.runs == 2


async def test_a_commit_that_failed_past_its_point_of_no_return_is_not_run_again() -> None:
    host, readier = FakeHost(), FailingOnce(VmRole.COMMITTING)
    host.vms.vms["v1"] = FakeVm("v1")
    made = commits(host, readier)
    for _ in range(2):
        with pytest.raises(PeerError, match="no NBD handshake"):
            await made.commit("v1", CommitRequest())
    assert readier.runs == 1


async def test_a_commit_whose_client_went_away_runs_to_its_end() -> None:
    host, readier = FakeHost(), Readier()
    host.vms.vms["v1"] = FakeVm("v1")
    made = commits(host, readier)
    asked = asyncio.create_task(made.commit("v1", CommitRequest()))
    await asyncio.sleep(0)
    asked.cancel()  # the request's handler is cancelled: the commit is not
    readier.go.set()
    assert (await made.commit("v1", CommitRequest())).resumed_at == 101.0
    assert host.vms.vms["v1"].role is VmRole.RUNNING and readier.runs == 1


async def test_a_vm_that_is_not_incoming_is_refused_and_a_new_one_commits_anew() -> None:
    host, readier = FakeHost(), Readier()
    readier.go.set()
    host.vms.vms["v1"] = FakeVm("v1", VmRole.RUNNING)
    made = commits(host, readier)
    with pytest.raises(StateError, match="not an incoming VM"):
        await made.commit("v1", CommitRequest())
    host.vms.vms["v1"] = FakeVm("v1")  # the VM came back here later: a new incoming VM
    await made.commit("v1", CommitRequest())
    host.vms.vms["v1"] = FakeVm("v1")
    assert (await made.commit("v1", CommitRequest())).resumed_at == 102.0
    assert readier.runs == 2


async def test_an_abort_is_refused_while_the_commit_runs_and_once_it_began() -> None:
    host, readier = FakeHost(), Readier()
    host.vms.vms["v1"] = FakeVm("v1")
    made = commits(host, readier)
    committing = asyncio.create_task(made.commit("v1", CommitRequest()))
    await asyncio.sleep(0)
    with pytest.raises(StateError, match="commit is under way"):
        await made.abort("v1")
    assert "v1" in host.vms.vms
    readier.go.set()
    await committing
    with pytest.raises(StateError, match="not an incoming VM"):  # it runs here now
        await made.abort("v1")
    host.vms.vms["v1"] = FakeVm("v1", VmRole.COMMITTING)  # a restarted daemon's: no Commits
    with pytest.raises(StateError, match="not an incoming VM"):
        await commits(host, readier).abort("v1")
    host.vms.vms["v2"] = FakeVm("v2")  # never committed: removed
    await made.abort("v2")
    assert "v2" not in host.vms.vms


async def test_a_baseline_commit_is_once_only_and_excludes_the_abort_too() -> None:
    host, devagents, qemus = FakeHost(), Readier(), Readier()
    host.vms.vms["v1"] = FakeVm("v1")
    made = commits(host, devagents)
    first = asyncio.create_task(made.commit("v1", CommitRequest(), using=qemus))
    await asyncio.sleep(0)
    with pytest.raises(StateError, match="commit is under way"):
        await made.abort("v1")
    qemus.go.set()
    again = await made.commit("v1", CommitRequest(), using=qemus)  # the first one's answer
    assert (await first).resumed_at == again.resumed_at == 101.0
    assert (qemus.runs, devagents.runs) == (1, 0)


# -- an early prepare: the answer once the push's receivers serve ------------------------------


@dataclass
class StartingVm:
    """An incoming VM as :func:`destination.prepare` reads it while its start goes on."""

    name: str
    role: VmRole = VmRole.INCOMING
    agents: list[Any] = field(default_factory=list)
    receivers: dict[str, Any] = field(default_factory=dict)
    nics: list[Any] = field(default_factory=list)
    vm: Any = None

    def api_status(self) -> None:
        return None

    def save(self) -> None:
        pass


@dataclass
class StartingHost:
    name: str = "b"
    vms: FakeVms = field(default_factory=FakeVms)
    address: str = "127.0.0.1"
    tls: Any = None
    shared_dir: Any = None


class Start:
    """The incoming VM's start, step by step as the test says: the VM in the host's table,
    its receivers serving and its NICs up (``receive``), then QEMU up (``listen``), or a
    failure; as the VM manager, a start that fails removes its VM."""

    def __init__(self, host: StartingHost) -> None:
        self.host = host
        self.receive, self.listen = asyncio.Event(), asyncio.Event()
        self.fail: BaseException | None = None  # once QEMU starts
        self.fail_early: BaseException | None = None  # before the receivers serve
        self.ports: list[int] = []  # RAM's port, as chosen

    async def prepare_incoming(
        self, manager: Any, request: Any, config: Any, disks: Any, *,
        serving: asyncio.Future[Any], **rest: Any,
    ) -> Any:  # fmt: skip
        managed = StartingVm(request.name)
        self.host.vms.vms[request.name] = managed
        try:
            if self.fail_early is not None:
                raise self.fail_early
            await self.receive.wait()
            serving.set_result(managed)
            await self.listen.wait()
            if self.fail is not None:
                raise self.fail
        except BaseException:
            await self.host.vms.remove(request.name)
            raise
        return managed

    def free_port(self, address: str) -> int:
        assert self.listen.is_set(), "RAM's port chosen before the agents bound theirs"
        self.ports.append(4999)
        return 4999

    async def migrate_incoming(self, vm: Any, uri: str, tls: Any, source: str) -> None:
        pass


def incoming(early: bool) -> IncomingRequest:
    return IncomingRequest(
        request=VmRequest(name="v1", disks=(DiskRequest(size=1 << 20),)),
        config=VmConfig(name="v1"),
        disks=[IncomingDisk(node="disk0", size=1 << 20, receive=True)],
        source="a",
        early=early,
    )


@pytest.fixture
def start(monkeypatch: pytest.MonkeyPatch) -> Start:
    started = Start(StartingHost())
    monkeypatch.setattr(incoming_vm, "prepare_incoming", started.prepare_incoming)
    monkeypatch.setattr(destination, "migrate_incoming", started.migrate_incoming)
    monkeypatch.setattr(destination, "free_port", started.free_port)
    return started


def prepare(start: Start, starts: destination.Starts, early: bool) -> Any:
    return destination.prepare(cast(Any, start.host), starts, incoming(early))


async def test_an_early_prepare_answers_once_the_receivers_serve(start: Start) -> None:
    starts = destination.Starts()
    preparing = asyncio.ensure_future(prepare(start, starts, early=True))
    await asyncio.sleep(0.05)
    assert not preparing.done(), "answered before the receivers served"
    start.receive.set()
    answer = await asyncio.wait_for(preparing, 1)
    assert answer.listening is False and answer.uri == ""  # RAM's port not chosen yet
    listening = asyncio.ensure_future(starts.listening("v1"))
    await asyncio.sleep(0.05)
    assert not listening.done(), "listening before QEMU started"
    start.listen.set()
    heard = await asyncio.wait_for(listening, 1)
    assert heard.listening is True and heard.uri == "tcp:127.0.0.1:4999"
    assert (await starts.listening("v1")).uri == heard.uri  # asked again: at once
    assert starts.source_of("v1") == "a" and starts.source_of("v2") is None


async def test_a_prepare_that_is_not_early_answers_once_qemu_listens(start: Start) -> None:
    preparing = asyncio.ensure_future(prepare(start, destination.Starts(), early=False))
    start.receive.set()
    await asyncio.sleep(0.05)
    assert not preparing.done(), "answered before QEMU listened"
    start.listen.set()
    answer = await asyncio.wait_for(preparing, 1)
    assert answer.listening is True and answer.uri == "tcp:127.0.0.1:4999"


async def test_a_start_that_fails_after_the_early_answer_is_told_to_the_source(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """Also when the source asks after the start removed its VM: the reason is kept."""
    starts = destination.Starts()
    start.receive.set()
    await prepare(start, starts, early=True)
    start.fail = PeerError("QEMU exited: no such machine")
    start.listen.set()
    await asyncio.sleep(0.05)
    assert start.host.vms.vms == {}  # the start removed it
    with pytest.raises(PeerError, match="no such machine"):
        await starts.listening("v1")
    assert "the start of incoming VM v1 failed: QEMU exited" in caplog.text
    with pytest.raises(NotFound):
        await starts.listening("v9")


async def test_a_start_that_fails_before_the_receivers_serve_fails_the_prepare(
    start: Start,
) -> None:
    start.fail_early = PeerError("the receiver could not open its replica")
    with pytest.raises(PeerError, match="could not open"):
        await asyncio.wait_for(prepare(start, destination.Starts(), early=True), 1)
    assert start.host.vms.vms == {}


async def test_a_vm_that_exists_here_is_refused_before_anything_starts(start: Start) -> None:
    starts = destination.Starts()
    start.receive.set()
    start.listen.set()
    await prepare(start, starts, early=True)
    with pytest.raises(StateError, match="already exists"):
        await prepare(start, starts, early=True)
    assert (await starts.listening("v1")).listening  # the first start's, kept


async def test_an_abort_while_the_vm_starts_waits_for_its_start(start: Start) -> None:
    """An abort waits for the start to end (cut short, a process it was spawning would be
    unknown), then removes the VM; twice at once, both wait."""
    starts = destination.Starts()
    start.receive.set()
    await prepare(start, starts, early=True)
    settling = [asyncio.ensure_future(starts.settled("v1")) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert not any(s.done() for s in settling), "the abort went on while the VM started"
    start.listen.set()
    await asyncio.wait_for(asyncio.gather(*settling), 1)
    assert (await starts.listening("v1")).listening  # not cancelled: it ended by itself
    await destination.abort(cast(Any, start.host), "v1")
    assert start.host.vms.vms == {}


async def test_the_early_answer_waits_for_the_receivers_and_the_nics() -> None:
    """The answer names each NIC's agent (the source forwards frames to it): the push may
    start once the receivers serve and the NICs are up, QEMU still starting."""
    go_nics, go_qemu, receivers_up = asyncio.Event(), asyncio.Event(), asyncio.Event()

    class Receiver:
        async def start(self) -> None:
            receivers_up.set()

        async def kill(self) -> None:
            pass

    class Manager:
        def __init__(self) -> None:
            self.vms: dict[str, Any] = {}

        async def _launch(self, managed: Any, nics_up: asyncio.Event) -> None:
            await go_nics.wait()
            nics_up.set()
            await go_qemu.wait()

    managed = StartingVm("v1", receivers={"disk0": Receiver()})
    served: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    launching = asyncio.ensure_future(
        incoming_vm._launch_with_receivers(cast(Any, Manager()), cast(Any, managed), served)
    )
    await asyncio.wait_for(receivers_up.wait(), 1)
    await asyncio.sleep(0.02)
    assert not served.done(), "answered before the NICs were up"
    go_nics.set()
    assert await asyncio.wait_for(served, 1) is managed
    assert not launching.done()
    go_qemu.set()
    await asyncio.wait_for(launching, 1)
