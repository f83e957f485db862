"""The console parser and the disk digest, on bytes; then against the real ioprobe, built
for the host and run on a file (no VM needed)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devagent.guest.probe import (
    HEADER,
    MAGIC,
    MAX_LINE,
    Adopted,
    ConsoleParser,
    Heartbeat,
    Paused,
    ProbeError,
    ProbeEvent,
    ProbeFatal,
    Ready,
    Started,
    Verified,
    VerifyFailure,
    block_hash,
    disk_digest,
    splitmix64,
)

HEARTBEAT: dict[str, Any] = {
    "hb": 7,
    "t_ms": 700,
    "phase": "run",
    "ops": 20,
    "reads": 9,
    "writes": 11,
    "ops_total": 140,
    "errors": 0,
    "verify_failures": 0,
    "lat_max_us": 3771,
    "lat_p99_us": 3000,
    "written_blocks": 93,
    "digest": "cd128d1ae3ed0f34",
}


def line(tag: str, body: dict[str, Any], end: bytes = b"\r\n") -> bytes:
    return f"{tag} {json.dumps(body, separators=(',', ':'))}".encode() + end


def parse_all(data: bytes, host_time: float = 1.0) -> tuple[list[ProbeEvent], ConsoleParser]:
    parser = ConsoleParser()
    return parser.feed(data, host_time), parser


# --- one line of each kind --------------------------------------------------------------


def test_heartbeat_has_every_field_and_the_host_time() -> None:
    events, parser = parse_all(line("IOPROBE", HEARTBEAT), host_time=12.5)
    assert events == [Heartbeat(**HEARTBEAT, host_time=12.5)]
    assert parser.garbage_lines == 0


@pytest.mark.parametrize(
    ("tag", "body", "expected"),
    [
        (
            "IOPROBE-START",
            {
                "device": "/dev/vda",
                "device_bytes": 67108864,
                "blocks": 16384,
                "block_size": 4096,
                "spec": "rand:50:4096:200:268435456:0",
            },
            Started("/dev/vda", 67108864, 16384, 4096, "rand:50:4096:200:268435456:0", 2.0),
        ),
        (
            "IOPROBE-ERR",
            {"op": "write", "block": 5, "ret": -1, "errno": 5, "message": "Input/output error"},
            ProbeError("write", 5, -1, 5, "Input/output error", 2.0),
        ),
        (
            "IOPROBE-VFAIL",
            {
                "block": 9,
                "expected_gen": 3,
                "found_gen": 2,
                "found_index": 9,
                "found_crc": 1,
                "crc": 1,
                "reason": "generation",
            },
            VerifyFailure(9, 3, 2, 9, 1, 1, "generation", 2.0),
        ),
        (
            "IOPROBE-PAUSED",
            {
                "digest": "fe7f20e779bf557a",
                "written_blocks": 821,
                "ops_total": 1693,
                "table_digest": "fe7f20e779bf557a",
            },
            Paused("fe7f20e779bf557a", 821, 1693, 2.0, "fe7f20e779bf557a"),
        ),
        (
            "IOPROBE-VERIFIED",
            {"blocks": 667, "failures": 0, "digest": "2647bb60b8501008"},
            Verified(667, 0, "2647bb60b8501008", 2.0),
        ),
        (
            "IOPROBE-ADOPTED",
            {"blocks": 640, "torn": 1, "failed_reads": 0, "digest": "2647bb60b8501008"},
            Adopted(640, 1, 0, "2647bb60b8501008", 2.0),
        ),
        (
            "IOPROBE-FATAL",
            {"message": "open device: No such file or directory"},
            ProbeFatal("open device: No such file or directory", 2.0),
        ),
    ],
)
def test_each_event_type(tag: str, body: dict[str, Any], expected: ProbeEvent) -> None:
    events, parser = parse_all(line(tag, body), host_time=2.0)
    assert events == [expected]
    assert parser.garbage_lines == 0


def test_ready_mark_behind_firmware_escape_sequences() -> None:
    data = b"Booting from ROM..\x1bc\x1b[?7l\x1b[2JDEVAGENT-READY\r\n"
    events, _ = parse_all(data, host_time=3.0)
    assert events == [Ready(3.0)]


def test_a_line_is_stamped_with_the_time_of_the_feed_that_completes_it() -> None:
    parser = ConsoleParser()
    whole = line("IOPROBE", HEARTBEAT)
    assert parser.feed(whole[:30], 1.0) == []
    [event] = parser.feed(whole[30:], 2.0)
    assert isinstance(event, Heartbeat)
    assert event.host_time == 2.0


# --- what is not a probe line -----------------------------------------------------------


def test_kernel_messages_and_echoed_commands_are_skipped_not_garbage() -> None:
    data = (
        b"[    1.234567] virtio_blk virtio1: [vda] 131072 512-byte logical blocks\r\n"
        b"verify\r\n"
        b"pause\n"
        b"\r\n"
    )
    events, parser = parse_all(data)
    assert events == []
    assert parser.garbage_lines == 0
    assert parser.other_lines == 4


def test_binary_garbage_does_not_stop_the_next_line() -> None:
    data = bytes(range(256)) + b"\n\xff\xfe\x00IOPROBE \xff{\n" + line("IOPROBE", HEARTBEAT)
    events, parser = parse_all(data)
    assert [type(e) for e in events] == [Heartbeat]
    assert parser.garbage_lines == 1


@pytest.mark.parametrize(
    "bad",
    [
        b'IOPROBE {"hb":1,"t_ms":',  # cut JSON
        b"IOPROBE {not json}",
        b"IOPROBE []",
        b'IOPROBE-PAUSED {"digest":"fe7f20e779bf557a","written_blocks":821}',  # a field missing
        b'IOPROBE-VERIFIED {"blocks":"667","failures":0,"digest":"2647bb60b8501008"}',  # str
        b'IOPROBE-VERIFIED {"blocks":true,"failures":0,"digest":"2647bb60b8501008"}',  # bool
        b'IOPROBE-VERIFIED {"blocks":1.5,"failures":0,"digest":"2647bb60b8501008"}',  # float
        b'IOPROBE-VERIFIED {"blocks":1,"failures":0,"digest":"XYZ"}',  # digest not 16 hex
        b'IOPROBE-PAUSED {"digest":"fe7f20e779bf557a","written_blocks":1,"ops_total":2,'
        b'"table_digest":"nope"}',  # an optional digest, but not 16 hex
        b'IOPROBE-BADCMD {"command":"bogus"}',  # a tag this parser does not know
        b"IOPROBE",
    ],
)
def test_broken_probe_lines_are_counted_as_garbage(bad: bytes) -> None:
    events, parser = parse_all(bad + b"\n" + line("IOPROBE", HEARTBEAT))
    assert [type(e) for e in events] == [Heartbeat]
    assert parser.garbage_lines == 1


def test_heartbeat_with_an_unknown_phase_is_garbage() -> None:
    events, parser = parse_all(line("IOPROBE", {**HEARTBEAT, "phase": "dancing"}))
    assert events == []
    assert parser.garbage_lines == 1


def test_a_pause_answer_from_a_probe_older_than_its_table_digest_is_taken() -> None:
    """A guest booted before the probe printed ``table_digest`` still runs that probe."""
    old = {"digest": "fe7f20e779bf557a", "written_blocks": 821, "ops_total": 1693}
    events, parser = parse_all(line("IOPROBE-PAUSED", old))
    assert events == [Paused("fe7f20e779bf557a", 821, 1693, 1.0)]
    assert parser.garbage_lines == 0


def test_a_pause_answer_gives_each_device_its_digest() -> None:
    body = {
        "digest": "0000000000000003", "written_blocks": 9, "ops_total": 20,
        "table_digest": "0000000000000003",
        "disks": {"disk0": "0000000000000001", "disk1": "0000000000000002"},
    }  # fmt: skip
    [paused], _ = parse_all(line("IOPROBE-PAUSED", body))
    assert isinstance(paused, Paused)
    assert paused.digest_of("disk1", only=False) == "0000000000000002"
    assert paused.digest_of("disk7", only=False) is None
    older = Paused("0000000000000003", 9, 20, 1.0)  # one digest for the VM's one disk
    assert older.digest_of("disk0", only=True) == "0000000000000003"
    assert older.digest_of("disk1", only=False) is None


@pytest.mark.parametrize("disks", [{"disk0": "xyz"}, {"disk0": 3}, ["0000000000000001"]])
def test_a_pause_answer_with_a_bad_device_digest_is_garbage(disks: object) -> None:
    body = {"digest": "0000000000000003", "written_blocks": 9, "ops_total": 20, "disks": disks}
    events, parser = parse_all(line("IOPROBE-PAUSED", body))
    assert events == [] and parser.garbage_lines == 1


def test_extra_fields_are_ignored() -> None:
    events, _ = parse_all(line("IOPROBE", {**HEARTBEAT, "new_field": 1}))
    assert [type(e) for e in events] == [Heartbeat]


# --- bounds -----------------------------------------------------------------------------


def test_an_overlong_line_is_dropped_and_the_next_one_parsed() -> None:
    data = b"IOPROBE " + b"x" * (MAX_LINE + 10) + b"\n" + line("IOPROBE", HEARTBEAT)
    events, parser = parse_all(data)
    assert [type(e) for e in events] == [Heartbeat]
    assert parser.overlong_lines == 1
    assert parser.garbage_lines == 0


def test_the_buffer_stays_bounded_while_a_line_never_ends() -> None:
    parser = ConsoleParser()
    for _ in range(1000):
        assert parser.feed(b"y" * 100, 1.0) == []
        assert parser.pending_bytes <= MAX_LINE
    # The rest of the endless line, then a good one.
    events = parser.feed(b"tail of it\n" + line("IOPROBE", HEARTBEAT), 2.0)
    assert [type(e) for e in events] == [Heartbeat]
    assert parser.overlong_lines == 1
    assert parser.pending_bytes == 0


def test_a_line_of_exactly_the_limit_is_kept() -> None:
    body = line("IOPROBE", HEARTBEAT, end=b"")
    padded = b" " * (MAX_LINE - len(body)) + body
    assert len(padded) == MAX_LINE
    events, parser = parse_all(padded + b"\n")
    assert [type(e) for e in events] == [Heartbeat]
    assert parser.overlong_lines == 0


# --- chunking ---------------------------------------------------------------------------

TRANSCRIPT = b"".join(
    [
        b"SeaBIOS (version 1.16.2)\r\n",
        b"Booting from ROM..\x1bc\x1b[2JDEVAGENT-READY\r\n",
        line("IOPROBE-START", {"device": "/dev/vda", "device_bytes": 1 << 26, "blocks": 16384,
                               "block_size": 4096, "spec": "rand:50:4096:200:268435456:0"}),
        line("IOPROBE", HEARTBEAT),
        b"[   9.1] random: crng init done\r\n",
        b"IOPROBE {broken\r\n",
        line("IOPROBE-VERIFIED", {"blocks": 93, "failures": 0, "digest": "cd128d1ae3ed0f34"}),
        line("IOPROBE", {**HEARTBEAT, "hb": 8}, end=b"\n"),
        line("IOPROBE-PAUSED", {"digest": "cd128d1ae3ed0f34", "written_blocks": 93,
                                "ops_total": 160, "table_digest": "cd128d1ae3ed0f34"}),
    ]
)  # fmt: skip


def whole_transcript_events() -> list[ProbeEvent]:
    events, parser = parse_all(TRANSCRIPT)
    assert [type(e) for e in events] == [Ready, Started, Heartbeat, Verified, Heartbeat, Paused]
    assert parser.garbage_lines == 1
    return events


def test_a_stream_split_at_every_offset_parses_the_same() -> None:
    expected = whole_transcript_events()
    for cut in range(len(TRANSCRIPT) + 1):
        parser = ConsoleParser()
        events = parser.feed(TRANSCRIPT[:cut], 1.0) + parser.feed(TRANSCRIPT[cut:], 1.0)
        assert events == expected, f"split at {cut}"
        assert parser.garbage_lines == 1


def test_a_stream_fed_byte_by_byte_parses_the_same() -> None:
    parser = ConsoleParser()
    events = [e for i in range(len(TRANSCRIPT)) for e in parser.feed(TRANSCRIPT[i : i + 1], 1.0)]
    assert events == whole_transcript_events()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(TRANSCRIPT)), max_size=20))
def test_any_chunking_parses_the_same(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(TRANSCRIPT)]
    parser = ConsoleParser()
    events = [e for a, b in pairwise(bounds) for e in parser.feed(TRANSCRIPT[a:b], 1.0)]
    assert events == whole_transcript_events()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3 * MAX_LINE))
def test_arbitrary_bytes_never_raise_and_stay_bounded(data: bytes) -> None:
    parser = ConsoleParser()
    parser.feed(data, 1.0)
    assert parser.pending_bytes <= MAX_LINE
    # Whatever came before, a newline and a good line still parse.
    events = parser.feed(b"\n" + line("IOPROBE", HEARTBEAT), 2.0)
    assert events[-1] == Heartbeat(**HEARTBEAT, host_time=2.0)


# --- disk digest ------------------------------------------------------------------------


def test_splitmix64_matches_the_reference_values() -> None:
    # First outputs of the reference splitmix64 generator seeded with 0.
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4


def make_block(index: int, generation: int, block_size: int = 4096) -> bytearray:
    payload = bytes((index * 7 + generation + i) & 0xFF for i in range(block_size - HEADER.size))
    header = HEADER.pack(MAGIC, index, generation, zlib.crc32(payload), block_size)
    return bytearray(header + payload)


def test_disk_digest_counts_valid_corrupt_and_misplaced_blocks(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    with image.open("wb") as f:
        f.truncate(64 * 4096)
        for index, generation in ((0, 1), (3, 5), (10, 2)):
            f.seek(index * 4096)
            f.write(make_block(index, generation))
        corrupt = make_block(20, 1)
        corrupt[100] ^= 0xFF
        f.seek(20 * 4096)
        f.write(corrupt)
        f.seek(30 * 4096)
        f.write(make_block(31, 1))  # block 31's header at block 30
    found = disk_digest(image)
    expected = block_hash(0, 1) ^ block_hash(3, 5) ^ block_hash(10, 2)
    assert found.digest == f"{expected:016x}"
    assert (found.valid_blocks, found.invalid_crc_blocks, found.misplaced_blocks) == (3, 1, 1)


def test_disk_digest_of_a_sparse_image_and_a_large_block_size(tmp_path: Path) -> None:
    image = tmp_path / "sparse.raw"
    bs = 65536
    with image.open("wb") as f:
        f.truncate(1 << 30)  # 1 GiB of hole
        f.seek(9000 * bs)
        f.write(make_block(9000, 4, bs))
    found = disk_digest(image, block_size=bs)
    assert found.digest == f"{block_hash(9000, 4):016x}"
    assert found.valid_blocks == 1


def test_disk_digest_of_an_empty_image_is_zero(tmp_path: Path) -> None:
    image = tmp_path / "empty.raw"
    image.write_bytes(b"\0" * 8192)
    assert disk_digest(image).digest == "0" * 16
    assert disk_digest(image).valid_blocks == 0


# --- the real ioprobe on the host ---------------------------------------------------------


@pytest.fixture(scope="module")
def host_ioprobe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    folder = tmp_path_factory.mktemp("ioprobe")
    source = folder / "ioprobe.c"
    source.write_bytes(resources.files("devagent.guest").joinpath("ioprobe.c").read_bytes())
    binary = folder / "ioprobe"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Werror", "-o", str(binary), str(source), "-lpthread"],
        check=True,
    )
    return binary


class ProbeRun:
    """ioprobe on a file, its stdout parsed, its stdin ours."""

    def __init__(self, binary: Path, spec: str, *devices: Path | str):
        self.proc = subprocess.Popen(
            [str(binary), spec, *map(str, devices)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.parser = ConsoleParser()
        self.events: list[ProbeEvent] = []

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_for(self, kind: type[ProbeEvent], count: int = 1) -> list[ProbeEvent]:
        """Read until ``count`` events of ``kind`` arrived since the last call."""
        assert self.proc.stdout is not None
        found: list[ProbeEvent] = []
        while len(found) < count:
            data = os.read(self.proc.stdout.fileno(), 4096)
            assert data, f"ioprobe ended; events so far: {self.events[-5:]}"
            for event in self.parser.feed(data, 0.0):
                self.events.append(event)
                if isinstance(event, kind):
                    found.append(event)
        return found

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def probe_run(host_ioprobe: Path, tmp_path: Path) -> Iterator[tuple[ProbeRun, Path]]:
    image = tmp_path / "disk.raw"
    with image.open("wb") as f:
        f.truncate(16 << 20)
    run = ProbeRun(host_ioprobe, "rand:50:4096:3000:0:1048576", image)
    try:
        yield run, image
    finally:
        run.close()


def test_ioprobe_runs_pauses_and_the_disk_holds_its_digest(
    probe_run: tuple[ProbeRun, Path],
) -> None:
    run, image = probe_run
    [started] = run.wait_for(Started)
    assert isinstance(started, Started)
    assert started.blocks == 4096
    beats = run.wait_for(Heartbeat, 3)
    assert all(isinstance(b, Heartbeat) and b.errors == 0 for b in beats)
    assert sum(b.ops for b in beats if isinstance(b, Heartbeat)) > 0
    run.send("pause")
    [paused] = run.wait_for(Paused)
    assert isinstance(paused, Paused)
    assert paused.written_blocks >= 256  # the 1 MiB prefill at least
    assert paused.table_digest == paused.digest  # its memory agrees with itself
    on_disk = disk_digest(image)
    assert on_disk.digest == paused.digest
    assert on_disk.valid_blocks == paused.written_blocks
    # Paused: heartbeats go on with no ops and the same digest.
    later = [b for b in run.wait_for(Heartbeat, 3) if isinstance(b, Heartbeat)]
    assert later[-1].ops == 0 and later[-1].phase == "idle"
    assert later[-1].digest == paused.digest
    run.send("verify")
    [verified] = run.wait_for(Verified)
    assert verified == Verified(paused.written_blocks, 0, paused.digest, 0.0)
    run.send("resume")
    resumed = [b for b in run.wait_for(Heartbeat, 3) if isinstance(b, Heartbeat)]
    assert resumed[-1].ops > 0
    assert resumed[-1].verify_failures == 0
    assert run.parser.garbage_lines == 0


def test_ioprobe_verify_finds_a_block_changed_behind_its_back(
    probe_run: tuple[ProbeRun, Path],
) -> None:
    run, image = probe_run
    run.wait_for(Heartbeat, 2)
    run.send("pause")
    run.wait_for(Paused)
    data = image.read_bytes()
    index = next(i for i in range(len(data) // 4096) if data[i * 4096 : i * 4096 + 8] == MAGIC)
    with image.open("r+b") as f:
        f.seek(index * 4096 + 2000)
        f.write(bytes([data[index * 4096 + 2000] ^ 0x55]))
    run.send("verify")
    [failure] = run.wait_for(VerifyFailure)
    [verified] = run.wait_for(Verified)
    assert isinstance(failure, VerifyFailure) and isinstance(verified, Verified)
    assert (failure.block, failure.reason) == (index, "crc")
    assert verified.failures == 1
    [beat] = run.wait_for(Heartbeat)
    assert isinstance(beat, Heartbeat)
    assert beat.verify_failures == 1


def test_ioprobe_adopts_the_disk_an_earlier_run_left_after_a_crash(
    host_ioprobe: Path, tmp_path: Path
) -> None:
    """A run killed mid-workload (a crash), one block torn behind its back; a new run with
    ``adopt`` starts from what the disk holds: its digest is the disk's, it keeps writing,
    and its reads of adopted blocks verify."""
    image = tmp_path / "disk.raw"
    with image.open("wb") as f:
        f.truncate(4 << 20)
    first = ProbeRun(host_ioprobe, "rand:50:4096:3000:0:1048576", image)
    try:
        first.wait_for(Heartbeat, 3)
    finally:
        first.close()  # SIGKILL: a crash
    data = image.read_bytes()
    valid = disk_digest(image)
    torn = next(i for i in range(len(data) // 4096) if data[i * 4096 : i * 4096 + 8] == MAGIC)
    with image.open("r+b") as f:
        f.seek(torn * 4096 + 100)
        f.write(bytes([data[torn * 4096 + 100] ^ 0xFF]))
    found = disk_digest(image)
    assert found.invalid_crc_blocks == 1 and found.valid_blocks == valid.valid_blocks - 1
    again = ProbeRun(host_ioprobe, "rand:50:4096:3000:0:1048576:adopt", image)
    try:
        [adopted] = again.wait_for(Adopted)
        assert adopted == Adopted(found.valid_blocks, 1, 0, found.digest, 0.0)
        beats = [b for b in again.wait_for(Heartbeat, 3) if isinstance(b, Heartbeat)]
        assert sum(b.ops for b in beats) > 0 and beats[-1].verify_failures == 0
        again.send("pause")
        [paused] = again.wait_for(Paused)
        assert isinstance(paused, Paused) and paused.digest == disk_digest(image).digest
        again.send("verify")
        [verified] = again.wait_for(Verified)
        assert isinstance(verified, Verified) and verified.failures == 0
        assert verified.blocks >= found.valid_blocks
    finally:
        again.close()


def test_ioprobe_writes_every_device_and_each_holds_its_own_digest(
    host_ioprobe: Path, tmp_path: Path
) -> None:
    """Three devices of three sizes, by name: each is prefilled and written, the pause
    answer's digest of each is that device's own, the total is theirs together."""
    images = {name: tmp_path / f"{name}.raw" for name in ("disk0", "disk1", "disk2")}
    for size, image in zip((4, 8, 2), images.values(), strict=True):
        with image.open("wb") as f:
            f.truncate(size << 20)
    run = ProbeRun(
        host_ioprobe, "rand:50:4096:3000:0:524288", *(f"{n}={i}" for n, i in images.items())
    )
    try:
        [started] = run.wait_for(Started)
        assert isinstance(started, Started)
        assert (started.device, started.blocks) == ("disk0,disk1,disk2", 3584)
        run.wait_for(Heartbeat, 5)
        run.send("pause")
        [paused] = run.wait_for(Paused)
        run.send("verify")
        [verified] = run.wait_for(Verified)
    finally:
        run.close()
    assert isinstance(paused, Paused) and isinstance(verified, Verified)
    on_disk = {name: disk_digest(image) for name, image in images.items()}
    assert paused.disks == {name: found.digest for name, found in on_disk.items()}
    assert all(found.valid_blocks >= 128 for found in on_disk.values())  # each prefilled
    together = 0
    for found in on_disk.values():
        together ^= int(found.digest, 16)
    assert paused.digest == paused.table_digest == f"{together:016x}"
    assert paused.written_blocks == sum(f.valid_blocks for f in on_disk.values())
    assert verified == Verified(paused.written_blocks, 0, paused.digest, 0.0)


def test_ioprobe_says_why_it_cannot_start(host_ioprobe: Path, tmp_path: Path) -> None:
    for spec, device in (
        ("rand:50:4096:0:0:0", tmp_path / "missing.raw"),
        ("rand:500:4096:0:0:0", tmp_path / "missing.raw"),
        ("rand:50:1000:0:0:0", tmp_path / "missing.raw"),
        ("rand:50:4096:0:0:0:adopted", tmp_path),  # a device, but a seventh field unknown
    ):
        done = subprocess.run(
            [str(host_ioprobe), spec, str(device)], capture_output=True, timeout=10
        )
        events, _ = parse_all(done.stdout)
        assert done.returncode != 0
        assert [type(e) for e in events] == [ProbeFatal]
        if device == tmp_path:
            assert isinstance(events[0], ProbeFatal) and "bad spec" in events[0].message
    bad_name = subprocess.run(
        [str(host_ioprobe), "rand:50:4096:0:0:0", f'"x"={tmp_path}/a'],
        capture_output=True, timeout=10,
    )  # fmt: skip
    [fatal], _ = parse_all(bad_name.stdout)
    assert isinstance(fatal, ProbeFatal) and "device name" in fatal.message


def test_block_header_layout_matches_ioprobe(host_ioprobe: Path, tmp_path: Path) -> None:
    """ioprobe's first prefill block, decoded by hand."""
    image = tmp_path / "one.raw"
    image.write_bytes(b"\0" * 8192)
    run = ProbeRun(host_ioprobe, "idle:0:4096:0:0:4096", image)
    try:
        run.wait_for(Heartbeat)
        run.send("pause")
        run.wait_for(Paused)
    finally:
        run.close()
    block = image.read_bytes()[:4096]
    magic, index, generation, crc, size = struct.unpack_from("<8sQQII", block)
    assert (magic, index, generation, size) == (b"DAGPROBE", 0, 1, 4096)
    assert crc == zlib.crc32(block[32:])


def test_disk_digest_ignores_the_magic_off_block_boundaries(tmp_path: Path) -> None:
    image = tmp_path / "noise.raw"
    data = bytearray(16 * 4096)
    data[100:108] = MAGIC  # inside block 0, not at its start
    data[4096 * 2 + 1 : 4096 * 2 + 9] = MAGIC
    data[4096 * 5 : 4096 * 6] = make_block(5, 9)
    data[-4:] = MAGIC[:4]  # a cut magic at the very end
    image.write_bytes(bytes(data))
    found = disk_digest(image)
    assert (found.digest, found.valid_blocks) == (f"{block_hash(5, 9):016x}", 1)
    assert found.misplaced_blocks == found.invalid_crc_blocks == 0
