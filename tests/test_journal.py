"""The journal: quiesce/resume ordering, FLUSH ordering, and the measures it keeps."""

from __future__ import annotations

import asyncio

import pytest

from devagent.agent.journal import Entry, Journal, JournalClosed, JournalState
from devagent.errors import StateError
from devagent.nbd.proto import Command


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class FakeBackend:
    """Writes finish when the test says so; flush records which writes were done then."""

    def __init__(self) -> None:
        self.done: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.flushes: list[set[str]] = []

    async def write(self, name: str) -> None:
        gate = self.gates.setdefault(name, asyncio.Event())
        await gate.wait()
        self.done.append(name)

    async def flush(self) -> None:
        self.flushes.append(set(self.done))


async def run(
    journal: Journal, backend: FakeBackend, kind: Command, name: str, acked: list[str]
) -> None:
    """What the agent does for one request: admit, run, complete, reply."""
    entry = await journal.admit(kind, 0, 512)
    if kind is Command.FLUSH:
        await backend.flush()
    else:
        await backend.write(name)
    journal.complete(entry)
    acked.append(name)


async def test_quiesce_holds_new_requests_and_resume_admits_in_arrival_order() -> None:
    journal = Journal()
    first = await journal.admit(Command.WRITE, 0, 512)
    quiesce = asyncio.create_task(journal.quiesce())
    await settle()
    assert journal.state is JournalState.QUIESCING and not quiesce.done()

    admitted: list[Entry] = []

    async def late(i: int) -> None:
        entry = await journal.admit(Command.READ, i, 1)
        admitted.append(entry)

    waiters = [asyncio.create_task(late(i)) for i in range(6)]
    await settle()
    assert journal.waiting == 6 and admitted == []  # waiting, not failed
    assert journal.try_admit(Command.READ) is None

    journal.complete(first)
    await quiesce
    assert journal.state is JournalState.QUIESCED and journal.in_flight == 0
    await settle()
    assert admitted == []  # still held while quiesced

    journal.resume()
    late_after_resume = asyncio.create_task(late(99))
    await asyncio.gather(*waiters, late_after_resume)
    assert [e.offset for e in admitted] == [0, 1, 2, 3, 4, 5, 99]
    stamps = [e.admitted for e in admitted]
    assert all(s is not None for s in stamps) and stamps == sorted(stamps)  # type: ignore[type-var]
    assert journal.in_flight == 7


async def test_quiesce_with_nothing_in_flight_returns_at_once() -> None:
    journal = Journal()
    await journal.quiesce()
    assert journal.state is JournalState.QUIESCED
    with pytest.raises(StateError, match="cannot quiesce a journal that is quiesced"):
        await journal.quiesce()
    journal.resume()
    with pytest.raises(StateError, match="cannot resume a journal that is open"):
        journal.resume()


async def test_flush_waits_for_writes_received_before_it_but_not_after() -> None:
    journal, backend, acked = Journal(), FakeBackend(), []
    slow = asyncio.create_task(run(journal, backend, Command.WRITE, "slow", acked))
    fast = asyncio.create_task(run(journal, backend, Command.WRITE, "fast", acked))
    await settle()
    backend.gates["fast"].set()
    await fast
    assert acked == ["fast"]

    flush = asyncio.create_task(run(journal, backend, Command.FLUSH, "flush", acked))
    after = asyncio.create_task(run(journal, backend, Command.WRITE, "after", acked))
    await settle()
    assert backend.flushes == []  # "slow" was received before the flush: not done yet
    backend.gates["slow"].set()
    await asyncio.gather(slow, flush)
    assert backend.flushes == [{"fast", "slow"}]
    assert acked.index("flush") > acked.index("slow")
    assert not after.done()  # a later write does not hold the flush back
    backend.gates["after"].set()
    await after


async def test_every_write_acked_before_a_flush_arrived_is_covered() -> None:
    journal, backend, acked = Journal(), FakeBackend(), []
    tasks = []
    for round_ in range(5):
        names = [f"w{round_}.{i}" for i in range(4)]
        tasks += [
            asyncio.create_task(run(journal, backend, Command.WRITE, n, acked)) for n in names
        ]
        await settle()
        for name in names[::2]:  # finish every other one
            backend.gates[name].set()
        await settle()
        acked_before = set(acked) - {"f"}
        tasks.append(asyncio.create_task(run(journal, backend, Command.FLUSH, "f", acked)))
        await settle()
        for name in names[1::2]:
            backend.gates[name].set()
        await settle()
        assert acked_before <= backend.flushes[-1]
    await asyncio.gather(*tasks)


async def test_shutdown_fails_waiters_and_refuses_new_requests() -> None:
    journal = Journal()
    await journal.quiesce()
    waiter = asyncio.create_task(journal.admit(Command.READ))
    await settle()
    journal.shutdown()
    with pytest.raises(JournalClosed):
        await waiter
    with pytest.raises(JournalClosed):
        await journal.admit(Command.READ)


async def test_cancelled_waiter_leaves_no_trace() -> None:
    journal = Journal()
    await journal.quiesce()
    waiter = asyncio.create_task(journal.admit(Command.WRITE))
    await settle()
    waiter.cancel()
    await settle()
    assert journal.waiting == 0
    journal.resume()
    assert journal.in_flight == 0


async def test_complete_twice_is_a_state_error() -> None:
    journal = Journal()
    entry = await journal.admit(Command.READ)
    journal.complete(entry)
    with pytest.raises(StateError, match="not in flight"):
        journal.complete(entry)


async def test_measures_gap_ring_histogram_with_a_fake_clock() -> None:
    now = [1000.0]
    journal = Journal(ring_size=4, clock=lambda: now[0])
    for step in (0.001, 0.002, 0.5, 0.001, 0.003):
        entry = await journal.admit(Command.WRITE, 0, 4096)
        now[0] += step
        journal.complete(entry, error=0 if step < 0.4 else 5)
    assert journal.max_gap == pytest.approx(0.5)
    assert journal.completions_since(0) == pytest.approx([1000.003, 1000.503, 1000.504, 1000.507])
    assert journal.completions_since(1000.5035) == pytest.approx([1000.504, 1000.507])
    assert journal.covers(1000.002) and not journal.covers(1000.0)  # 1000.001 was dropped
    entry = await journal.admit(Command.READ, 0, 4096)
    now[0] += 0.0002  # within a millisecond of the last: counted, not put in the ring
    journal.complete(entry)
    assert journal.completions_since(1000.505) == pytest.approx([1000.507])
    stats = journal.stats()
    assert stats.completed == 6 and stats.errors == 1
    assert stats.counts == {"WRITE": 5, "READ": 1}
    assert stats.bytes == {"READ": 4096, "WRITE": 5 * 4096}
    assert stats.max_gap_ms == pytest.approx(500.0)
    assert sum(journal.histogram) == 6
    assert journal.latency_percentile(1.0) >= 0.5  # the slow one is in the top bucket
    assert journal.latency_percentile(0.5) < 0.01


async def test_shutdown_while_quiescing_ends_the_quiesce_with_an_error() -> None:
    journal = Journal()
    entry = await journal.admit(Command.WRITE)
    quiesce = asyncio.create_task(journal.quiesce())
    await settle()
    journal.shutdown()
    journal.complete(entry)
    with pytest.raises(JournalClosed, match="shut down while quiescing"):
        await quiesce
    assert journal.state is JournalState.CLOSED
