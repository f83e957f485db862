"""Uplinks without the kernel's help: the checks a tap makes before attaching, the uplink
spec, the fake's queueing, and the ``devagent agent net`` command's errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from devagent.cli import main
from devagent.errors import EnvironmentProblem, NotFound, UsageError
from devagent.net.messages import TapSpec, UplinkStatus
from devagent.net.uplink import MemoryUplink, TapUplink, check_uplink_spec


@pytest.mark.parametrize("name", ["", "a" * 16, "../x"])
def test_a_bad_tap_name_is_a_usage_error(name: str) -> None:
    with pytest.raises(UsageError, match="bad tap name"):
        TapUplink(name)


def test_a_tap_that_does_not_exist_is_not_made_up() -> None:
    with pytest.raises(NotFound, match="no network interface"):
        TapUplink("nettap-none")


def test_without_the_tun_device_the_environment_is_blamed(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentProblem, match="missing"):
        TapUplink("lo", tun_path=str(tmp_path / "tun"))


def test_an_interface_that_is_no_tap_is_refused() -> None:
    expected = UsageError if os.path.exists("/dev/net/tun") else EnvironmentProblem
    with pytest.raises(expected):
        TapUplink("lo")


@pytest.mark.parametrize(
    "spec",
    [None, "tap0", {"kind": "file", "name": "x"}, {"kind": "tap"}, {"kind": "tap", "name": 3}],
)
def test_a_bad_uplink_spec_is_a_usage_error(spec: object) -> None:
    with pytest.raises(UsageError):
        check_uplink_spec(spec)


def test_an_uplink_spec_is_read_as_its_type() -> None:
    assert check_uplink_spec({"kind": "tap", "name": "t0"}) == TapSpec(name="t0")
    with pytest.raises(UsageError, match="extra"):
        check_uplink_spec({"kind": "tap", "name": "t0", "extra": 1})
    with pytest.raises(UsageError):
        check_uplink_spec({"kind": "memory"})


def test_the_fake_queues_while_nobody_reads_and_counts() -> None:
    uplink = MemoryUplink()
    got: list[bytes] = []
    uplink.inject(b"a" * 60)  # before start: waits
    uplink.start(got.append)
    assert got == [b"a" * 60]
    uplink.inject(b"b" * 60, read_now=False)
    assert got == [b"a" * 60]
    uplink.inject(b"c" * 60)
    assert got == [b"a" * 60, b"b" * 60, b"c" * 60]
    uplink.stop_reading()
    uplink.inject(b"d" * 60)
    assert uplink.drain() == [b"d" * 60]
    assert uplink.send(b"e" * 60)
    uplink.accept = False
    assert not uplink.send(b"f" * 60)
    assert uplink.describe() == UplinkStatus(
        kind="MemoryUplink", name="memory", rx_frames=4, rx_bytes=240, tx_frames=1,
        tx_bytes=60, tx_dropped=1,
    )  # fmt: skip


def test_cli_net_agent_reports_a_missing_tap(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["agent", "net", "--vm-socket", str(tmp_path / "s"), "--tap", "nettap-none", "--quiet"],
    )
    assert result.exit_code == 1
    assert "no network interface 'nettap-none'" in result.output


def test_cli_net_agent_checks_the_peer_address(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["agent", "net", "--vm-socket", str(tmp_path / "s"), "--tap", "t", "--peer-listen", "x"],
    )
    assert result.exit_code == 2
    assert "HOST:PORT" in result.output
