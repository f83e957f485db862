"""One QEMU process and the QMP session that drives it.

A :class:`Vm` owns a QEMU process started in its own session (so a daemon restart never
touches it), its QMP socket, and its serial console socket. Its lifecycle is one state enum,
:class:`VmState`, moved only through :meth:`Vm._move`, which checks the transition table
``_TRANSITIONS``; every public operation first states the states it accepts with
:meth:`Vm.require`.

Everything the guest prints on its console is handed, with the host's wall-clock time of
arrival, to the ``on_console`` callback; ``console.log`` in the run folder keeps a copy
(QEMU's own chardev logfile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from qemu.qmp import ConnectError, EventListener, QMPClient, QMPError

from devagent.errors import PeerError, StateError
from devagent.process import alive, wait_exit
from devagent.qemu.answers import Event, MigrationInfo, StatusInfo, answer, event_of
from devagent.qemu.config import VmConfig
from devagent.wait import WaitTimeout, wait_until

log = logging.getLogger(__name__)

ConsoleSink = Callable[[bytes, float], None]

QEMU_BINARY = "qemu-system-x86_64"
LAUNCH_TIMEOUT_S = 20.0
QUIT_TIMEOUT_S = 10.0
#: QEMU listens on its QMP socket a moment after it creates it; a look costs a stat (and a
#: refused connect), and a migration's destination waits for it.
CONNECT_RETRY_S = 0.005

T = TypeVar("T")


class VmState(Enum):
    NEW = "new"
    LAUNCHING = "launching"
    INCOMING = "incoming"  # waiting for a live migration to arrive
    RUNNING = "running"
    PAUSED = "paused"
    MIGRATED = "migrated"  # migrated away: the guest now lives elsewhere, this copy is inert
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


_TRANSITIONS: dict[VmState, frozenset[VmState]] = {
    VmState.NEW: frozenset({VmState.LAUNCHING, VmState.STOPPED}),
    # (MIGRATED: a QEMU adopted after a daemon restart, whose outgoing migration completed
    # while no daemon watched)
    VmState.LAUNCHING: frozenset(
        {
            VmState.RUNNING,
            VmState.PAUSED,
            VmState.INCOMING,
            VmState.MIGRATED,
            VmState.FAILED,
            VmState.STOPPING,
        }
    ),
    VmState.INCOMING: frozenset(
        {VmState.RUNNING, VmState.PAUSED, VmState.FAILED, VmState.STOPPING}
    ),
    VmState.RUNNING: frozenset(
        {VmState.PAUSED, VmState.MIGRATED, VmState.STOPPING, VmState.FAILED}
    ),
    VmState.PAUSED: frozenset(
        {VmState.RUNNING, VmState.MIGRATED, VmState.STOPPING, VmState.FAILED}
    ),
    VmState.MIGRATED: frozenset({VmState.RUNNING, VmState.STOPPING, VmState.FAILED}),
    VmState.STOPPING: frozenset({VmState.STOPPED, VmState.FAILED}),
    VmState.STOPPED: frozenset(),
    VmState.FAILED: frozenset({VmState.STOPPING, VmState.STOPPED}),
}

# QEMU's run states (query-status) mapped onto ours.
_QEMU_STATUS: dict[str, VmState] = {
    "running": VmState.RUNNING,
    "paused": VmState.PAUSED,
    "prelaunch": VmState.PAUSED,
    "finish-migrate": VmState.PAUSED,
    "inmigrate": VmState.INCOMING,
    "postmigrate": VmState.MIGRATED,
    "suspended": VmState.PAUSED,
    "shutdown": VmState.STOPPING,
    "internal-error": VmState.FAILED,
    "io-error": VmState.PAUSED,
    "guest-panicked": VmState.FAILED,
}


class Vm:
    """A QEMU process with its QMP session and console."""

    def __init__(self, config: VmConfig, run_dir: Path, on_console: ConsoleSink | None = None):
        self.config = config
        self.run_dir = run_dir
        self.on_console = on_console
        self.state = VmState.NEW
        self.pid: int | None = None
        self.started_at: float | None = None
        # When the guest last began to run: QEMU's time stamp on its RESUME event (this
        # host's clock when the event had none, or a query found it running).
        self.resumed_at: float | None = None
        self.log = logging.getLogger(f"{__name__}.{config.name}")
        self._proc: asyncio.subprocess.Process | None = None
        self._qmp: QMPClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._console_writer: asyncio.StreamWriter | None = None
        self._exited = asyncio.Event()

    # --- paths -----------------------------------------------------------------------
    @property
    def qmp_path(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console_path(self) -> Path:
        return self.run_dir / "console.sock"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.run_dir / "qemu.log"

    @property
    def pid_path(self) -> Path:
        return self.run_dir / "qemu.pid"

    # --- state -----------------------------------------------------------------------
    def require(self, *states: VmState) -> None:
        if self.state not in states:
            wanted = ", ".join(s.value for s in states)
            raise StateError(f"VM {self.config.name} is {self.state.value}, needs {wanted}")

    def _move(self, new: VmState, at: float | None = None) -> None:
        """To state ``new``; ``at``: when QEMU said so (its event's timestamp)."""
        if new == self.state:
            return
        if new not in _TRANSITIONS[self.state]:
            raise StateError(
                f"VM {self.config.name}: no transition {self.state.value} -> {new.value}"
            )
        self.log.debug("state %s -> %s", self.state.value, new.value)
        self.state = new
        if new is VmState.RUNNING:
            self.resumed_at = at or time.time()

    # --- launch ----------------------------------------------------------------------
    def argv(self) -> list[str]:
        return [
            QEMU_BINARY,
            *self.config.qemu_args(),
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-chardev",
            f"socket,id=console0,path={self.console_path},server=on,wait=off,"
            f"logfile={self.console_log},logappend=on",
            "-serial",
            "chardev:console0",
            "-pidfile",
            str(self.pid_path),
        ]

    async def launch(self) -> None:
        """Start QEMU and connect to it; returns once QMP answers."""
        self.require(VmState.NEW)
        self._move(VmState.LAUNCHING)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.qmp_path, self.console_path):
            path.unlink(missing_ok=True)
        argv = self.argv()
        self.log.info("launching: %s", " ".join(argv))
        try:
            with self.qemu_log.open("ab") as qemu_log:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=qemu_log,
                    stderr=qemu_log,
                    start_new_session=True,
                )
        except OSError as err:
            self._move(VmState.FAILED)
            raise PeerError(f"VM {self.config.name}: cannot run {QEMU_BINARY}: {err}") from err
        self.pid = self._proc.pid
        self.started_at = time.time()
        self._tasks.append(asyncio.create_task(self._watch_exit(), name=f"{self.config.name}-exit"))
        try:
            await self._connect(LAUNCH_TIMEOUT_S)
        except BaseException:
            await self.kill()
            raise

    async def adopt(self, pid: int) -> None:
        """Take over a QEMU already running (after a daemon restart)."""
        self.require(VmState.NEW)
        self._move(VmState.LAUNCHING)
        self.pid = pid
        self._tasks.append(
            asyncio.create_task(self._watch_adopted_exit(), name=f"{self.config.name}-exit")
        )
        await self._connect(5.0)

    def gone(self, pid: int) -> None:
        """A QEMU that exited while no daemon watched it (found dead on a restart): nothing
        to talk to or stop, and :attr:`exited` says so. For a VM kept for what still
        depends on it (its agents serving a migration's destination)."""
        self.require(VmState.NEW)
        self.pid = pid
        self._move(VmState.STOPPED)
        self._exited.set()

    async def _connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        qmp = await wait_until(
            lambda: self._try_qmp(deadline),
            timeout=timeout,
            what=f"VM {self.config.name}: QMP answering on {self.qmp_path}",
            interval=CONNECT_RETRY_S,
        )
        self._qmp = qmp
        self._tasks.append(
            asyncio.create_task(self._watch_events(qmp), name=f"{self.config.name}-qmp")
        )
        # Read always, a guest without a probe too: a serial console nobody reads stalls
        # the guest's writes to it (a user's guest that prints, ioprobe under it).
        await self._connect_console()
        await self.refresh_state()

    async def _try_qmp(self, deadline: float) -> QMPClient | None:
        """One attempt at QMP: the session, or None while QEMU is not listening yet."""
        if self._exited.is_set():
            raise PeerError(f"VM {self.config.name}: QEMU exited at launch: {self.log_tail()}")
        if not self.qmp_path.exists():
            return None
        qmp = QMPClient(self.config.name)
        try:
            await asyncio.wait_for(
                qmp.connect(str(self.qmp_path)), max(0.5, deadline - time.monotonic())
            )
        except ConnectError as err:
            # The socket file appears at bind(), a moment before QEMU listens on it.
            if isinstance(err.exc, ConnectionRefusedError) and not self._exited.is_set():
                return None
            await self._connect_failed(err)
        except (QMPError, OSError, TimeoutError) as err:
            await self._connect_failed(err)
        return qmp

    async def refresh_state(self) -> VmState:
        """The state as QEMU has it now (``query-status``), without waiting for its event."""
        status = await self.query("query-status", StatusInfo)
        self._move(_QEMU_STATUS.get(status.status, VmState.PAUSED))
        return self.state

    async def _connect_failed(self, err: BaseException) -> NoReturn:
        if await self.wait_exit(1.0):
            raise PeerError(
                f"VM {self.config.name}: QEMU exited at launch: {self.log_tail()}"
            ) from err
        raise PeerError(f"VM {self.config.name}: QMP connect failed: {err}") from err

    async def _connect_console(self) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.console_path))
        except OSError as err:
            raise PeerError(f"VM {self.config.name}: console connect failed: {err}") from err
        self._console_writer = writer
        self._tasks.append(
            asyncio.create_task(self._read_console(reader), name=f"{self.config.name}-console")
        )

    async def _read_console(self, reader: asyncio.StreamReader) -> None:
        """Hand what the guest prints to ``on_console``; without one, only ``console.log``
        keeps it."""
        sink = self.on_console
        while data := await reader.read(65536):
            if sink is not None:
                sink(data, time.time())

    async def send_console(self, text: str) -> None:
        """Type ``text`` on the guest's serial console."""
        if self._console_writer is None:
            raise StateError(f"VM {self.config.name}: console not connected")
        self._console_writer.write(text.encode())
        await self._console_writer.drain()

    async def _watch_events(self, qmp: QMPClient) -> None:
        with qmp.listener() as listener:
            async for raw in listener:
                try:
                    event = event_of(raw)
                except PeerError as err:  # one odd event does not end the watch
                    self.log.warning("%s", err)
                    continue
                self._on_event(event)

    def _on_event(self, event: Event) -> None:
        self.log.debug("event %s", event)
        name = event.event
        if name == "RESUME" and self.state in (VmState.PAUSED, VmState.INCOMING, VmState.MIGRATED):
            # When QEMU ran the guest, by its clock (this host's wall clock), not when this
            # process got round to the event: the same clock as the source's STOP.
            self._move(VmState.RUNNING, event.at())
        elif name == "STOP" and self.state is VmState.RUNNING:
            self._move(VmState.PAUSED)
        elif name == "SHUTDOWN" and self.state not in (VmState.STOPPING, VmState.STOPPED):
            self._move(VmState.STOPPING)

    async def _watch_exit(self) -> None:
        assert self._proc is not None
        code = await self._proc.wait()
        self._on_exit(code)

    async def _watch_adopted_exit(self) -> None:
        """The exit of a QEMU that is not our child: its pidfd says when (no status)."""
        assert self.pid is not None
        await wait_exit(self.pid, None, f"QEMU of VM {self.config.name}")
        self._on_exit(None)

    def _on_exit(self, code: int | None) -> None:
        self._exited.set()
        if self.state is VmState.STOPPING:
            self._move(VmState.STOPPED)
        elif self.state is not VmState.STOPPED:
            self.log.warning("QEMU exited unexpectedly (code %s): %s", code, self.log_tail())
            self.state = VmState.FAILED

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.qemu_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no qemu.log)"
        return " | ".join(text[-lines:]) or "(qemu.log empty)"

    # --- operation -------------------------------------------------------------------
    async def qmp(self, command: str, **arguments: Any) -> Any:
        """Run one QMP command; errors become :class:`PeerError` naming the VM."""
        if self._qmp is None:
            raise StateError(f"VM {self.config.name}: no QMP session ({self.state.value})")
        try:
            return await self._qmp.execute(command, arguments or None)
        except QMPError as err:
            raise PeerError(f"VM {self.config.name}: QMP {command} failed: {err}") from err

    async def query(self, command: str, into: type[T], **arguments: Any) -> T:
        """Run one QMP command whose answer devagent reads: the answer as an ``into``
        (:mod:`devagent.qemu.answers`)."""
        raw = await self.qmp(command, **arguments)
        return answer(raw, into, what=f"VM {self.config.name}: QMP {command}")

    async def migration_outcome(self, timeout: float = 2.0) -> MigrationInfo:
        """``query-migrate`` of a completed outgoing migration, once QEMU has done its
        bookkeeping. QEMU says ``completed`` (event and ``query-migrate``) before it works
        out ``downtime`` and ``total-time`` and moves the guest to ``postmigrate``; read too
        soon, the downtime is 0. This waits for ``postmigrate`` (``timeout`` at most)."""

        async def settled() -> bool:  # no QMP event marks finish-migrate -> postmigrate
            status = await self.query("query-status", StatusInfo)
            return status.status != "finish-migrate"

        with contextlib.suppress(WaitTimeout):
            await wait_until(
                settled,
                timeout=timeout,
                what=f"VM {self.config.name}: postmigrate after the migration",
                interval=0.005,
            )
        return await self.query("query-migrate", MigrationInfo)

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[EventListener]:
        """QMP events of these names (all if none), queued from now until the block ends."""
        if self._qmp is None:
            raise StateError(f"VM {self.config.name}: no QMP session ({self.state.value})")
        with self._qmp.listener(names or None) as listener:
            yield listener

    async def wait_exit(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    async def stop(self, timeout: float = QUIT_TIMEOUT_S) -> None:
        """Quit QEMU (QMP ``quit``), killing it if it does not go in ``timeout`` seconds."""
        if self.state in (VmState.STOPPED, VmState.NEW):
            self._move(VmState.STOPPED)
            await self._close()
            return
        if self.state is not VmState.STOPPING:
            self._move(VmState.STOPPING)
        if not self.exited and self._qmp is not None:
            with contextlib.suppress(PeerError, StateError, OSError, TimeoutError):
                await asyncio.wait_for(self.qmp("quit"), 2.0)
        if not await self.wait_exit(timeout):
            self.log.warning("QEMU did not quit in %.0f s; killing it", timeout)
            await self.kill()
        await self._close()

    async def kill(self) -> None:
        """SIGKILL QEMU (the source's inert instance after a migration, a fence that
        failed, a launch given up): asked for, so its exit is no surprise (not logged as
        one)."""
        if self.pid is not None and not self.exited:
            if VmState.STOPPING in _TRANSITIONS[self.state]:
                self._move(VmState.STOPPING)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            await self.wait_exit(5.0)
        if self.state not in (VmState.STOPPED, VmState.FAILED):
            self.state = VmState.STOPPED
        await self._close()

    async def _close(self) -> None:
        if self._console_writer is not None:
            self._console_writer.close()
            self._console_writer = None
        if self._qmp is not None:
            # QEMU gone first means the session ends in EOF: expected, as in QEMU's machine.py
            with contextlib.suppress(QMPError, OSError, EOFError):
                await self._qmp.disconnect()
            self._qmp = None
        for task in self._tasks:
            if not task.done():
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for path in (self.qmp_path, self.console_path, self.pid_path):
            path.unlink(missing_ok=True)


#: The one liveness test (:func:`devagent.process.alive`: a zombie is dead), under the name
#: the daemon imports it by.
pid_alive = alive

__all__ = ["Vm", "VmState", "pid_alive"]
