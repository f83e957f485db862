"""QMP's answers and events as far as devagent reads them, as declared types (msgspec
Structs) with QEMU's own field names (``error-desc``, ``total-progress``).

qemu.qmp hands over each answer and event as parsed JSON; :func:`answer` converts it, in one
call where the command returns (:meth:`devagent.qemu.vm.Vm.query`), and nothing past it
sees a dict. An answer that does not fit is QEMU's fault: a :class:`PeerError` naming the
field (``Expected `str`, got `int` - at `$.status```). Fields QEMU may leave out have
defaults; fields devagent does not read are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import msgspec

from devagent.errors import PeerError

T = TypeVar("T")


class Answer(msgspec.Struct, rename="kebab"):
    """A QMP answer or event: QEMU spells its fields in kebab-case."""


class RamInfo(Answer):
    """``query-migrate``'s ``ram`` (QEMU's ``MigrationStats``), in bytes."""

    transferred: int = 0
    remaining: int = 0
    total: int | None = None
    dirty_sync_count: int = 0  # dirty-page syncs so far: one at setup, then one per pass


class MigrationInfo(Answer):
    """``query-migrate`` (QEMU's ``MigrationInfo``); ``downtime`` and ``total_time`` in ms,
    once it completed."""

    status: str = "none"
    ram: RamInfo | None = None
    downtime: int | None = None
    total_time: int | None = None
    error_desc: str | None = None
    cpu_throttle_percentage: int = 0  # auto-converge slowing the guest's vCPUs


class StatusInfo(Answer):
    """``query-status``: the run state (``running``, ``inmigrate``, ``postmigrate``, …)."""

    status: str
    running: bool = False


class BlockJobInfo(Answer):
    """An entry of ``query-block-jobs``: ``offset`` of ``len`` bytes done."""

    device: str
    offset: int = 0
    len: int = 0
    ready: bool = False
    status: str | None = None
    error: str | None = None


class JobInfo(Answer):
    """An entry of ``query-jobs``."""

    id: str
    status: str
    current_progress: int = 0
    total_progress: int = 0
    error: str | None = None


class Timestamp(Answer):
    seconds: int
    microseconds: int

    def at(self) -> float:
        """The host's wall clock when QEMU sent the event."""
        return self.seconds + self.microseconds / 1e6


class EventData(Answer):
    """What devagent reads of an event's data: a ``MIGRATION`` event's ``status``."""

    status: str | None = None


class Event(Answer):
    """A QMP event (``STOP``, ``RESUME``, ``MIGRATION``, …)."""

    event: str
    data: EventData = msgspec.field(default_factory=EventData)
    timestamp: Timestamp | None = None

    def at(self) -> float | None:
        """The host's wall clock when QEMU sent it (None: it came without a time stamp)."""
        return self.timestamp.at() if self.timestamp is not None else None


def answer(raw: object, into: type[T], *, what: str) -> T:
    """QMP's parsed JSON ``raw`` as an ``into``; :class:`PeerError` naming the bad field."""
    if isinstance(raw, Mapping) and not isinstance(raw, dict):
        raw = dict(raw)  # qemu.qmp's Message
    try:
        return msgspec.convert(raw, type=into)
    except msgspec.ValidationError as err:
        raise PeerError(f"{what}: QEMU's answer does not fit: {err}") from None


def event_of(raw: object) -> Event:
    """A QMP event as qemu.qmp hands it over, typed."""
    return answer(raw, Event, what="QMP event")
