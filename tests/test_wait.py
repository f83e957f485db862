"""wait_until: returns what the check found, ends at the deadline with a sentence, stops at
once when the check raises; the same for the blocking twin."""

from __future__ import annotations

import asyncio
import time

import pytest

from devagent.errors import PeerError
from devagent.wait import WaitTimeout, all_of, wait_until, wait_until_blocking


async def test_returns_the_first_truthy_answer_of_a_sync_check() -> None:
    answers = iter([None, 0, "", "here"])
    assert await wait_until(lambda: next(answers), timeout=5, what="x", interval=0) == "here"


async def test_an_async_check_is_awaited() -> None:
    event = asyncio.Event()

    async def check() -> bool:
        return event.is_set()

    asyncio.get_running_loop().call_soon(event.set)
    assert await wait_until(check, timeout=5, what="the event", interval=0.001) is True


async def test_the_timeout_says_what_never_happened_and_after_how_long() -> None:
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as caught:
        await wait_until(
            lambda: False, timeout=0.05, what="VM v1's heartbeat", detail=lambda: "log: boom"
        )
    assert time.monotonic() - started < 2
    assert str(caught.value) == "VM v1's heartbeat: not within 0.05 s; log: boom"
    assert isinstance(caught.value, PeerError)
    assert caught.value.what == "VM v1's heartbeat" and caught.value.timeout == 0.05


async def test_an_exception_from_the_check_ends_the_wait() -> None:
    def check() -> bool:
        raise PeerError("the process died")

    with pytest.raises(PeerError, match="died"):
        await wait_until(check, timeout=5, what="x")


def test_the_blocking_twin_has_the_same_contract() -> None:
    answers = iter([None, 7])
    assert wait_until_blocking(lambda: next(answers), timeout=5, what="x", interval=0) == 7
    with pytest.raises(WaitTimeout, match=r"the port: not within 0\.02 s"):
        wait_until_blocking(lambda: None, timeout=0.02, what="the port")


async def test_all_of_runs_every_step_to_its_end_before_raising_the_first_failure() -> None:
    ended: list[str] = []

    async def step(name: str, delay: float, fails: bool = False) -> str:
        await asyncio.sleep(delay)
        ended.append(name)
        if fails:
            raise PeerError(f"{name} failed")
        return name

    assert await all_of(step("a", 0.01), step("b", 0.0)) == ["a", "b"]
    ended.clear()
    with pytest.raises(PeerError, match="quick failed"):
        await all_of(step("quick", 0.0, fails=True), step("slow", 0.05))
    assert ended == ["quick", "slow"]  # the slow one was not left behind
