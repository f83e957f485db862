"""What a destination takes from a peer for a libvirt domain coming to it: names that go
into file names, and a disk's description, refused with the reason before anything is
made."""

from __future__ import annotations

import pytest

from devagent.daemon.libvirt_incoming import check_names
from devagent.daemon.migration.messages import DomainIncoming, IncomingDisk, RemoteDisk
from devagent.errors import UsageError

SOURCE = RemoteDisk(address="tcp:10.0.0.1:10809", export="vda", host="a")


def incoming(name: str = "web-1", *disks: IncomingDisk) -> DomainIncoming:
    disks = disks or (IncomingDisk(node="vda", size=1 << 20, backend=SOURCE),)
    return DomainIncoming(domain=name, source="a", disks=list(disks))


def test_a_well_formed_incoming_domain_passes() -> None:
    check_names(incoming("web-1.prod_2"))
    check_names(incoming("d", IncomingDisk(node="vda", size=1, backend=SOURCE),
                         IncomingDisk(node="vdb", size=1, backend=SOURCE)))  # fmt: skip


@pytest.mark.parametrize(
    ("domain", "disks", "reason"),
    [
        ("../etc", (), "not a domain name"),
        ("a/b", (), "not a domain name"),
        (".hidden", (), "not a domain name"),
        ("x" * 65, (), "not a domain name"),
        ("d", (IncomingDisk(node="../vda", size=1, backend=SOURCE),), "disk targets"),
        ("d", (IncomingDisk(node="vda", size=1, backend=SOURCE),) * 2, "distinct"),
        ("d", (IncomingDisk(node="vda", size=0, backend=SOURCE),), "needs 'backend' and 'size'"),
        ("d", (IncomingDisk(node="vda", size=1),), "needs 'backend' and 'size'"),
    ],
)
def test_a_peers_bad_names_are_refused_with_the_reason(
    domain: str, disks: tuple[IncomingDisk, ...], reason: str
) -> None:
    with pytest.raises(UsageError, match=reason):
        check_names(incoming(domain, *disks))


def test_no_disk_at_all_is_refused() -> None:
    with pytest.raises(UsageError, match="names none"):
        check_names(DomainIncoming(domain="d", source="a", disks=[]))
