"""Whether a process lives, and its exit as an event.

One answer for every layer (QEMU, agents, daemons, the lab's sweeps): a process is **alive**
while it exists and is not a zombie. A zombie has exited; only its exit status is left for
its parent to collect, and it will never do anything again, so waiting on it or killing it
is pointless. (``kill(pid, 0)`` succeeds on a zombie: that is why it is not the test.)

:func:`alive` never reaps: a child that ``asyncio.subprocess`` or ``subprocess.Popen``
watches must keep its exit status for them. :func:`reap` collects it explicitly, for the
callers that own the child and no watcher does (the lab's sweeps).

A process's exit is an event, not a poll: :func:`wait_exit` (async) and
:func:`wait_all_exit` (blocking) watch a pidfd (``os.pidfd_open``, Linux 5.3), which becomes
readable the moment the process exits, whether it is our child or not.

A session's CPU priority: where the kernel groups each session's processes (autogroups,
Debian's default), CFS shares the CPU between the groups first, and a process's nice only
counts inside its own; :func:`set_autogroup_nice` sets the group's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import time
from collections.abc import Iterable
from pathlib import Path

from devagent.wait import WaitTimeout, wait_until, wait_until_blocking

PROC = Path("/proc")


def stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name: [state, ppid, pgrp, session, …];
    None when the process does not exist (or /proc will not say)."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie. Never reaps (see the module doc)."""
    fields = stat_fields(pid)
    if fields is not None:
        return fields[0] not in ("Z", "X")
    try:  # no /proc entry we can read: a hidden /proc, or the process is gone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not (PROC / "self").exists()  # /proc works, so the pid is really gone


def reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our child and has exited; harmless otherwise."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _pidfd(pid: int) -> int | None:
    """A pidfd for ``pid``; None when the process is gone already."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


async def wait_exit(pid: int, timeout: float | None, what: str) -> None:
    """Return once process ``pid`` has exited (at once if it has already). ``timeout=None``
    waits as long as it lives (a watcher task, cancelled by its owner); past ``timeout``
    seconds, raises :class:`~devagent.wait.WaitTimeout` naming ``what``."""
    try:
        fd = _pidfd(pid)
    except OSError:  # no pidfd here (old kernel, seccomp): ask /proc instead
        await wait_until(lambda: not alive(pid), timeout=timeout or float("inf"), what=what)
        return
    if fd is None:
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    try:
        loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(exited, timeout)
        except TimeoutError:
            raise WaitTimeout(f"{what} (pid {pid}) to exit", timeout or 0.0) from None
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


def wait_all_exit(pids: Iterable[int], timeout: float) -> set[int]:
    """Block until every process of ``pids`` has exited or ``timeout`` seconds passed;
    returns those still alive. Each one that exited is reaped, in case it is our child."""
    deadline = time.monotonic() + timeout
    watched: dict[int, int] = {}  # pidfd -> pid
    unwatchable: set[int] = set()
    try:
        for pid in set(pids):
            try:
                fd = _pidfd(pid)
            except OSError:
                unwatchable.add(pid)
                continue
            if fd is not None:
                watched[fd] = pid
        poller = select.poll()
        for fd in watched:
            poller.register(fd, select.POLLIN)
        waiting = set(watched)
        while waiting and (remaining := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(remaining * 1000):
                poller.unregister(fd)
                waiting.discard(fd)
    finally:
        for fd in watched:
            os.close(fd)
    if unwatchable:  # no pidfd for them (old kernel, seccomp): ask /proc until the deadline
        with contextlib.suppress(WaitTimeout):
            wait_until_blocking(
                lambda: not any(alive(pid) for pid in unwatchable),
                timeout=max(0.0, deadline - time.monotonic()),
                what="processes to exit",
            )
    left = set()
    for pid in (*watched.values(), *unwatchable):
        if alive(pid):
            left.add(pid)
        else:
            reap(pid)
    return left


def set_autogroup_nice(pid: int | str, nice: int) -> None:
    """The CPU priority of the autogroup of ``pid`` (a session's; no-op where the kernel
    has none, or it may not be changed)."""
    with contextlib.suppress(OSError):
        (PROC / str(pid) / "autogroup").write_text(f"{nice}\n")


def autogroup_nice(pid: int | str) -> int | None:
    """The nice of the autogroup of ``pid`` (``/autogroup-42 nice 19``), None without one."""
    try:
        words = (PROC / str(pid) / "autogroup").read_text().split()
    except OSError:
        return None
    return int(words[-1]) if len(words) == 3 and words[1] == "nice" else None


__all__ = [
    "alive",
    "autogroup_nice",
    "reap",
    "set_autogroup_nice",
    "stat_fields",
    "wait_all_exit",
    "wait_exit",
]
