"""Building the test guest (the real cache, reused), and a real boot of it under TCG."""

from __future__ import annotations

import gzip
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from devagent.cli.guest_cmd import guest_group
from devagent.errors import EnvironmentProblem, NotFound
from devagent.guest import build
from devagent.guest.build import (
    GuestImage,
    build_guest,
    cache_dir,
    kernel_version_from_depends,
    load_guest,
    module_depends,
    module_load_order,
    needs_build,
)
from devagent.guest.probe import (
    ConsoleParser,
    Heartbeat,
    Paused,
    ProbeEvent,
    Ready,
    Started,
    Verified,
    disk_digest,
)
from devagent.guest.workload import parse_workload
from devagent.qemu.accel import choose_accel


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    """The real guest in the real cache: built once, then reused by every run."""
    return build_guest()


# --- pieces -----------------------------------------------------------------------------


def test_kernel_version_from_apt_cache_depends() -> None:
    text = (
        "linux-image-amd64\n"
        "  Depends: linux-image-6.1.0-56-amd64\n"
        "  Depends: linux-image-6.1.0-9-amd64\n"
        " |Depends: something-else\n"
    )
    assert kernel_version_from_depends(text) == "6.1.0-56-amd64"
    assert kernel_version_from_depends("N: Unable to locate package linux-image-amd64\n") is None


def test_module_depends_reads_the_modinfo_section() -> None:
    ko = b"\x7fELF...\0license=GPL\0depends=virtio_ring,virtio\0retpoline=Y\0"
    assert module_depends(ko) == ["virtio_ring", "virtio"]
    assert module_depends(b"\0depends=\0name=failover\0") == []
    assert module_depends(b"no modinfo at all") == []


def test_module_load_order_puts_dependencies_first() -> None:
    order = module_load_order(
        {
            "virtio": ["virtio_ring"],
            "virtio_ring": [],
            "virtio_pci": ["virtio_ring", "virtio"],
            "virtio_blk": ["virtio", "virtio_ring", "builtin_thing"],
        }
    )
    assert order == ["virtio_ring", "virtio", "virtio_pci", "virtio_blk"]


def test_module_load_order_refuses_a_cycle() -> None:
    with pytest.raises(EnvironmentProblem, match="cycle"):
        module_load_order({"a": ["b"], "b": ["a"]})


def test_load_guest_in_an_empty_cache_says_how_to_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVAGENT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    with pytest.raises(NotFound, match="run `devagent guest build`"):
        load_guest()
    assert needs_build()


def test_cache_dir_defaults_to_the_home_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEVAGENT_CACHE", raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    assert cache_dir() == Path("/home/someone/.cache/devagent")


def test_a_missing_tool_is_a_clear_environment_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVAGENT_CACHE", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "apt-cache" else "/x")
    with pytest.raises(EnvironmentProblem, match=r"missing tool.*apt-cache"):
        build_guest()


def test_unpack_bzimage_finds_the_elf_behind_a_gzip_stream() -> None:
    elf = b"\x7fELF\x02" + bytes(100)
    image = b"MZ setup code \x1f\x8b\x08\x00 not a stream" + gzip.compress(elf) + b"trailer"
    assert build.unpack_bzimage(image) == elf
    assert build.unpack_bzimage(b"MZ nothing compressed here") is None
    assert not build.has_pvh_entry(elf)  # no program headers, no note
    assert not build.has_pvh_entry(b"MZ")


# --- the real build ---------------------------------------------------------------------


def test_build_makes_kernel_and_initrd_and_a_second_build_does_nothing(
    guest_image: GuestImage,
) -> None:
    assert guest_image.kernel.stat().st_size > 1 << 20
    # Debian's kernel has a PVH entry: the guest boots the unpacked ELF.
    assert guest_image.kernel.name == f"vmlinux-{guest_image.kernel_version}"
    assert build.has_pvh_entry(guest_image.kernel.read_bytes())
    assert (guest_image.kernel.parent / f"vmlinuz-{guest_image.kernel_version}").is_file()
    assert guest_image.initrd.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert load_guest() == guest_image
    assert not needs_build()
    before = (guest_image.initrd.stat().st_mtime_ns, guest_image.kernel.stat().st_mtime_ns)
    said: list[str] = []
    assert build_guest(log=said.append) == guest_image
    assert said == [f"guest up to date in {cache_dir()} (kernel {guest_image.kernel_version})"]
    after = (guest_image.initrd.stat().st_mtime_ns, guest_image.kernel.stat().st_mtime_ns)
    assert after == before


def cpio_listing(initrd: Path) -> dict[str, str]:
    """Path → mode string of every entry of a gzipped newc cpio."""
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"],
        input=gzip.decompress(initrd.read_bytes()),
        capture_output=True,
        check=True,
    ).stdout.decode()
    entries = {}
    for row in listing.splitlines():
        fields = row.split()
        name = fields[8] if len(fields) > 8 else fields[-1]
        entries[name] = fields[0]
    return entries


def test_initramfs_holds_init_busybox_ioprobe_and_the_modules(guest_image: GuestImage) -> None:
    entries = cpio_listing(guest_image.initrd)
    assert entries["init"].startswith("-rwx")
    assert entries["bin/busybox"].startswith("-rwx")
    assert entries["bin/ioprobe"].startswith("-rwx")
    assert entries["bin/sh"].startswith("l")
    for name, _ in build.MODULES:
        assert f"lib/modules/{name}.ko" in entries
    order = (
        subprocess.run(
            ["cpio", "-i", "--quiet", "--to-stdout", "lib/modules/order"],
            input=gzip.decompress(guest_image.initrd.read_bytes()),
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split()
    )
    assert sorted(order) == sorted(name for name, _ in build.MODULES)
    # Debian 6.1: virtio needs virtio_ring (the order in the lab notes had it the other way).
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_pci")
    assert order.index("failover") < order.index("net_failover") < order.index("virtio_net")


def test_a_changed_init_rebuilds_only_the_initramfs(
    guest_image: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A private cache with the real kernel and modules, so apt must not be asked again.
    real = guest_image.kernel.parent
    version = guest_image.kernel_version
    shutil.copy(guest_image.kernel, tmp_path)
    shutil.copy(real / f"vmlinuz-{version}", tmp_path)
    shutil.copytree(real / f"modules-{version}", tmp_path / f"modules-{version}")
    shutil.copy(guest_image.initrd, tmp_path)
    shutil.copy(real / build.MANIFEST, tmp_path)
    monkeypatch.setenv("DEVAGENT_CACHE", str(tmp_path))

    def no_apt(*_args: object) -> str:
        raise AssertionError("the kernel was resolved again")

    monkeypatch.setattr(build, "_resolve_kernel_version", no_apt)
    assert not needs_build()
    original = build._guest_source

    def changed_source(name: str) -> bytes:
        text = original(name)
        return text + b"\n# changed\n" if name == "init" else text

    monkeypatch.setattr(build, "_guest_source", changed_source)
    assert needs_build()
    said: list[str] = []
    rebuilt = build_guest(log=said.append)
    assert rebuilt.initrd.parent == tmp_path
    assert "building ioprobe and the initramfs" in said
    assert rebuilt.initrd.read_bytes() != guest_image.initrd.read_bytes()
    assert not needs_build()
    manifest = json.loads((tmp_path / build.MANIFEST).read_text())
    assert manifest["kernel_version"] == version


def test_cli_guest_build_json(guest_image: GuestImage) -> None:
    result = CliRunner().invoke(guest_group, ["build", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record == {
        "cache_dir": str(cache_dir()),
        "kernel": str(guest_image.kernel),
        "initrd": str(guest_image.initrd),
        "kernel_version": guest_image.kernel_version,
        "built": False,
        "accel": choose_accel(guest_image),  # the KVM probe's cached answer
    }


def test_cli_guest_build_reports_a_missing_tool_as_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVAGENT_CACHE", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    result = CliRunner().invoke(guest_group, ["build"])
    assert result.exit_code == 1
    assert "error: missing tool" in result.output


# --- a real boot ------------------------------------------------------------------------


def qemu_command(guest: GuestImage, disk: Path, append: str, cache: str) -> list[str]:
    """A plain QEMU command line for the test guest (the Vm object will take this over)."""
    return [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-m", "256",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "stdio",
        "-no-reboot",
        "-kernel", str(guest.kernel),
        "-initrd", str(guest.initrd),
        "-append", f"console=ttyS0 quiet panic=-1 {append}",
        "-drive", f"file={disk},if=virtio,format=raw,cache={cache}",
    ]  # fmt: skip


def o_direct_works(folder: Path) -> bool:
    probe = folder / "o_direct_probe"
    probe.write_bytes(b"\0" * 4096)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_DIRECT)
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    os.close(fd)
    return True


class Console:
    """A running QEMU whose serial console is its stdio."""

    def __init__(self, argv: list[str]):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.parser = ConsoleParser()
        self.events: list[ProbeEvent] = []
        self.transcript = bytearray()

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_for(self, kind: type[ProbeEvent], timeout: float = 60.0) -> ProbeEvent:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            data = os.read(fd, 4096)
            if not data:
                break
            self.transcript += data
            for event in self.parser.feed(data, time.monotonic()):
                self.events.append(event)
                if isinstance(event, kind):
                    return event
        tail = self.transcript[-2000:].decode(errors="replace")
        raise AssertionError(f"no {kind.__name__} from the guest; console tail:\n{tail}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def booted(guest_image: GuestImage, tmp_path: Path) -> Iterator[tuple[Console, Path]]:
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as f:
        f.truncate(64 << 20)
    workload = parse_workload("moderate,prefill=1M")
    cache = "none" if o_direct_works(tmp_path) else "writeback"
    console = Console(qemu_command(guest_image, disk, workload.to_kernel_arg(), cache))
    try:
        yield console, disk
    finally:
        console.close()


@pytest.mark.vm
def test_boot_run_verify_pause_and_the_disk_matches(
    booted: tuple[Console, Path], record_property: Callable[[str, object], None]
) -> None:
    console, disk = booted
    ready = console.wait_for(Ready, timeout=120)
    started = console.wait_for(Started)
    assert isinstance(started, Started)
    assert (started.device, started.device_bytes, started.blocks) == ("/dev/vda", 64 << 20, 16384)
    first = console.wait_for(Heartbeat)
    to_ready = ready.host_time - console.started
    to_first_heartbeat = first.host_time - console.started
    record_property("boot_to_ready_s", round(to_ready, 2))
    record_property("boot_to_first_heartbeat_s", round(to_first_heartbeat, 2))
    print(f"\nTCG: QEMU start → DEVAGENT-READY {to_ready:.2f} s, first heartbeat "
          f"{to_first_heartbeat:.2f} s")  # fmt: skip

    beat = first
    while not (isinstance(beat, Heartbeat) and beat.phase == "run" and beat.ops > 0):
        beat = console.wait_for(Heartbeat)
    assert isinstance(beat, Heartbeat)
    assert beat.errors == 0 and beat.verify_failures == 0
    assert beat.written_blocks >= 256  # the 1 MiB prefill

    console.send("verify")
    verified = console.wait_for(Verified)
    assert isinstance(verified, Verified)
    assert verified.failures == 0 and verified.blocks >= 256

    console.send("pause")
    paused = console.wait_for(Paused)
    assert isinstance(paused, Paused)
    idle = console.wait_for(Heartbeat)
    idle = console.wait_for(Heartbeat)  # the first may still count ops from before the pause
    assert isinstance(idle, Heartbeat)
    assert (idle.phase, idle.ops, idle.errors, idle.verify_failures) == ("idle", 0, 0, 0)
    assert idle.digest == paused.digest

    on_disk = disk_digest(disk)
    assert on_disk.digest == paused.digest
    assert on_disk.valid_blocks == paused.written_blocks
    assert on_disk.invalid_crc_blocks == 0
    assert console.parser.garbage_lines == 0


@pytest.fixture
def booted_with_nic(guest_image: GuestImage, tmp_path: Path) -> Iterator[Console]:
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as f:
        f.truncate(8 << 20)
    append = f"devagent.ip=10.0.2.15/24 {parse_workload('idle').to_kernel_arg()}"
    argv = [
        *qemu_command(guest_image, disk, append, cache="writeback"),
        "-netdev", "user,id=n0",
        "-device", "virtio-net-pci,netdev=n0",
    ]  # fmt: skip
    console = Console(argv)
    try:
        yield console
    finally:
        console.close()


@pytest.mark.vm
def test_boot_with_an_address_brings_eth0_up_and_idles(booted_with_nic: Console) -> None:
    console = booted_with_nic
    console.wait_for(Ready, timeout=120)
    beat = console.wait_for(Heartbeat)
    assert isinstance(beat, Heartbeat)
    assert (beat.phase, beat.ops, beat.errors) == ("idle", 0, 0)
    transcript = console.transcript.decode(errors="replace")
    assert "DEVAGENT-NET eth0 10.0.2.15/24" in transcript
    assert "insmod" not in transcript  # every module loaded
