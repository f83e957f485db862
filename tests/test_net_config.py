"""A VM's NICs in its configuration: QEMU's arguments and the JSON round trip."""

from __future__ import annotations

import json

import pytest

from devagent.errors import UsageError
from devagent.qemu.config import DiskSpec, NicSpec, VmConfig


def test_a_nic_is_a_stream_server_for_its_agent() -> None:
    nic = NicSpec(id="net0", stream_socket="/run/vm1/net0.sock", mac="52:54:00:12:34:56")
    config = VmConfig(name="vm1", nics=(nic,))
    args = config.qemu_args()
    at = args.index("-netdev")
    assert args[at : at + 4] == [
        "-netdev",
        "stream,id=net0,server=on,addr.type=unix,addr.path=/run/vm1/net0.sock",
        "-device",
        "virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:12:34:56",
    ]


def test_without_nics_the_arguments_are_unchanged() -> None:
    config = VmConfig(name="vm1", disks=(DiskSpec(path="/x"),))
    assert "-netdev" not in config.qemu_args()
    assert VmConfig.from_json({"name": "vm1", "disks": [{"path": "/x"}]}) == config


def test_nics_survive_the_json_round_trip() -> None:
    config = VmConfig(
        name="vm2",
        nics=(NicSpec(stream_socket="/a.sock"), NicSpec(id="net1", stream_socket="/b.sock")),
        incoming=True,
    )
    assert VmConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    args = config.qemu_args()
    assert args.count("-netdev") == 2
    assert "virtio-net-pci,netdev=net1,id=nic1" in args


def test_a_nic_needs_its_socket() -> None:
    with pytest.raises(UsageError, match="stream socket"):
        NicSpec(id="net0")
    with pytest.raises(UsageError):
        VmConfig.from_json({"name": "x", "nics": [{"id": "n", "bogus": 1}]})
