"""Agents started ahead: a few agent processes per daemon that have done their imports and
wait for the command line of the agent they are to become.

A new agent is a fresh Python process, and about a quarter of a second of its start is
importing what it runs (aiohttp alone is 0.1 s). A migration waits for the destination's
agents before RAM moves, so that time was on every migration's critical path. The daemon
keeps :data:`POOL_SIZE` standby processes (``python -m devagent.cli.agent_cmd standby``):
each imports the agent's modules at the lowest CPU priority (so making one steals little
from a migration under way), says ``ready`` on its stdout, and blocks on its stdin. A
standby has a session of its own, which the kernel makes an autogroup of its own where
autogroups are on (Debian's default), and CFS shares the CPU between autogroups before nice
counts inside one: so the standby's autogroup gets the lowest priority too
(``/proc/PID/autogroup``). With its plain ``nice`` alone, two standbys made at a
migration's start took 80 % of both cores for 0.35 s and stalled the guest. An agent
that starts takes one (:meth:`StandbyPool.take`): it is sent the agent's arguments, its
working folder and its log file as one JSON line, goes back to the priority it was started
with, and runs ``agent serve`` with them; the pool makes another in its place. With no
standby ready, the agent is started afresh, as before.

A standby whose daemon exits sees its stdin close and exits too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from devagent.process import set_autogroup_nice

log = logging.getLogger(__name__)

POOL_SIZE = 2  # a hybrid destination starts a disk's agent and its receiver at once
#: How a standby is started; an agent's own command line starts the same way.
MODULE = "devagent.cli.agent_cmd"
READY = b"ready\n"
READY_TIMEOUT_S = 30.0
STANDBY_NICE = 19  # the lowest priority, until it is taken


class StandbyPool:
    """The daemon's standby agents (see the module's description)."""

    def __init__(self, log_file: Path, size: int = POOL_SIZE) -> None:
        self.log_file = log_file
        self.size = size
        self._ready: list[asyncio.subprocess.Process] = []
        self._making: set[asyncio.Task[None]] = set()
        self._closed = False

    def fill(self) -> None:
        """Start standbys until the pool has its size (ready or on their way)."""
        while not self._closed and len(self._ready) + len(self._making) < self.size:
            task = asyncio.get_running_loop().create_task(self._make())
            self._making.add(task)
            task.add_done_callback(self._making.discard)

    async def _make(self) -> None:
        with self.log_file.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                "nice", "-n", str(STANDBY_NICE), sys.executable, "-m", MODULE, "standby",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=out,
                start_new_session=True, cwd="/",
            )  # fmt: skip
        set_autogroup_nice(proc.pid, STANDBY_NICE)
        assert proc.stdout is not None
        try:
            said = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S)
        except (TimeoutError, asyncio.CancelledError):
            await _end(proc)
            raise
        if said != READY:
            log.warning("a standby agent did not start (%r; see %s)", said, self.log_file)
            await _end(proc)
            return
        if self._closed:
            await _end(proc)
            return
        self._ready.append(proc)

    def take(self) -> asyncio.subprocess.Process | None:
        """A ready standby (another is made in its place), or None: start afresh."""
        while self._ready:
            proc = self._ready.pop(0)
            if proc.returncode is None:
                self.fill()
                return proc
        self.fill()
        return None

    async def close(self) -> None:
        """End every standby (their stdin closes: they exit)."""
        self._closed = True
        for task in list(self._making):
            task.cancel()
        await asyncio.gather(*self._making, return_exceptions=True)
        for proc in self._ready:
            await _end(proc)
        self._ready.clear()


async def become(proc: asyncio.subprocess.Process, argv: list[str], cwd: str, log_to: Path) -> None:
    """Make the standby ``proc`` the agent of ``argv`` (an agent's command line from its
    ``-m`` module on: ``serve ...``), working in ``cwd``, logging to ``log_to``."""
    assert proc.stdin is not None
    order = {"argv": argv, "cwd": cwd, "log": str(log_to),
             "nice": os.getpriority(os.PRIO_PROCESS, 0)}  # fmt: skip
    line = json.dumps(order).encode() + b"\n"
    proc.stdin.write(line)
    with contextlib.suppress(ConnectionError):
        await proc.stdin.drain()
    proc.stdin.close()


async def _end(proc: asyncio.subprocess.Process) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), 2.0)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


#: The daemon's pool (None in other processes: agents start afresh).
_pool: StandbyPool | None = None


def use_pool(pool: StandbyPool | None) -> None:
    global _pool
    _pool = pool


def pool() -> StandbyPool | None:
    return _pool
