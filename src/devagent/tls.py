"""Mutual TLS for devagent's processes: a certificate folder of :mod:`devagent.pki` made
into SSL contexts, and who the peer at the other end of a connection is.

:class:`Tls` holds one process's identity: the server context (client certificates from the
CA required) and the client context (the server's certificate checked against the CA and the
name or address it is reached at). Both trust the deployment's CA only, never the system's.
:meth:`Tls.reload` reads the files again (a daemon's SIGHUP): connections already made keep
the certificate they began with; new ones get the new one.

A peer is known by its certificate (:func:`peer_of`): its name (common name) and its role,
host or operator (organisational unit).
"""

from __future__ import annotations

import enum
import logging
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devagent.errors import EnvironmentProblem

log = logging.getLogger(__name__)

# The files of a certificate folder (QEMU's tls-creds-x509 layout; :mod:`devagent.pki` makes
# them). This module does not import that one: agents load certificates, never make them.
CA_CERT = "ca-cert.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
#: A server's Diffie-Hellman group for QEMU's GnuTLS. Without the file, QEMU makes new DH
#: parameters each time it loads a server's credentials (a random 0.1-1 s and more).
DH_PARAMS = "dh-params.pem"


class Role(enum.StrEnum):
    """A certificate's organisational unit: what its holder is."""

    HOST = "host"
    OPERATOR = "operator"


#: Every certificate's organisation (:mod:`devagent.pki` writes it).
ORGANIZATION = "devagent"


def host_dn(host: str) -> str:
    """Host ``host``'s certificate's subject as GnuTLS writes it: what QEMU's
    ``authz-simple`` and libvirtd's ``tls_allowed_dn_list`` compare."""
    return f"O={ORGANIZATION},OU={Role.HOST.value},CN={host}"


@dataclass(frozen=True)
class Peer:
    """Who a certificate says the other end is."""

    name: str
    role: Role

    def __str__(self) -> str:
        return f"{self.role.value} {self.name}"


class Tls:
    """A process's TLS identity, from a folder of :mod:`devagent.pki` (a host's holds a
    server and a client certificate, an operator's a client certificate only)."""

    def __init__(self, folder: Path, peers: Iterable[str] = ()) -> None:
        self.folder = folder.resolve()  # agents run in other folders
        #: The hosts whose certificates a server of this process admits (none: any host of
        #: the CA). An operator's certificate is never a peer's.
        self.peers = frozenset(peers)
        self.server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server.verify_mode = ssl.CERT_REQUIRED
        self.client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks the host name
        for context in (self.server, self.client):
            context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.reload()

    @property
    def ca(self) -> Path:
        return self.folder / CA_CERT

    @property
    def is_host(self) -> bool:
        return (self.folder / SERVER_CERT).exists()

    def reload(self) -> None:
        """Read the certificate, its key and the CA again. They are tried on fresh contexts
        first: files that do not load (a key that does not match its certificate, half
        rewritten) leave the loaded ones as they were. A CA added to the file is trusted
        from now on; one removed stays trusted until the process restarts."""
        try:
            trial_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            trial_client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            for server, client in ((trial_server, trial_client), (self.server, self.client)):
                self._load(server, client)
        except (OSError, ssl.SSLError) as err:
            raise EnvironmentProblem(
                f"cannot load the certificates of {self.folder}: {err} "
                "(make them with 'devagent pki init' and 'devagent pki issue')"
            ) from None
        log.info("certificates loaded from %s", self.folder)

    def _load(self, server: ssl.SSLContext, client: ssl.SSLContext) -> None:
        for context in (server, client):
            context.load_verify_locations(cafile=str(self.ca))
        if self.is_host:
            server.load_cert_chain(str(self.folder / SERVER_CERT), str(self.folder / SERVER_KEY))
        client.load_cert_chain(str(self.folder / CLIENT_CERT), str(self.folder / CLIENT_KEY))

    def refusal(self, peer: Peer | None) -> str | None:
        """Why a connection whose certificate names ``peer`` is not served (None: it is)."""
        if peer is None:
            return "its certificate names no devagent host"
        if peer.role is not Role.HOST:
            return f"{peer} is not a host"
        if self.peers and peer.name not in self.peers:
            return (
                f"host {peer.name} is not among this one's peers ({', '.join(sorted(self.peers))})"
            )
        return None


#: What a host's or operator's name is made of (its certificate's and the lab's).
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")


def as_name(text: str) -> str | None:
    """``text`` if it is a host's name (not a URL or an address with a port), else None."""
    return text if text and set(text) <= NAME_CHARS and text[0] not in "-." else None


_process: Tls | None = None


def use_tls(tls: Tls | None) -> None:
    """The certificate this process connects with: a daemon's or an agent's host
    certificate, the CLI's operator certificate (None: plaintext)."""
    global _process
    _process = tls


def process_tls() -> Tls | None:
    return _process


def peer_of(cert: Mapping[str, Any] | None) -> Peer | None:
    """The peer a verified certificate (``SSLObject.getpeercert()``) names, or None when it
    names no devagent host or operator."""
    if not cert:
        return None
    fields: dict[str, str] = {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            fields[key] = value
    name = fields.get("commonName", "")
    try:
        role = Role(fields.get("organizationalUnitName", ""))
    except ValueError:
        return None
    if not name:
        return None
    if role is Role.HOST:
        dns = [v for kind, v in cert.get("subjectAltName", ()) if kind == "DNS"]
        if name not in dns:
            return None
    return Peer(name=name, role=role)


def peer_of_transport(transport: Any) -> Peer | None:
    """The peer of an asyncio transport (or an aiohttp request's), None when plaintext."""
    if transport is None:
        return None
    return peer_of(transport.get_extra_info("peercert"))
