"""A lab host's devagentd: finding its program, starting it, asking its health and waiting
until it answers as the host it should be.

The :class:`~devagent.lab.lab.Lab` decides which host runs which daemon and records the
pids; this module only deals with one daemon process at a time.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec

from devagent.errors import EnvironmentProblem, PeerError, StateError
from devagent.lab.layout import LabHost, run_in_host
from devagent.wait import wait_until_blocking

HEALTH_TIMEOUT_S = 30.0
HEALTH_PROBE_TIMEOUT_S = 1.0
HEALTH_RETRY_S = 0.1
LOG_TAIL_LINES = 15


def daemon_binary() -> Path:
    """The devagentd console script installed beside the running interpreter."""
    path = Path(sys.executable).parent / "devagentd"
    if not os.access(path, os.X_OK):
        raise EnvironmentProblem(f"devagentd not found at {path}: install devagent (make venv)")
    return path


def log_file(host: LabHost) -> Path:
    return host.dir / "devagentd.log"


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def start(binary: Path, host: LabHost, args: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start ``host``'s devagentd (in its namespace, its own session, logging to its folder)
    with ``--host-name``, ``--listen`` and ``--dir`` for that host, then ``args``."""
    argv = run_in_host(
        host,
        [
            *(str(binary), "--host-name", host.name),
            *("--listen", f"{host.address}:{host.port}", "--dir", str(host.dir)),
            *args,
        ],
    )
    with open(log_file(host), "ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=host.dir,
            start_new_session=True,
        )


class Health(msgspec.Struct):
    """What the lab reads of a daemon's ``GET /v1/health``: which host answered."""

    host: str | None = None


def health(
    host: LabHost, token: str, timeout: float = 5.0, context: ssl.SSLContext | None = None
) -> Health:
    """``GET /v1/health`` of ``host``'s daemon, with the lab's token; over HTTPS with the
    operator's certificate (``context``), the daemon presenting host ``host``'s (checked by
    name: the hosts of a loopback lab share one address)."""
    conn = http.client.HTTPConnection(host.address, host.port, timeout=timeout)
    try:
        if host.tls:
            if context is None:
                raise StateError(f"host {host.name} speaks HTTPS: give the operator's certificate")
            sock = socket.create_connection((host.address, host.port), timeout=timeout)
            conn.sock = context.wrap_socket(sock, server_hostname=host.name)
        conn.request("GET", "/v1/health", headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        raw = response.read()
    except OSError as err:  # ssl.SSLError and socket errors are OSErrors
        raise PeerError(f"host {host.name}: {host.url}/v1/health failed: {err}") from err
    finally:
        conn.close()
    if response.status != 200:
        raise PeerError(f"host {host.name}: {host.url}/v1/health answered {response.status}")
    try:
        return msgspec.json.decode(raw, type=Health)
    except msgspec.DecodeError as err:
        raise PeerError(f"host {host.name}: /v1/health answered {raw[:200]!r}: {err}") from None


def wait_answering(
    proc: subprocess.Popen[bytes],
    host: LabHost,
    token: str,
    lab: str,
    timeout: float,
    context: ssl.SSLContext | None = None,
) -> None:
    """Until ``host``'s devagentd (``proc``) answers ``/v1/health`` as that host; raises at
    once if it exits or another daemon answers, and after ``timeout`` with its log's tail."""
    logfile = log_file(host)

    def answering() -> bool:
        if proc.poll() is not None:
            raise PeerError(
                f"devagentd of host {host.name} (lab {lab}) exited with status "
                f"{proc.returncode} before answering; last lines of {logfile}:\n" + tail(logfile)
            )
        try:
            answer = health(host, token, timeout=HEALTH_PROBE_TIMEOUT_S, context=context)
        except PeerError:
            return False
        if answer.host != host.name:
            raise PeerError(
                f"{host.url} answered as host {answer.host!r}, not {host.name!r}: "
                "another daemon holds that address"
            )
        return True

    wait_until_blocking(
        answering,
        timeout=timeout,
        what=f"devagentd of host {host.name} (lab {lab}) answering {host.url}/v1/health",
        interval=HEALTH_RETRY_S,
        detail=lambda: f"last lines of {logfile}:\n" + tail(logfile),
    )
