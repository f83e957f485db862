"""A copy's pace: at most so many bytes per second, booked as it goes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class Pace:
    """Bytes per second a background copy may move (None: no limit). Each copy is booked
    (:meth:`charge`) and the next waits until the link time booked is over (:meth:`wait`)."""

    def __init__(
        self,
        rate: float | None,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._next_free = 0.0

    def set(self, rate: float | None) -> None:
        """From now on at most ``rate`` (None: no limit); what the old rate had booked
        ahead is forgotten."""
        self.rate = rate
        self._next_free = min(self._next_free, self._clock())

    async def wait(self) -> None:
        while self.rate and (wait := self._next_free - self._clock()) > 0:
            await self._sleep(wait)

    def charge(self, length: int) -> None:
        """Book ``length`` bytes (negative: give back some of what was booked)."""
        if self.rate and length < 0:
            self._next_free += length / self.rate
        elif self.rate:
            self._next_free = max(self._next_free, self._clock()) + length / self.rate
