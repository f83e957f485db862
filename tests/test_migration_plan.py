"""The pure parts of a migration's plan: what the copier asks per request after the
switchover, and the hand-over of the chunks a stopped mirror's target holds."""

from __future__ import annotations

import base64

from devagent.agent.presence import clean_chunks
from devagent.daemon.migration.plans import FETCH_CHUNK
from devagent.daemon.migration.share import COPY_BATCH_MAX, copy_batch


def test_the_copy_batch_follows_the_link_rate() -> None:
    assert copy_batch(None, FETCH_CHUNK) == COPY_BATCH_MAX  # unshaped: as large as allowed
    assert copy_batch(1_000_000_000, FETCH_CHUNK) == 1 << 20
    assert copy_batch(100_000_000, FETCH_CHUNK) == 64 << 10  # 10 ms of link per worker
    assert copy_batch(1_000_000, FETCH_CHUNK) == FETCH_CHUNK  # never below one chunk
    assert copy_batch(400_000_000, FETCH_CHUNK) == 256 << 10  # a power-of-two of chunks


def test_clean_chunks_are_the_complement_of_the_dirty_ones_within_the_disk() -> None:
    dirty = bytes([0b0000_0101, 0b0000_0000])  # chunks 0 and 2 dirty, 10 chunks in all
    clean = base64.b64decode(clean_chunks(base64.b64encode(dirty).decode(), 10))
    assert clean == bytes([0b1111_1010, 0b0000_0011])  # no bit past chunk 9
