"""Agents started ahead (:mod:`devagent.daemon.standby`): a real standby process becomes a
real agent that serves its image, logs to its own file and answers its control socket; with
none ready an agent starts afresh; a closed pool leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devagent.agent.messages import RemoteSpec
from devagent.cli.agent_cmd import EXITING_NICE
from devagent.daemon import standby
from devagent.daemon.agents import AgentProcess
from devagent.daemon.standby import StandbyPool
from devagent.daemon.supervised import until_listening
from devagent.errors import PeerError
from devagent.process import autogroup_nice
from devagent.wait import wait_until


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[StandbyPool]:
    made = StandbyPool(tmp_path / "standby.log", size=1)
    standby.use_pool(made)
    try:
        yield made
    finally:
        standby.use_pool(None)
        await made.close()


def _agent(tmp_path: Path) -> AgentProcess:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    return AgentProcess(vm="v1", node="disk0", image=str(image), run_dir=str(run_dir))


async def _ready(pool: StandbyPool) -> asyncio.subprocess.Process:
    pool.fill()
    await wait_until(lambda: bool(pool._ready), timeout=30, interval=0.05, what="a standby")
    return pool._ready[0]


async def test_a_standby_becomes_the_agent_and_another_is_made(
    tmp_path: Path, pool: StandbyPool
) -> None:
    waiting = await _ready(pool)
    agent = _agent(tmp_path)
    await agent.start()
    try:
        assert agent.pid == waiting.pid  # the standby itself, not a new process
        assert (await agent.status()).size == 1 << 20
        assert os.getpriority(os.PRIO_PROCESS, waiting.pid) == os.getpriority(os.PRIO_PROCESS, 0)
        assert "vm=v1 device=disk0" in agent.log_file.read_text()
        replacement = await _ready(pool)
        assert replacement.pid != waiting.pid
        assert os.getpriority(os.PRIO_PROCESS, replacement.pid) == standby.STANDBY_NICE
        if autogroup_nice("self") is not None:  # the kernel has autogroups
            # The standby's session is weighed at the lowest priority too; the agent, at
            # the daemon's own nice again.
            assert autogroup_nice(replacement.pid) == standby.STANDBY_NICE
            assert autogroup_nice(waiting.pid) == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        await agent.stop()
    assert not agent.alive


async def test_with_no_standby_ready_an_agent_starts_afresh(tmp_path: Path) -> None:
    empty = StandbyPool(tmp_path / "standby.log", size=0)
    standby.use_pool(empty)
    try:
        agent = _agent(tmp_path)
        await agent.start()
        try:
            assert (await agent.status()).size == 1 << 20
        finally:
            await agent.stop()
    finally:
        standby.use_pool(None)


async def test_an_agent_listens_before_it_answers_and_a_failed_start_is_said(
    tmp_path: Path, pool: StandbyPool
) -> None:
    """``listening`` is set once the agent's NBD socket listens (QEMU may start then); an
    agent that exits first has its failure raised by :func:`until_listening`; one whose
    backend cannot open (its remote peer refuses) removes the socket it listened on."""
    await _ready(pool)
    agent = _agent(tmp_path)
    listens = asyncio.Event()
    start = asyncio.ensure_future(agent.start(listens))
    await until_listening([start], [listens])
    assert agent.nbd_socket.exists()
    await start
    try:
        assert (await agent.status()).size == 1 << 20
    finally:
        await agent.stop()

    gone = AgentProcess(vm="v1", node="disk1", image=str(tmp_path / "nowhere.img"),
                        run_dir=agent.run_dir)  # fmt: skip
    listens = asyncio.Event()
    start = asyncio.ensure_future(gone.start(listens))
    with pytest.raises(PeerError, match="exited at start"):
        await until_listening([start], [listens])
    assert not listens.is_set()

    refused = AgentProcess(
        vm="v1", node="disk2", image=agent.image, run_dir=agent.run_dir,
        backend=RemoteSpec(address="tcp:127.0.0.1:1", export="disk2"),
    )  # fmt: skip
    with pytest.raises(PeerError, match="exited at start"):
        await refused.start(asyncio.Event())
    assert not refused.nbd_socket.exists()


async def test_a_closed_pool_leaves_no_standby_running(pool: StandbyPool) -> None:
    waiting = await _ready(pool)
    await pool.close()
    assert waiting.returncode is not None
    assert pool.take() is None  # closed: none made again


PRIORITIES = """
from devagent.cli.agent_cmd import yield_while_exiting
from devagent.process import autogroup_nice
import os
yield_while_exiting()
print(os.getpriority(os.PRIO_PROCESS, 0), autogroup_nice("self"))
"""


@pytest.mark.parametrize("own_session", [True, False])
def test_a_stopped_agent_yields_the_cpu_only_in_its_own_session(own_session: bool) -> None:
    """An agent the daemon started (its own session) drops to the lowest priority for its
    exit; one started from a shell leaves the shell's session as it was (the shell here
    leads a session of its own, so that a regression renices a throwaway one)."""
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    if own_session:
        argv = [sys.executable, "-c", PRIORITIES]
    else:  # ("; :" keeps sh from exec'ing python: sh leads, python is its child)
        argv = ["setsid", "sh", "-c", '"$0" -c "$1"; :', sys.executable, PRIORITIES]
    out = subprocess.run(
        argv, capture_output=True, text=True, check=True, start_new_session=own_session
    ).stdout.split()
    has_autogroups = autogroup_nice("self") is not None
    if own_session:
        assert int(out[0]) == EXITING_NICE
        if has_autogroups:
            assert int(out[1]) == EXITING_NICE
    else:
        assert int(out[0]) == ours
        if has_autogroups:
            assert int(out[1]) != EXITING_NICE
