"""Guest workloads: what ioprobe does in the guest, named, parsed and put on the kernel
command line (``devagent.probe=pattern:read_pct:block_size:rate:span:prefill``).

A workload text is a profile name (``idle``, ``moderate``, ``heavy``), optionally followed
by overrides (``moderate,rate=500,prefill=256M``), or a plain ``key=value`` list that starts
from :data:`DEFAULT` (random 4 KiB, 50% reads, unlimited rate, whole disk, no prefill).
Keys: ``pattern`` (rand|seq|idle), ``read`` (percent of ops that read), ``bs`` (block
size), ``rate`` (ops/s, 0 or ``unlimited`` = as fast as the disk answers), ``span`` (bytes
from the disk's start, 0 = whole disk), ``prefill`` (bytes written sequentially first).
Sizes take K, M, G suffixes (powers of 1024).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from devagent.errors import UsageError
from devagent.vocab import format_size, parse_size

KERNEL_ARG = "devagent.probe"
MIN_BLOCK = 512
MAX_BLOCK = 1 << 20
MAX_RATE = 1_000_000


class Pattern(StrEnum):
    """Where ioprobe's ops land."""

    RAND = "rand"
    SEQ = "seq"
    IDLE = "idle"


@dataclass(frozen=True)
class Workload:
    """One ioprobe workload; see the module docstring for the fields' meaning."""

    pattern: Pattern
    read_pct: int
    block_size: int
    rate: int
    span: int
    prefill: int

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, Pattern):
            object.__setattr__(self, "pattern", _pattern(str(self.pattern)))
        if not 0 <= self.read_pct <= 100:
            raise UsageError(f"read percent {self.read_pct} is not within 0..100")
        bs = self.block_size
        if not MIN_BLOCK <= bs <= MAX_BLOCK or bs & (bs - 1):
            raise UsageError(
                f"block size {bs} is not a power of two within {MIN_BLOCK}..{MAX_BLOCK}"
            )
        if not 0 <= self.rate <= MAX_RATE:
            raise UsageError(f"rate {self.rate} ops/s is not within 0..{MAX_RATE}")
        for name, value in (("span", self.span), ("prefill", self.prefill)):
            if value < 0 or value % bs:
                raise UsageError(f"{name} {value} is not a multiple of the block size {bs}")
        if self.span and self.prefill > self.span:
            raise UsageError(f"prefill {self.prefill} is larger than the span {self.span}")

    def spec(self) -> str:
        """The compact form ioprobe takes."""
        return (
            f"{self.pattern.value}:{self.read_pct}:{self.block_size}:{self.rate}:"
            f"{self.span}:{self.prefill}"
        )

    def to_kernel_arg(self) -> str:
        """The kernel command-line argument that makes the guest's /init run this."""
        return f"{KERNEL_ARG}={self.spec()}"

    def describe(self) -> str:
        """One line for people, e.g. ``random 4 KiB I/O, 50% reads, 200 ops/s, span 256 MiB``."""
        prefill = f", prefill {format_size(self.prefill)}" if self.prefill else ""
        if self.pattern is Pattern.IDLE:
            return f"idle (heartbeats only){prefill}"
        kind = "random" if self.pattern is Pattern.RAND else "sequential"
        rate = f"{self.rate} ops/s" if self.rate else "unlimited rate"
        span = f"span {format_size(self.span)}" if self.span else "whole disk"
        return (
            f"{kind} {format_size(self.block_size)} I/O, {self.read_pct}% reads, {rate}, "
            f"{span}{prefill}"
        )

    @classmethod
    def from_spec(cls, spec: str) -> Workload:
        """The inverse of :meth:`spec`."""
        parts = spec.split(":")
        if len(parts) != 6:
            raise UsageError(f"probe spec {spec!r} does not have 6 ':'-separated fields")
        try:
            numbers = [int(part) for part in parts[1:]]
        except ValueError as err:
            raise UsageError(f"probe spec {spec!r} has a field that is not a number") from err
        read_pct, block_size, rate, span, prefill = numbers
        return cls(_pattern(parts[0]), read_pct, block_size, rate, span, prefill)


DEFAULT = Workload(Pattern.RAND, 50, 4096, 0, 0, 0)
PROFILES: dict[str, Workload] = {
    "idle": Workload(Pattern.IDLE, 0, 4096, 0, 0, 0),
    "moderate": Workload(Pattern.RAND, 50, 4096, 200, 256 << 20, 0),
    "heavy": Workload(Pattern.RAND, 30, 4096, 0, 256 << 20, 0),
}

_KEYS = {
    "pattern": "pattern",
    "read": "read_pct",
    "read_pct": "read_pct",
    "bs": "block_size",
    "block_size": "block_size",
    "rate": "rate",
    "span": "span",
    "prefill": "prefill",
}


def parse_workload(text: str) -> Workload:
    """A workload from a profile name, a profile with overrides, or a key=value list."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise UsageError(f"empty workload item in {text!r}")
    if "=" in items[0]:
        base = DEFAULT
    else:
        name = items.pop(0).lower()
        if name not in PROFILES:
            raise UsageError(
                f"unknown workload profile {name!r}: choose one of {', '.join(PROFILES)} "
                "or give key=value pairs"
            )
        base = PROFILES[name]
    changes: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        value = value.strip()
        if not sep or not value:
            raise UsageError(f"workload item {item!r} is not key=value")
        field = _KEYS.get(key)
        if field is None:
            raise UsageError(f"unknown workload key {key!r}: use one of {', '.join(_KEYS)}")
        if field in changes:
            raise UsageError(f"workload key {key!r} given twice")
        changes[field] = _parse_value(field, value)
    return replace(base, **changes)  # type: ignore[arg-type]


def _parse_value(field: str, value: str) -> object:
    if field == "pattern":
        return _pattern(value)
    if field == "rate":
        if value.lower() in ("unlimited", "max"):
            return 0
        return _parse_int(value, "rate")
    if field == "read_pct":
        return _parse_int(value.removesuffix("%"), "read percent")
    return parse_size(value)


def _pattern(value: str) -> Pattern:
    aliases = {"random": Pattern.RAND, "sequential": Pattern.SEQ}
    lowered = value.lower()
    if lowered in aliases:
        return aliases[lowered]
    try:
        return Pattern(lowered)
    except ValueError as err:
        raise UsageError(f"unknown I/O pattern {value!r}: use rand, seq or idle") from err


def _parse_int(value: str, what: str) -> int:
    if not value.isdigit():
        raise UsageError(f"{what} {value!r} is not a whole number")
    return int(value)


def adopting(command_line: str) -> str:
    """``command_line`` with its probe told to adopt the disk as it finds it (``adopt``:
    a guest booted again after a crash, on the disk the crashed boot's probe wrote)."""
    words = command_line.split()
    for i, word in enumerate(words):
        if word.startswith(f"{KERNEL_ARG}=") and not word.endswith(":adopt"):
            words[i] = f"{word}:adopt"
    return " ".join(words)
