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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devagent import pki
from devagent.errors import EnvironmentProblem

log = logging.getLogger(__name__)


class Role(enum.StrEnum):
    HOST = pki.HOST_UNIT
    OPERATOR = pki.OPERATOR_UNIT


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

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server.verify_mode = ssl.CERT_REQUIRED
        self.client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks the host name
        for context in (self.server, self.client):
            context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.reload()

    @property
    def ca(self) -> Path:
        return self.folder / pki.CA_CERT

    @property
    def is_host(self) -> bool:
        return (self.folder / pki.SERVER_CERT).exists()

    def reload(self) -> None:
        """Read the certificate, its key and the CA again. A CA added to the file is
        trusted from now on; one removed stays trusted until the process restarts."""
        try:
            for context in (self.server, self.client):
                context.load_verify_locations(cafile=str(self.ca))
            if self.is_host:
                self.server.load_cert_chain(
                    str(self.folder / pki.SERVER_CERT), str(self.folder / pki.SERVER_KEY)
                )
            self.client.load_cert_chain(
                str(self.folder / pki.CLIENT_CERT), str(self.folder / pki.CLIENT_KEY)
            )
        except (OSError, ssl.SSLError) as err:
            raise EnvironmentProblem(
                f"cannot load the certificates of {self.folder}: {err} "
                "(make them with 'devagent pki init' and 'devagent pki issue')"
            ) from None
        log.info("certificates loaded from %s", self.folder)

    def to_json(self) -> str:
        return str(self.folder)


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
