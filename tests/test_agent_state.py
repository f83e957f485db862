"""Device state blobs: round trip, and clear refusals of anything else."""

from __future__ import annotations

import struct
import zlib

import pytest

from devagent.agent.state import Bitmap, DeviceState, StateFormatError


def sample() -> DeviceState:
    state = DeviceState(size=10 * 65536 + 100, chunk_size=65536)
    dirty = state.new_bitmap("dirty")
    dirty.set(0)
    dirty.set_range(5, 11)
    state.new_bitmap("present").set(3)
    state.counters.update(writes=12345, generation=7)
    return state


def test_round_trip() -> None:
    state = sample()
    assert state.n_chunks == 11
    back = DeviceState.import_(state.export())
    assert back == state
    assert back.bitmaps["dirty"].count() == 7 and back.bitmaps["dirty"][10]
    assert not back.bitmaps["dirty"][4]
    assert back.counters == {"writes": 12345, "generation": 7}


def _reseal(body: bytes) -> bytes:
    return body + struct.pack(">I", zlib.crc32(body))


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"", "too short"),
        (b"garbage" * 10, "not a device state"),
        (_reseal(b"DAST\x00\x02" + bytes(20)), "version 2, this agent reads 1"),
        (sample().export()[:-1] + b"\x00", "checksum"),
        (_reseal(sample().export()[:-4] + b"extra"), "trailing bytes"),
        (_reseal(sample().export()[:-10]), "truncated"),
        (_reseal(struct.pack(">4sHQIHH", b"DAST", 1, 10, 0, 0, 0)), "chunk size 0"),
        (
            _reseal(
                struct.pack(">4sHQIHH", b"DAST", 1, 4096, 4096, 0, 1)
                + b"\x00\x01d"
                + struct.pack(">Q", 9)
                + b"\x00\x00"
            ),
            "has 9 bits for 1 chunks",
        ),
    ],
)
def test_rejects_what_it_cannot_read(blob: bytes, match: str) -> None:
    with pytest.raises(StateFormatError, match=match):
        DeviceState.import_(blob)


def test_bitmap_bounds() -> None:
    bitmap = Bitmap(9)
    bitmap.set(8)
    assert bitmap[8] and bitmap.count() == 1 and len(bitmap.to_bytes()) == 2
    bitmap.set(8, False)
    assert bitmap.count() == 0
    with pytest.raises(Exception, match="outside a bitmap of 9"):
        bitmap.set(9)
    with pytest.raises(StateFormatError):
        Bitmap(9, b"\x00")
