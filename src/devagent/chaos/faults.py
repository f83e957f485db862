"""The faults, done to a lab: a signal to a process of a host, a host's link cut, a host's
replica space filled up or turned read-only. Each fault starts, lasts its drawn while, and
ends (a killed daemon is started again, a stopped process continued, the link brought up,
the space freed), so that the run can see the system recover.

The replica space: each host's ``disks`` folder is its own small ext4 filesystem on a loop
device (:class:`ReplicaSpace`), mounted ``errors=remount-ro`` so that a filesystem error
turns it read-only, as a failing disk does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from devagent.chaos.draw import Action, RunPlan, Target
from devagent.errors import EnvironmentProblem
from devagent.lab.lab import Lab

log = logging.getLogger(__name__)

SPACE_SIZE = "3G"  # each host's replica space (sparse: it costs what is written)
FILLER = ".chaos-filler"
DAEMON_RESTART_S = 2.0


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise EnvironmentProblem(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


@dataclass
class ReplicaSpace:
    """One host's ``disks`` folder as its own ext4 filesystem."""

    mountpoint: Path
    image: Path
    device: str = ""

    def make(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        _run("truncate", "-s", SPACE_SIZE, str(self.image))
        _run("mkfs.ext4", "-q", "-F", "-m", "0", str(self.image))
        self.device = _run("losetup", "--find", "--show", str(self.image))
        _run("mount", "-o", "errors=remount-ro", self.device, str(self.mountpoint))

    def remove(self) -> None:
        if self.device:
            with contextlib.suppress(EnvironmentProblem):
                _run("umount", "--lazy", str(self.mountpoint))
            with contextlib.suppress(EnvironmentProblem):
                _run("losetup", "--detach", self.device)
            self.device = ""
        self.image.unlink(missing_ok=True)

    def fill(self) -> int:
        """Take every free byte; returns how many."""
        stat = os.statvfs(self.mountpoint)
        free = stat.f_bavail * stat.f_frsize
        taken = 0
        with open(self.mountpoint / FILLER, "ab") as filler:
            for piece in (free, 64 << 20, 1 << 20, 4096):  # metadata takes some of "free"
                while True:
                    try:
                        os.posix_fallocate(filler.fileno(), taken, piece)
                    except OSError:
                        break
                    taken += piece
        return taken

    def unfill(self) -> None:
        (self.mountpoint / FILLER).unlink(missing_ok=True)

    def break_readonly(self) -> None:
        """An ext4 error: the filesystem turns itself read-only (errors=remount-ro)."""
        name = Path(self.device).name
        Path(f"/sys/fs/ext4/{name}/trigger_fs_error").write_text("chaos: a failing disk\n")

    def writable_again(self) -> None:
        """Remount it read-write; an ext4 that went read-only on an error refuses: then it
        stays so until :meth:`replace` (as a failed disk stays failed until replaced)."""
        _run("mount", "-o", "remount,rw", str(self.mountpoint))

    def writable(self) -> bool:
        probe = self.mountpoint / ".chaos-probe"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError:
            return False
        return True

    def replace(self) -> None:
        """A new filesystem in place of this one (the old one goes once nothing uses it)."""
        self.remove()
        self.make()


@dataclass
class Injected:
    """A fault as it was done: when it began and ended (wall clock), on what, how."""

    fault: str
    at: float = 0.0
    ended_at: float | None = None
    pid: int | None = None
    detail: str = ""
    error: str | None = None  # the fault could not be done (its target was gone, say)
    events: list[str] = field(default_factory=list)


class Injector:
    """Does the faults of a chaos run on ``lab``."""

    def __init__(self, lab: Lab, spaces: dict[str, ReplicaSpace]) -> None:
        self.lab = lab
        self.spaces = spaces

    async def inject(
        self, plan: RunPlan, source: str, destination: str, pid: int | None
    ) -> Injected:
        """Start ``plan``'s fault now, let it last, end it. ``pid`` is the target process's
        (None for a fault of the lab, or when the target was not found)."""
        done = Injected(plan.fault, at=time.time(), pid=pid)
        try:
            await self._do(plan, source, destination, done)
        except (OSError, EnvironmentProblem) as err:
            done.error = str(err)
        done.ended_at = time.time()
        return done

    async def _do(self, plan: RunPlan, source: str, destination: str, done: Injected) -> None:
        action, target = plan.action, plan.target
        if action in (Action.KILL, Action.STOP):
            if done.pid is None:
                done.error = f"no {target} process to signal"
                return
            if target in (Target.SOURCE_DAEMON, Target.DESTINATION_DAEMON):
                host = destination if target is Target.DESTINATION_DAEMON else source
                await self._signal_daemon(action, done, host)
            else:
                await self._signal(action, done.pid, plan.duration_s, done)
        elif action is Action.LINK_DOWN:
            await asyncio.to_thread(self.lab.set_link, destination, False)
            done.detail = f"host {destination}'s link down for {plan.duration_s:g} s"
            try:
                await asyncio.sleep(plan.duration_s)
            finally:
                await asyncio.to_thread(self.lab.set_link, destination, True)
        else:
            await self._disk(action, self.spaces[destination], plan.duration_s, done)

    async def _signal(self, action: Action, pid: int, lasting: float, done: Injected) -> None:
        if action is Action.KILL:
            os.kill(pid, signal.SIGKILL)
            done.detail = f"SIGKILL pid {pid}"
            return
        os.kill(pid, signal.SIGSTOP)
        done.detail = f"SIGSTOP pid {pid} for {lasting:g} s"
        try:
            await asyncio.sleep(lasting)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    async def _signal_daemon(self, action: Action, done: Injected, name: str) -> None:
        assert done.pid is not None
        if action is Action.STOP:
            await self._signal(action, done.pid, 10.0, done)
            return
        os.kill(done.pid, signal.SIGKILL)
        await asyncio.sleep(DAEMON_RESTART_S)
        restarted = await asyncio.to_thread(self.lab.restart_daemon, name)
        done.detail = f"SIGKILL devagentd of {name} (pid {done.pid}), restarted as {restarted.pid}"

    async def _disk(
        self, action: Action, space: ReplicaSpace, lasting: float, done: Injected
    ) -> None:
        if action is Action.DISK_FULL:
            taken = await asyncio.to_thread(space.fill)
            done.detail = f"{space.mountpoint} filled ({taken >> 20} MiB) for {lasting:g} s"
            try:
                await asyncio.sleep(lasting)
            finally:
                space.unfill()
            return
        await asyncio.to_thread(space.break_readonly)
        done.detail = f"{space.mountpoint} read-only (an ext4 error), for {lasting:g} s at least"
        await asyncio.sleep(lasting)
        try:
            await asyncio.to_thread(space.writable_again)
        except EnvironmentProblem:
            done.detail += ": it stays read-only until the run's end, when it is replaced"
