"""The host side of ioprobe: a pure parser of the guest console, and the disk digest.

:class:`ConsoleParser` takes console bytes as they arrive (any chunking) and returns typed
events; it imports no asyncio and touches no socket, so whoever reads the console (a test's
pipe, the VM object's chardev socket) feeds it. The console carries much besides the probe:
firmware escape sequences, kernel messages, commands echoed back, binary garbage. Lines
without a probe tag are skipped (``other_lines``); tagged lines whose JSON is broken or lacks
a field are counted in ``garbage_lines``; a line longer than :data:`MAX_LINE` is dropped
(``overlong_lines``). Nothing the guest sends makes the parser raise or grow without bound.

:func:`disk_digest` recomputes, from a disk image, the digest ioprobe keeps in RAM (see the
header of ioprobe.c for the block layout), so the host can check that a disk holds exactly
what the guest last wrote.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The longest console line kept, in bytes; longer lines are dropped.
MAX_LINE = 4096
READY_MARK = "DEVAGENT-READY"
PHASES = frozenset({"prefill", "run", "idle"})

MAGIC = b"DAGPROBE"
#: Block header: magic, index, generation, crc32 of the payload, block size (little-endian).
HEADER = struct.Struct("<8sQQII")

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def splitmix64(x: int) -> int:
    """One step of splitmix64 (the same as ioprobe's)."""
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def block_hash(index: int, generation: int) -> int:
    """H(index, generation): a block's share of the digest."""
    return splitmix64(((index * _GOLDEN) & _MASK64) ^ generation)


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The guest's /init runs (``DEVAGENT-READY``)."""

    host_time: float


@dataclass(frozen=True)
class Started:
    """ioprobe opened its device (``IOPROBE-START``)."""

    device: str
    device_bytes: int
    blocks: int
    block_size: int
    spec: str
    host_time: float


@dataclass(frozen=True)
class Heartbeat:
    """One 100 ms report (``IOPROBE``); ops, reads, writes and latencies cover the interval."""

    hb: int
    t_ms: int
    phase: str
    ops: int
    reads: int
    writes: int
    ops_total: int
    errors: int
    verify_failures: int
    lat_max_us: int
    lat_p99_us: int
    written_blocks: int
    digest: str
    host_time: float


@dataclass(frozen=True)
class ProbeError:
    """An I/O error or short transfer (``IOPROBE-ERR``)."""

    op: str
    block: int
    ret: int
    errno: int
    message: str
    host_time: float


@dataclass(frozen=True)
class VerifyFailure:
    """A block read back that is not what was last written there (``IOPROBE-VFAIL``)."""

    block: int
    expected_gen: int
    found_gen: int
    found_index: int
    found_crc: int
    crc: int
    reason: str
    host_time: float


@dataclass(frozen=True)
class Paused:
    """Answer to ``pause``: I/O stopped and synced (``IOPROBE-PAUSED``)."""

    digest: str
    written_blocks: int
    ops_total: int
    host_time: float
    #: The digest worked out anew from the probe's block table: equal to ``digest`` unless
    #: the guest's memory lost an update (a migration that dropped a page, say). None from
    #: a probe older than that (a guest booted before it still runs one).
    table_digest: str | None = None
    #: Each device's digest by its name (the disk's node in the test guest); None from a
    #: probe older than several devices.
    disks: dict[str, str] | None = None

    def digest_of(self, name: str, *, only: bool) -> str | None:
        """What the guest last wrote on device ``name``: the digest when it is the probe's
        ``only`` device (whatever the probe named it), else that device's own (None when
        the probe named no such device, or is older than several devices)."""
        if only:
            return self.digest
        return (self.disks or {}).get(name)


@dataclass(frozen=True)
class Verified:
    """Answer to ``verify``: every written block read back (``IOPROBE-VERIFIED``)."""

    blocks: int
    failures: int
    digest: str
    host_time: float


@dataclass(frozen=True)
class Adopted:
    """A probe started with ``adopt`` (a guest booted again after a crash) took the disk's
    valid blocks as written (``IOPROBE-ADOPTED``): how many, how many torn (a crash-cut
    write: header right, payload not), reads that failed, and the digest it starts from."""

    blocks: int
    torn: int
    failed_reads: int
    digest: str
    host_time: float


@dataclass(frozen=True)
class ProbeFatal:
    """ioprobe could not run and exited (``IOPROBE-FATAL``)."""

    message: str
    host_time: float


ProbeEvent = (
    Ready
    | Started
    | Heartbeat
    | ProbeError
    | VerifyFailure
    | Paused
    | Verified
    | Adopted
    | ProbeFatal
)

# Each tag: the event class and its fields with their JSON types (all but host_time).
#: A field an older probe does not print: absent is None.
_OPTIONAL_STR = (str, type(None))
_OPTIONAL_DIGESTS = (dict, type(None))  # name → digest
_SCHEMAS: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "IOPROBE": (
        Heartbeat,
        {
            "hb": int,
            "t_ms": int,
            "phase": str,
            "ops": int,
            "reads": int,
            "writes": int,
            "ops_total": int,
            "errors": int,
            "verify_failures": int,
            "lat_max_us": int,
            "lat_p99_us": int,
            "written_blocks": int,
            "digest": str,
        },
    ),
    "IOPROBE-START": (
        Started,
        {"device": str, "device_bytes": int, "blocks": int, "block_size": int, "spec": str},
    ),
    "IOPROBE-ERR": (
        ProbeError,
        {"op": str, "block": int, "ret": int, "errno": int, "message": str},
    ),
    "IOPROBE-VFAIL": (
        VerifyFailure,
        {
            "block": int,
            "expected_gen": int,
            "found_gen": int,
            "found_index": int,
            "found_crc": int,
            "crc": int,
            "reason": str,
        },
    ),
    "IOPROBE-PAUSED": (
        Paused,
        {
            "digest": str,
            "written_blocks": int,
            "ops_total": int,
            "table_digest": _OPTIONAL_STR,
            "disks": _OPTIONAL_DIGESTS,
        },
    ),
    "IOPROBE-VERIFIED": (Verified, {"blocks": int, "failures": int, "digest": str}),
    "IOPROBE-ADOPTED": (
        Adopted,
        {"blocks": int, "torn": int, "failed_reads": int, "digest": str},
    ),
    "IOPROBE-FATAL": (ProbeFatal, {"message": str}),
}

_TAGGED_RE = re.compile(r"(IOPROBE(?:-[A-Z]+)?) (\{.*\})")
_DIGEST_RE = re.compile(r"[0-9a-f]{16}")


class ConsoleParser:
    """Turns console bytes into probe events; see the module docstring."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._discarding = False
        self.garbage_lines = 0
        self.overlong_lines = 0
        self.other_lines = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes of an unfinished line held until its newline arrives."""
        return len(self._buffer)

    def feed(self, data: bytes, host_time: float) -> list[ProbeEvent]:
        """Parse ``data`` (received at wall-clock ``host_time``) and return the events of
        every line it completes."""
        events: list[ProbeEvent] = []
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._discarding:
                self._discarding = False
                continue
            if len(line) > MAX_LINE:
                self.overlong_lines += 1
                continue
            event = self._parse_line(line, host_time)
            if event is not None:
                events.append(event)
        if len(self._buffer) > MAX_LINE:
            if not self._discarding:
                self.overlong_lines += 1
            self._discarding = True
            self._buffer.clear()
        return events

    def _parse_line(self, raw: bytes, host_time: float) -> ProbeEvent | None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        tagged = _TAGGED_RE.search(line)
        if tagged is None:
            if READY_MARK in line:
                return Ready(host_time=host_time)
            if "IOPROBE" in line:
                self.garbage_lines += 1
            else:
                self.other_lines += 1
            return None
        tag, body = tagged.groups()
        schema = _SCHEMAS.get(tag)
        if schema is None:
            self.garbage_lines += 1
            return None
        cls, fields = schema
        try:
            data = json.loads(body)
        except ValueError:
            self.garbage_lines += 1
            return None
        if not isinstance(data, dict) or not _fields_ok(data, fields):
            self.garbage_lines += 1
            return None
        if any(_bad_digest(data.get(k)) for k in fields if k.endswith("digest")):
            self.garbage_lines += 1
            return None
        per_disk = data.get("disks") if "disks" in fields else None
        if per_disk is not None and not all(
            isinstance(k, str) and isinstance(v, str) and not _bad_digest(v)
            for k, v in per_disk.items()
        ):
            self.garbage_lines += 1
            return None
        if cls is Heartbeat and data["phase"] not in PHASES:
            self.garbage_lines += 1
            return None
        event: ProbeEvent = cls(**{name: data.get(name) for name in fields}, host_time=host_time)
        return event


def _bad_digest(value: object) -> bool:
    return value is not None and not (isinstance(value, str) and _DIGEST_RE.fullmatch(value))


def _fields_ok(data: dict[str, Any], fields: dict[str, Any]) -> bool:
    for name, kind in fields.items():
        value = data.get(name)
        if kind is int:
            if not isinstance(value, int) or isinstance(value, bool):
                return False
        elif not isinstance(value, kind):
            return False
    return True


# --- disk digest ------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskDigest:
    """What a disk image holds, as ioprobe would see it.

    ``digest`` (16 hex digits) XORs H(index, generation) over the valid blocks: a probe
    header with the right magic, the index of its own position and a payload matching its
    crc. ``invalid_crc_blocks`` have a good header but a payload that does not match;
    ``misplaced_blocks`` have the magic but another block's index.
    """

    digest: str
    valid_blocks: int
    invalid_crc_blocks: int
    misplaced_blocks: int


def disk_digest(path: Path, block_size: int = 4096) -> DiskDigest:
    """Scan a raw image (holes skipped) and compute ioprobe's digest from its blocks."""
    if block_size < HEADER.size or block_size & (block_size - 1):
        raise ValueError(f"block size {block_size} is not a power of two >= {HEADER.size}")
    digest = valid = bad_crc = misplaced = 0
    chunk_blocks = max(1, (1 << 20) // block_size)
    with path.open("rb") as image:
        fd = image.fileno()
        size = os.fstat(fd).st_size
        scanned = 0  # blocks before this one are done (extents may share a block)
        for start, stop in _data_extents(fd, size):
            first = max(start // block_size, scanned)
            last = min(-(-stop // block_size), size // block_size)
            scanned = max(scanned, last)
            for chunk_first in range(first, last, chunk_blocks):
                count = min(chunk_blocks, last - chunk_first)
                data = os.pread(fd, count * block_size, chunk_first * block_size)
                view = memoryview(data)
                for start in _aligned_finds(data, MAGIC, block_size):
                    k = start // block_size
                    _, index, generation, crc, _ = HEADER.unpack_from(view, start)
                    if index != chunk_first + k:
                        misplaced += 1
                    elif zlib.crc32(view[start + HEADER.size : start + block_size]) != crc:
                        bad_crc += 1
                    else:
                        valid += 1
                        digest ^= block_hash(index, generation)
    return DiskDigest(
        digest=f"{digest:016x}",
        valid_blocks=valid,
        invalid_crc_blocks=bad_crc,
        misplaced_blocks=misplaced,
    )


def _aligned_finds(data: bytes, needle: bytes, step: int) -> list[int]:
    """Offsets that are multiples of ``step`` where ``data`` holds ``needle`` (a C-speed
    search, so the zeros of never-written blocks cost next to nothing)."""
    found: list[int] = []
    pos = data.find(needle)
    while pos >= 0:
        misalignment = pos % step
        if misalignment == 0:
            if len(data) - pos >= step:
                found.append(pos)
            pos = data.find(needle, pos + step)
        else:
            pos = data.find(needle, pos - misalignment + step)
    return found


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, stop) byte ranges of ``fd`` that hold data; the whole file when the file
    system cannot tell holes."""
    extents: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:  # no data after offset
                    break
                raise
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, stop))
            offset = stop
    except (OSError, AttributeError):
        return [(0, size)]
    return extents
