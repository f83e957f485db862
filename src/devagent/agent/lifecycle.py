"""The one shape every lifecycle of the agent has: a state enum, a table of the allowed
(state, event) -> state transitions, and a guard that raises :class:`StateError` naming the
object, its state and the event refused (in the manner of h11's ``_state.py``)."""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from typing import Generic, TypeVar

from devagent.errors import StateError

S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)

log = logging.getLogger(__name__)


class Lifecycle(Generic[S, E]):
    """The state of ``name`` (for messages), moved only along ``table``."""

    def __init__(self, name: str, initial: S, table: Mapping[tuple[S, E], S]) -> None:
        self.name = name
        self.state = initial
        self.table = table
        self.history: list[S] = [initial]

    def allows(self, event: E) -> bool:
        return (self.state, event) in self.table

    def require(self, event: E) -> None:
        """Raise unless ``event`` may happen now."""
        if not self.allows(event):
            raise StateError(f"{self.name} is {self.state.value}: cannot {event.value}")

    def fire(self, event: E) -> S:
        """Move along ``event``; returns the new state."""
        self.require(event)
        new = self.table[(self.state, event)]
        if new is not self.state:
            log.debug("%s: %s --%s--> %s", self.name, self.state.value, event.value, new.value)
            self.history.append(new)
        self.state = new
        return new
