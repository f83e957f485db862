"""The quiesce hold of the control API: ``POST /quiesce`` holds the guest's new requests
once none is in flight, ``POST /resume`` releases them. A hold that nobody releases is
released by the agent itself after ``max_hold_s``, so a daemon that dies mid-exchange cannot
freeze its guest's disk for ever.

    RELEASED --quiesce--> DRAINING --drained--> HELD --resume | expire--> RELEASED
                          DRAINING --abort (the drain failed)--> RELEASED
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time

from devagent.agent.defaults import MAX_HOLD_S
from devagent.agent.journal import Journal
from devagent.agent.lifecycle import Lifecycle

log = logging.getLogger(__name__)


class HoldState(enum.Enum):
    RELEASED = "released"
    DRAINING = "draining"
    HELD = "held"


class HoldEvent(enum.Enum):
    QUIESCE = "quiesce"
    DRAINED = "drained"
    ABORT = "abort"
    RESUME = "resume"
    EXPIRE = "expire"


_S, _E = HoldState, HoldEvent
TRANSITIONS: dict[tuple[HoldState, HoldEvent], HoldState] = {
    (_S.RELEASED, _E.QUIESCE): _S.DRAINING,
    (_S.DRAINING, _E.DRAINED): _S.HELD,
    (_S.DRAINING, _E.ABORT): _S.RELEASED,
    (_S.HELD, _E.RESUME): _S.RELEASED,
    (_S.HELD, _E.EXPIRE): _S.RELEASED,
}


class Hold:
    """The hold on one agent's journal."""

    def __init__(self, journal: Journal, name: str, max_hold_s: float = MAX_HOLD_S) -> None:
        self.journal = journal
        self.max_hold_s = max_hold_s
        self.lifecycle: Lifecycle[HoldState, HoldEvent] = Lifecycle(
            f"the hold of export {name!r}", HoldState.RELEASED, TRANSITIONS
        )
        self.since: float | None = None  # wall clock when held
        self._timer: asyncio.TimerHandle | None = None

    @property
    def state(self) -> HoldState:
        return self.lifecycle.state

    @property
    def engaged(self) -> bool:
        """Quiesced by the control API (draining or held)."""
        return self.state is not HoldState.RELEASED

    async def quiesce(self) -> float:
        """Hold new requests; return once none is in flight, with the seconds that took."""
        self.lifecycle.fire(HoldEvent.QUIESCE)
        started = time.time()
        try:
            await self.journal.quiesce()
        except BaseException:
            self.lifecycle.fire(HoldEvent.ABORT)
            raise
        self.lifecycle.fire(HoldEvent.DRAINED)
        self.since = time.time()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.max_hold_s, self._expire)
        return self.since - started

    def resume(self) -> float:
        """Release the held requests in arrival order; returns the seconds they were held."""
        self.lifecycle.fire(HoldEvent.RESUME)
        return self._release()

    def _expire(self) -> None:
        log.warning(
            "%s: held for %.0f s without resume: resuming", self.lifecycle.name, self.max_hold_s
        )
        self.lifecycle.fire(HoldEvent.EXPIRE)
        self._release()

    def _release(self) -> float:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held = time.time() - (self.since or time.time())
        self.since = None
        self.journal.resume()
        return held
