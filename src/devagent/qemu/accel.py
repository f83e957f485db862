"""Choosing the accelerator: KVM only where a probe boot under KVM reaches the guest's
userspace, TCG otherwise.

On some machines ``/dev/kvm`` opens but a Linux guest hangs right after the kernel
decompresses; only a real boot tells. The probe's answer is cached beside the test guest,
keyed by the kernel and QEMU versions, so it runs once per machine.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Literal

from devagent.guest.build import GuestImage, cache_dir

log = logging.getLogger(__name__)

Accel = Literal["tcg", "kvm"]
READY_MARK = b"DEVAGENT-READY"
PROBE_TIMEOUT_S = 20.0


@functools.cache  # one subprocess per process: the daemon's VMs and its KVM probe's cache key
def qemu_version() -> str:
    """The first line of ``qemu-system-x86_64 --version`` ("unknown" without one)."""
    try:
        out = subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def _probe_file() -> Path:
    return cache_dir() / "kvm-probe.json"


def probe_kvm(guest: GuestImage, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Boot the test guest under KVM; True when its userspace prints the ready mark."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    argv = [
        "qemu-system-x86_64",
        "-machine", "pc,accel=kvm",
        "-m", "256",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-kernel", str(guest.kernel),
        "-initrd", str(guest.initrd),
        "-append", "console=ttyS0 quiet panic=-1",
        "-serial", "stdio",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                seen = (seen + os.read(proc.stdout.fileno(), 4096))[-4096:]
                if READY_MARK in seen:
                    return True
        return False
    finally:
        proc.kill()
        proc.wait()


def no_cached_accel(guest: GuestImage) -> bool:
    """True when no probe answer is cached for this guest and QEMU."""
    try:
        cached = json.loads(_probe_file().read_text())
    except (OSError, ValueError):
        return True
    return bool(cached.get("key") != _key(guest))


def _key(guest: GuestImage) -> dict[str, str]:
    return {"kernel": guest.kernel_version, "qemu": qemu_version()}


def choose_accel(guest: GuestImage, *, probe: bool = False) -> Accel:
    """The cached probe's answer; with ``probe``, run the probe when no answer is cached."""
    key = _key(guest)
    path = _probe_file()
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return "kvm" if cached.get("kvm") else "tcg"
    except (OSError, ValueError):
        pass
    if not probe:
        return "tcg"
    started = time.monotonic()
    works = probe_kvm(guest)
    log.info(
        "KVM probe boot: %s in %.1f s", "works" if works else "fails", time.monotonic() - started
    )
    path.write_text(json.dumps({"key": key, "kvm": works, "probed_at": time.time()}))
    return "kvm" if works else "tcg"
