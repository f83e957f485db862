"""What adopting reads and writes of a domain's XML: which disks it takes over (raw files
only, by name), and the definition that points them at their agents, the rest kept."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from devagent.daemon.agents import AgentProcess
from devagent.daemon.libvirt_adopt import FileDisk, NbdSource, file_disks, redefined
from devagent.errors import UsageError

DOMAIN = """<domain type='qemu'><name>d1</name><devices>
  <disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>
    <source file='/var/lib/images/d1.img'/><target dev='vda' bus='virtio'/>
    <serial>sys</serial><address type='pci' domain='0x0000' bus='0x00' slot='0x04'/></disk>
  <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='hdc' bus='ide'/></disk>
  <disk type='network' device='disk'><driver name='qemu' type='raw'/>
    <source protocol='nbd' name='x'><host transport='unix' socket='/s'/></source>
    <target dev='vdb' bus='virtio'/></disk>
  <disk type='file' device='disk'><source file='/data.raw'/><target dev='vdc' bus='virtio'/></disk>
</devices></domain>"""


def test_the_raw_file_disks_are_taken_the_rest_left() -> None:
    assert file_disks(DOMAIN, "d1") == [
        FileDisk("vda", Path("/var/lib/images/d1.img")),
        FileDisk("vdc", Path("/data.raw")),  # no <driver>: raw, as libvirt reads it
    ]


def test_a_qcow2_disk_or_none_at_all_is_refused_by_name() -> None:
    qcow2 = DOMAIN.replace("type='raw' cache='none'", "type='qcow2'")
    with pytest.raises(UsageError, match="domain d1: disk vda is a qcow2 image"):
        file_disks(qcow2, "d1")
    cdrom_only = "<domain><devices><disk type='file' device='cdrom'><source file='/x'/>" \
        "<target dev='hdc'/></disk></devices></domain>"  # fmt: skip
    with pytest.raises(UsageError, match="domain d2 has no raw file disk"):
        file_disks(cdrom_only, "d2")


def test_the_definition_points_the_disks_at_their_agents(tmp_path: Path) -> None:
    agents = {
        node: AgentProcess(vm="d1", node=node, image=f"/r/{node}.img", run_dir=str(tmp_path))
        for node in ("vda", "vdc")
    }
    root = ET.fromstring(redefined(DOMAIN, {n: NbdSource.of(a) for n, a in agents.items()}))
    disks = {d.find("target").get("dev"): d for d in root.iterfind("./devices/disk")}  # type: ignore[union-attr]
    for node in ("vda", "vdc"):
        disk = disks[node]
        assert disk.get("type") == "network"
        source = disk.find("source")
        assert source is not None and source.get("protocol") == "nbd"
        assert source.get("name") == node
        host = source.find("host")
        assert host is not None and host.get("socket") == str(tmp_path / f"{node}.nbd")
        tags = [c.tag for c in disk]
        assert tags.count("driver") == 1 and tags.count("source") == 1
        assert disk.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    assert disks["vda"].find("driver").get("cache") == "none"  # type: ignore[union-attr]
    assert disks["vda"].findtext("serial") == "sys"  # what the guest sees is kept
    assert disks["vda"].find("address") is not None
    assert disks["hdc"].get("type") == "file"  # not ours: untouched
