"""``devagent pki``: the deployment's CA and the certificates of its hosts and operators."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click

from devagent import pki
from devagent.cli.common import click_errors

dir_option = click.option(
    "--dir",
    "pki_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("pki"),
    show_default=True,
    help="The PKI folder: the CA, and the identities it issued under hosts/ and operators/.",
)


@click.group("pki")
def pki_group() -> None:
    """Certificates for mutual TLS between hosts, daemons, agents and the CLI.

    \b
    devagent pki init DIR                       a CA in DIR
    devagent pki issue HOST --ip ADDR --dir DIR  a host's certificate (DIR/hosts/HOST)
    devagent pki issue --operator NAME --dir DIR an operator's (DIR/operators/NAME)

    A host's folder is what its daemon's --tls-dir names, and what QEMU's tls-creds-x509
    and nbdinfo's tls-certificates= read as they are.
    """


@pki_group.command("init")
@click.argument("pki_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--days", type=click.IntRange(min=1), default=pki.CA_DAYS, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print only JSON, for scripts.")
def init(pki_dir: Path, days: int, as_json: bool) -> None:
    """Make a CA in PKI_DIR (refused where one already is)."""
    _report(lambda: pki.init_ca(pki_dir, days=days), "CA", as_json)


@pki_group.command("issue")
@click.argument("name")
@click.option("--operator", is_flag=True, help="NAME is an operator (a client certificate).")
@click.option("--ip", "addresses", multiple=True, help="An address the host is reached at.")
@click.option("--days", type=click.IntRange(min=1), default=pki.LEAF_DAYS, show_default=True)
@dir_option
@click.option("--json", "as_json", is_flag=True, help="Print only JSON, for scripts.")
def issue(
    name: str, operator: bool, addresses: tuple[str, ...], days: int, pki_dir: Path, as_json: bool
) -> None:
    """Issue NAME's certificate from the CA in --dir: a host's (its name and --ip addresses
    in the certificate), or with --operator an operator's. A second issue replaces the
    first; the daemon reads it on SIGHUP."""
    validity = pki.Validity.days(days)
    if operator:
        if addresses:
            raise click.UsageError("--ip names a host's addresses, not an operator's")
        _report(lambda: pki.issue_operator(pki_dir, name, validity=validity), "operator", as_json)
    else:
        made = lambda: pki.issue_host(pki_dir, name, addresses, validity=validity)  # noqa: E731
        _report(made, "host", as_json)


def _report(make: Callable[[], Path], what: str, as_json: bool) -> None:
    with click_errors():
        path = make()
    if as_json:
        click.echo(json.dumps({"kind": what, "path": str(path)}))
    else:
        click.echo(f"{what}: {path}")
