"""Waiting with a deadline and a reason: :func:`wait_until` polls a condition until it holds,
and its timeout error says what never happened. Prefer an event where one exists (a QMP
event, a process's exit); this is for the conditions only a question answers."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

from devagent.errors import PeerError


class WaitTimeout(PeerError):
    """Something waited for never happened in time."""


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> None:
    """Return once ``check()`` (sync or async) is true; :class:`WaitTimeout` ("waited
    T s for WHAT") once ``timeout`` seconds passed without it."""
    deadline = time.monotonic() + timeout
    while True:
        done = check()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"waited {timeout:g} s for {what}")
        await asyncio.sleep(interval)
