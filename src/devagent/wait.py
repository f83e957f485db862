"""Waiting for something to become true, always with a deadline and a reason.

Prefer an event when one exists (an ``asyncio.Event``, a QMP event, a process's pidfd: see
:mod:`devagent.process`). When the only way to learn that something happened is to ask
again (a daemon's HTTP status, a socket that starts listening, a file that appears), ask
through :func:`wait_until`, never through a hand-written ``while True: sleep`` loop: it
stops at a deadline, and its :class:`WaitTimeout` says what never happened and after how
long, so that every hang in a test or a command ends in a sentence.

:func:`wait_until_blocking` is the same for synchronous code (the lab, which runs in plain
threads and subprocesses).

    DevagentError
    └── PeerError
        └── WaitTimeout       something a peer (process, daemon, QEMU) should have done
                              did not happen in time: ``what`` and ``timeout`` say which
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast, overload

from devagent.errors import PeerError

T = TypeVar("T")

#: Default pause between two checks: short next to any deadline we use, long next to a
#: check's own cost (a stat, a local HTTP request).
DEFAULT_INTERVAL_S = 0.05


class WaitTimeout(PeerError):
    """``what`` did not happen within ``timeout`` seconds."""

    def __init__(self, what: str, timeout: float, detail: str = "") -> None:
        self.what = what
        self.timeout = timeout
        self.detail = detail
        message = f"{what}: not within {timeout:g} s"
        super().__init__(f"{message}; {detail}" if detail else message)


async def all_of(*steps: Awaitable[T]) -> list[T]:
    """Every one of ``steps`` at once, each run to its end (none is left half-done behind
    another's failure); then the first failure is raised. Their results, in order."""
    done = await asyncio.gather(*steps, return_exceptions=True)
    for outcome in done:
        if isinstance(outcome, BaseException):
            raise outcome
    return cast(list[T], done)


@overload
async def wait_until(
    check: Callable[[], Awaitable[T | None]],
    *,
    timeout: float,
    what: str,
    interval: float = ...,
    detail: Callable[[], str] | None = ...,
) -> T: ...


@overload
async def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = ...,
    detail: Callable[[], str] | None = ...,
) -> T: ...


async def wait_until(
    check: Callable[[], Any],
    *,
    timeout: float,
    what: str,
    interval: float = DEFAULT_INTERVAL_S,
    detail: Callable[[], str] | None = None,
) -> Any:
    """Call ``check`` (sync or async) until it returns something truthy, and return that.

    ``check`` is called at once, then every ``interval`` seconds. An exception from it ends
    the wait (that is how a check says "this will never happen": the process died). Past
    ``timeout`` seconds, raises :class:`WaitTimeout` with ``what`` (phrase it as what was
    awaited: ``"VM v1's first heartbeat"``) and, if given, ``detail()`` (a log's tail).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(what, timeout, detail() if detail is not None else "")
        await asyncio.sleep(min(interval, left))


def wait_until_blocking(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = DEFAULT_INTERVAL_S,
    detail: Callable[[], str] | None = None,
) -> T:
    """:func:`wait_until` for synchronous code: the same contract, with ``time.sleep``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(what, timeout, detail() if detail is not None else "")
        time.sleep(min(interval, left))


__all__ = ["DEFAULT_INTERVAL_S", "WaitTimeout", "wait_until", "wait_until_blocking"]
