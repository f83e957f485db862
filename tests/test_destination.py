"""The destination's commit happens once per incoming VM: a repeat (the source trying again
after a lost answer) waits for the first one and gets its answer, and a client that goes
away cannot stop it half-way."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from devagent.daemon.migration.destination import Commits
from devagent.daemon.migration.messages import CommitAnswer, CommitRequest
from devagent.daemon.vms import VmRole
from devagent.errors import NotFound, StateError


@dataclass
class FakeVm:
    name: str
    role: VmRole = VmRole.INCOMING


@dataclass
class FakeVms:
    table: dict[str, FakeVm] = field(default_factory=dict)

    def get(self, name: str) -> FakeVm:
        if name not in self.table:
            raise NotFound(f"no VM {name!r}")
        return self.table[name]


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
    host.vms.table["v1"] = FakeVm("v1")
    made = commits(host, readier)
    first = asyncio.create_task(made.commit("v1", CommitRequest()))
    again = asyncio.create_task(made.commit("v1", CommitRequest()))  # during the first
    await asyncio.sleep(0)
    readier.go.set()
    answers = await asyncio.gather(first, again)
    later = await made.commit("v1", CommitRequest())  # after it: the same answer
    assert readier.runs == 1
    assert [a.resumed_at for a in [*answers, later]] == [101.0, 101.0, 101.0]


async def test_a_commit_whose_client_went_away_runs_to_its_end() -> None:
    host, readier = FakeHost(), Readier()
    host.vms.table["v1"] = FakeVm("v1")
    made = commits(host, readier)
    asked = asyncio.create_task(made.commit("v1", CommitRequest()))
    await asyncio.sleep(0)
    asked.cancel()  # the request's handler is cancelled: the commit is not
    readier.go.set()
    assert (await made.commit("v1", CommitRequest())).resumed_at == 101.0
    assert host.vms.table["v1"].role is VmRole.RUNNING and readier.runs == 1


async def test_a_vm_that_is_not_incoming_is_refused_and_a_new_one_commits_anew() -> None:
    host, readier = FakeHost(), Readier()
    readier.go.set()
    host.vms.table["v1"] = FakeVm("v1", VmRole.RUNNING)
    made = commits(host, readier)
    with pytest.raises(StateError, match="not an incoming VM"):
        await made.commit("v1", CommitRequest())
    host.vms.table["v1"] = FakeVm("v1")  # the VM came back here later: a new incoming VM
    await made.commit("v1", CommitRequest())
    host.vms.table["v1"] = FakeVm("v1")
    assert (await made.commit("v1", CommitRequest())).resumed_at == 102.0
    assert readier.runs == 2
