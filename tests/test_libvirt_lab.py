"""``lab up --libvirt``: a libvirtd in each host beside its devagentd, each its own "machine"
(its own folders, host UUID and address), reached by its peers over TLS with the host's
certificate; the daemon follows its domains by libvirt's events; ``lab down`` leaves none
of it behind."""

from __future__ import annotations

import re
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import private_lab, processes_mentioning
from devagent import pki
from devagent.api_types import Adopted, Libvirt
from devagent.client import DaemonClient, Endpoint
from devagent.errors import NotFound, StateError, UsageError
from devagent.guest.build import load_guest
from devagent.lab import libvirt
from devagent.lab.lab import OPERATOR, Lab
from devagent.tls import CA_CERT, CLIENT_CERT, CLIENT_KEY
from devagent.wait import wait_until

pytestmark = [pytest.mark.lab, pytest.mark.vm]

LAB = "tlv"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """One lab for the module, in a short private state root of its own."""
    with private_lab(LAB, with_libvirt=True) as made:
        yield made
    assert not [p for p in processes_mentioning("libvirtd") if "--listen" in p]


def domain_xml(name: str) -> str:
    """A domain with no disk: the test guest's kernel, enough for QEMU to start."""
    guest = load_guest()
    return f"""<domain type='qemu'>
  <name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{guest.kernel}</kernel><initrd>{guest.initrd}</initrd>
    <cmdline>console=ttyS0</cmdline></os>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <devices><serial type='null'/></devices>
</domain>"""


def host_uuid(lab: Lab, host: str) -> str:
    capabilities = libvirt.virsh(lab.host(host), "capabilities")
    found = re.search(r"<uuid>([0-9a-f-]+)</uuid>", capabilities)
    assert found, capabilities[:500]
    return found.group(1)


def test_each_host_has_its_own_libvirtd(lab: Lab) -> None:
    assert host_uuid(lab, "a") != host_uuid(lab, "b")  # else libvirt refuses to migrate
    for host in lab.hosts:
        assert host.libvirt
        assert libvirt.socket_path(host).is_socket()
    assert lab.status()["hosts"][0]["libvirt"] is True


def peer_version(
    lab: Lab, caller: str, host: str, pkipath: Path
) -> subprocess.CompletedProcess[str]:
    """``virsh version`` from ``caller``'s namespace against ``host``'s libvirtd over TLS,
    with the certificates in ``pkipath``."""
    target = lab.host(host)
    uri = f"qemu+tls://{target.address}/system?pkipath={pkipath}"
    source = lab.host(caller)
    assert source.netns is not None
    return subprocess.run(
        ["ip", "netns", "exec", source.netns, "virsh", "-c", uri, "version"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_a_peer_reaches_a_libvirtd_over_tls_with_its_certificate(lab: Lab, tmp_path: Path) -> None:
    done = peer_version(lab, "a", "b", libvirt.pki_path(lab.host("a")))
    assert done.returncode == 0, done.stderr
    assert "Running hypervisor: QEMU" in done.stdout
    assert libvirt.peer_uri(lab.host("b"), lab.host("a")).startswith("qemu+tls://")
    # Without a client certificate: refused at the handshake.
    (tmp_path / "cacert.pem").write_bytes(
        (libvirt.pki_path(lab.host("a")) / "cacert.pem").read_bytes()
    )
    refused = peer_version(lab, "a", "b", tmp_path)
    assert refused.returncode != 0
    assert "TLS" in refused.stderr, refused.stderr
    # The lab operator's certificate (the same CA): not a host's, not in its allowed DNs.
    operator = pki.operator_dir(lab.pki_dir, OPERATOR)
    as_operator = tmp_path / "operator"
    as_operator.mkdir()
    for theirs, ours in (("cacert.pem", CA_CERT), ("clientcert.pem", CLIENT_CERT),
                         ("clientkey.pem", CLIENT_KEY)):  # fmt: skip
        (as_operator / theirs).write_bytes((operator / ours).read_bytes())
    refused = peer_version(lab, "a", "b", as_operator)
    assert refused.returncode != 0, refused.stdout
    assert "Running hypervisor" not in refused.stdout


async def libvirt_status(lab: Lab, host: str) -> Libvirt:
    target = lab.host(host)
    async with DaemonClient(Endpoint(url=target.url, token=lab.token, name=host)) as client:
        return await client.get_as("/v1/libvirt", Libvirt)


async def test_the_daemon_follows_its_domains_by_their_events(lab: Lab) -> None:
    status = await libvirt_status(lab, "a")
    assert status.connected and status.uri == libvirt.local_uri(lab.host("a"))
    xml = lab.host("a").dir / "probe-dom.xml"
    xml.write_text(domain_xml("evdom"))
    libvirt.virsh(lab.host("a"), "create", str(xml))  # a transient domain, started
    try:

        async def running() -> bool:
            domains = {d.name: d for d in (await libvirt_status(lab, "a")).domains}
            return "evdom" in domains and domains["evdom"].last_event == "started/booted"

        await wait_until(running, timeout=20, what="the daemon saw evdom start", interval=0.1)
        domain = next(d for d in (await libvirt_status(lab, "a")).domains if d.name == "evdom")
        assert domain.state == "running" and not domain.persistent
        assert (await libvirt_status(lab, "b")).domains == []  # b's libvirtd is another
    finally:
        libvirt.virsh(lab.host("a"), "destroy", "evdom")

    async def gone() -> bool:
        return not (await libvirt_status(lab, "a")).domains

    await wait_until(gone, timeout=20, what="evdom gone from a", interval=0.1)
    log = (lab.host("a").dir / "devagentd.log").read_text()
    assert "libvirt domain evdom stopped/destroyed" in log  # the event, by name


def file_domain_xml(name: str, image: Path) -> str:
    """A persistent domain booting the test guest (no probe: it leaves its disk alone)
    with ``image`` as its raw file disk vda."""
    disk = (
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{image}'/><target dev='vda' bus='virtio'/><serial>sys</serial></disk>"
    )
    return domain_xml(name).replace("<devices>", f"<devices>{disk}")


async def adopt(lab: Lab, host: str, domain: str) -> Adopted:
    target = lab.host(host)
    async with DaemonClient(Endpoint(url=target.url, token=lab.token, name=host)) as client:
        return await client.post_as(f"/v1/libvirt/{domain}/adopt", Adopted)


async def test_adopt_serves_a_running_domains_disk_by_an_agent(lab: Lab) -> None:
    a = lab.host("a")
    image = a.dir / "dom1.img"
    content = bytes(range(256)) * 4096 * 16  # 16 MiB, every block different from zero
    image.write_bytes(content)
    xml = a.dir / "dom1.xml"
    xml.write_text(file_domain_xml("dom1", image))
    libvirt.virsh(a, "define", str(xml))
    libvirt.virsh(a, "start", "dom1")
    try:
        adopted = await adopt(lab, "a", "dom1")
        assert [d.node for d in adopted.disks] == ["vda"]
        disk = adopted.disks[0]
        assert disk.original == str(image) and disk.tcp_address
        for flags in ((), ("--inactive",)):  # the running domain, and its definition
            dumped = ET.fromstring(libvirt.virsh(a, "dumpxml", "dom1", *flags))
            vda = next(
                d
                for d in dumped.iterfind("./devices/disk")
                if d.find("target").get("dev") == "vda"  # type: ignore[union-attr]
            )
            assert vda.get("type") == "network", flags
            assert vda.find("source/host").get("socket") == disk.socket, flags  # type: ignore[union-attr]
            assert vda.findtext("serial") == "sys"
        assert libvirt.virsh(a, "domstate", "dom1").strip() == "running"
        assert Path(disk.image).read_bytes() == content  # the copy, whole
        assert image.read_bytes() == content  # the original, left as it was
        with pytest.raises(StateError, match="domain dom1 was adopted already"):
            await adopt(lab, "a", "dom1")
    finally:
        libvirt.virsh(a, "destroy", "dom1")
        libvirt.virsh(a, "undefine", "dom1")


async def test_adopt_refuses_what_it_cannot_take_with_the_reason(lab: Lab) -> None:
    with pytest.raises(NotFound, match=r"lookupByName\('nosuch'\): .*[Dd]omain not found"):
        await adopt(lab, "a", "nosuch")
    a = lab.host("a")
    xml = a.dir / "nodisk.xml"
    xml.write_text(domain_xml("nodisk"))
    libvirt.virsh(a, "create", str(xml))
    try:
        with pytest.raises(UsageError, match="domain nodisk has no raw file disk"):
            await adopt(lab, "a", "nodisk")
    finally:
        libvirt.virsh(a, "destroy", "nodisk")
