"""A PKI for the TLS tests: the deployment's CA with hosts a, b, c and an operator, another
CA's host b, and an expired operator and host (``late``)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from devagent import pki
from devagent.tls import Tls


@dataclass(frozen=True)
class Certs:
    root: Path  # the deployment's CA
    other: Path  # another CA

    def host(self, name: str) -> Tls:
        return Tls(pki.host_dir(self.root, name))

    def operator(self) -> Tls:
        return Tls(pki.operator_dir(self.root, "root"))

    def stranger(self) -> Tls:
        """Host ``b`` as another CA certifies it."""
        return Tls(pki.host_dir(self.other, "b"))

    def expired(self) -> Tls:
        return Tls(pki.operator_dir(self.root, "expired"))

    def dir(self, name: str) -> Path:
        """Host ``name``'s folder (``late``: expired; ``stranger``: another CA's b)."""
        if name == "stranger":
            return pki.host_dir(self.other, "b")
        return pki.host_dir(self.root, name)


def make_pki(folder: Path, address: str = "127.0.0.1") -> Certs:
    root, other = folder / "pki", folder / "other-pki"
    pki.init_ca(root)
    for host in ("a", "b", "c"):
        pki.issue_host(root, host, [address])
    pki.issue_operator(root, "root")
    now = datetime.datetime.now(datetime.UTC)
    gone = pki.Validity(now - datetime.timedelta(days=30), now - datetime.timedelta(days=1))
    pki.issue_operator(root, "expired", validity=gone)
    pki.issue_host(root, "late", [address], validity=gone)
    pki.init_ca(other, common_name="another CA")
    pki.issue_host(other, "b", [address])
    return Certs(root, other)
