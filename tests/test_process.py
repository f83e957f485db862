"""One liveness answer (a zombie is dead, and alive() does not reap it) and a process's exit
as an event (pidfd), for a child and for a process that is not ours."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys

import pytest

from devagent import process
from devagent.qemu.vm import pid_alive
from devagent.wait import WaitTimeout


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_running_process_is_alive_and_a_missing_one_is_not() -> None:
    assert process.alive(os.getpid())
    child = sleeper()
    child.kill()
    child.wait()
    assert not process.alive(child.pid)


def test_a_zombie_is_dead_and_left_for_its_parent_to_reap() -> None:
    child = sleeper()
    os.kill(child.pid, signal.SIGKILL)
    assert process.wait_all_exit([child.pid], 5) == set()  # reaps it…
    assert child.wait(timeout=5) in (-signal.SIGKILL, 0)  # …and Popen copes (ECHILD)

    other = sleeper()
    os.kill(other.pid, signal.SIGKILL)
    fd = os.pidfd_open(other.pid)
    try:
        assert select.select([fd], [], [], 5)[0]  # exited: a zombie until reaped
    finally:
        os.close(fd)
    assert not process.alive(other.pid)
    assert not pid_alive(other.pid)  # the qemu name is the same helper
    assert other.wait(timeout=5) == -signal.SIGKILL  # alive() left the status to Popen


def test_wait_all_exit_returns_those_that_outlive_the_timeout() -> None:
    child = sleeper()
    try:
        assert process.wait_all_exit([child.pid], 0.05) == {child.pid}
    finally:
        child.kill()
        child.wait()


async def test_wait_exit_is_an_event() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; sys.stdin.read()", stdin=subprocess.PIPE
    )
    with pytest.raises(WaitTimeout, match=r"the reader \(pid \d+\) to exit: not within 0.05 s"):
        await process.wait_exit(proc.pid, 0.05, "the reader")
    assert proc.stdin is not None
    proc.stdin.close()
    await process.wait_exit(proc.pid, 5, "the reader")
    assert await proc.wait() == 0  # the watcher still got the exit status
    await process.wait_exit(proc.pid, 5, "a process long gone")  # returns at once
