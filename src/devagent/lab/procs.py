"""Finding and stopping the processes that belong to a lab, and only those.

A process belongs to a lab when one of these holds:

* it runs in one of the lab's network namespaces (``ip netns pids``);
* its working directory, or one of its command-line arguments, is a path under the lab folder
  (daemons get ``--dir <labdir>/hosts/<h>``; QEMU and agents get sockets and images there);
* it is in the session of one of the lab's daemons (they start with ``start_new_session``),
  counted only while that pid is provably the daemon or gone — Linux keeps a pid number
  allocated while any process still uses it as a session id, so the session cannot be a
  stranger's.

This process and its ancestors are never counted, whatever their cwd.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Iterable
from pathlib import Path

from devagent.process import alive as process_alive
from devagent.process import reap, stat_fields, wait_all_exit

PROC = Path("/proc")


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (:func:`devagent.process.alive`); a
    zombie that is our child is reaped on the way: the lab owns the processes it sweeps."""
    if process_alive(pid):
        return True
    reap(pid)
    return False


def cmdline(pid: int) -> list[str]:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _cwd(pid: int) -> str | None:
    try:
        return os.readlink(PROC / str(pid) / "cwd")
    except OSError:
        return None


def _all_pids() -> list[int]:
    return [int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit()]


def _protected() -> set[int]:
    """This process and its ancestors: never ours to kill."""
    pids = {os.getpid()}
    pid = os.getpid()
    while pid > 1:
        fields = stat_fields(pid)
        if fields is None:
            break
        pid = int(fields[1])
        pids.add(pid)
    return pids


def _mentions(text: str, root: str) -> bool:
    pattern = re.escape(root) + r"(?=$|[/,:;\s\"'])"
    return re.search(pattern, text) is not None


def uses_path(pid: int, root: Path) -> bool:
    """Whether ``pid``'s cwd or one of its arguments is ``root`` or a path under it."""
    top = str(root)
    cwd = _cwd(pid)
    if cwd is not None and _mentions(cwd, top):
        return True
    return any(_mentions(arg, top) for arg in cmdline(pid))


def under_path(root: Path) -> set[int]:
    return {pid for pid in _all_pids() if uses_path(pid, root)} - _protected()


def session_of(leaders: Iterable[int], root: Path) -> set[int]:
    """Members of the sessions led by ``leaders`` — those leaders that are ours (their
    cmdline names ``root``) or gone."""
    sids = {sid for sid in leaders if not alive(sid) or uses_path(sid, root)}
    if not sids:
        return set()
    found: set[int] = set()
    for pid in _all_pids():
        fields = stat_fields(pid)
        if fields is not None and int(fields[3]) in sids:
            found.add(pid)
    return found - _protected()


def terminate(pids: Iterable[int], grace_s: float = 5.0, kill_wait_s: float = 3.0) -> set[int]:
    """SIGTERM every pid, wait up to ``grace_s``, SIGKILL the rest, wait up to ``kill_wait_s``
    (waits on their pidfds: an exit is an event, not a poll).

    Returns the pids still alive after all that (a process stuck in the kernel).
    """
    left = {pid for pid in pids if pid not in _protected()}
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        left = wait_all_exit(left, wait_s)
        if not left:
            break
    return left
