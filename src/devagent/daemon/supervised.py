"""What the daemon does alike for every helper process it supervises: a block agent
(:mod:`devagent.daemon.agents`) or a net agent (:mod:`devagent.daemon.nics`).

Each runs in its own session (a daemon restart never touches it), logs to a file in its
VM's run folder, and is reached only through the HTTP control API on its unix socket.
:class:`Supervised` starts it and waits until that socket answers, calls it, stops it
politely and kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec

from devagent.daemon import standby
from devagent.errors import DevagentError, PeerError, StateError
from devagent.qemu.vm import pid_alive
from devagent.tls import process_tls

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0
#: How often a starting process is looked at: a stat of its sockets (a migration's
#: destination waits for its agents, a standby one is up in about 10 ms).
START_LOOK_S = 0.005
STOP_TIMEOUT_S = 10.0
KILL_TIMEOUT_S = 2.0
#: How long a status the API shows waits for an agent's answer.
STATUS_TIMEOUT_S = 1.0

T = TypeVar("T")
Param = str | int | float


class ErrorAnswer(msgspec.Struct):
    """What every agent answers with a 4xx or 5xx status (:mod:`devagent.control_api`)."""

    error: str = "(no message)"


class Supervised:
    """A mixin for a dataclass with ``vm``, ``node``, ``run_dir`` and ``pid`` fields."""

    vm: str
    node: str
    run_dir: str
    pid: int | None
    kind = "agent"  # how messages name it: "agent", "net agent"
    bad_request: type[DevagentError] = PeerError  # what its 400 answers become

    # --- what each kind says ----------------------------------------------------------
    def argv(self) -> list[str]:
        raise NotImplementedError

    @staticmethod
    def tls_args() -> list[str]:
        """The daemon's certificate and admitted peers, for an agent it starts (none on an
        ``--insecure`` daemon): its TCP links to peers are TLS, as the daemon's are."""
        tls = process_tls()
        if tls is None:
            return []
        peers = [arg for peer in sorted(tls.peers) for arg in ("--tls-peer", peer)]
        return ["--tls-dir", str(tls.folder), *peers]

    def title(self) -> str:
        return f"{self.kind} for VM {self.vm} device {self.node}"

    def sockets(self) -> tuple[Path, ...]:
        """Its sockets: gone before it starts and once it is killed; it is up once they
        all exist and the control socket answers."""
        return (self.control_socket,)

    async def check_started(self) -> None:
        """Ask its first ``GET /status`` (it answers: it is up) and keep what it needs."""
        await self.call("GET", "/status")

    # --- the same for all --------------------------------------------------------------
    @property
    def control_socket(self) -> Path:
        return Path(self.run_dir) / f"{self.node}.ctl"

    @property
    def log_file(self) -> Path:
        return Path(self.run_dir) / f"agent-{self.node}.log"

    @property
    def alive(self) -> bool:
        return self.pid is not None and pid_alive(self.pid)

    def tail(self, lines: int = 5) -> str:
        try:
            text = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    async def start(self, listening: asyncio.Event | None = None) -> None:
        """Start the process; return once its control socket answers. ``listening`` is set
        as soon as its first socket exists (an agent's NBD socket, which listens before the
        agent serves: its client may connect from then on)."""
        for path in self.sockets():
            path.unlink(missing_ok=True)
        argv = self.argv()
        pool = standby.pool()
        ahead = pool.take() if pool is not None and argv[1:3] == ["-m", standby.MODULE] else None
        if ahead is not None:  # started ahead, its imports done (:mod:`.standby`)
            proc = ahead
            await standby.become(proc, argv[3:], self.run_dir, self.log_file)
        else:
            with self.log_file.open("ab") as out:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                    cwd=self.run_dir,
                )
        self.pid = proc.pid
        try:
            await self._wait_answering(proc, listening)
        except PeerError:
            await self.kill()
            raise
        asyncio.get_running_loop().create_task(proc.wait())  # reaped when it exits
        log.info("%s: pid %d", self.title(), self.pid)

    async def _wait_answering(
        self, proc: asyncio.subprocess.Process, listening: asyncio.Event | None
    ) -> None:
        """Until its sockets exist and its control socket answers (nothing signals a
        socket's creation: look every :data:`START_LOOK_S`), for :data:`START_TIMEOUT_S`
        at most."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.returncode is not None or not pid_alive(proc.pid):
                raise PeerError(f"{self.title()} exited at start: {self.tail()}")
            if listening is not None and self.sockets()[0].exists():
                listening.set()
            if all(path.exists() for path in self.sockets()):
                with contextlib.suppress(PeerError):
                    await self.check_started()
                    return
            await asyncio.sleep(START_LOOK_S)
        raise PeerError(
            f"{self.title()} did not answer on {self.control_socket} within "
            f"{START_TIMEOUT_S:g} s: {self.tail()}"
        )

    async def ask(
        self,
        method: str,
        path: str,
        body: msgspec.Struct | None = None,
        *,
        into: type[T],
        timeout: float = 60.0,
        **params: Param,
    ) -> T:
        """One request on the control socket, its answer decoded as an ``into`` (one of
        :mod:`devagent.agent.messages`); an answer that is not one is a :class:`PeerError`
        naming the field, like any other failure (a wrong state :class:`StateError`, a bad
        request ``bad_request``)."""
        raw = await self._exchange(method, path, _encoded(body), timeout, params)
        try:
            return msgspec.json.decode(raw, type=into)
        except msgspec.DecodeError as err:
            raise PeerError(f"{self._who()}: bad answer to {method} {path}: {err}") from None

    async def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        timeout: float = 60.0,
        **params: Param,
    ) -> Any:
        """:meth:`ask`'s untyped form: ``body`` any JSON value, the answer parsed JSON,
        which the caller decodes into its type at once (the NICs' steps, the exchange's
        cutover); a disk agent has a method per route for the others
        (:class:`devagent.daemon.agents.AgentProcess`)."""
        raw = await self._exchange(method, path, _encoded(body), timeout, params)
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError as err:
            raise PeerError(f"{self._who()}: bad answer to {method} {path}: {err}") from None

    def _who(self) -> str:
        return f"{self.kind} {self.vm}/{self.node}"

    async def _exchange(
        self,
        method: str,
        path: str,
        body: bytes | None,
        timeout: float,
        params: dict[str, Param],
    ) -> bytes:
        """The raw answer of a 2xx; failures become :class:`PeerError` (a wrong state
        :class:`StateError`, a bad request ``bad_request``)."""
        connector = aiohttp.UnixConnector(path=str(self.control_socket))
        limit = aiohttp.ClientTimeout(total=timeout)
        headers = {"Content-Type": "application/json"} if body is not None else None
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=limit) as session,
                session.request(
                    method, f"http://agent{path}", params=params or None, data=body,
                    headers=headers,
                ) as resp,
            ):  # fmt: skip
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as err:
            raise PeerError(f"{self._who()} unreachable: {err!r}") from err
        if status < 400:
            return raw
        try:
            message = f"{self._who()}: {msgspec.json.decode(raw, type=ErrorAnswer).error}"
        except msgspec.DecodeError:
            message = f"{self._who()}: status {status}: {raw[:200]!r}"
        if status == 409:
            raise StateError(message)
        raise (self.bad_request if status == 400 else PeerError)(message)

    async def quick_status(self, timeout: float = STATUS_TIMEOUT_S) -> Any:
        """Its ``GET /status`` answer (parsed JSON) for a status the API shows as it is:
        ``TimeoutError`` when it gives none in ``timeout`` seconds (a status never waits on
        a silent agent)."""
        async with asyncio.timeout(timeout):
            return await self.call("GET", "/status", timeout=timeout + 1.0)

    async def stop(self) -> None:
        """Ask it to stop (it answers or fails what it still has), kill it if it lingers."""
        if self.pid is not None and self.alive:
            with contextlib.suppress(PeerError, StateError):
                await self.call("POST", "/stop")
            if not await wait_exit(self.pid, STOP_TIMEOUT_S):
                log.warning("%s did not stop in %g s: killing it", self.title(), STOP_TIMEOUT_S)
        await self.kill()

    async def kill(self) -> None:
        if self.pid is not None and pid_alive(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            if not await wait_exit(self.pid, KILL_TIMEOUT_S):
                log.error("%s (pid %d) still there %g s after SIGKILL", self.title(),
                          self.pid, KILL_TIMEOUT_S)  # fmt: skip
        for path in self.sockets():
            path.unlink(missing_ok=True)


def _encoded(body: object) -> bytes | None:
    return None if body is None else msgspec.json.encode(body)


async def wait_exit(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` exits within ``timeout`` seconds. Its pidfd becomes readable
    when it does: an event, not a poll."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, on_exit)
    try:
        await asyncio.wait_for(exited, timeout)
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return True


async def until_listening(
    starting: Sequence[asyncio.Future[None]], listening: Sequence[asyncio.Event]
) -> None:
    """Until each process :meth:`Supervised.start` starts listens (its ``listening`` set);
    one whose start failed before: its failure raised."""
    for start, listens in zip(starting, listening, strict=True):
        heard: asyncio.Future[Any] = asyncio.ensure_future(listens.wait())
        try:
            await asyncio.wait([start, heard], return_when=asyncio.FIRST_COMPLETED)
        finally:
            heard.cancel()
        if start.done():
            start.result()
