"""``devagent bench libvirt``: libvirt's own storage migration against devagent under
libvirt, on the same guest, over the same link, in the same run.

One libvirt domain (the test guest, its probe writing and checking its raw file disk) on a
2-host lab with a libvirtd in each host. First it moves by libvirt alone, as ``virsh
migrate --live --p2p --copy-storage-all --persistent --undefine-source`` does (the same
call: ``virDomainMigrateToURI3`` with ``VIR_MIGRATE_NON_SHARED_DISK``; QEMU mirrors the
disk to the destination's NBD server until it converges, then RAM moves), and again with
``--copy-storage-synchronous-writes`` (the mirror in write-blocking mode, so that it
converges under writes); the destination's image is made empty beforehand, as an operator
would. Then its disk is adopted by devagent, and it moves by each of devagent's strategies
(libvirt moving RAM and definition). The domain goes back and forth a → b → a …

Each migration is measured with the same instruments whoever moves the disk: the total time
(until the source is released, as devagent's report has it: no byte of the domain there
that the destination still needs; for libvirt alone, whose copy ends before the switchover,
the guest's resume on the destination; the source's clean-up after that is left out of
both); its floor
``limit_s``, the guest's data (the blocks its probe wrote, and its RAM) over the link; the
guest's pause from libvirt's events as this process receives them (the source's
``Suspended/Migrated`` to the destination's ``Resumed``); QEMU's downtime from libvirt's
job information on the destination; the probe's errors on both hosts; the disk on the
destination against the guest's digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devagent.api_types import Adopted
from devagent.client import DaemonClient, Endpoint
from devagent.errors import DevagentError
from devagent.guest.probe import Heartbeat
from devagent.guest.workload import Workload
from devagent.lab import libvirt
from devagent.lab import libvirt_guest as guest
from devagent.lab.lab import Lab
from devagent.lab.layout import LabHost
from devagent.libvirt_link import (
    JOB_STATS_COMPLETED,
    MIGRATE_LIVE,
    MIGRATE_NON_SHARED_DISK,
    MIGRATE_PEER2PEER,
    MIGRATE_PERSIST_DEST,
    MIGRATE_SYNCHRONOUS_WRITES,
    MIGRATE_TLS,
    MIGRATE_UNDEFINE_SOURCE,
    XML_INACTIVE,
    XML_MIGRATABLE,
    DomainEvent,
    LibvirtLink,
)
from devagent.orchestrate import migrate
from devagent.report import limit_seconds

DOMAIN = "bench-domain"
BLOCK = 4096  # the probe's block
BOOT_TIMEOUT_S = 180.0
SETTLE_S = 3.0  # steady guest I/O before each migration
EVENT_TIMEOUT_S = 600.0
MIGRATE_BASE = MIGRATE_LIVE | MIGRATE_PEER2PEER | MIGRATE_PERSIST_DEST | MIGRATE_UNDEFINE_SOURCE

LIBVIRT_COPY = "libvirt copy-storage-all"
LIBVIRT_COPY_SYNC = "libvirt copy-storage-all, synchronous writes"
DEVAGENT = ("hybrid", "postcopy", "precopy")


@dataclass
class BenchRow:
    """One migration of the domain."""

    method: str  # LIBVIRT_COPY, LIBVIRT_COPY_SYNC, or "devagent STRATEGY"
    source: str
    destination: str
    total_s: float | None = None
    vm_pause_ms: float | None = None
    downtime_ms: float | None = None
    limit_s: float | None = None
    guest_io_errors: int | None = None
    guest_verify_failures: int | None = None
    integrity: str | None = None
    error: str | None = None


@dataclass
class LibvirtBench:
    """The run: a lab, the domain, where it is and its disk there."""

    lab: Lab
    size: int
    workload: Workload
    ram_mb: int
    say: Callable[[str], None]
    links: dict[str, LibvirtLink] = field(default_factory=dict)
    where: str = "a"
    image: Path = Path()
    rows: list[BenchRow] = field(default_factory=list)

    def host(self, name: str) -> LabHost:
        return self.lab.host(name)

    def endpoint(self, name: str) -> Endpoint:
        return Endpoint(url=self.host(name).url, token=self.lab.token, name=name)

    @property
    def other(self) -> str:
        return "b" if self.where == "a" else "a"

    async def run(self, runs: int) -> list[BenchRow]:
        for host in self.lab.hosts[:2]:
            self.links[host.name] = LibvirtLink(libvirt.local_uri(host), host.name)
            await self.links[host.name].open()
        try:
            self.image = await asyncio.to_thread(
                guest.define_and_start, self.host("a"), DOMAIN, self.size, self.workload,
                self.ram_mb,
            )  # fmt: skip
            await guest.wait_io(self.lab.hosts, DOMAIN, beats=1, timeout=BOOT_TIMEOUT_S)
            for method, sync in ((LIBVIRT_COPY, False), (LIBVIRT_COPY_SYNC, True)):
                for _ in range(runs):
                    await self.measure(method, functools.partial(self.libvirt_copy, sync))
            async with DaemonClient(self.endpoint(self.where)) as client:
                await client.post_as(f"/v1/libvirt/{DOMAIN}/adopt", Adopted)
            for strategy in DEVAGENT:
                for _ in range(runs):
                    move = functools.partial(self.devagent, strategy)
                    await self.measure(f"devagent {strategy}", move)
        finally:
            for link in self.links.values():
                await link.close()
        return self.rows

    async def measure(self, method: str, move: Callable[[], Awaitable[float | None]]) -> None:
        """One migration from where the domain is to the other host, by ``move``."""
        await asyncio.sleep(SETTLE_S)
        row = BenchRow(method=method, source=self.where, destination=self.other)
        self.rows.append(row)
        self.say(f"{method}: {row.source} → {row.destination}")
        events = guest.probe_events(self.lab.hosts, DOMAIN)
        before = guest.GuestErrors.of(events)
        written = max((e.written_blocks for e in events if isinstance(e, Heartbeat)), default=0)
        data = written * BLOCK + (self.ram_mb << 20)  # what the guest holds, whoever moves it
        row.limit_s = limit_seconds(data, self.lab.link_rate_bps)
        stopped = self._event(row.source, "suspended", "migrated")
        resumed = self._event(row.destination, "resumed", None)
        await asyncio.sleep(0)  # the waiters are in place before anything happens
        try:
            started = time.time()
            total = await move()
            self.where = row.destination
            # libvirt alone: the disk copied before the switchover, nothing of the source
            # is needed once the guest runs there (its Confirm, the source's clean-up, after)
            row.total_s = total or round((await resumed).at - started, 3)
            pause = (await resumed).at - (await stopped).at
            row.vm_pause_ms = round(pause * 1000, 1)
            row.downtime_ms = await self._downtime(row.destination)
            there = self.host(self.where)
            row.integrity = await guest.integrity(self.lab.hosts, there, DOMAIN, self.image)
        except DevagentError as err:
            row.error = str(err)
            self.say(f"  failed: {err}")
        finally:
            for waiter in (stopped, resumed):
                waiter.cancel()
        after = guest.GuestErrors.of(guest.probe_events(self.lab.hosts, DOMAIN))
        row.guest_io_errors = after.io_errors - before.io_errors
        row.guest_verify_failures = after.verify_failures - before.verify_failures
        self.say(f"  total {row.total_s} s, pause {row.vm_pause_ms} ms, downtime "
                 f"{row.downtime_ms} ms, integrity {row.integrity}")  # fmt: skip

    def _event(self, host: str, event: str, detail: str | None) -> asyncio.Future[DomainEvent]:
        def wanted(got: DomainEvent) -> bool:
            return got.domain == DOMAIN and got.event == event and detail in (None, got.detail)

        what = f"{DOMAIN} {event} on {host}"
        return asyncio.ensure_future(self.links[host].wait_event(wanted, EVENT_TIMEOUT_S, what))

    async def _downtime(self, host: str) -> float | None:
        with contextlib.suppress(DevagentError, KeyError):
            dom = await self.links[host].call("lookupByName", DOMAIN)
            stats = await self.links[host].run(dom, "jobStats", JOB_STATS_COMPLETED)
            return float(stats["downtime"])
        return None

    async def libvirt_copy(self, synchronous: bool) -> float | None:
        """libvirt alone: the disk copied to an empty image on the destination."""
        source, dest = self.host(self.where), self.host(self.other)
        link = self.links[self.where]
        dom = await link.call("lookupByName", DOMAIN)
        target = dest.dir / f"{DOMAIN}.img"
        with target.open("wb") as out:  # what the destination's QEMU opens, empty
            out.truncate(self.size)
        live = await link.run(dom, "XMLDesc", XML_MIGRATABLE)
        inactive = await link.run(dom, "XMLDesc", XML_INACTIVE | XML_MIGRATABLE)
        params = {
            "destination_xml": live.replace(str(self.image), str(target)),
            "persistent_xml": inactive.replace(str(self.image), str(target)),
            "migrate_uri": f"tcp://{dest.address}",
            "migrate_disks": ["vda"],
        }
        flags = MIGRATE_BASE | MIGRATE_NON_SHARED_DISK
        flags |= MIGRATE_TLS if source.tls else 0
        flags |= MIGRATE_SYNCHRONOUS_WRITES if synchronous else 0
        await link.run(dom, "migrateToURI3", libvirt.peer_uri(dest, source), params, flags)
        old, self.image = self.image, target
        old.unlink(missing_ok=True)
        return None  # the guest's resume on the destination

    async def devagent(self, strategy: str) -> float | None:
        """devagent under libvirt: the adopted domain moved by ``strategy``."""
        report = await migrate(
            self.endpoint(self.where), self.endpoint(self.other), DOMAIN, storage=strategy,
            link_rate_bps=self.lab.link_rate_bps,
        )  # fmt: skip
        if report.status != "completed":
            raise DevagentError(f"devagent {strategy}: {report.error}")
        self.image = await guest.served_image(self.endpoint(self.other), DOMAIN)
        return report.total_time_s


def median_rows(rows: list[BenchRow]) -> list[dict[str, Any]]:
    """Per method, in the order measured: the medians of the completed runs, the worst
    errors and every integrity verdict."""
    methods = list(dict.fromkeys(r.method for r in rows))
    table = []
    for method in methods:
        mine = [r for r in rows if r.method == method]
        done = [r for r in mine if r.error is None]

        def median(values: list[float | None]) -> float | None:
            known = [v for v in values if v is not None]
            return round(statistics.median(known), 3) if known else None

        total, limit = median([r.total_s for r in done]), median([r.limit_s for r in done])
        table.append({
            "method": method,
            "runs": len(mine),
            "completed": len(done),
            "total_s": total,
            "total_over_limit": round(total / limit, 2) if total and limit else None,
            "vm_pause_ms": median([r.vm_pause_ms for r in done]),
            "downtime_ms": median([r.downtime_ms for r in done]),
            "guest_errors": max((r.guest_io_errors or 0) + (r.guest_verify_failures or 0)
                                for r in mine),
            "integrity": sorted({str(r.integrity) for r in mine}),
        })  # fmt: skip
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    head = ("| method | runs (completed) | total (s) | total / limit | guest pause (ms) | "
            "QEMU downtime (ms) | guest errors | integrity |")  # fmt: skip
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(
            f"| {row['method']} | {row['runs']} ({row['completed']}) | {row['total_s']} | "
            f"{row['total_over_limit']} | {row['vm_pause_ms']} | {row['downtime_ms']} | "
            f"{row['guest_errors']} | {', '.join(row['integrity'])} |"
        )
    return "\n".join(lines)
