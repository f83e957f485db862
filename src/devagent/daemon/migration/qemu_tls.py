"""QEMU's own TLS, with the host's certificates: the RAM migration stream of every strategy,
and the QEMU-only baselines' NBD exports and their clients.

Each QEMU gets its credentials as QOM objects (``tls-creds-x509``, the host's certificate
folder as it is) when a migration needs them: made afresh each time, so that certificates a
SIGHUP reloaded are the ones used. A server's peer is named (``authz-simple``): only the
host the migration comes from, or goes to, passes QEMU's check of the client's certificate.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Literal, Protocol

from devagent.errors import PeerError
from devagent.tls import DH_PARAMS, Tls, host_dn

log = logging.getLogger(__name__)


class Qmp(Protocol):
    async def qmp(self, command: str, **arguments: Any) -> Any: ...


CLIENT_CREDS = "devagent-tls-client"
SERVER_CREDS = "devagent-tls-server"
AUTHZ = "devagent-tls-peer"


async def add_creds(
    vm: Qmp, tls: Tls, endpoint: Literal["client", "server"], peer: str | None = None
) -> dict[str, str]:
    """Give ``vm`` this host's credentials for ``endpoint`` (and, for a server, admit only
    host ``peer``; none named: any host of the CA); returns the ``migrate-set-parameters``
    or NBD arguments that use them."""
    creds = CLIENT_CREDS if endpoint == "client" else SERVER_CREDS
    if endpoint == "server":
        _warn_without_dh_params(tls.folder)
    await _replace(vm, creds, "tls-creds-x509",
                   endpoint=endpoint, dir=str(tls.folder), **{"verify-peer": True})  # fmt: skip
    if endpoint == "client" or peer is None:
        return {"tls-creds": creds}
    authz = f"{AUTHZ}-{peer}"  # one per host: one still in use names the same host
    await _replace(vm, authz, "authz-simple", identity=host_dn(peer))
    return {"tls-creds": creds, "tls-authz": authz}


_warned: set[Path] = set()


def _warn_without_dh_params(folder: Path) -> None:
    """Once per folder: one without ``dh-params.pem`` (made before devagent wrote it) costs
    each migration the time QEMU takes to generate DH parameters."""
    if folder not in _warned and not (folder / DH_PARAMS).exists():
        _warned.add(folder)
        log.warning(
            "%s holds no %s: QEMU generates Diffie-Hellman parameters for each incoming "
            "migration (up to a second or more); 'devagent pki issue' writes the file",
            folder, DH_PARAMS,
        )  # fmt: skip


async def _replace(vm: Qmp, object_id: str, qom_type: str, **props: Any) -> None:
    """The object made anew; one still in use (a migration retried on the same QEMU keeps
    its parameters) cannot be deleted, and is kept as it is."""
    with contextlib.suppress(PeerError):  # none yet, or in use
        await vm.qmp("object-del", id=object_id)
    try:
        await vm.qmp("object-add", **{"qom-type": qom_type, "id": object_id, **props})
    except PeerError as err:
        if "duplicate" not in str(err):
            raise


def cli_client_creds(tls: Tls) -> tuple[str, ...]:
    """The ``-object`` a QEMU needs at its start to open an NBD disk over TLS."""
    folder = str(tls.folder).replace(",", ",,")  # QEMU's option syntax
    return ("-object", f"tls-creds-x509,id={CLIENT_CREDS},endpoint=client,dir={folder}")


async def migrate_incoming(vm: Qmp, uri: str, tls: Tls | None, source: str) -> None:
    """``migrate-incoming`` on ``uri``; with ``tls``, the stream must come over TLS from
    host ``source``."""
    if tls is not None:
        params = await add_creds(vm, tls, "server", peer=source or None)
        await vm.qmp("migrate-set-parameters", **params)
    await vm.qmp("migrate-incoming", uri=uri)
