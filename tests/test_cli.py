"""The devagent command line, run as a user runs it: real processes, a real lab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devagent.guest.build import GuestImage
from tests.conftest import namespaces, processes_mentioning

DEVAGENT = str(Path(sys.executable).with_name("devagent"))


def cli(*args: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [DEVAGENT, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"devagent {' '.join(args)} -> {result.returncode}\n{result.stderr}\n{result.stdout}"
        )
    return result


def cli_json(*args: str) -> Any:
    return json.loads(cli(*args, "--json").stdout)


@pytest.mark.parametrize(
    "command",
    [[], ["lab"], ["lab", "up"], ["vm", "start"], ["migrate"], ["demo"], ["guest", "build"]],
)
def test_every_command_explains_itself(command: list[str]) -> None:
    result = cli(*command, "--help")
    assert "Usage:" in result.stdout
    assert len(result.stdout.splitlines()) > 3


@pytest.fixture
def cli_lab(state_dir: Path, guest: GuestImage) -> Iterator[str]:
    os.environ["DEVAGENT_LAB"] = "tcli"
    try:
        up = cli_json("lab", "up", "--hosts", "2", "--link-rate", "100mbit")
        assert [h["name"] for h in up["hosts"]] == ["a", "b"]
        yield "tcli"
    finally:
        cli("lab", "down", check=False)
        os.environ.pop("DEVAGENT_LAB", None)
        assert processes_mentioning(str(state_dir)) == []
        assert not [ns for ns in namespaces() if ns.startswith("da-tcli")]


@pytest.mark.vm
@pytest.mark.lab
def test_a_user_session_through_the_cli(cli_lab: str, guest: GuestImage, state_dir: Path) -> None:
    started = cli_json(
        "vm", "start", "v1", "--host", "a", "--disk-size", "64M", "--workload", "moderate,span=16M"
    )
    assert started["state"] == "running" and started["boot_s"] > 0

    plot = state_dir / "v1-timeline.png"
    report = cli_json("migrate", "v1", "--to", "b", "--storage", "shared", "--plot", str(plot))
    assert report["status"] == "completed"
    assert plot.read_bytes()[:4] == b"\x89PNG"
    steps = report["timeline"]
    assert 0 < steps["ram_started"] < steps["ram_completed"] <= steps["resumed"]
    assert steps["resumed"] == report["time_to_switchover_s"]
    assert (report["guest_io_errors"], report["guest_verify_failures"]) == (0, 0)
    assert report["integrity"] == "ok"
    assert report["link_rate_bps"] == 100_000_000

    listed = cli_json("vm", "list")
    assert [(v["host"], v["name"], v["state"]) for v in listed] == [("b", "v1", "running")]

    # A user's own guest: a qcow2 image booted with a kernel, no ioprobe in it.
    image = state_dir / "labs" / cli_lab / "shared" / "user.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            str(image),
            "64M",
        ],
        check=True,
    )
    cli(
        "vm", "start", "u1", "--host", "a", "--disk", str(image),
        "--kernel", str(guest.kernel), "--initrd", str(guest.initrd),
        "--append", "console=ttyS0 quiet",
    )  # fmt: skip
    # One terminal starts the migration, another follows it with --watch: the same report.
    # It names the link's rate itself, over the lab's 100 Mbit/s.
    rate = ["--link-rate", "1gbit"]
    started_migration = subprocess.Popen(
        [DEVAGENT, "migrate", "u1", "--to", "b", "--storage", "hybrid", *rate, "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    watched = None
    for _ in range(100):
        attempt = cli("migrate", "u1", "--watch", "--json", check=False)
        if attempt.returncode == 0:
            watched = json.loads(attempt.stdout)
            break
        assert "is not being migrated" in attempt.stderr  # not started yet, or over
        if started_migration.poll() is not None:
            break
    out, _ = started_migration.communicate(timeout=240)
    user_report = json.loads(out)
    assert watched is not None, "the migration ended before --watch found it"
    assert watched["time_to_switchover_s"] == user_report["time_to_switchover_s"]
    assert user_report["status"] == "completed"
    assert user_report["link_rate_bps"] == 1_000_000_000
    assert user_report["downtime_ms"] is not None
    # Its agents' journals still give the I/O gap (long: that guest is idle) ...
    assert user_report["max_io_gap_ms"] is not None
    assert user_report["io_gap_source"] == "agent journals"
    # ... but what only the probe can tell is missing, and the report says why.
    assert user_report["guest_max_latency_ms"] is None
    assert "ioprobe" in user_report["missing"]["guest_max_latency_ms"]
    assert "ioprobe" in user_report["missing"]["integrity"]

    # Device dynamic exchange and remote access through the CLI.
    devices = cli_json("device", "status", "v1")
    assert [(d["host"], d["device"], d["state"]) for d in devices] == [("b", "disk0", "serving")]
    target = state_dir / "v1-swapped.img"
    swapped = cli_json("device", "swap", "v1", "disk0", "--to", str(target))
    assert swapped["old_image"] != str(target) and target.stat().st_size == 64 << 20
    assert cli_json("device", "status", "v1")[0]["image"] == str(target)
    remote = cli_json(
        "vm", "start", "r1", "--host", "a", "--disk-host", "b", "--disk-size", "32M",
        "--workload", "moderate,span=8M",
    )  # fmt: skip
    assert remote["disk"] == "host b (remote)"
    remote_device = cli_json("device", "status", "r1")[0]
    assert remote_device["agent"]["backend_status"]["kind"] == "remote"
    cli("vm", "stop", "r1")

    stopped = cli_json("vm", "stop", "v1")
    assert stopped["host"] == "b"
    assert [v["name"] for v in cli_json("vm", "list")] == ["u1"]


def test_a_bad_link_rate_is_refused_before_anything_runs() -> None:
    bad = cli("migrate", "v1", "--to", "b", "--link-rate", "fast", check=False)
    assert bad.returncode == 2
    assert "bad link rate 'fast'" in bad.stderr and "Traceback" not in bad.stderr
    watching = cli("migrate", "v1", "--watch", "--link-rate", "1gbit", check=False)
    assert watching.returncode == 2 and "not one to --watch" in watching.stderr


@pytest.mark.lab
def test_cli_errors_are_one_clear_line(cli_lab: str) -> None:
    missing = cli("migrate", "ghost", "--to", "b", check=False)
    assert missing.returncode == 1
    assert "no host of the lab runs VM 'ghost'" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = cli("vm", "start", "v2", "--host", "a", "--workload", "frantic", check=False)
    assert bad.returncode == 2
    assert "frantic" in bad.stderr and "Traceback" not in bad.stderr
    nohost = cli("vm", "start", "v3", "--host", "zz", check=False)
    assert nohost.returncode == 2 and "no host 'zz'" in nohost.stderr


@pytest.mark.vm
def test_demo_in_loopback_mode_prints_a_json_report(state_dir: Path, guest: GuestImage) -> None:
    result = cli("demo", "--loopback", "--json")
    report = json.loads(result.stdout)
    assert report["status"] == "completed"
    assert (report["guest_io_errors"], report["guest_verify_failures"]) == (0, 0)
    assert report["integrity"] == "ok"
    assert report["bytes_between_hosts"] is None
    assert "loopback" in report["missing"]["bytes_between_hosts"]
    assert processes_mentioning(str(state_dir)) == []


@pytest.mark.vm
def test_demo_migrates_back_and_forth(state_dir: Path, guest: GuestImage) -> None:
    plot = state_dir / "last.png"
    result = cli("demo", "--loopback", "--json", "--migrations", "3", "--disk-size", "128M",
                 "--workload", "moderate,prefill=32M", "--plot", str(plot))  # fmt: skip
    answer = json.loads(result.stdout)
    moves = [(r["source"], r["destination"]) for r in answer["migrations"]]
    assert moves == [("a", "b"), ("b", "a"), ("a", "b")]
    assert answer["healthy"] is True
    for report in answer["migrations"]:
        assert report["status"] == "completed" and report["integrity"] == "ok"
        assert (report["guest_io_errors"], report["guest_verify_failures"]) == (0, 0)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert processes_mentioning(str(state_dir)) == []
