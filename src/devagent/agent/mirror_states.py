"""The lifecycle of a :class:`devagent.agent.mirror.Mirrored` copy job, in one table, and
the errors it raises: a state the job does not allow (:class:`MirrorStateError`, a caller's
bug) or a failed job (:class:`MirrorFailed`, the target's or the source's fault)."""

from __future__ import annotations

import enum
import logging
from collections.abc import MutableMapping
from typing import Any

from devagent.errors import PeerError, StateError


class MirrorState(enum.Enum):
    COPYING = "copying"  # tracking and (when ``run`` runs) copying
    CONVERGED = "converged"  # ``run`` brought the dirty set under its limit
    FINISHED = "finished"  # target == source, target flushed; writes now go to both
    FAILED = "failed"  # the job failed; the guest is served by the source alone


class MirrorEvent(enum.Enum):
    CONVERGE = "converge"
    RECOPY = "recopy"
    FINISH = "finish"
    FAIL = "fail"


_S, _E = MirrorState, MirrorEvent
#: Every allowed transition; anything else is a bug in the caller (:class:`MirrorStateError`).
TRANSITIONS: dict[tuple[MirrorState, MirrorEvent], MirrorState] = {
    (_S.COPYING, _E.CONVERGE): _S.CONVERGED,
    (_S.CONVERGED, _E.RECOPY): _S.COPYING,
    (_S.COPYING, _E.FINISH): _S.FINISHED,
    (_S.CONVERGED, _E.FINISH): _S.FINISHED,
    (_S.COPYING, _E.FAIL): _S.FAILED,
    (_S.CONVERGED, _E.FAIL): _S.FAILED,
    (_S.FINISHED, _E.FAIL): _S.FAILED,
}


class MirrorStateError(StateError):
    """A mirror was asked for something its state does not allow."""


class MirrorFailed(PeerError):
    """The mirror job failed (the target, or a read of the source for a copy); the guest's
    I/O on the source is unharmed.  ``__cause__`` is the error that failed it."""


class MirrorLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes each record with the mirror's source and target."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        name = self.extra["mirror"] if self.extra else "?"
        return f"[{name}] {msg}", kwargs
