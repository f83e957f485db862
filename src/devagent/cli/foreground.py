"""Running one agent in the foreground (``devagent agent serve``, ``devagent agent net``):
its logging, and its lifetime until SIGINT or SIGTERM. Lean on purpose: the daemon starts
agents through these commands' modules, and each import costs start time."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import click

from devagent.errors import DevagentError
from devagent.tls import Tls, process_tls, use_tls


def log_to_stderr(quiet: bool, who: str) -> None:
    """INFO (WARNING if ``quiet``) log lines that start with ``who``."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format=f"%(asctime)s %(levelname)s {who} %(name)s: %(message)s",
    )


tls_dir_option = click.option(
    "--tls-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="This host's certificate folder: TCP peers must turn to TLS and present a host's "
    "certificate of its CA; connections to peers turn to TLS too. SIGHUP reads it again.",
)
tls_peer_option = click.option(
    "--tls-peer",
    "tls_peers",
    multiple=True,
    metavar="HOST",
    help="With --tls-dir: admit only these hosts' certificates (default: any host's).",
)


def agent_tls(tls_dir: Path | None, peers: tuple[str, ...]) -> Tls | None:
    """The agent's certificate, made this process's (its connections to peers use it)."""
    if tls_dir is None:
        if peers:
            raise click.UsageError("--tls-peer goes with --tls-dir")
        return None
    try:
        tls = Tls(tls_dir, peers)
    except DevagentError as err:
        raise click.ClickException(str(err)) from err
    use_tls(tls)
    return tls


def reload_tls() -> None:
    """SIGHUP: read this process's certificates again (its next connections use them)."""
    tls = process_tls()
    if tls is None:
        return
    try:
        tls.reload()
    except DevagentError as err:
        logging.getLogger(__name__).error("SIGHUP: kept the certificates loaded before: %s", err)


def serve_until_signalled(serve: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run ``serve(stop)`` until it returns; SIGINT or SIGTERM sets ``stop``. A devagent
    error ends the command with its message."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload_tls)
        await serve(stop)

    try:
        asyncio.run(main())
    except DevagentError as err:
        raise click.ClickException(str(err)) from err
    click.echo("stopped")
