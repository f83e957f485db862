"""``devagent agent ...``: run a block agent in the foreground, benchmark it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path

import click

from devagent.agent.agent import BlockAgent
from devagent.agent.listener import UnixListener, bind_unix, drop_unix
from devagent.agent.serve import serve
from devagent.agent.spec import check_spec
from devagent.cli.foreground import (
    agent_tls,
    log_to_stderr,
    serve_until_signalled,
    tls_dir_option,
    tls_peer_option,
)
from devagent.errors import DevagentError
from devagent.process import set_autogroup_nice
from devagent.vocab import parse_hostport, parse_size

#: The CPU priority of an agent that stopped serving, for the rest of its exit.
EXITING_NICE = 19


def yield_while_exiting() -> None:
    """What is left once the agent stopped is its exit (tens of ms of the interpreter's
    teardown), beside what its host does next: a migration's receiver retires just before
    the guest resumes. An agent that leads its own session (the daemon starts them so)
    yields from now on; one started from a shell leaves the shell's priority alone."""
    if os.getsid(0) != os.getpid():
        return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, EXITING_NICE)
    set_autogroup_nice("self", EXITING_NICE)


def _uri(agent: BlockAgent, address: str) -> str:
    kind, _, rest = address.partition(":")
    if kind == "unix":
        return f"nbd+unix:///{agent.export_name}?socket={rest}"
    return f"nbd://{rest}/{agent.export_name}"


def _bind(path: Path) -> UnixListener:
    try:
        return bind_unix(path)
    except OSError as err:
        raise click.ClickException(f"cannot listen on {path}: {err.strerror or err}") from err


@click.group("agent")
def agent_group() -> None:
    """Block device agents (NBD servers with a journal and swappable backends)."""


@agent_group.command("serve")
@click.argument(
    "image", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--backend-json",
    "backend_json",
    metavar="JSON",
    help='Serve this backend instead of IMAGE, e.g. \'{"kind": "fetch", "path": "r.img", '
    '"remote": {"kind": "remote", "address": "tcp:10.0.0.1:10809", "export": "disk"}}\'.',
)
@click.option("--unix", "unix", type=click.Path(path_type=Path), help="Listen on this socket.")
@click.option("--tcp", "tcp", metavar="HOST:PORT", help="Listen on this TCP address.")
@click.option("--name", default="", show_default=True, help="Export name.")
@click.option("--read-only", is_flag=True, help="Refuse writes.")
@click.option("--quiet", is_flag=True, help="Log warnings only.")
@click.option(
    "--control",
    type=click.Path(path_type=Path),
    help="Also serve the control API (status, quiesce, resume) on this unix socket.",
)
@click.option("--label", default="", help="Put this text (e.g. 'vm=vm1 device=disk0') in logs.")
@tls_dir_option
@tls_peer_option
def serve_cmd(
    image: Path | None,
    backend_json: str | None,
    unix: Path | None,
    tcp: str | None,
    name: str,
    read_only: bool,
    quiet: bool,
    control: Path | None,
    label: str,
    tls_dir: Path | None,
    tls_peers: tuple[str, ...],
) -> None:
    """Serve IMAGE (or the backend --backend-json describes: local, remote or fetch) over
    NBD in the foreground until SIGINT or SIGTERM, the way qemu-nbd would, but through
    devagent's journal."""
    if unix is None and tcp is None:
        raise click.UsageError("give --unix PATH or --tcp HOST:PORT")
    if (image is None) == (backend_json is None):
        raise click.UsageError("give either IMAGE or --backend-json")
    spec = None
    if backend_json is not None:
        try:
            spec = json.loads(backend_json)
            check_spec(spec)
        except (ValueError, DevagentError) as err:
            raise click.BadParameter(str(err), param_hint="--backend-json") from err
    log_to_stderr(quiet, f"agent [{label}]" if label else "agent")
    try:
        address = parse_hostport(tcp) if tcp is not None else None
    except DevagentError as err:
        raise click.BadParameter(str(err), param_hint="--tcp") from err

    # Listening first (QEMU, started beside the agent, may connect from now on), then the
    # certificates and the backend.
    listener = _bind(unix) if unix is not None else None
    try:
        tls = agent_tls(tls_dir, tls_peers)
    except BaseException:
        if listener is not None:
            drop_unix(listener)
        raise

    def ready(agent: BlockAgent) -> None:
        for listening in agent.addresses:
            click.echo(f"listening on {listening}  ({_uri(agent, listening)})", err=False)

    async def main(stop: asyncio.Event) -> None:
        await serve(
            image,
            backend_spec=spec,
            unix=listener,
            tcp=address,
            name=name,
            read_only=read_only,
            on_ready=ready,
            stop=stop,
            control=control,
            tls=tls,
        )
        yield_while_exiting()

    serve_until_signalled(main)


@agent_group.command("bench")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--size", default="256M", show_default=True, help="Image size.")
@click.option("--count-4k", default=40000, show_default=True, help="Requests per 4 KiB run.")
@click.option("--count-1m", default=1000, show_default=True, help="Requests per 1 MiB run.")
@click.option("--rounds", default=5, show_default=True, help="Runs per server (best counts).")
@click.option(
    "--tls",
    is_flag=True,
    help="Both on TCP with TLS required (mutual x509, certificates made for the run).",
)
def bench_cmd(
    as_json: bool, size: str, count_4k: int, count_1m: int, rounds: int, tls: bool
) -> None:
    """Drive the agent and qemu-nbd with the same client; print both and their ratio."""
    from devagent.agent.bench import run_bench

    try:
        report = run_bench(
            size=parse_size(size),
            count_small=count_4k,
            count_large=count_1m,
            rounds=rounds,
            tls=tls,
        )
    except DevagentError as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{'workload':<20} {'unit':>6} {'agent':>10} {'qemu-nbd':>10} {'ratio':>7}")
    for row in report["results"]:
        click.echo(
            f"{row['name']:<20} {row['unit']:>6} {row['agent']:>10.0f} "
            f"{row['qemu_nbd']:>10.0f} {row['ratio']:>7.2f}"
        )
    click.echo(f"transport: {report['transport']}; client: {report['client']}")


@agent_group.command("standby", hidden=True)
def standby_cmd() -> None:
    """Wait, imports done, for the agent to become (``devagentd`` starts agents ahead this
    way: devagent.daemon.standby): say ``ready``, read one JSON line from stdin with its
    arguments (``serve ...``), working folder, log file and CPU priority, and run it. A
    closed stdin (the daemon gone) ends it."""
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    line = sys.stdin.buffer.readline()
    if not line:
        return
    order = json.loads(line)
    log = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for fd in (1, 2):
        os.dup2(log, fd)
    os.close(log)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.chdir(order["cwd"])
    nice = int(order.get("nice", 0))
    with contextlib.suppress(OSError):  # back from the standby's low priority
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    set_autogroup_nice("self", nice)  # and its session's
    agent_group.main(args=order["argv"], prog_name="devagent agent")


if __name__ == "__main__":  # the daemon and the benchmark start agents this way: it is lean
    agent_group()
