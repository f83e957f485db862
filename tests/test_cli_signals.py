"""A command stopped by SIGTERM or SIGHUP still cleans up (its ``finally`` runs: a bench's or
a demo's lab is removed) and exits 143, like one stopped with Ctrl-C."""

from __future__ import annotations

import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import asyncio, sys
from pathlib import Path
from devagent.cli.common import run

async def work() -> None:
    print("started", flush=True)
    try:
        await asyncio.sleep(60)
    finally:
        await asyncio.sleep(0.1)  # clean-up that itself awaits
        Path(sys.argv[1], "cleaned").touch()

run(work())
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_the_command_after_its_clean_up(tmp_path: Path, signum: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    # The command says when its work began: an event on its stdout, not a file to poll.
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    assert ready, "the command never started its work"
    assert proc.stdout.readline() == b"started\n"
    proc.send_signal(signum)
    proc.send_signal(signum)  # a second one does not cut the clean-up short
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 143, stderr
    assert (tmp_path / "cleaned").exists()
    assert b"terminated" in stderr
