"""Build devagent's test guest: Debian's kernel plus a busybox initramfs with ioprobe.

The guest lives in the cache folder (``$DEVAGENT_CACHE`` or ``~/.cache/devagent``)::

    vmlinuz-<ver>          the kernel, from Debian's linux-image-<ver> package
    vmlinux-<ver>          the same unpacked to ELF, booted through PVH (no decompression)
    modules-<ver>/*.ko     the virtio modules the initramfs loads (decompressed)
    initrd-<ver>.gz        busybox, the modules, ioprobe and /init, as a newc cpio
    guest.json             manifest: kernel version, file names, hash of the inputs

Building is idempotent. The kernel package is fetched once (``apt-get download`` and
``dpkg -x`` into a temporary folder: nothing is installed on the host); the initramfs is
rebuilt only when ioprobe.c, init, busybox or the module set change (their hash is in the
manifest). ``force=True`` redoes everything, resolving the kernel version again.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from devagent.errors import EnvironmentProblem, NotFound

logger = logging.getLogger(__name__)

MANIFEST = "guest.json"
MANIFEST_FORMAT = 2
#: Bump when the way the initramfs is put together changes, so old ones get rebuilt.
RECIPE = 1
META_PACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")

#: Modules the initramfs loads, with their place in ``lib/modules/<ver>/kernel``. The load
#: order written to the initramfs comes from each module's own ``depends=`` (modinfo), so it
#: holds whatever the kernel (in 6.1, virtio needs virtio_ring first).
MODULES: tuple[tuple[str, str], ...] = (
    ("virtio", "drivers/virtio"),
    ("virtio_ring", "drivers/virtio"),
    ("virtio_pci_modern_dev", "drivers/virtio"),
    ("virtio_pci_legacy_dev", "drivers/virtio"),
    ("virtio_pci", "drivers/virtio"),
    ("virtio_blk", "drivers/block"),
    ("failover", "net/core"),
    ("net_failover", "drivers/net"),
    ("virtio_net", "drivers/net"),
    ("virtio_console", "drivers/char"),
)

Log = Callable[[str], None]


@dataclass(frozen=True)
class GuestImage:
    """A built test guest: boot it with ``-kernel kernel -initrd initrd``."""

    kernel: Path
    initrd: Path
    kernel_version: str


def cache_dir() -> Path:
    """The folder holding the guest (and other cached artefacts)."""
    env = os.environ.get("DEVAGENT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "devagent"


def load_guest() -> GuestImage:
    """The guest already built in the cache folder; NotFound when there is none."""
    folder = cache_dir()
    manifest = _read_manifest(folder)
    if manifest is None:
        raise NotFound(f"no test guest in {folder}: run `devagent guest build`")
    image = _image_from_manifest(folder, manifest)
    for path in (image.kernel, image.initrd):
        if not path.is_file():
            raise NotFound(f"test guest file {path} is missing: run `devagent guest build`")
    return image


def needs_build() -> bool:
    """Whether :func:`build_guest` (without force) would build anything."""
    folder = cache_dir()
    manifest = _read_manifest(folder)
    if manifest is None:
        return True
    image = _image_from_manifest(folder, manifest)
    modules = folder / f"modules-{image.kernel_version}"
    if not image.kernel.is_file() or not _have_kernel(folder, image.kernel_version):
        return True
    return not image.initrd.is_file() or manifest["inputs"] != _inputs_hash(modules)


def build_guest(*, force: bool = False, log: Log | None = None) -> GuestImage:
    """Make sure the test guest is in the cache folder, building what is missing or stale."""
    say: Log = log if log is not None else logger.info
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with _build_lock(folder):
        return _build_locked(folder, force, say)


def _build_locked(folder: Path, force: bool, say: Log) -> GuestImage:
    manifest = None if force else _read_manifest(folder)
    version = str(manifest["kernel_version"]) if manifest else None
    if version is None or not _have_kernel(folder, version):
        _require_tools("apt-cache", "apt-get", "dpkg")
        version = _resolve_kernel_version(say)
        if force or not _have_kernel(folder, version):
            _fetch_kernel(folder, version, say)
        manifest = None
    kernel = _boot_kernel(folder, version, manifest, say)
    modules = folder / f"modules-{version}"

    inputs = _inputs_hash(modules)
    initrd = folder / f"initrd-{version}.gz"
    if (
        manifest is not None
        and manifest["inputs"] == inputs
        and manifest["initrd"] == initrd.name
        and manifest["kernel"] == kernel.name
        and initrd.is_file()
    ):
        say(f"guest up to date in {folder} (kernel {version})")
        return _image_from_manifest(folder, manifest)

    _require_tools("gcc", "cpio")
    if not BUSYBOX.is_file():
        raise EnvironmentProblem(f"{BUSYBOX} not found: install the busybox-static package")
    say("building ioprobe and the initramfs")
    _build_initramfs(folder, modules, initrd)
    new_manifest: dict[str, object] = {
        "format": MANIFEST_FORMAT,
        "kernel_version": version,
        "kernel": kernel.name,
        "initrd": initrd.name,
        "inputs": inputs,
    }
    _atomic_write(folder / MANIFEST, json.dumps(new_manifest, indent=2).encode() + b"\n")
    image = _image_from_manifest(folder, new_manifest)
    say(f"guest ready in {folder}: {image.kernel.name}, {image.initrd.name}")
    return image


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """One build at a time per cache folder (make, a test session and a daemon may race)."""
    with (folder / "guest.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- manifest ---------------------------------------------------------------------------


def _read_manifest(folder: Path) -> dict[str, object] | None:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return None
    for key in ("kernel_version", "kernel", "initrd", "inputs"):
        if not isinstance(data.get(key), str):
            return None
    return data


def _image_from_manifest(folder: Path, manifest: dict[str, object]) -> GuestImage:
    return GuestImage(
        kernel=folder / str(manifest["kernel"]),
        initrd=folder / str(manifest["initrd"]),
        kernel_version=str(manifest["kernel_version"]),
    )


def _guest_source(name: str) -> bytes:
    return resources.files("devagent.guest").joinpath(name).read_bytes()


def _inputs_hash(modules: Path) -> str:
    """Hash of everything the initramfs is made of."""
    digest = hashlib.sha256(f"recipe {RECIPE}\n".encode())
    for name in ("ioprobe.c", "init"):
        digest.update(name.encode() + b"\0" + _guest_source(name))
    for name, _ in MODULES:
        path = modules / f"{name}.ko"
        digest.update(name.encode() + b"\0")
        if path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    if BUSYBOX.is_file():
        stat = BUSYBOX.stat()
        digest.update(f"busybox {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# --- kernel -----------------------------------------------------------------------------


def _have_modules(modules: Path) -> bool:
    return all((modules / f"{name}.ko").is_file() for name, _ in MODULES)


def _have_kernel(folder: Path, version: str) -> bool:
    return (folder / f"vmlinuz-{version}").is_file() and _have_modules(
        folder / f"modules-{version}"
    )


def _require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise EnvironmentProblem(
            f"missing tool(s) {', '.join(missing)}: the guest build needs a Debian host with "
            "apt, dpkg, gcc, cpio and busybox-static (`make deps` installs them)"
        )


def _run(argv: Sequence[str], *, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(
            list(argv), cwd=cwd, capture_output=True, text=True, check=False, timeout=1800
        )
    except OSError as err:
        raise EnvironmentProblem(f"cannot run {argv[0]}: {err}") from err
    except subprocess.TimeoutExpired as err:
        raise EnvironmentProblem(f"{' '.join(argv)} took too long") from err
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise EnvironmentProblem(
            f"{' '.join(argv)} failed (exit {done.returncode}): " + " | ".join(tail)
        )
    return done.stdout


_DEPENDS_RE = re.compile(r"^\s*Depends:\s*linux-image-(\S+-amd64)\s*$", re.MULTILINE)


def kernel_version_from_depends(text: str) -> str | None:
    """The newest ``<ver>`` among ``Depends: linux-image-<ver>`` lines of apt-cache."""
    versions: list[str] = _DEPENDS_RE.findall(text)
    if not versions:
        return None
    return max(versions, key=_version_key)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def _resolve_kernel_version(say: Log) -> str:
    def ask() -> str | None:
        try:
            return kernel_version_from_depends(_run(["apt-cache", "depends", META_PACKAGE]))
        except EnvironmentProblem:
            return None

    version = ask()
    if version is None:
        say("apt knows no kernel package yet: running apt-get update")
        _run(["apt-get", "update", "-q"])
        version = ask()
    if version is None:
        raise EnvironmentProblem(
            f"apt-cache cannot resolve {META_PACKAGE}: the guest needs Debian's kernel package"
        )
    return version


def _fetch_kernel(folder: Path, version: str, say: Log) -> None:
    package = f"linux-image-{version}"
    with tempfile.TemporaryDirectory(prefix="kernel-", dir=folder) as tmp_name:
        tmp = Path(tmp_name)
        say(f"downloading {package} (about 70 MB)")
        _run(["apt-get", "download", package], cwd=tmp)
        debs = sorted(tmp.glob(f"{package}_*.deb"))
        if not debs:
            raise EnvironmentProblem(f"apt-get download {package} left no .deb in {tmp}")
        say(f"unpacking {debs[0].name}")
        tree = tmp / "tree"
        _run(["dpkg", "-x", str(debs[0]), str(tree)])
        kernel = tree / "boot" / f"vmlinuz-{version}"
        if not kernel.is_file():
            raise EnvironmentProblem(f"{debs[0].name} holds no boot/vmlinuz-{version}")
        modules = folder / f"modules-{version}"
        modules.mkdir(exist_ok=True)
        for name, subdir in MODULES:
            _extract_module(tree / "lib" / "modules" / version / "kernel" / subdir, name, modules)
        shutil.copyfile(kernel, folder / f"vmlinuz-{version}.tmp")
        (folder / f"vmlinuz-{version}.tmp").replace(folder / f"vmlinuz-{version}")


def _extract_module(source_dir: Path, name: str, modules: Path) -> None:
    """Copy ``name.ko`` (or decompress ``.ko.xz`` / ``.ko.zst``) into ``modules``."""
    target = modules / f"{name}.ko"
    plain = source_dir / f"{name}.ko"
    if plain.is_file():
        _atomic_write(target, plain.read_bytes())
        return
    packed_xz = source_dir / f"{name}.ko.xz"
    if packed_xz.is_file():
        _atomic_write(target, lzma.decompress(packed_xz.read_bytes()))
        return
    packed_zst = source_dir / f"{name}.ko.zst"
    if packed_zst.is_file():
        _require_tools("zstd")
        _run(["zstd", "-q", "-d", "-f", "-o", str(target), str(packed_zst)])
        return
    raise EnvironmentProblem(f"kernel module {name} not found in {source_dir}")


def module_depends(ko: bytes) -> list[str]:
    """The ``depends=`` list of a kernel module's modinfo section."""
    found = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    if found is None:
        return []
    return [name for name in found.group(1).decode(errors="replace").split(",") if name]


def module_load_order(depends: dict[str, list[str]]) -> list[str]:
    """The modules of ``depends`` with each one after the ones it needs (which must be in
    ``depends`` too; anything else is taken as built into the kernel), otherwise in the
    given order."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name not in depends:
            return
        if name in visiting:
            raise EnvironmentProblem(f"kernel modules depend on each other in a cycle: {name}")
        visiting.add(name)
        for needed in depends[name]:
            visit(needed)
        visiting.discard(name)
        order.append(name)

    for name in depends:
        visit(name)
    return order


def _boot_kernel(folder: Path, version: str, manifest: dict[str, object] | None, say: Log) -> Path:
    """The kernel file to boot: ``vmlinux-<ver>``, the bzImage unpacked to its ELF, which
    QEMU starts through its PVH entry without the in-guest decompression that costs about
    6 s under TCG; ``vmlinuz-<ver>`` when the kernel cannot be unpacked or has no PVH entry.
    """
    if manifest is not None and (folder / str(manifest["kernel"])).is_file():
        return folder / str(manifest["kernel"])
    vmlinuz = folder / f"vmlinuz-{version}"
    vmlinux = folder / f"vmlinux-{version}"
    if vmlinux.is_file():
        return vmlinux
    say("unpacking the kernel for a direct (PVH) boot")
    elf = unpack_bzimage(vmlinuz.read_bytes())
    if elf is None or not has_pvh_entry(elf):
        say("the kernel has no PVH entry: booting the compressed image")
        return vmlinuz
    _atomic_write(vmlinux, elf)
    return vmlinux


def unpack_bzimage(image: bytes) -> bytes | None:
    """The ELF kernel inside a bzImage compressed with xz or gzip, or None."""
    for magic, make in (
        (b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor()),
        (b"\x1f\x8b\x08\x00", lambda: zlib.decompressobj(wbits=31)),
    ):
        start = image.find(magic)
        while start >= 0:
            try:
                elf = make().decompress(image[start:])
            except (lzma.LZMAError, zlib.error):
                elf = b""
            if elf[:4] == b"\x7fELF":
                return elf
            start = image.find(magic, start + 1)
    return None


_ELF_NOTE = struct.Struct("<III")
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def has_pvh_entry(elf: bytes) -> bool:
    """Whether a 64-bit ELF kernel carries the Xen PHYS32_ENTRY note QEMU's PVH boot needs."""
    if elf[:5] != b"\x7fELF\x02" or len(elf) < 64:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for k in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + k * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, min(p_offset + p_filesz, len(elf))
        while pos + _ELF_NOTE.size <= end:
            namesz, descsz, note_type = _ELF_NOTE.unpack_from(elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz]
            if name == b"Xen\0" and note_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


# --- initramfs --------------------------------------------------------------------------


def _build_initramfs(folder: Path, modules: Path, initrd: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="initramfs-", dir=folder) as tmp_name:
        tmp = Path(tmp_name)
        source = tmp / "ioprobe.c"
        source.write_bytes(_guest_source("ioprobe.c"))
        root = tmp / "root"
        for sub in ("bin", "dev", "proc", "sys", "tmp", "lib/modules"):
            (root / sub).mkdir(parents=True)
        _run(
            ["gcc", "-static", "-O2", "-Wall", "-o", str(root / "bin" / "ioprobe"),
             str(source), "-lpthread"]
        )  # fmt: skip
        shutil.copyfile(BUSYBOX, root / "bin" / "busybox")
        (root / "bin" / "busybox").chmod(0o755)
        applets = _run([str(BUSYBOX), "--list"]).split()
        for applet in applets:
            if applet != "busybox" and "/" not in applet:
                (root / "bin" / applet).symlink_to("busybox")
        for name, _ in MODULES:
            shutil.copyfile(modules / f"{name}.ko", root / "lib" / "modules" / f"{name}.ko")
        order = module_load_order(
            {name: module_depends((modules / f"{name}.ko").read_bytes()) for name, _ in MODULES}
        )
        (root / "lib" / "modules" / "order").write_text("".join(f"{m}\n" for m in order))
        (root / "init").write_bytes(_guest_source("init"))
        (root / "init").chmod(0o755)
        _pack_cpio(root, tmp / "initrd.gz")
        (tmp / "initrd.gz").replace(initrd)


def _pack_cpio(root: Path, out: Path) -> None:
    """``cpio -o -H newc | gzip`` of everything under ``root``, owned by root."""
    names = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path != root)
    listing = "".join(f"{name}\n" for name in names).encode()
    try:
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
            cwd=root,
            input=listing,
            capture_output=True,
            check=False,
            timeout=300,
        )
    except OSError as err:
        raise EnvironmentProblem(f"cannot run cpio: {err}") from err
    if cpio.returncode != 0:
        raise EnvironmentProblem(f"cpio failed: {cpio.stderr.decode(errors='replace').strip()}")
    out.write_bytes(gzip.compress(cpio.stdout, compresslevel=6, mtime=0))
