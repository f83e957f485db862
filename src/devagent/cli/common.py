"""What every command shares: running a coroutine with devagent errors turned into a clear
message and exit code, the consoles, and finding a lab's daemons."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from devagent.client import Endpoint
from devagent.errors import DevagentError, UsageError
from devagent.tls import Tls, use_tls

T = TypeVar("T")
TLS_DIR_ENV = "DEVAGENT_TLS_DIR"  # an operator's certificate folder, outside a lab

out = Console()  # reports and tables: standard output
err = Console(stderr=True)  # progress and messages: standard error

json_option = click.option("--json", "as_json", is_flag=True, help="Print only JSON, for scripts.")
lab_option = click.option(
    "--lab",
    "lab_name",
    default=lambda: os.environ.get("DEVAGENT_LAB", "lab"),
    show_default="$DEVAGENT_LAB or 'lab'",
    help="Which lab's hosts to use.",
)


async def _until_signalled(coro: Coroutine[Any, Any, T]) -> T:
    """``coro``, cancelled by the first SIGTERM or SIGHUP, so that its clean-up runs (a
    bench's or a demo's lab is removed); a second signal of either is ignored."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    signalled: list[int] = []

    def cancel(signum: int) -> None:
        if not signalled:
            signalled.append(signum)
            err.print(f"{signal.Signals(signum).name}: stopping, cleaning up")
            task.cancel()

    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, cancel, signum)
    return await coro


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; a devagent error prints one line and exits 1 (2 for misuse); SIGTERM or
    SIGHUP stops it as Ctrl-C does, its clean-up done, and exits 143."""
    try:
        return asyncio.run(_until_signalled(coro))
    except asyncio.CancelledError:
        err.print("terminated")
        sys.exit(143)
    except UsageError as error:
        err.print(f"[red]error:[/red] {error}")
        sys.exit(2)
    except DevagentError as error:
        err.print(f"[red]error:[/red] {error}")
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


@contextmanager
def click_errors() -> Iterator[None]:
    """Show devagent's errors as click errors (exit 2 for misuse, 1 for the rest), for a
    command that runs no coroutine (:func:`run` does this for those that do)."""
    try:
        yield
    except UsageError as err:
        raise click.UsageError(str(err)) from err
    except DevagentError as err:
        raise click.ClickException(str(err)) from err


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def lab_endpoints(lab_name: str) -> list[Endpoint]:
    from devagent.lab.lab import Lab

    lab = Lab.load(lab_name)
    return [Endpoint(url=h.url, token=lab.token, name=h.name) for h in lab.hosts]


def endpoint_for(host: str, lab_name: str) -> Endpoint:
    """A host by its lab name (``a``) or, outside a lab, by URL with $DEVAGENT_TOKEN (and
    for ``https://`` the operator certificate folder $DEVAGENT_TLS_DIR)."""
    if host.startswith(("http://", "https://")):
        if host.startswith("https://") and os.environ.get(TLS_DIR_ENV):
            use_tls(Tls(Path(os.environ[TLS_DIR_ENV])))
        return Endpoint(url=host.rstrip("/"), token=os.environ.get("DEVAGENT_TOKEN", ""), name=host)
    for endpoint in lab_endpoints(lab_name):
        if endpoint.name == host:
            return endpoint
    names = ", ".join(e.name for e in lab_endpoints(lab_name))
    raise UsageError(f"lab {lab_name!r} has no host {host!r} (hosts: {names})")


def lab_link_rate(lab_name: str) -> int | None:
    """The lab's shaped link rate in bit/s, or None when unshaped or not a lab."""
    from devagent.lab.lab import Lab

    try:
        lab = Lab.load(lab_name)
    except DevagentError:
        return None
    rate = getattr(lab, "link_rate_bps", None)
    return int(rate) if rate else None
