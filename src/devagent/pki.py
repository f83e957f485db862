"""The deployment's certificates: one CA, a certificate per host, one per operator.

Everything between hosts is mutual TLS (HTTPS between daemons and the CLI, NBD with
STARTTLS between agents, the NICs' frame link, QEMU's migration stream), and each side
proves who it is with a certificate of the CA made here.

A PKI folder holds the CA and the identities it issued, in the layout QEMU's
``tls-creds-x509`` and libnbd's ``tls-certificates=`` read, so that a host's folder is given
as is to QEMU, qemu-img, qemu-nbd, nbdinfo and devagent's own processes::

    DIR/ca-cert.pem  DIR/ca-key.pem                         the CA (its key mode 0600)
    DIR/hosts/NAME/{ca-cert,server-cert,server-key,client-cert,client-key,dh-params}.pem
    DIR/operators/NAME/{ca-cert,client-cert,client-key}.pem

A host's certificate names the host (its common name and a DNS name in its SAN), and the
addresses it is reached at (IP addresses in its SAN); it serves and it calls (extended key
usage server and client). An operator's only calls. The organisational unit tells the two
apart (:class:`devagent.tls.Role`): a peer route is for hosts only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devagent.errors import StateError, UsageError
from devagent.tls import (
    CA_CERT,
    CLIENT_CERT,
    CLIENT_KEY,
    DH_PARAMS,
    ORGANIZATION,
    SERVER_CERT,
    SERVER_KEY,
    Role,
    as_name,
)

HOST_UNIT = Role.HOST.value
OPERATOR_UNIT = Role.OPERATOR.value
CA_DAYS = 3650
LEAF_DAYS = 825
CA_KEY = "ca-key.pem"

#: RFC 7919's ``ffdhe2048`` group (appendix A.1), as PKCS#3 ``DHParameter`` PEM: what
#: ``openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048`` writes. A host's
#: folder holds it as ``dh-params.pem``, so that QEMU's TLS server loads a known group
#: instead of generating one each time (which a migration would wait for). Written out
#: rather than made: ``cryptography`` deprecates finite-field DH.
FFDHE2048_PEM = b"""\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


@dataclass(frozen=True)
class Validity:
    """When a certificate is valid (tests make expired ones)."""

    not_before: datetime.datetime
    not_after: datetime.datetime

    @classmethod
    def days(cls, days: int) -> Validity:
        now = datetime.datetime.now(datetime.UTC)
        # An hour back: a peer whose clock is a little behind still accepts it.
        return cls(now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days))


def hosts_dir(pki: Path) -> Path:
    return pki / "hosts"


def host_dir(pki: Path, host: str) -> Path:
    return hosts_dir(pki) / host


def operator_dir(pki: Path, name: str) -> Path:
    return pki / "operators" / name


def check_name(name: str, what: str) -> str:
    if as_name(name) is None:
        raise UsageError(f"{what} {name!r}: use lower-case letters, digits, '-' and '.'")
    return name


def init_ca(pki: Path, *, common_name: str = "devagent CA", days: int = CA_DAYS) -> Path:
    """Make the CA in ``pki`` (refused when one is there: its hosts' certificates would no
    longer be trusted). Returns the CA certificate's path."""
    if (pki / CA_KEY).exists():
        raise StateError(f"{pki} already holds a CA ({pki / CA_KEY})")
    pki.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    validity = Validity.days(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _write(pki / CA_KEY, _key_pem(key), mode=0o600)
    _write(pki / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return pki / CA_CERT


def issue_host(
    pki: Path,
    host: str,
    addresses: Sequence[str] = (),
    *,
    validity: Validity | None = None,
    out: Path | None = None,
) -> Path:
    """A certificate for ``host``, reached at ``addresses`` (IP addresses), in
    ``pki/hosts/HOST`` (or ``out``). Returns the folder."""
    check_name(host, "host name")
    try:
        ips = [ipaddress.ip_address(a) for a in addresses]
    except ValueError as err:
        raise UsageError(f"host {host}: {err}") from None
    san = [x509.DNSName(host), *(x509.IPAddress(ip) for ip in ips)]
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    folder = out if out is not None else host_dir(pki, host)
    cert, key = _leaf(pki, host, HOST_UNIT, san, usages, validity or Validity.days(LEAF_DAYS))
    for cert_name, key_name in ((SERVER_CERT, SERVER_KEY), (CLIENT_CERT, CLIENT_KEY)):
        _write(folder / key_name, key, mode=0o600)  # a reload between the two refuses the
        _write(folder / cert_name, cert)  # pair that does not match, and keeps the old
    _write(folder / CA_CERT, (pki / CA_CERT).read_bytes())
    _write(folder / DH_PARAMS, FFDHE2048_PEM)
    return folder


def issue_operator(
    pki: Path, name: str, *, validity: Validity | None = None, out: Path | None = None
) -> Path:
    """A client certificate for the operator ``name`` (the CLI's), in
    ``pki/operators/NAME`` (or ``out``). Returns the folder."""
    check_name(name, "operator name")
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    folder = out if out is not None else operator_dir(pki, name)
    cert, key = _leaf(pki, name, OPERATOR_UNIT, [], usages, validity or Validity.days(LEAF_DAYS))
    _write(folder / CLIENT_KEY, key, mode=0o600)
    _write(folder / CLIENT_CERT, cert)
    _write(folder / CA_CERT, (pki / CA_CERT).read_bytes())
    return folder


def _leaf(
    pki: Path,
    name: str,
    unit: str,
    san: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    validity: Validity,
) -> tuple[bytes, bytes]:
    """A certificate signed by the CA in ``pki``, and its key, both PEM."""
    ca_key, ca_cert = _load_ca(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _load_ca(pki: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((pki / CA_KEY).read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((pki / CA_CERT).read_bytes())
    except FileNotFoundError:
        raise StateError(f"{pki} holds no CA: make one with 'devagent pki init {pki}'") from None
    except ValueError as err:
        raise StateError(f"the CA in {pki} cannot be read: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StateError(f"the CA key in {pki} is not an EC key")
    return key, cert


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=not ca,  # QEMU's x509 check wants it on a server's certificate
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` whole, with ``mode`` from the start (a key is never readable by
    others, not even for a moment), replacing the file at once (a reload reads either the
    old file or the new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)
