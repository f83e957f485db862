"""``devagent lab …``: bring a lab of hosts up, show it, tear it down."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from devagent.cli.common import click_errors
from devagent.lab import Lab, default_lab_name, format_rate

F = TypeVar("F", bound=Callable[..., Any])


def _name_option(func: F) -> F:
    return click.option(
        "--name",
        default=default_lab_name,
        show_default="$DEVAGENT_LAB or 'lab'",
        help="lab name (1-6 characters a-z, 0-9)",
    )(func)


def _rate(bps: Any) -> str:
    return format_rate(bps) if isinstance(bps, int) else "none"


def _print_status(status: dict[str, Any]) -> None:
    mode = "loopback" if status["loopback"] else f"{status['subnet']} via {status['bridge']}"
    title = f"lab {status['name']} ({status['state']}, {mode})"
    table = Table(title=title, title_justify="left")
    for column in ("host", "address", "netns", "pid", "daemon", "link", "shaping out/in"):
        table.add_column(column, no_wrap=True)
    for host in status["hosts"]:
        if host["healthy"]:
            daemon = "[green]healthy[/]"
        elif host["alive"]:
            daemon = "[yellow]not answering[/]"
        else:
            daemon = "[red]dead[/]"
        link = {True: "[green]up[/]", False: "[red]down[/]", None: "-"}[host["link_up"]]
        shaping = (
            "-"
            if status["loopback"]
            else (f"{_rate(host['rate_out_bps'])}/{_rate(host['rate_in_bps'])}")
        )
        table.add_row(
            host["name"],
            f"{host['address']}:{host['port']}",
            host["netns"] or "-",
            str(host["pid"] or "-"),
            daemon,
            link,
            shaping,
        )
    console = Console()
    console.print(table)
    console.print(f"token: {status['token_file']}   shared: {status['shared_dir']}")
    console.print(f"certificates: {status.get('pki_dir') or 'none (--insecure)'}")
    for host in status["hosts"]:
        if host.get("libvirt_uri"):
            console.print(f"libvirt of {host['name']}: virsh -c '{host['libvirt_uri']}'")


@click.group("lab")
def lab_group() -> None:
    """Hosts for tests and demos: network namespaces joined by a bridge (or loopback
    folders), each running a devagentd."""


@lab_group.command("up")
@click.option("--hosts", "hosts", type=int, default=2, show_default=True, help="number of hosts")
@click.option("--link-rate", default=None, help="shape every host's link, e.g. 100mbit, 1gbit")
@click.option("--loopback", is_flag=True, help="no namespaces: daemons on 127.0.0.1 ports")
@click.option("--subnet", default=None, help="IPv4 subnet for the lab (default: chosen)")
@click.option(
    "--insecure",
    is_flag=True,
    help="no certificates: plain HTTP and NBD between hosts (anyone on the network can "
    "read the disks)",
)
@click.option(
    "--libvirt",
    "with_libvirt",
    is_flag=True,
    help="a libvirtd in each host beside its devagentd (its own folders, host UUID and "
    "address; TLS with the host's certificate): for libvirt-managed VMs",
)
@_name_option
@click.option("--json", "as_json", is_flag=True, help="print only JSON")
def up_cmd(
    hosts: int,
    link_rate: str | None,
    loopback: bool,
    subnet: str | None,
    insecure: bool,
    with_libvirt: bool,
    name: str,
    as_json: bool,
) -> None:
    """Make a lab and start one devagentd per host. The lab gets its own CA, a
    certificate per host and one for its operator (the CLI's) under its folder's pki/:
    every link between hosts is mutual TLS."""
    with click_errors():
        if insecure:
            click.echo("warning: --insecure: the lab's hosts speak plaintext", err=True)
        lab = Lab.up(
            name,
            hosts=hosts,
            link_rate=link_rate,
            loopback=loopback,
            subnet=subnet,
            insecure=insecure,
            with_libvirt=with_libvirt,
        )
        status = lab.status()
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        _print_status(status)


@lab_group.command("down")
@_name_option
@click.option("--all", "all_labs", is_flag=True, help="remove every devagent lab")
@click.option("--json", "as_json", is_flag=True, help="print only JSON")
def down_cmd(name: str, all_labs: bool, as_json: bool) -> None:
    """Stop a lab's daemons and everything they started; delete its namespaces and state."""
    with click_errors():
        removed = Lab.down_all() if all_labs else ([name] if Lab.destroy(name) else [])
    if as_json:
        click.echo(json.dumps({"removed": removed}))
    elif removed:
        Console().print(f"removed lab{'s' if len(removed) > 1 else ''}: {', '.join(removed)}")
    else:
        Console().print("nothing to remove" if all_labs else f"no lab {name!r}: nothing to remove")


@lab_group.command("status")
@_name_option
@click.option("--json", "as_json", is_flag=True, help="print only JSON")
def status_cmd(name: str, as_json: bool) -> None:
    """Show a lab's hosts, addresses, daemons and link shaping."""
    with click_errors():
        status = Lab.load(name).status()
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        _print_status(status)
