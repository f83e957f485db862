"""``devagent agent net``: run a net agent (one VM NIC's frame forwarder) in the foreground."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from devagent.cli.foreground import (
    agent_tls,
    log_to_stderr,
    serve_until_signalled,
    tls_dir_option,
    tls_peer_option,
)
from devagent.errors import DevagentError
from devagent.net.agent import MAX_HOLD_S, NetAgent
from devagent.net.messages import TapSpec
from devagent.net.serve import serve
from devagent.vocab import parse_hostport


@click.command("net")
@click.option(
    "--vm-socket",
    required=True,
    type=click.Path(path_type=Path),
    help="QEMU's stream socket (-netdev stream,server=on,addr.type=unix,addr.path=SOCK).",
)
@click.option("--tap", required=True, help="The uplink: an existing tap device (on a bridge).")
@click.option("--peer-listen", metavar="HOST:PORT", help="Accept frames from peer agents here.")
@click.option(
    "--control",
    type=click.Path(path_type=Path),
    help="Serve the control API (status, hold, release, forward, swap) on this unix socket.",
)
@click.option("--vm", "vm_name", default="", help="The VM's name (for logs and status).")
@click.option("--nic", default="net0", show_default=True, help="The NIC's id.")
@click.option("--hold", is_flag=True, help="Start held: keep frames for the VM until release.")
@click.option(
    "--max-hold",
    type=click.FloatRange(min=0.1),
    default=MAX_HOLD_S,
    show_default=True,
    help="Seconds after which a hold nobody released ends by itself.",
)
@click.option("--quiet", is_flag=True, help="Log warnings only.")
@tls_dir_option
@tls_peer_option
def net_agent_cmd(
    vm_socket: Path,
    tap: str,
    peer_listen: str | None,
    control: Path | None,
    vm_name: str,
    nic: str,
    hold: bool,
    max_hold: float,
    quiet: bool,
    tls_dir: Path | None,
    tls_peers: tuple[str, ...],
) -> None:
    """Forward one VM NIC's frames between QEMU's stream netdev on --vm-socket and the tap
    --tap, in the foreground until SIGINT or SIGTERM; the agent reconnects to QEMU whenever
    the connection drops."""
    log_to_stderr(quiet, "net-agent")
    try:
        listen = parse_hostport(peer_listen) if peer_listen is not None else None
    except DevagentError as err:
        raise click.BadParameter(str(err), param_hint="--peer-listen") from err

    tls = agent_tls(tls_dir, tls_peers)

    def ready(agent: NetAgent) -> None:
        peers = ", ".join(agent.peer_addresses) or "no peer port"
        click.echo(f"net agent {agent.label}: tap {tap} <-> {vm_socket} ({peers})")

    async def main(stop: asyncio.Event) -> None:
        await serve(
            vm_socket,
            TapSpec(name=tap),
            vm=vm_name,
            nic=nic,
            peer_listen=listen,
            control=control,
            on_ready=ready,
            stop=stop,
            hold=hold,
            max_hold_s=max_hold,
            tls=tls,
        )

    serve_until_signalled(main)


if __name__ == "__main__":  # how the daemon runs it: only what a net agent needs is imported
    net_agent_cmd()
