"""The lab: real namespaces, veths, a bridge, tc shaping and real devagentd processes.

Every lab made here has a name starting with ``hl`` and lives under a private state root, and
every one is torn down (and checked to leave nothing) even when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from devagent.cli.lab_cmd import lab_group
from devagent.errors import EnvironmentProblem, NotFound, PeerError, StateError, UsageError
from devagent.lab import (
    Lab,
    LabHost,
    addressing,
    daemons,
    format_rate,
    layout,
    net,
    parse_rate,
    procs,
    run_in_host,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")
namespaces = [pytest.mark.lab, needs_root]


# ---- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def state_root() -> Iterator[Path]:
    """A short private state root for the whole module (unix socket paths stay short)."""
    path = Path(tempfile.mkdtemp(prefix="hl", dir="/tmp"))
    old = os.environ.get("DEVAGENT_STATE")
    os.environ["DEVAGENT_STATE"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            del os.environ["DEVAGENT_STATE"]
        else:
            os.environ["DEVAGENT_STATE"] = old
        shutil.rmtree(path, ignore_errors=True)


def leftovers(name: str, labdir: Path, pids: list[int]) -> list[str]:
    """Everything of lab ``name`` still there: namespaces, links, live pids, the folder."""
    found = [ns for ns in net.netns_names() if ns.startswith(f"da-{name}-")]
    found += [
        link
        for link in net.link_names()
        if link == f"dab-{name}" or link.startswith(f"dav-{name}-")
    ]
    found += [f"pid {pid}" for pid in pids if procs.alive(pid)]
    if labdir.exists():
        found.append(str(labdir))
    return found


@pytest.fixture
def make_lab() -> Iterator[Callable[..., Lab]]:
    """``make_lab(name, **up_args)``: Lab.up that is always torn down, checked to leave
    nothing, and that first clears anything a crashed earlier run left under that name."""
    made: list[tuple[str, Path, list[int]]] = []

    def make(name: str, **kwargs: object) -> Lab:
        Lab.destroy(name)
        made.append((name, layout.labs_root() / name, []))
        lab = Lab.up(name, **kwargs)  # type: ignore[arg-type]
        made[-1][2].extend(h.pid for h in lab.hosts if h.pid)
        return lab

    try:
        yield make
    finally:
        for name, labdir, pids in made:
            Lab.destroy(name)
            assert leftovers(name, labdir, pids) == []


def get_health(lab: Lab, url: str, token: str | None) -> tuple[int, dict[str, object]]:
    """``GET /v1/health`` with ``token``, over HTTPS with the lab's operator certificate."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(f"{url}/v1/health", headers=headers)
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=lab.client_context())
    )
    try:
        with opener.open(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def connects(src: LabHost, dst: LabHost, timeout: float = 3.0) -> bool:
    """Whether a TCP connect from inside ``src`` to ``dst``'s daemon succeeds."""
    code = (
        "import socket\n"
        f"socket.create_connection(({dst.address!r}, {dst.port}), timeout={timeout}).close()\n"
    )
    argv = run_in_host(src, [sys.executable, "-c", code])
    return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


SINK = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = server.accept()
total = 0
while data := conn.recv(1 << 16):
    total += len(data)
print(total, flush=True)
"""

SEND = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as conn:
    conn.sendall(b"x" * int(sys.argv[3]))
"""


def send_bytes(src: LabHost, dst: LabHost, count: int, port: int = 7490) -> int:
    """Send ``count`` bytes over TCP from ``src`` to a sink in ``dst``; the bytes received."""
    argv = [sys.executable, "-c", SINK, dst.address, str(port)]
    sink = subprocess.Popen(run_in_host(dst, argv), stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        assert sink.stdout.readline().strip() == "ready"
        send = [sys.executable, "-c", SEND, dst.address, str(port), str(count)]
        subprocess.run(run_in_host(src, send), check=True, timeout=60)
        out, _ = sink.communicate(timeout=60)
        return int(out.strip())
    finally:
        if sink.poll() is None:
            sink.kill()
        sink.wait()


# ---- pure checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("1gbit", 10**9),
        ("100mbit", 10**8),
        ("1.5gbit", 1_500_000_000),
        ("500kbit", 500_000),
        ("20MBIT", 20_000_000),
        ("64000", 64_000),
        (10**9, 10**9),
    ],
)
def test_parse_rate_reads_tc_units_as_bits_per_second(text: str | int, bps: int) -> None:
    assert parse_rate(text) == bps


@pytest.mark.parametrize("text", ["fast", "10mbps", "-1mbit", "1 gigabit", "", "100", "1000tbit"])
def test_parse_rate_rejects_garbage_and_absurd_rates(text: str) -> None:
    with pytest.raises(UsageError):
        parse_rate(text)


def test_format_rate_is_the_inverse_of_parse_rate() -> None:
    for text in ("1gbit", "100mbit", "1500mbit", "64kbit"):
        assert format_rate(parse_rate(text)) == text


@pytest.mark.parametrize("name", ["BAD", "toolong", "a-b", "", "lab_1", "é"])
def test_bad_lab_names_are_refused_before_anything_is_made(name: str, state_root: Path) -> None:
    with pytest.raises(UsageError, match="bad lab name"):
        Lab.up(name, loopback=True)
    assert not (state_root / "labs" / name).exists() if name else True


@pytest.mark.parametrize("hosts", [0, 27])
def test_host_counts_out_of_range_are_refused(hosts: int) -> None:
    with pytest.raises(UsageError, match="1 to 26 hosts"):
        Lab.up("hlbad", hosts=hosts, loopback=True)


def test_link_rate_with_loopback_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="loopback"):
        Lab.up("hlbad", link_rate="1gbit", loopback=True)
    assert "hlbad" not in Lab.list()


def test_a_state_root_too_long_for_unix_sockets_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVAGENT_STATE", "/tmp/" + "x" * 90)
    with pytest.raises(UsageError, match="107-byte"):
        Lab.up("hllong", loopback=True)
    assert not Path("/tmp/" + "x" * 90).exists()


def test_namespace_mode_without_root_is_an_environment_problem(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(EnvironmentProblem, match="needs root"):
        Lab.up("hlroot")
    assert "hlroot" not in Lab.list()


def test_load_of_an_absent_lab_is_not_found() -> None:
    with pytest.raises(NotFound, match="hlnone"):
        Lab.load("hlnone")


def test_run_in_host_prefixes_only_namespaced_hosts() -> None:
    ns_host = LabHost("a", "10.0.0.1", 7480, Path("/x"), netns="da-hl-a", veth="dav-hl-a")
    lo_host = LabHost("a", "127.0.0.1", 7481, Path("/x"))
    assert run_in_host(ns_host, ["true"]) == ["ip", "netns", "exec", "da-hl-a", "true"]
    assert run_in_host(lo_host, ["true"]) == ["true"]


# ---- loopback mode --------------------------------------------------------------------------


def test_loopback_lab_runs_daemons_on_distinct_ports_and_down_kills_its_processes(
    make_lab: Callable[..., Lab],
) -> None:
    lab = make_lab("hllo", hosts=2, loopback=True)
    a, b = lab.hosts
    assert (a.address, b.address) == ("127.0.0.1", "127.0.0.1")
    assert a.port != b.port and a.netns is None and a.veth is None
    assert (lab.token_file.stat().st_mode & 0o777) == 0o600
    assert lab.shared_dir.is_dir()
    for host in lab.hosts:
        assert get_health(lab, host.url, lab.token) == (
            200,
            {"host": host.name, "address": "127.0.0.1", "port": host.port},
        )
        assert get_health(lab, host.url, None)[0] == 401
    assert Lab.load("hllo").hosts == lab.hosts
    assert "hllo" in Lab.list()
    with pytest.raises(UsageError, match="loopback"):
        lab.set_link("a", up=False)
    with pytest.raises(NotFound, match="hosts: a, b"):
        lab.host("z")

    # A process working in the lab's folder (as a VM would) goes; a stranger stays.
    ours = subprocess.Popen(["sleep", "300"], cwd=a.dir, start_new_session=True)
    stranger = subprocess.Popen(["sleep", "300"], cwd="/tmp", start_new_session=True)
    try:
        lab.down()
        assert ours.wait(timeout=5) is not None
        assert procs.alive(stranger.pid)
        assert not any(procs.alive(h.pid) for h in lab.hosts if h.pid)
        assert not lab.dir.exists()
        assert "hllo" not in Lab.list()
        lab.down()  # idempotent
    finally:
        for proc in (ours, stranger):
            proc.kill()
            proc.wait()


def test_cli_up_twice_is_a_clear_error_and_status_down_work() -> None:
    runner = CliRunner()
    Lab.destroy("hlcli")
    try:
        first = runner.invoke(lab_group, ["up", "--loopback", "--name", "hlcli", "--json"])
        assert first.exit_code == 0, first.output
        status = json.loads(first.stdout)
        assert [h["name"] for h in status["hosts"]] == ["a", "b"]
        assert all(h["healthy"] for h in status["hosts"])

        again = runner.invoke(lab_group, ["up", "--loopback", "--name", "hlcli"])
        assert again.exit_code != 0
        assert "already exists" in again.output and "lab down --name hlcli" in again.output

        shown = runner.invoke(lab_group, ["status", "--name", "hlcli", "--json"])
        assert shown.exit_code == 0
        assert json.loads(shown.stdout)["hosts"][1]["url"] == status["hosts"][1]["url"]
        table = runner.invoke(lab_group, ["status", "--name", "hlcli"])
        assert "healthy" in table.output

        bad = runner.invoke(lab_group, ["up", "--name", "hlcli2", "--link-rate", "fast"])
        assert bad.exit_code == 2 and "bad link rate" in bad.output

        down = runner.invoke(lab_group, ["down", "--name", "hlcli", "--json"])
        assert json.loads(down.stdout) == {"removed": ["hlcli"]}
        gone = runner.invoke(lab_group, ["status", "--name", "hlcli"])
        assert gone.exit_code == 1 and "no lab named 'hlcli'" in gone.output
    finally:
        Lab.destroy("hlcli")


def test_quick_acks_reads_the_route_s_metrics_whatever_they_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shown = {
        "da-x-a": '[{"dst":"10.1.2.0/24","metrics":[{"congctl":"bbr"},{"quickack":1}]}]',
        "da-x-b": '[{"dst":"10.1.2.0/24","metrics":[{"quickack":0}]}]',
        "da-x-c": '[{"dst":"10.1.2.0/24","dev":"br0","flags":[]}]',
    }

    def fake_run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 0, shown[argv[argv.index("-n") + 1]], "")

    monkeypatch.setattr(net, "run", fake_run)
    assert [net.quick_acks("10.1.2.0/24", ns) for ns in shown] == [True, False, False]


# ---- namespace mode -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ns_lab(state_root: Path) -> Iterator[Lab]:
    """One shaped 2-host namespace lab shared by the tests that only use it."""
    if os.geteuid() != 0:
        pytest.skip("namespaces need root")
    Lab.destroy("hlns")
    lab = Lab.up("hlns", hosts=2, link_rate="100mbit")
    pids = [h.pid for h in lab.hosts if h.pid]
    try:
        yield lab
    finally:
        lab.down()
        assert leftovers("hlns", lab.dir, pids) == []


@pytest.mark.lab
def test_namespace_daemons_answer_health_with_the_token_only(ns_lab: Lab) -> None:
    assert [h.netns for h in ns_lab.hosts] == ["da-hlns-a", "da-hlns-b"]
    assert ns_lab.mgmt_address is not None and ns_lab.mgmt_address.endswith(".254")
    for i, host in enumerate(ns_lab.hosts):
        assert ns_lab.subnet is not None
        assert host.address == str(ns_lab.subnet.network_address + i + 1)
        assert get_health(ns_lab, host.url, ns_lab.token) == (
            200,
            {"host": host.name, "address": host.address, "port": 7480},
        )
        assert get_health(ns_lab, host.url, None)[0] == 401
        assert get_health(ns_lab, host.url, "wrong")[0] == 401
        assert ns_lab.daemon_alive(host)


@pytest.mark.lab
def test_links_are_shaped_both_ways_and_can_be_reshaped(ns_lab: Lab) -> None:
    b = ns_lab.host("b")
    assert ns_lab.link_rate_bps == 100_000_000
    out_ns = subprocess.run(
        ["tc", "-n", str(b.netns), "qdisc", "show", "dev", "eth0"], capture_output=True, text=True
    ).stdout
    out_root = subprocess.run(
        ["tc", "qdisc", "show", "dev", str(b.veth)], capture_output=True, text=True
    ).stdout
    assert "tbf" in out_ns and "rate 100Mbit" in out_ns
    assert "tbf" in out_root and "rate 100Mbit" in out_root
    try:
        ns_lab.shape("b", "20mbit")
        row = ns_lab.status()["hosts"][1]
        assert (row["rate_out_bps"], row["rate_in_bps"]) == (20_000_000, 20_000_000)
        assert Lab.load("hlns").host("b").link_rate_bps == 20_000_000
        ns_lab.shape("b", None)
        assert net.shaped_rate(str(b.veth)) is None
        assert net.shaped_rate("eth0", netns=b.netns) is None
    finally:
        ns_lab.shape("b", "100mbit")


@pytest.mark.lab
def test_each_host_acknowledges_the_lab_at_once(ns_lab: Lab) -> None:
    # QEMU's NBD server over TLS waits on delayed ACKs otherwise (net.ack_at_once)
    assert ns_lab.subnet is not None
    for host in ns_lab.hosts:
        assert net.quick_acks(str(ns_lab.subnet), str(host.netns))
    assert not net.quick_acks("10.255.255.0/24", str(ns_lab.hosts[0].netns))


@pytest.mark.lab
def test_hosts_reach_each_other_and_a_cut_link_stops_them(ns_lab: Lab) -> None:
    a, b = ns_lab.hosts
    assert connects(a, b)
    try:
        ns_lab.set_link("b", up=False)
        assert not ns_lab.link_is_up("b")
        assert not connects(a, b, timeout=1.0)
    finally:
        ns_lab.set_link("b", up=True)
    assert ns_lab.link_is_up("b")
    assert connects(a, b)


@pytest.mark.lab
def test_link_counters_grow_with_traffic_as_each_host_sees_it(ns_lab: Lab) -> None:
    a, b = ns_lab.hosts
    a_rx0, a_tx0 = ns_lab.link_counters(a)
    b_rx0, b_tx0 = ns_lab.link_counters(b)
    size = 2_000_000
    assert send_bytes(a, b, size) == size
    a_rx1, a_tx1 = ns_lab.link_counters(a)
    b_rx1, b_tx1 = ns_lab.link_counters(b)
    assert a_tx1 - a_tx0 >= size
    assert b_rx1 - b_rx0 >= size
    assert a_rx1 - a_rx0 < size  # acknowledgements only
    assert b_tx1 - b_tx0 < size


@pytest.mark.lab
def test_a_second_lab_never_gets_a_live_labs_subnet(ns_lab: Lab) -> None:
    assert ns_lab.subnet is not None
    start = zlib.crc32(b"hlns") % 256
    twin = next(f"hl{i}" for i in range(10000) if zlib.crc32(f"hl{i}".encode()) % 256 == start)
    chosen = addressing.choose_subnet(twin, 2, None)
    assert not chosen.overlaps(ns_lab.subnet)
    with pytest.raises(UsageError, match="overlaps"):
        addressing.choose_subnet("hlx", 2, str(ns_lab.subnet))


@pytest.mark.lab
@needs_root
def test_up_twice_is_a_clear_error(ns_lab: Lab) -> None:
    with pytest.raises(StateError, match=r"already exists.*lab down --name hlns"):
        Lab.up("hlns", hosts=2)
    assert get_health(ns_lab, ns_lab.host("a").url, ns_lab.token)[0] == 200


@pytest.mark.lab
@needs_root
def test_down_kills_everything_in_the_namespaces_and_under_the_folder(
    make_lab: Callable[..., Lab],
) -> None:
    lab = make_lab("hldn", hosts=2)
    a, b = lab.hosts
    in_ns = subprocess.Popen(run_in_host(a, ["sleep", "300"]), start_new_session=True)
    in_dir = subprocess.Popen(["sleep", "300"], cwd=b.dir, start_new_session=True)
    stranger = subprocess.Popen(["sleep", "300"], cwd="/tmp", start_new_session=True)
    pids = [h.pid for h in lab.hosts if h.pid] + [in_ns.pid, in_dir.pid]
    try:
        lab.down()
        assert leftovers("hldn", lab.dir, pids) == []
        assert procs.alive(stranger.pid)
        lab.down()
        assert Lab.destroy("hldn") is False
    finally:
        for proc in (in_ns, in_dir, stranger):
            proc.kill()
            proc.wait()


@pytest.mark.lab
@needs_root
def test_down_works_from_a_corrupt_state_file(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab("hlcor", hosts=1)
    pids = [h.pid for h in lab.hosts if h.pid]
    lab.state_file.write_text('{"name": "hlcor", "hos')
    with pytest.raises(StateError, match="unreadable"):
        Lab.load("hlcor")
    assert Lab.destroy("hlcor") is True
    assert leftovers("hlcor", lab.dir, pids) == []


@pytest.mark.lab
@needs_root
def test_a_daemon_that_fails_to_start_tears_the_lab_down(
    make_lab: Callable[..., Lab], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    broken = tmp_path / "devagentd"
    broken.write_text("#!/bin/sh\necho 'cannot bind: boom' >&2\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setattr(daemons, "daemon_binary", lambda: broken)
    with pytest.raises(PeerError, match=r"host a .*exited with status 3[\s\S]*boom"):
        make_lab("hlfail", hosts=2, link_rate="1gbit")
    assert leftovers("hlfail", layout.labs_root() / "hlfail", []) == []


@pytest.mark.lab
@needs_root
def test_down_all_finds_labs_by_state_and_by_interface_names(
    make_lab: Callable[..., Lab],
) -> None:
    first = make_lab("hlal1", hosts=1)
    second = make_lab("hlal2", hosts=1)
    shutil.rmtree(second.dir)  # only its namespace, veth and bridge tell it exists
    pids = [h.pid for lab in (first, second) for h in lab.hosts if h.pid]
    removed = Lab.down_all(name_prefix="hlal")
    assert removed == ["hlal1", "hlal2"]
    assert leftovers("hlal1", first.dir, pids) == leftovers("hlal2", second.dir, []) == []
