"""No plaintext between hosts: a packet capture of the lab link during a migration (RAM and
disk moving, the guest writing) holds none of the guest's data, which every block ioprobe
writes starts with. The same capture in a lab made with ``--insecure`` holds it: the
search finds what is there."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devagent import pki
from devagent.guest.build import GuestImage
from devagent.lab.lab import Lab
from devagent.orchestrate import migrate, start_vm, wait_heartbeats
from devagent.wait import wait_until
from tests.conftest import clean_lab, two_hosts, until_steady

pytestmark = [pytest.mark.vm, pytest.mark.lab]

MARKER = b"DAGPROBE"  # the start of every block the guest's ioprobe writes (ioprobe.c)


@contextlib.contextmanager
def capture(lab: Lab, host: str, out: Path) -> Iterator[Path]:
    """tcpdump of host ``host``'s link (its veth's end on the lab bridge), whole packets."""
    veth = lab.host(host).veth
    assert veth is not None
    proc = subprocess.Popen(
        ["tcpdump", "-i", veth, "-s", "0", "-U", "-w", str(out), "tcp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not out.exists():  # tcpdump makes the file once it listens
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline, "tcpdump did not start"
            time.sleep(0.05)
        yield out
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def served_serial(lab: Lab, host: str) -> str:
    """The serial number of the certificate host ``host``'s daemon presents now."""
    target = lab.host(host)
    context = lab.client_context()
    assert context is not None
    with (
        socket.create_connection((target.address, target.port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls,
    ):
        cert = tls.getpeercert()
    assert cert is not None
    return str(cert["serialNumber"])


async def captured_migration(lab: Lab, out: Path) -> tuple[bytes, int]:
    """A hybrid migration a→b of a writing guest, captured on a's link: the capture and the
    disk bytes the migration moved."""
    a, b = two_hosts(lab)
    await start_vm(a, {"name": "t1", "disk_size": "64M", "storage": "local",
                       "workload": "moderate,span=16M,prefill=16M"})  # fmt: skip
    await until_steady(a, "t1")
    with capture(lab, "a", out):
        report = await migrate(a, b, "t1", storage="hybrid", link_rate_bps=lab.link_rate_bps)
    assert report.status == "completed", report.error
    assert (report.guest_io_errors, report.integrity) == (0, "ok")
    assert report.disk_bytes_moved
    return out.read_bytes(), report.disk_bytes_moved


@pytest.mark.parametrize("secure", [True, False], ids=["tls", "insecure"])
async def test_a_capture_of_a_migration_holds_no_guest_data(
    state_dir: Path, guest: GuestImage, tmp_path: Path, secure: bool
) -> None:
    with clean_lab("ttls", state_dir, insecure=not secure) as lab:
        data, moved = await captured_migration(lab, tmp_path / "link.pcap")
        if secure:
            await a_sighup_reloads_the_certificate_and_leaves_the_vm_running(lab)
        else:
            log = (lab.host("a").dir / "devagentd.log").read_text()
            assert "--insecure: plain HTTP and NBD" in log
    print(f"\ncaptured {len(data):,} B; the disk moved {moved:,} B; "
          f"{data.count(MARKER)} markers")  # fmt: skip
    assert len(data) > moved  # the disk's bytes crossed the captured link
    if secure:
        assert data.count(MARKER) == 0
    else:
        assert data.count(MARKER) > 100


async def a_sighup_reloads_the_certificate_and_leaves_the_vm_running(lab: Lab) -> None:
    """Host b gets a new certificate; its daemon's SIGHUP makes it the one presented, and
    the guest that just arrived on b goes on writing."""
    _, b = two_hosts(lab)
    before = served_serial(lab, "b")
    pki.issue_host(lab.pki_dir, "b", [lab.host("b").address])
    pid = lab.host("b").pid
    assert pid is not None
    os.kill(pid, signal.SIGHUP)
    await wait_until(
        lambda: served_serial(lab, "b") != before, timeout=10, what="b's new certificate"
    )
    beats = await wait_heartbeats(b, "t1", 3)  # three more, after the reload
    assert all(beat.errors == 0 for beat in beats)
    assert lab.daemon_alive("b")
