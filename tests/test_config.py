"""A VM's configuration, as QEMU arguments and as JSON handed between daemons."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from devagent.client import Endpoint
from devagent.daemon.vms import DiskRequest, VmRequest, parse_size
from devagent.daemon.vms.config import GuestBoot, build_config, check_growable, disk_spec
from devagent.daemon.vms.request import RemoteHome
from devagent.errors import UsageError
from devagent.guest.build import GuestImage
from devagent.qemu.config import (
    TCG_RAM_EXTRA_KB,
    DiskSpec,
    VmConfig,
    qemu_release,
    ram_extra_kb,
)


def test_direct_kernel_boot_with_a_file_disk() -> None:
    config = VmConfig(
        name="v1",
        kernel="/k",
        initrd="/i",
        append="console=ttyS0",
        disks=(DiskSpec(path="/d.img"),),
    )
    args = config.qemu_args()
    assert args[args.index("-kernel") + 1] == "/k"
    assert args[args.index("-append") + 1] == "console=ttyS0"
    blockdev = json.loads(args[args.index("-blockdev") + 1])
    assert blockdev["file"] == {
        "driver": "file",
        "filename": "/d.img",
        "cache": {"direct": False, "no-flush": False},
        "aio": "threads",
    }
    assert "-incoming" not in args
    assert "bootindex" not in args[args.index("-device") + 1]


def test_firmware_boot_of_a_qcow2_over_nbd_incoming() -> None:
    disk = DiskSpec(nbd_socket="/s.sock", nbd_export="vda", format="qcow2", reconnect_delay_s=5)
    config = VmConfig(name="v2", disks=(disk,), incoming=True)
    args = config.qemu_args()
    blockdev = json.loads(args[args.index("-blockdev") + 1])
    assert blockdev["driver"] == "qcow2"
    assert blockdev["file"]["server"] == {"type": "unix", "path": "/s.sock"}
    assert blockdev["file"]["reconnect-delay"] == 5
    assert args[args.index("-incoming") + 1] == "defer"
    assert "bootindex=1" in args[args.index("-device") + 1]


def test_several_disks_each_with_its_serial_and_the_probe_told_them_all() -> None:
    request = VmRequest(name="t", disks=(DiskRequest(size=1 << 30), DiskRequest(size=1 << 29)))
    disks = tuple(disk_spec(n, Path(f"/{n}.img"), None, "raw") for n in request.nodes())
    guest = GuestBoot(GuestImage(Path("/k"), Path("/i"), "6.1"), "tcg")
    config = build_config(request, disks, guest=guest)
    args = config.qemu_args()
    devices = [args[i + 1] for i, a in enumerate(args) if a == "-device"]
    assert devices == [
        "virtio-blk-pci,drive=disk0,id=vd0,serial=disk0",
        "virtio-blk-pci,drive=disk1,id=vd1,serial=disk1",
    ]
    assert config.append is not None and " devagent.disks=disk0,disk1" in config.append
    one = build_config(request.replace(disks=request.disks[:1]), disks[:1], guest=guest)
    assert one.append is not None and "devagent.disks" not in one.append  # /dev/vda
    old = DiskSpec(path="/x")  # a record from before serials: the same QEMU device
    assert "serial" not in VmConfig(name="o", disks=(old,)).qemu_args()[-1]


QEMU_7_2 = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)"
QEMU_10 = "QEMU emulator version 10.0.6 (Debian 1:10.0.6+ds-0+deb13u2)"


def test_a_tcg_guest_gets_ram_that_is_not_a_whole_number_of_256_kib() -> None:
    """QEMU 7.2 loses a TCG guest's stores in a RAM migration when its RAM block is a
    whole number of 256 KiB (see TCG_RAM_EXTRA_KB): such a guest gets 8 KiB more."""
    request = VmRequest(name="u", disks=(DiskRequest(image="/img"),), ram_mb=256)
    config = build_config(request, (DiskSpec(path="/img"),), qemu=QEMU_7_2)
    assert (config.accel, config.ram_extra_kb) == ("tcg", TCG_RAM_EXTRA_KB)
    args = config.qemu_args()
    ram = args[args.index("-m") + 1]
    assert ram == "262152K" and (262152 * 1024) % (256 * 1024) != 0
    assert ram_extra_kb("kvm", QEMU_7_2) == 0
    old = VmConfig(name="v", ram_mb=256)  # a record from before: its RAM as it was
    assert old.qemu_args()[old.qemu_args().index("-m") + 1] == "256"
    # Sent to a daemon from before the field, a config that does not use it still fits.
    assert "ram_extra_kb" not in json.dumps(VmConfig(name="k", accel="kvm").to_json())


def test_from_qemu_9_a_tcg_guest_gets_the_ram_it_asks() -> None:
    """QEMU 9.0 fixed the fast path (one TLB walk per block): the extra 8 KiB would only
    cost a walk per dirty page. A version not understood keeps the extra: safe first."""
    request = VmRequest(name="u", disks=(DiskRequest(image="/img"),), ram_mb=256)
    config = build_config(request, (DiskSpec(path="/img"),), qemu=QEMU_10)
    assert config.ram_extra_kb == 0
    assert config.qemu_args()[config.qemu_args().index("-m") + 1] == "256"
    assert qemu_release(QEMU_10) == (10, 0) and qemu_release(QEMU_7_2) == (7, 2)
    assert ram_extra_kb("tcg", "QEMU emulator version 9.0.0") == 0
    assert ram_extra_kb("tcg", "QEMU emulator version 8.2.2") == TCG_RAM_EXTRA_KB
    assert ram_extra_kb("tcg", "unknown") == TCG_RAM_EXTRA_KB
    assert build_config(request, (DiskSpec(path="/img"),)).ram_extra_kb == TCG_RAM_EXTRA_KB


def test_config_round_trips_json() -> None:
    config = VmConfig(name="v3", disks=(DiskSpec(path="/x"),), extra_args=("-S",))
    assert VmConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_disk_needs_exactly_one_source() -> None:
    with pytest.raises(UsageError):
        DiskSpec()
    with pytest.raises(UsageError):
        DiskSpec(path="/a", nbd_socket="/b")


def test_bad_config_json() -> None:
    with pytest.raises(UsageError):
        VmConfig.from_json({"name": "x", "bogus": 1})


@pytest.mark.parametrize(
    ("text", "size"), [("1G", 1 << 30), ("256M", 256 << 20), ("4k", 4096), (7, 7)]
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


def test_request_defaults_and_user_guest() -> None:
    assert VmRequest.from_json({"name": "v"}).has_probe
    user = VmRequest.from_json({"name": "u", "disk": "/img", "workload": "heavy"})
    assert not user.has_probe and user.workload is None


def test_request_keeps_where_the_disk_lives() -> None:
    peer = {"url": "http://10.0.0.1:7480", "token": "t", "name": "a"}
    request = VmRequest.from_json({"name": "r", "disk_from": peer})
    assert request.remote_disks() == {"disk0": RemoteHome(peer=Endpoint(**peer), export="r")}
    assert VmRequest.from_json(request.to_json()) == request
    with pytest.raises(UsageError, match="disk_from"):
        VmRequest.from_json({"name": "r", "disk_from": peer, "disk": "/x"})
    with pytest.raises(UsageError, match="peer"):
        VmRequest.from_json({"name": "r", "disk_from": "a"})


def test_a_qcow2_that_must_grow_is_refused_one_that_holds_its_disk_is_not(
    tmp_path: Path,
) -> None:
    """Served by an agent (a fixed size) a qcow2 cannot grow: QEMU hangs the guest's first
    write to a new cluster. Refused at start, saying how to make it right."""
    grows, holds = tmp_path / "grows.qcow2", tmp_path / "holds.qcow2"
    for image, options in ((grows, []), (holds, ["-o", "preallocation=metadata"])):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *options, str(image), "8M"],
                       check=True)  # fmt: skip
    with pytest.raises(UsageError, match="preallocation=metadata"):
        check_growable(grows)
    check_growable(holds)
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(4096))
    check_growable(raw)
