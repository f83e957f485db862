"""``devagent pki``: the CA, hosts' and operators' certificates, and who a certificate names."""

from __future__ import annotations

import ipaddress
import json
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from devagent import pki
from devagent.cli import main
from devagent.errors import StateError, UsageError
from devagent.tls import DH_PARAMS, Peer, Role, Tls, peer_of


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_a_host_certificate_names_the_host_and_its_addresses(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    folder = pki.issue_host(tmp_path, "a", ["10.0.0.1"])
    cert = load(folder / pki.SERVER_CERT)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.issuer == load(tmp_path / pki.CA_CERT).subject
    assert (folder / pki.CLIENT_CERT).read_bytes() == (folder / pki.SERVER_CERT).read_bytes()
    for key in (folder / pki.SERVER_KEY, folder / pki.CLIENT_KEY, tmp_path / pki.CA_KEY):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert Tls(folder).is_host


def test_a_host_folder_holds_rfc_7919s_dh_group_for_qemu(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    folder = pki.issue_host(tmp_path, "a")
    params = subprocess.run(
        ["openssl", "pkeyparam", "-in", str(folder / DH_PARAMS), "-text", "-noout"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "(2048 bit)" in params and "GROUP: ffdhe2048" in params  # openssl knows the group
    assert not (pki.issue_operator(tmp_path, "alice") / DH_PARAMS).exists()  # no server


def test_an_operator_certificate_only_calls(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    folder = pki.issue_operator(tmp_path, "alice")
    assert not (folder / pki.SERVER_CERT).exists()
    cert = load(folder / pki.CLIENT_CERT)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not Tls(folder).is_host


def test_a_second_ca_and_bad_names_are_refused(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    with pytest.raises(StateError, match="already holds a CA"):
        pki.init_ca(tmp_path)
    with pytest.raises(UsageError, match="host name 'A/b'"):
        pki.issue_host(tmp_path, "A/b")
    with pytest.raises(UsageError, match="does not appear to be an IPv4 or IPv6"):
        pki.issue_host(tmp_path, "a", ["not-an-address"])
    with pytest.raises(StateError, match="holds no CA"):
        pki.issue_host(tmp_path / "elsewhere", "a")


def test_peer_of_reads_the_role_and_the_name() -> None:
    def cert(unit: str, name: str, dns: tuple[str, ...] = ()) -> dict[str, object]:
        subject = ((("organizationalUnitName", unit),), (("commonName", name),))
        return {"subject": subject, "subjectAltName": tuple(("DNS", d) for d in dns)}

    assert peer_of(cert("host", "a", ("a",))) == Peer("a", Role.HOST)
    assert peer_of(cert("operator", "alice")) == Peer("alice", Role.OPERATOR)
    assert peer_of(cert("host", "a", ("b",))) is None  # its name not among its DNS names
    assert peer_of(cert("guest", "a", ("a",))) is None
    assert peer_of(None) is None


def test_the_cli_makes_a_ca_a_host_and_an_operator(tmp_path: Path) -> None:
    runner = CliRunner()
    ca = runner.invoke(main, ["pki", "init", str(tmp_path / "p"), "--json"])
    assert ca.exit_code == 0, ca.output
    assert json.loads(ca.output)["path"] == str(tmp_path / "p" / pki.CA_CERT)
    host = runner.invoke(
        main, ["pki", "issue", "b", "--ip", "10.0.0.2", "--dir", str(tmp_path / "p")]
    )
    assert host.exit_code == 0 and "hosts/b" in host.output, host.output
    op = runner.invoke(main, ["pki", "issue", "--operator", "ops", "--dir", str(tmp_path / "p")])
    assert op.exit_code == 0 and "operators/ops" in op.output, op.output
    again = runner.invoke(main, ["pki", "init", str(tmp_path / "p")])
    assert again.exit_code == 1 and "already holds a CA" in again.output
    bad = runner.invoke(main, ["pki", "issue", "--operator", "x", "--ip", "10.0.0.1"])
    assert bad.exit_code == 2 and "--ip" in bad.output
