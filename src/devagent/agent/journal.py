"""The journal: every request from arrival to reply, and the gate that makes swaps safe.

The agent calls ``admit`` when a request arrives and ``complete`` right before its reply is
handed to the transport.  In between the request is *in flight*.  ``quiesce`` closes the
gate: new requests wait in ``admit`` (they never fail) and ``quiesce`` returns once nothing
is in flight; ``resume`` opens the gate and admits the waiters in arrival order.

FLUSH ordering: a FLUSH is admitted like any request, then waits until every write-class
request (WRITE, WRITE_ZEROES, TRIM) admitted before it has completed, and only then goes to
the backend.  That covers the spec's rule (every write acknowledged before the FLUSH was
received is durable when the FLUSH is acknowledged) with room to spare, whatever order a
backend finishes writes in.

Timestamps are wall-clock (``time.time()``) so that journals on two hosts can be laid on one
time line; the migration report reads ``completions_since`` to compute ``max_io_gap_ms``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from devagent.agent.messages import JournalStats
from devagent.errors import StateError
from devagent.nbd.proto import Command

log = logging.getLogger(__name__)

WRITE_CLASS = frozenset({Command.WRITE, Command.WRITE_ZEROES, Command.TRIM})
#: WRITE_CLASS as bits (``1 << command``): the hot path tests a bit rather than hashing an
#: enum member (an Enum's hash is a Python-level call).
_WRITE_BITS = sum(1 << int(kind) for kind in WRITE_CLASS)
_COMMAND_SLOTS = 32
#: Latency histogram bucket ``i`` counts requests that took [2**i, 2**(i+1)) microseconds.
#: The ring of completion times keeps one per millisecond at most (a gap is then known to
#: 1 ms), which makes its 262,144 entries at least 4.4 minutes of the busiest I/O.
RING_RESOLUTION_S = 0.001
RING_SIZE = 1 << 18
_RING_STEP = RING_RESOLUTION_S * 0.999  # a millisecond, give or take a float's rounding
HISTOGRAM_BUCKETS = 32


class JournalClosed(StateError):
    """The journal was shut down while a request waited at the gate."""


class JournalState(enum.Enum):
    OPEN = "open"
    QUIESCING = "quiescing"
    QUIESCED = "quiesced"
    CLOSED = "closed"


@dataclass(slots=True, eq=False)
class Entry:
    """One request's record."""

    seq: int
    kind: Command
    offset: int
    length: int
    arrived: float
    admitted: float | None = None
    completed: float | None = None
    error: int = 0


@dataclass(slots=True, eq=False)
class _FlushBarrier:
    waiting_for: set[int]
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Journal:
    """Tracks requests, holds them while quiesced, orders FLUSH after earlier writes."""

    def __init__(
        self, *, ring_size: int = RING_SIZE, clock: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock
        self.state = JournalState.OPEN
        self._seq = 0
        self._in_flight: dict[int, Entry] = {}
        self._writes_in_flight: set[int] = set()
        self._barriers: list[_FlushBarrier] = []
        self._waiting: deque[tuple[Entry, asyncio.Future[None]]] = deque()
        self._drained: asyncio.Event | None = None
        self._counts = [0] * _COMMAND_SLOTS  # indexed by command value
        self._bytes = [0] * _COMMAND_SLOTS
        self.errors = 0
        self.histogram = [0] * HISTOGRAM_BUCKETS
        self._ring: deque[float] = deque(maxlen=ring_size)
        self._ring_lost_until: float | None = None  # the newest completion the ring dropped
        self.last_completion: float | None = None
        self.max_gap = 0.0

    # -- the gate ------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def admit(self, kind: Command, offset: int = 0, length: int = 0) -> Entry:
        """Record a request's arrival; return once it may run (after ``resume`` if quiesced)."""
        if self.state is JournalState.CLOSED:
            raise JournalClosed("the journal is shut down")
        self._seq += 1
        entry = Entry(self._seq, kind, offset, length, arrived=self._clock())
        if self.state is JournalState.OPEN and not self._waiting:
            self._start(entry)
        else:
            gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.append((entry, gate))
            try:
                await gate
            except asyncio.CancelledError:
                if gate.done() and not gate.cancelled() and gate.exception() is None:
                    self.complete(entry, error=108)  # started by resume(): close its record
                else:
                    self._drop_waiter(entry)
                raise
        if kind is Command.FLUSH:
            await self._flush_barrier(entry)
        return entry

    def try_admit(self, kind: Command, offset: int = 0, length: int = 0) -> Entry | None:
        """Admit at once when the gate is open and nobody waits, else None (then ``admit``).

        The synchronous path lets the agent answer a page-cache read without a task.
        A FLUSH always takes ``admit``: it may have to wait for earlier writes.
        """
        if self.state is not JournalState.OPEN or self._waiting or kind is Command.FLUSH:
            return None
        self._seq += 1
        now = self._clock()
        entry = Entry(self._seq, kind, offset, length, arrived=now, admitted=now)
        self._in_flight[entry.seq] = entry
        if _WRITE_BITS >> kind & 1:
            self._writes_in_flight.add(entry.seq)
        return entry

    def _drop_waiter(self, entry: Entry) -> None:
        self._waiting = deque(w for w in self._waiting if w[0] is not entry)

    def _start(self, entry: Entry) -> None:
        entry.admitted = self._clock()
        self._in_flight[entry.seq] = entry
        if _WRITE_BITS >> entry.kind & 1:
            self._writes_in_flight.add(entry.seq)

    async def _flush_barrier(self, entry: Entry) -> None:
        earlier = {seq for seq in self._writes_in_flight if seq < entry.seq}
        if not earlier:
            return
        barrier = _FlushBarrier(earlier)
        self._barriers.append(barrier)
        try:
            await barrier.done
        finally:
            if barrier in self._barriers:
                self._barriers.remove(barrier)

    def complete(self, entry: Entry, error: int = 0) -> None:
        """Record that the request's reply is leaving now (``error`` 0 is success)."""
        if self._in_flight.pop(entry.seq, None) is None:
            raise StateError(f"request #{entry.seq} is not in flight")
        now = self._clock()
        entry.completed, entry.error = now, error
        kind = entry.kind
        self._counts[kind] += 1
        self._bytes[kind] += entry.length  # reported for READ and WRITE only
        if error:
            self.errors += 1
        micros = max(1, int((now - entry.arrived) * 1e6))
        self.histogram[min(micros.bit_length() - 1, HISTOGRAM_BUCKETS - 1)] += 1
        if self.last_completion is not None:
            self.max_gap = max(self.max_gap, now - self.last_completion)
        self.last_completion = now
        ring = self._ring
        if not ring or now - ring[-1] >= _RING_STEP:
            if len(ring) == ring.maxlen:
                self._ring_lost_until = ring[0]
            ring.append(now)
        if self._writes_in_flight and entry.seq in self._writes_in_flight:
            self._writes_in_flight.discard(entry.seq)
            for barrier in self._barriers:
                barrier.waiting_for.discard(entry.seq)
                if not barrier.waiting_for and not barrier.done.done():
                    barrier.done.set_result(None)
        if not self._in_flight and self._drained is not None:
            self._drained.set()

    async def quiesce(self) -> None:
        """Hold new requests; return once every request in flight is answered."""
        if self.state is not JournalState.OPEN:
            raise StateError(f"cannot quiesce a journal that is {self.state.value}")
        self.state = JournalState.QUIESCING
        self._drained = asyncio.Event()
        if not self._in_flight:
            self._drained.set()
        try:
            await self._drained.wait()
        except asyncio.CancelledError:
            self.resume()
            raise
        finally:
            self._drained = None
        if self.state is JournalState.CLOSED:  # shut down while draining
            raise JournalClosed("the journal was shut down while quiescing")
        self.state = JournalState.QUIESCED

    def resume(self) -> None:
        """Open the gate: admit the waiting requests in arrival order."""
        if self.state not in (JournalState.QUIESCING, JournalState.QUIESCED):
            raise StateError(f"cannot resume a journal that is {self.state.value}")
        self.state = JournalState.OPEN
        while self._waiting:
            entry, gate = self._waiting.popleft()
            if gate.cancelled():
                continue
            self._start(entry)
            gate.set_result(None)

    def shutdown(self) -> None:
        """Refuse new requests and fail the ones waiting at the gate."""
        self.state = JournalState.CLOSED
        while self._waiting:
            _, gate = self._waiting.popleft()
            if not gate.done():
                gate.set_exception(JournalClosed("the agent is stopping"))

    # -- measures ------------------------------------------------------------------------

    @property
    def counts(self) -> dict[str, int]:
        """Completed requests per command name."""
        return {Command(value).name: n for value, n in enumerate(self._counts) if n}

    def completions_since(self, t: float) -> list[float]:
        """Completion times (wall clock) at or after ``t`` still held in the ring, oldest first."""
        out: list[float] = []
        for stamp in reversed(self._ring):
            if stamp < t:
                break
            out.append(stamp)
        out.reverse()
        return out

    def covers(self, t: float) -> bool:
        """Whether ``completions_since(t)`` is whole: the ring dropped nothing at or after t."""
        return self._ring_lost_until is None or self._ring_lost_until < t

    def latency_percentile(self, fraction: float) -> float:
        """Upper bound (seconds) of the histogram bucket holding that fraction of requests."""
        total = sum(self.histogram)
        if not total:
            return 0.0
        running = 0
        for i, count in enumerate(self.histogram):
            running += count
            if running >= fraction * total:
                return (1 << (i + 1)) / 1e6
        return (1 << HISTOGRAM_BUCKETS) / 1e6

    def stats(self) -> JournalStats:
        """A summary, as ``GET /status`` shows it."""
        return JournalStats(
            state=self.state.value,
            in_flight=self.in_flight,
            waiting=self.waiting,
            completed=sum(self._counts),
            errors=self.errors,
            counts=self.counts,
            bytes={
                kind.name: self._bytes[kind]
                for kind in (Command.READ, Command.WRITE)
                if self._bytes[kind]
            },
            max_gap_ms=round(self.max_gap * 1000, 3),
            p99_latency_ms=round(self.latency_percentile(0.99) * 1000, 3),
            latency_histogram_us={f"<{2 ** (i + 1)}": n for i, n in enumerate(self.histogram) if n},
        )
