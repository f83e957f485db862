"""Running one agent in the foreground (``devagent agent serve``, ``devagent agent net``):
its logging, and its lifetime until SIGINT or SIGTERM. Lean on purpose: the daemon starts
agents through these commands' modules, and each import costs start time."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import click

from devagent.errors import DevagentError


def log_to_stderr(quiet: bool, who: str) -> None:
    """INFO (WARNING if ``quiet``) log lines that start with ``who``."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format=f"%(asctime)s %(levelname)s {who} %(name)s: %(message)s",
    )


def serve_until_signalled(serve: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run ``serve(stop)`` until it returns; SIGINT or SIGTERM sets ``stop``. A devagent
    error ends the command with its message."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(stop)

    try:
        asyncio.run(main())
    except DevagentError as err:
        raise click.ClickException(str(err)) from err
    click.echo("stopped")
