"""The pure stream-netdev codec: every rejection on raw bytes, every split offset, and
random and mutated streams (hypothesis)."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devagent.errors import ProtocolError, UsageError
from devagent.net.codec import (
    NEED_DATA,
    Closed,
    CloseReason,
    DecoderState,
    Dropped,
    DropReason,
    Event,
    Frame,
    FrameDecoder,
    Limit,
    StreamProtocolError,
    StreamUsageError,
    encode_frame,
    frame_header,
)

ETH = bytes(range(6)) + bytes(range(6, 12)) + b"\x08\x00"  # dst, src, EtherType IPv4


def frame(n: int, fill: int = 0xAB) -> bytes:
    """An Ethernet frame of ``n`` bytes (n >= 14)."""
    return ETH + bytes([fill]) * (n - len(ETH))


def drain(decoder: FrameDecoder) -> list[Event]:
    """Every event up to NEED_DATA or the (first) Closed."""
    events: list[Event] = []
    while True:
        event = decoder.next_event()
        if event is NEED_DATA:
            return events
        assert not isinstance(event, type(NEED_DATA))
        events.append(event)
        if isinstance(event, Closed):
            return events


def decode(chunks: list[bytes], *, eof: bool = True) -> list[Event]:
    decoder = FrameDecoder()
    events: list[Event] = []
    for chunk in chunks:
        if not chunk:
            continue  # b"" is EOF to the decoder, not an empty read
        decoder.receive_data(chunk)
        events += drain(decoder)
    if eof:
        decoder.receive_data(b"")
        events += drain(decoder)
    return events


# --- the wire -----------------------------------------------------------------------------


def test_header_is_big_endian_length() -> None:
    assert frame_header(60) == b"\x00\x00\x00\x3c"
    assert encode_frame(frame(1514)) == b"\x00\x00\x05\xea" + frame(1514)
    assert struct.calcsize(">I") == Limit.HEADER
    assert Limit.MAX_FRAME == 69632  # QEMU's NET_BUFSIZE


def test_one_frame_then_eof() -> None:
    assert decode([encode_frame(frame(60))]) == [Frame(frame(60)), Closed(CloseReason.EOF)]


def test_several_frames_in_one_chunk_keep_their_order() -> None:
    frames = [frame(n, fill=n % 256) for n in (14, 60, 1514, 9000, Limit.MAX_FRAME)]
    events = decode([b"".join(encode_frame(f) for f in frames)])
    assert events == [*(Frame(f) for f in frames), Closed(CloseReason.EOF)]


def test_empty_stream_closes_cleanly() -> None:
    assert decode([]) == [Closed(CloseReason.EOF)]


def test_need_data_until_the_frame_is_whole() -> None:
    decoder = FrameDecoder()
    wire = encode_frame(frame(100))
    for offset in range(len(wire)):
        decoder.receive_data(wire[offset : offset + 1])
        if offset < len(wire) - 1:
            assert decoder.next_event() is NEED_DATA
            assert decoder.buffered == offset + 1  # the half-read header was rolled back
    assert decoder.next_event() == Frame(frame(100))
    assert decoder.buffered == 0


@pytest.mark.parametrize("count", [1, 3])
def test_split_at_every_offset(count: int) -> None:
    frames = [frame(60 + k, fill=k) for k in range(count)]
    wire = b"".join(encode_frame(f) for f in frames)
    for cut in range(len(wire) + 1):
        assert decode([wire[:cut], wire[cut:]]) == [
            *(Frame(f) for f in frames),
            Closed(CloseReason.EOF),
        ], cut


def test_split_at_every_pair_of_offsets() -> None:
    wire = encode_frame(frame(20)) + encode_frame(frame(15))
    expected = [Frame(frame(20)), Frame(frame(15)), Closed(CloseReason.EOF)]
    for a in range(len(wire) + 1):
        for b in range(a, len(wire) + 1):
            assert decode([wire[:a], wire[a:b], wire[b:]]) == expected, (a, b)


# --- every rejection ----------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 13])
def test_runt_is_dropped_and_the_stream_stays_in_sync(length: int) -> None:
    wire = struct.pack(">I", length) + b"\x55" * length + encode_frame(frame(60))
    decoder = FrameDecoder()
    decoder.receive_data(wire)
    assert drain(decoder) == [Dropped(DropReason.RUNT, length, length), Frame(frame(60))]
    assert decoder.stats.runt == 1
    assert (decoder.stats.frames, decoder.stats.bytes) == (1, 60)


@pytest.mark.parametrize("length", [Limit.MAX_FRAME + 1, 0x00100000, 0xFFFFFFFF])
def test_oversized_length_closes_without_buffering(length: int) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(frame(60)) + struct.pack(">I", length) + b"\x00" * 1000)
    assert decoder.next_event() == Frame(frame(60))
    with pytest.raises(StreamProtocolError) as caught:
        decoder.next_event()
    assert isinstance(caught.value, ProtocolError)
    assert caught.value.reason is DropReason.OVERSIZED
    assert caught.value.length == length
    assert f"{length:#x}" in str(caught.value)
    assert decoder.state is DecoderState.CLOSED
    assert decoder.stats.oversized == 1
    assert decoder.buffered == 0
    # Whatever follows is ignored, not buffered: a megabyte costs nothing.
    decoder.receive_data(b"\xff" * (1 << 20))
    assert decoder.buffered == 0
    assert decoder.next_event() == Closed(CloseReason.BROKEN)
    decoder.receive_data(b"")
    assert decoder.next_event() == Closed(CloseReason.BROKEN)


def test_a_lower_limit_applies_too() -> None:
    decoder = FrameDecoder(max_frame=1518)
    decoder.receive_data(encode_frame(frame(1518)) + encode_frame(frame(1519)))
    assert decoder.next_event() == Frame(frame(1518))
    with pytest.raises(StreamProtocolError):
        decoder.next_event()


@pytest.mark.parametrize("kept", [1, 2, 3])
def test_eof_in_a_header_is_a_truncated_drop(kept: int) -> None:
    wire = encode_frame(frame(60)) + frame_header(60)[:kept]
    assert decode([wire]) == [
        Frame(frame(60)),
        Dropped(DropReason.TRUNCATED, None, kept),
        Closed(CloseReason.EOF),
    ]


@pytest.mark.parametrize("kept", [0, 1, 59])
def test_eof_in_a_frame_is_a_truncated_drop(kept: int) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(frame_header(60) + frame(60)[:kept])
    decoder.receive_data(b"")
    assert drain(decoder) == [
        Dropped(DropReason.TRUNCATED, 60, kept),
        Closed(CloseReason.EOF),
    ]
    assert decoder.stats.truncated == 1
    assert decoder.next_event() == Closed(CloseReason.EOF)


def test_bytes_after_eof_are_a_usage_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    decoder.receive_data(b"")  # a second EOF is harmless
    with pytest.raises(StreamUsageError):
        decoder.receive_data(b"\x00")


@pytest.mark.parametrize("length", [0, 13, Limit.MAX_FRAME + 1])
def test_encoding_a_frame_the_wire_cannot_carry_is_a_usage_error(length: int) -> None:
    with pytest.raises(StreamUsageError) as caught:
        encode_frame(b"\x00" * length)
    assert isinstance(caught.value, UsageError)
    assert str(length) in str(caught.value)


@pytest.mark.parametrize("limit", [13, Limit.MAX_FRAME + 1])
def test_limit_outside_the_wire_is_refused(limit: int) -> None:
    with pytest.raises(StreamUsageError):
        FrameDecoder(max_frame=limit)


# --- random and mutated streams -----------------------------------------------------------

frame_sizes = st.one_of(st.integers(0, 13), st.integers(14, 200), st.integers(1400, 1600))
cuts = st.lists(st.integers(0, 1 << 16), max_size=8)


def split(wire: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(wire) + 1) for p in points})
    bounds = [0, *marks, len(wire)]
    return [wire[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(frame_sizes, st.integers(0, 255)), max_size=12), cuts)
def test_any_stream_of_frames_decodes_the_same_whatever_the_splits(
    specs: list[tuple[int, int]], points: list[int]
) -> None:
    payloads = [bytes([fill]) * size for size, fill in specs]
    wire = b"".join(struct.pack(">I", len(p)) + p for p in payloads)
    expected: list[Event] = [
        Frame(p) if len(p) >= Limit.MIN_FRAME else Dropped(DropReason.RUNT, len(p), len(p))
        for p in payloads
    ]
    assert decode(split(wire, points)) == [*expected, Closed(CloseReason.EOF)]


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=300), cuts)
def test_garbage_never_escapes_the_error_tree_nor_grows_the_buffer(
    garbage: bytes, points: list[int]
) -> None:
    decoder = FrameDecoder()
    for chunk in [*(c for c in split(garbage, points) if c), b""]:
        decoder.receive_data(chunk)
        assert decoder.buffered <= len(garbage)
        try:
            events = drain(decoder)
        except StreamProtocolError as err:
            assert err.length > Limit.MAX_FRAME
            assert decoder.next_event() == Closed(CloseReason.BROKEN)
            return
        for event in events:
            if isinstance(event, Frame):
                assert Limit.MIN_FRAME <= len(event.data) <= Limit.MAX_FRAME
    assert decoder.next_event() == Closed(CloseReason.EOF)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 200), st.integers(0, 255), st.integers(1, 6))
def test_one_flipped_byte_in_a_valid_stream_is_contained(
    position: int, value: int, count: int
) -> None:
    wire = bytearray(b"".join(encode_frame(frame(40 + k, fill=k)) for k in range(count)))
    wire[position % len(wire)] = value
    decoder = FrameDecoder()
    decoder.receive_data(bytes(wire))
    decoder.receive_data(b"")
    try:
        events = drain(decoder)
    except StreamProtocolError:
        assert decoder.state is DecoderState.CLOSED
        return
    assert isinstance(events[-1], Closed)
    assert sum(isinstance(e, Frame) for e in events) == decoder.stats.frames
