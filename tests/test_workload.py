"""Workload profiles, parsing, the kernel argument, and every rejection."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devagent.errors import UsageError
from devagent.guest.workload import (
    PROFILES,
    Pattern,
    Workload,
    format_size,
    parse_size,
    parse_workload,
)


def test_profiles_as_kernel_arguments() -> None:
    assert parse_workload("idle").to_kernel_arg() == "devagent.probe=idle:0:4096:0:0:0"
    assert (
        parse_workload("moderate").to_kernel_arg() == "devagent.probe=rand:50:4096:200:268435456:0"
    )
    assert parse_workload("heavy").to_kernel_arg() == "devagent.probe=rand:30:4096:0:268435456:0"


def test_profile_names_are_case_insensitive() -> None:
    assert parse_workload("Moderate") == PROFILES["moderate"]


def test_profile_with_overrides() -> None:
    workload = parse_workload("moderate,rate=500,prefill=256M")
    assert workload == Workload(Pattern.RAND, 50, 4096, 500, 256 << 20, 256 << 20)


def test_full_key_value_list_starts_from_the_defaults() -> None:
    workload = parse_workload("pattern=seq, read=0, bs=64K, span=1G")
    assert workload == Workload(Pattern.SEQ, 0, 65536, 0, 1 << 30, 0)
    assert parse_workload("rate=10") == Workload(Pattern.RAND, 50, 4096, 10, 0, 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("heavy,rate=unlimited", 0),
        ("heavy,rate=max", 0),
        ("idle,rate=7", 7),
    ],
)
def test_rate_words(text: str, expected: int) -> None:
    assert parse_workload(text).rate == expected


def test_aliases_for_keys_and_patterns() -> None:
    workload = parse_workload("pattern=random,read_pct=25%,block_size=512")
    assert (workload.pattern, workload.read_pct, workload.block_size) == (Pattern.RAND, 25, 512)
    assert parse_workload("pattern=sequential").pattern is Pattern.SEQ


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4096", 4096), ("4K", 4096), ("4k", 4096), ("4KiB", 4096), ("256M", 256 << 20),
     ("256MB", 256 << 20), ("2G", 2 << 30), ("0", 0), (" 1 M ", 1 << 20)],
)  # fmt: skip
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_describe() -> None:
    assert (
        parse_workload("moderate").describe()
        == "random 4 KiB I/O, 50% reads, 200 ops/s, span 256 MiB"
    )
    assert (
        parse_workload("heavy").describe()
        == "random 4 KiB I/O, 30% reads, unlimited rate, span 256 MiB"
    )
    assert parse_workload("idle").describe() == "idle (heartbeats only)"
    assert (
        parse_workload("pattern=seq,bs=1M,prefill=3M,rate=5").describe()
        == "sequential 1 MiB I/O, 50% reads, 5 ops/s, whole disk, prefill 3 MiB"
    )


def test_format_size() -> None:
    assert [format_size(n) for n in (512, 4096, 1536, 3 << 30)] == [
        "512 B",
        "4 KiB",
        "1536 B",
        "3 GiB",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("moderate,", "empty"),
        ("moderate,,rate=1", "empty"),
        ("turbo", "unknown workload profile 'turbo'"),
        ("moderate,speed=3", "unknown workload key 'speed'"),
        ("moderate,rate", "not key=value"),
        ("moderate,rate=", "not key=value"),
        ("moderate,rate=fast", "rate 'fast' is not a whole number"),
        ("moderate,rate=-5", "not a whole number"),
        ("moderate,rate=2000000", "not within 0..1000000"),
        ("moderate,read=101", "not within 0..100"),
        ("moderate,read=half", "not a whole number"),
        ("moderate,bs=3000", "not a power of two"),
        ("moderate,bs=256", "not a power of two within 512"),
        ("moderate,bs=2M", "not a power of two"),
        ("moderate,span=1000", "span 1000 is not a multiple of the block size 4096"),
        ("moderate,prefill=512M", "prefill 536870912 is larger than the span"),
        ("moderate,pattern=zigzag", "unknown I/O pattern 'zigzag'"),
        ("moderate,span=12T", "not a number with an optional K, M or G"),
        ("moderate,rate=1,rate=2", "given twice"),
        ("moderate,moderate", "not key=value"),
    ],
)
def test_rejections_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_workload(text)


def test_spec_rejections() -> None:
    for spec in ("rand:50:4096:0:0", "rand:50:4096:0:0:0:0", "rand:x:4096:0:0:0", "up:1:512:0:0:0"):
        with pytest.raises(UsageError):
            Workload.from_spec(spec)


workloads = st.builds(
    lambda pattern, read, bs_log, rate, span_blocks, prefill_blocks: Workload(
        pattern,
        read,
        1 << bs_log,
        rate,
        span_blocks << bs_log,
        min(prefill_blocks, span_blocks or prefill_blocks) << bs_log,
    ),
    st.sampled_from(list(Pattern)),
    st.integers(0, 100),
    st.integers(9, 20),
    st.integers(0, 1_000_000),
    st.integers(0, 1 << 20),
    st.integers(0, 1 << 20),
)


@given(workloads)
def test_spec_round_trips(workload: Workload) -> None:
    assert Workload.from_spec(workload.spec()) == workload
    assert workload.to_kernel_arg() == "devagent.probe=" + workload.spec()
    assert " " not in workload.to_kernel_arg()
