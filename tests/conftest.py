"""Shared fixtures: a private state folder, the test guest, and labs that are always torn
down — and checked to leave nothing behind — even when a test fails."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devagent.client import DaemonClient, Endpoint
from devagent.guest.build import GuestImage, build_guest
from devagent.lab.lab import Lab
from devagent.orchestrate import wait_heartbeats, wait_phase
from devagent.tls import process_tls, use_tls


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    """The test guest; built on first use (``make test`` builds it before pytest)."""
    return build_guest()


SESSION_DIRS: list[Path] = []  # every state root this pytest run made, and only those


@pytest.fixture
def state_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short private state root (unix socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="da-", dir="/tmp"))
    SESSION_DIRS.append(path)
    monkeypatch.setenv("DEVAGENT_STATE", str(path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (a lab's folder, say)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After the whole run: no QEMU, daemon or agent started under this run's state roots,
    and no namespace of a lab this run made (other pytest runs on the machine are left be)."""
    yield
    leftovers = [line for root in SESSION_DIRS for line in processes_mentioning(str(root))]
    labs = {lab.name for root in SESSION_DIRS for lab in (root / "labs").glob("*")}
    stray_ns = [ns for ns in namespaces() if any(ns.startswith(f"da-{lab}-") for lab in labs)]
    for line in leftovers:
        os.kill(int(line.split(":")[0]), 9)
    for ns in stray_ns:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    assert leftovers == [], f"processes left behind: {leftovers}"
    assert stray_ns == [], f"namespaces left behind: {stray_ns}"


@pytest.fixture(autouse=True)
def the_process_certificate_stays_the_tests() -> Iterator[None]:
    """The process's TLS identity (``devagent.tls.use_tls``: a lab up or loaded makes its
    operator's this process's) is put back after each test, so that a test's lab does not
    turn a later test's plain NBD connections to TLS."""
    saved = process_tls()
    yield
    use_tls(saved)


@contextlib.contextmanager
def clean_lab(
    name: str,
    state_dir: Path,
    hosts: int = 2,
    *,
    show_logs: bool = False,
    insecure: bool = False,
    with_libvirt: bool = False,
) -> Iterator[Lab]:
    """A lab of ``hosts`` namespace hosts (links at 1 Gbit/s) for one test: removed after
    it, and checked to leave no process and no namespace behind. ``show_logs``: the end of
    each daemon's log and each VM's logs are printed first (pytest shows them on a
    failure). ``insecure``: without certificates, all in plaintext. ``with_libvirt``: a
    libvirtd in each host."""
    lab = Lab.up(
        name=name, hosts=hosts, link_rate="1gbit", insecure=insecure, with_libvirt=with_libvirt
    )
    try:
        yield lab
    finally:
        if show_logs:
            print_logs(lab)
        lab.down()
    assert processes_mentioning(str(state_dir)) == []
    assert not [ns for ns in namespaces() if ns.startswith(f"da-{name}")]


@contextlib.contextmanager
def private_lab(name: str, **options: Any) -> Iterator[Lab]:
    """:func:`clean_lab` in a short private state root of its own (a module's lab)."""
    root = Path(tempfile.mkdtemp(prefix=name, dir="/tmp"))
    SESSION_DIRS.append(root)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DEVAGENT_STATE", str(root))
        try:
            with clean_lab(name, root, **options) as made:
                yield made
        finally:
            shutil.rmtree(root, ignore_errors=True)


async def kill_daemon_during_ram(lab: Lab, source: Endpoint, host: str) -> None:
    """Once a migration from ``source`` is moving RAM (its destination made every agent),
    SIGKILL host ``host``'s daemon."""
    async with DaemonClient(source) as client:
        deadline = time.monotonic() + 60
        while not [j for j in (await client.get("/v1/migrations"))["migrations"]
                   if j["phase"] == "ram"]:  # fmt: skip
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    pid = lab.host(host).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)


def print_logs(lab: Lab, lines: int = 30) -> None:
    for host in lab.hosts:
        for log in [host.dir / "devagentd.log", *sorted(host.dir.glob("vms/*/*.log"))]:
            with contextlib.suppress(OSError):
                tail = log.read_text(errors="replace").splitlines()[-lines:]
                print(f"--- {log}", *tail, sep="\n")


def two_hosts(lab: Lab) -> tuple[Endpoint, Endpoint]:
    a, b = (Endpoint(url=h.url, token=lab.token, name=h.name) for h in lab.hosts[:2])
    return a, b


async def until_steady(at: Endpoint, vm: str) -> None:
    """Until VM ``vm``'s prefill is done and three seconds of steady I/O followed (the
    baseline of its migration's measures)."""
    await wait_phase(at, vm, lambda phase: phase == "run", "its run phase")
    await wait_heartbeats(at, vm, 30)
