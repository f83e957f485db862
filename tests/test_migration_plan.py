"""The pure parts of a migration's plan: what the copier asks per request after the
switchover, and the hand-over of the chunks a stopped mirror's target holds."""

from __future__ import annotations

import base64

import pytest

from devagent.agent.presence import clean_chunks
from devagent.daemon.migration.context import ReplicaProgress
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


def test_the_replicas_are_looked_at_again_when_they_are_due_to_be_complete() -> None:
    """The source asks for the destination's replicas every POLL_S, or sooner when at the
    rate they grew they are due to be complete sooner: it lets its disks go then, not up to
    a whole poll later."""
    now = [100.0]
    progress = ReplicaProgress(clock=lambda: now[0])
    progress.saw(0, missing=100 << 20)
    assert progress.next_look_in(0.1) == 0.1  # no rate yet
    now[0] += 0.1
    progress.saw(10 << 20, missing=90 << 20)  # 100 MiB/s: 0.9 s to go
    assert progress.next_look_in(0.1) == 0.1
    now[0] += 0.1
    progress.saw(97 << 20, missing=3 << 20)  # 870 MiB/s, 3 MiB to go: due in 3.4 ms
    assert progress.next_look_in(0.1) == ReplicaProgress.SOONEST_LOOK_S
    now[0] += 0.1
    progress.saw(98 << 20, missing=2 << 20)  # 10 MiB/s: due in 0.2 s
    assert progress.next_look_in(0.1) == 0.1
    now[0] += 0.1
    progress.saw(99 << 20, missing=1 << 19)  # 10 MiB/s, half a MiB: due in 50 ms
    assert progress.next_look_in(0.1) == pytest.approx(0.05)
    now[0] += 0.1
    progress.saw(99 << 20, missing=1 << 19)  # no growth since (a stall, a spill): no hurry
    assert progress.next_look_in(0.1) == 0.1
    now[0] += 0.1
    progress.saw(100 << 20, missing=1 << 16)  # grew again, 64 KiB left: due in 6 ms
    assert progress.next_look_in(0.1) == ReplicaProgress.SOONEST_LOOK_S
    progress.lost_sight()  # a look that failed: no rate until two looks again
    assert progress.next_look_in(0.1) == 0.1
    now[0] += 0.1
    progress.saw(100 << 20, missing=0)  # complete: settled on this look
    assert progress.next_look_in(0.1) == 0.1
