"""The spill state of a :class:`~devagent.agent.fetch.Fetch` whose replica has no room.

The Fetch (its module docstring says what a spill does to each request) keeps here: why it
spills (``reason``, None while the replica takes writes), how much went to the remote,
whether present chunks are served lock-free (``fast``), the lock-free writes and the
spilled ones in flight (each counted: a change of mode waits for them), and the prober
that asks every :data:`ROOM_PROBE_S` for a chunk's room beside the replica.

Entering: ``reason`` set, ``room`` cleared (the copier waits on it), ``fast`` off, then wait
until no lock-free write is in flight. Leaving, once the probe gets room: ``reason``
cleared, then wait until no spilled write is in flight (a spilled write forgets the chunks
it wrote back: a lock-free write must not land in one meanwhile); a write that found no
room again meanwhile keeps the spill (the prober goes on); else ``fast`` on, ``room`` set.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from devagent.agent.chunks import Count

ROOM_PROBE_S = 1.0  # how often a spilling Fetch asks whether its replica has room again


def no_room(replica: Path, chunk_size: int, probe: str = "room") -> OSError | None:
    """Why a probe file beside ``replica`` (``.NAME.<probe>``: each asker its own) cannot
    get a chunk's blocks (a full or read-only filesystem), or None when it can."""
    probe_path = replica.with_name(f".{replica.name}.{probe}")
    try:
        fd = os.open(probe_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, chunk_size)
        finally:
            os.close(fd)
            probe_path.unlink()
    except OSError as err:
        return err
    return None


class Spill:
    """One replica's spill state (see the module docstring)."""

    def __init__(self, replica: Path, chunk_size: int, log: logging.Logger) -> None:
        self.replica = replica
        self.chunk_size = chunk_size
        self.log = log
        self.reason: str | None = None
        self.bytes = 0  # guest bytes written to the remote, in all
        self.room = asyncio.Event()
        self.room.set()
        self.fast = True  # present chunks served lock-free
        self.fast_writes = Count()
        self.spilled_writes = Count()
        self.remote_unflushed = False  # spilled writes since the remote's last flush
        self.remote_writes = 0  # a zero map asked before this changed is old
        self._prober: asyncio.Task[None] | None = None
        self._closed = False

    async def enter(self, err: Exception, remote: object, on_room: Callable[[], None]) -> None:
        """No room (``err``): spill, serving the guest from ``remote``; returns once no
        lock-free write is in flight. ``on_room`` runs when the spill ends."""
        if self.reason is None:
            self.reason = str(err)
            self.room.clear()
            self.fast = False
            self.log.warning(
                "replica %s has no room (%s): the guest's I/O goes to %r by remote access, "
                "and the replica stops filling, until there is room again "
                "(free some space, or remount the filesystem read-write)",
                self.replica, err, remote,
            )  # fmt: skip
            if self._prober is None or self._prober.done():
                self._prober = asyncio.create_task(self._await_room(on_room))
        await self.fast_writes.idle.wait()

    async def _await_room(self, on_room: Callable[[], None]) -> None:
        began = time.monotonic()
        while not self._closed:
            await asyncio.sleep(ROOM_PROBE_S)
            if not await asyncio.to_thread(self.has_room):
                continue
            self.reason = None
            await self.spilled_writes.idle.wait()
            if self.reason is None:
                break
            # a write found no room again meanwhile: still spilling, probe on
        else:
            return
        self.fast = True
        self.room.set()
        on_room()
        self.log.warning(
            "replica %s has room again after %.1f s: it fills again (%d bytes spilled to the "
            "remote so far)", self.replica, time.monotonic() - began, self.bytes,
        )  # fmt: skip

    def has_room(self) -> bool:
        """Whether a probe file beside the replica gets a chunk's blocks."""
        return no_room(self.replica, self.chunk_size) is None

    def close(self) -> None:
        self._closed = True
        if self._prober is not None:
            self._prober.cancel()
