"""Writes held while the disk under a backend has no room, or turned read-only.

A full filesystem (``ENOSPC``, ``EDQUOT``) or one that went read-only (``EROFS``, as ext4
does with ``errors=remount-ro`` when it meets an error) is a condition of the host, often
passing: an operator frees space, a filesystem is remounted. The agent's promise is to hold
a request rather than fail it, so such a write is tried again every :data:`RETRY_S` for up
to :data:`HOLD_S` (the agent's I/O timeout) before the guest is told. The hold is logged
once when it begins, with the file and the reason, and once when writes go on.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: The errors that mean "no room, for now" rather than "this device is broken".
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
RETRY_S = 0.5
#: A write held this long fails (the same bound as a link cut's: the agent's I/O timeout).
HOLD_S = 120.0


def is_space_error(err: OSError) -> bool:
    return err.errno in SPACE_ERRNOS


class SpaceHold:
    """The writes of one file held for room: when each began to wait, and the log lines.
    ``hold_s`` (default :data:`HOLD_S`; 0: never held) bounds each wait; ``clock`` is for
    tests."""

    def __init__(
        self, path: str, hold_s: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self.hold_s = HOLD_S if hold_s is None else hold_s
        self.clock = clock
        self._since: dict[int, float] = {}  # a held write's id -> when it first failed
        self._began: float | None = None  # when the current hold began
        self.held_total = 0  # writes that had to wait, since the backend opened

    @property
    def holding(self) -> int:
        return len(self._since)

    def failed(self, key: int, err: OSError) -> bool:
        """Write ``key`` failed with ``err`` (a space error): True to try it again in
        :data:`RETRY_S`, False when it has waited ``hold_s`` already (then fail it)."""
        if self.hold_s <= 0:
            return False
        now = self.clock()
        since = self._since.setdefault(key, now)
        if since == now:
            self.held_total += 1
        if self._began is None:
            self._began = now
            log.warning(
                "%s: %s: holding writes until there is room again (at most %.0f s each)",
                self.path, err.strerror, self.hold_s,
            )  # fmt: skip
        if now - since < self.hold_s:
            return True
        del self._since[key]
        if not self._since:
            self._began = None
        log.error("%s: a write waited %.0f s for room: failing it (%s)",
                  self.path, now - since, err.strerror)  # fmt: skip
        return False

    def done(self, key: int) -> None:
        """Write ``key`` went through (after a hold, or not held at all)."""
        if self._since.pop(key, None) is not None and not self._since and self._began:
            log.warning("%s: writes go on, after %.1f s held", self.path,
                        self.clock() - self._began)  # fmt: skip
            self._began = None
