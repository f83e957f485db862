"""A host's libvirtd as devagentd follows it (``devagentd --libvirt URI``; ``bench
libvirt`` watches the lab's the same way): one connection through ``libvirt-python``, and
libvirt's events on it, so that the daemon follows domains by their events, never by
polling them.

libvirt's events arrive on a thread of libvirt's own event loop, which hands each to the
daemon's loop (``call_soon_threadsafe``). libvirt's calls block on their socket: each runs
in a thread (:func:`asyncio.to_thread`; a connection is thread-safe). A connection that
closes (libvirtd restarted, its socket gone) is opened again at the next call;
:attr:`LibvirtLink.connected` says which.

Each lifecycle event is logged naming the domain and the host, kept as the domain's last
event, and handed to whoever waits for one (:meth:`LibvirtLink.wait_event`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from devagent.api_types import LibvirtDomain
from devagent.errors import EnvironmentProblem, NotFound, PeerError
from devagent.wait import WaitTimeout

log = logging.getLogger(__name__)

#: libvirt's ``virDomainEventType``, and each type's ``detail`` (libvirt's constants, in
#: the order libvirt numbers them), for the log and the API.
EVENTS = ("defined", "undefined", "started", "suspended", "resumed", "stopped", "shutdown",
          "pmsuspended", "crashed")  # fmt: skip
DETAILS: dict[str, tuple[str, ...]] = {
    "defined": ("added", "updated", "renamed", "from_snapshot"),
    "undefined": ("removed", "renamed"),
    "started": ("booted", "migrated", "restored", "from_snapshot", "wakeup", "recreated"),
    "suspended": (
        "paused",
        "migrated",
        "ioerror",
        "watchdog",
        "restored",
        "from_snapshot",
        "api_error",
        "postcopy",
        "postcopy_failed",
    ),
    "resumed": ("unpaused", "migrated", "from_snapshot", "postcopy", "postcopy_failed"),
    "stopped": ("shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from_snapshot"),
    "shutdown": ("finished", "guest", "host"),
    "pmsuspended": ("memory", "disk"),
    "crashed": ("panicked", "crashloaded"),
}
#: ``virConnectDomainEventBlockJobStatus``: a block job's events (``event`` "block-job").
BLOCK_JOB_STATUSES = ("completed", "failed", "canceled", "ready")
# libvirt's numbers that devagent passes or compares (libvirt-python's constants, not
# imported at module level: this module loads without libvirt).
#: ``virDomainState`` values, and ``virDomainPausedReason``: paused by a user's call (what a
#: migration with ``VIR_MIGRATE_PAUSED`` leaves on its destination).
STATE_RUNNING, STATE_PAUSED, PAUSED_USER = 1, 3, 1
#: ``virDomainXMLFlags``: the inactive (persistent) definition; one fit for a migration.
XML_INACTIVE, XML_MIGRATABLE = 2, 8
#: ``virDomainGetJobStatsFlags``: the job that ended (its figures kept for other readers:
#: a read clears them otherwise).
JOB_STATS_COMPLETED = 1 | 2
#: ``virDomainMigrateFlags``: live; peer to peer (the source's libvirtd drives it); defined
#: on the destination, undefined on the source; left paused on the destination; every disk
#: copied (libvirt's own storage migration), its mirror blocking each guest write until it
#: reached the destination; the streams over TLS.
MIGRATE_LIVE = 1
MIGRATE_PEER2PEER = 2
MIGRATE_PERSIST_DEST = 8
MIGRATE_UNDEFINE_SOURCE = 16
MIGRATE_PAUSED = 32
MIGRATE_NON_SHARED_DISK = 64
MIGRATE_TLS = 1 << 16
MIGRATE_SYNCHRONOUS_WRITES = 1 << 18
#: ``virDomainBlockCopyFlags``: the destination exists and is used as it is; the job is not
#: kept in the persistent definition; ``virDomainBlockJobAbortFlags``: a pivot ends it.
BLOCK_COPY_REUSE_EXT = 2
BLOCK_COPY_TRANSIENT_JOB = 4
BLOCK_JOB_ABORT_PIVOT = 2
#: ``virDomainState``.
STATES = ("nostate", "running", "blocked", "paused", "shutdown", "shutoff", "crashed",
          "pmsuspended")  # fmt: skip


@dataclass(frozen=True)
class DomainEvent:
    """One lifecycle event of a domain, as libvirt sent it, with the daemon's receive time."""

    domain: str
    event: str  # "started", "suspended", …, or "block-job"
    detail: str  # "migrated", "booted", …; a block job's "ready", "completed", …
    at: float  # time.time() when it arrived
    disk: str | None = None  # a block job's disk (its target, e.g. "vda")

    def __str__(self) -> str:
        where = f" {self.disk}" if self.disk else ""
        return f"{self.event}{where}/{self.detail}"


def event_names(event: int, detail: int) -> tuple[str, str]:
    """libvirt's numbers as names (unknown ones, from a newer libvirt, as numbers)."""
    kind = EVENTS[event] if 0 <= event < len(EVENTS) else str(event)
    details = DETAILS.get(kind, ())
    return kind, details[detail] if 0 <= detail < len(details) else str(detail)


def state_name(state: int) -> str:
    return STATES[state] if 0 <= state < len(STATES) else str(state)


_events_thread: threading.Thread | None = None
_events_lock = threading.Lock()


def _start_events_thread() -> None:
    """libvirt's own event loop, on a thread of its own, once per process and before the
    first connection opens (libvirt takes one event implementation per process, for good:
    one thread serves every loop this process runs, the daemon's or a test's)."""
    global _events_thread
    with _events_lock:
        if _events_thread is None:
            import libvirt

            libvirt.virEventRegisterDefaultImpl()
            # libvirt prints each error on stderr too; devagent raises it with its context
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _events_thread = threading.Thread(
                target=_run_events, name="libvirt-events", daemon=True
            )
            _events_thread.start()


def _run_events() -> None:
    import libvirt

    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # the thread must outlive an error: without it, no event at all
            log.exception("libvirt's event loop failed an iteration")
            time.sleep(0.1)


class LibvirtLink:
    """devagentd's connection to its host's libvirtd at ``uri``."""

    def __init__(self, uri: str, host_name: str) -> None:
        self.uri = uri
        self.host_name = host_name
        self.last_events: dict[str, DomainEvent] = {}
        self._conn: Any = None  # libvirt.virConnect (libvirt-python has no type hints)
        self._loop: asyncio.AbstractEventLoop | None = None  # where its events are handled
        self._callbacks: list[int] = []
        self._opening = asyncio.Lock()
        self._waiters: list[tuple[Callable[[DomainEvent], bool], asyncio.Future[DomainEvent]]] = []

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def open(self) -> None:
        """Connect, and subscribe to every domain's lifecycle and block-job events (one
        opening at a time: calls that find the connection gone wait for the same one)."""
        try:
            import libvirt
        except ImportError as err:
            raise EnvironmentProblem(
                "libvirt-python is not installed (make venv installs it)"
            ) from err
        _start_events_thread()
        self._loop = asyncio.get_running_loop()
        async with self._opening:
            if self._conn is not None:
                return
            try:
                self._conn = await asyncio.to_thread(self._connect, libvirt)
            except libvirt.libvirtError as err:
                raise PeerError(f"host {self.host_name}: libvirt at {self.uri}: {err}") from err
        log.info("host %s: connected to libvirt at %s", self.host_name, self.uri)

    def _connect(self, libvirt: Any) -> Any:
        """The connection, its callbacks registered (libvirt's calls: in a thread)."""
        conn = libvirt.open(self.uri)
        conn.registerCloseCallback(self._closed, None)
        self._callbacks = [
            conn.domainEventRegisterAny(None, kind, handler, None)
            for kind, handler in (
                (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle),
                (libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._block_job),
            )
        ]
        with contextlib.suppress(libvirt.libvirtError):  # a local driver has none
            conn.setKeepAlive(5, 3)
        return conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return

        def close() -> None:
            with contextlib.suppress(Exception):  # a connection already lost
                for callback in self._callbacks:
                    conn.domainEventDeregisterAny(callback)
                conn.unregisterCloseCallback()
            conn.close()

        await asyncio.to_thread(close)

    async def call(self, method: str, *args: Any) -> Any:
        """``virConnect.method(*args)`` in a thread; a connection lost is opened again."""
        if self._conn is None:
            await self.open()
        return await self.run(self._conn, method, *args)

    async def run(self, target: Any, method: str, *args: Any) -> Any:
        """``target.method(*args)`` (a libvirt object: a domain, the connection) in a
        thread; libvirt's error as a :class:`PeerError` naming the host and the call."""
        import libvirt

        try:
            return await asyncio.to_thread(getattr(target, method), *args)
        except libvirt.libvirtError as err:
            shown = ", ".join(_short(repr(a)) for a in args)
            kind = NotFound if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN else PeerError
            raise kind(f"host {self.host_name}: libvirt {method}({shown}): {err}") from err

    async def domains(self) -> list[LibvirtDomain]:
        """Every domain libvirt knows here, with the last event the daemon saw of it."""
        found = await self.call("listAllDomains", 0)

        def describe(dom: Any) -> LibvirtDomain | None:
            import libvirt

            try:
                state, _reason = dom.state()
                persistent = bool(dom.isPersistent())
            except libvirt.libvirtError:  # gone meanwhile (destroyed, migrated away)
                return None
            last = self.last_events.get(dom.name())
            return LibvirtDomain(
                name=dom.name(), uuid=dom.UUIDString(), state=state_name(state),
                persistent=persistent, last_event=str(last) if last else None,
            )  # fmt: skip

        described = await asyncio.to_thread(lambda: [describe(d) for d in found])
        return [d for d in described if d is not None]

    async def wait_event(
        self, wanted: Callable[[DomainEvent], bool], timeout: float, what: str
    ) -> DomainEvent:
        """The first event from now on that ``wanted`` accepts."""
        future: asyncio.Future[DomainEvent] = asyncio.get_running_loop().create_future()
        entry = (wanted, future)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise WaitTimeout(f"host {self.host_name}: {what}", timeout) from None
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    # --- libvirt's callbacks, on libvirt's events thread -----------------------------------

    def _lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        kind, why = event_names(event, detail)
        self._hand_over(DomainEvent(domain=dom.name(), event=kind, detail=why, at=time.time()))

    def _block_job(
        self, _conn: Any, dom: Any, disk: str, _kind: int, status: int, _opaque: Any
    ) -> None:
        known = 0 <= status < len(BLOCK_JOB_STATUSES)
        why = BLOCK_JOB_STATUSES[status] if known else str(status)
        self._hand_over(
            DomainEvent(domain=dom.name(), event="block-job", detail=why, at=time.time(), disk=disk)
        )

    def _closed(self, conn: Any, reason: int, _opaque: Any) -> None:
        self._on_loop(self._lost, (conn, reason))

    def _hand_over(self, got: DomainEvent) -> None:
        self._on_loop(self._dispatch, got)

    def _on_loop(self, handler: Callable[[Any], None], argument: Any) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (a test's)
                self._loop.call_soon_threadsafe(handler, argument)

    # --- the same, on the daemon's loop ------------------------------------------------------

    def _dispatch(self, got: DomainEvent) -> None:
        if got.event != "block-job":
            self.last_events[got.domain] = got
        log.info("host %s: libvirt domain %s %s", self.host_name, got.domain, got)
        for wanted, future in list(self._waiters):
            if not future.done() and wanted(got):
                future.set_result(got)

    def _lost(self, closed: tuple[Any, int]) -> None:
        conn, reason = closed
        if conn is not self._conn:  # an older connection's late word
            return
        self._conn = None
        log.warning(
            "host %s: the connection to libvirt at %s closed (reason %d); it is opened "
            "again at the next call", self.host_name, self.uri, reason,
        )  # fmt: skip
        for _wanted, future in self._waiters:  # no event of theirs can come now
            if not future.done():
                future.set_exception(PeerError(f"host {self.host_name}: libvirt went away"))
        asyncio.get_running_loop().run_in_executor(None, _close_quietly, conn)


def _short(text: str, most: int = 60) -> str:
    """An argument as an error shows it (a domain's XML is not repeated in full)."""
    return text if len(text) <= most else f"{text[: most - 1]}…"


def _close_quietly(conn: Any) -> None:
    """A lost connection's resources freed (its callbacks hold it)."""
    with contextlib.suppress(Exception):
        conn.unregisterCloseCallback()
        conn.close()
