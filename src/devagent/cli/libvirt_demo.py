"""``devagent demo --libvirt``: the main job on a libvirt domain. A 2-host lab with a
libvirtd beside each devagentd; the test guest defined and started by libvirt on host a
(its probe writing and checking its raw file disk); the disk adopted live (served by an
agent of host a from then on); then migrated a → b (and back, with ``--migrations``),
libvirt moving its RAM and definition, devagent its disk. Each report gains the probe's
figures, which the lab reads through the domain's console (:mod:`devagent.lab.libvirt_guest`):
its errors on both hosts, and the disk's digest against the guest's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from devagent.api_types import Adopted
from devagent.cli.demo_common import fresh_lab, healthy
from devagent.cli.progress import MigrationProgress, Spinner
from devagent.client import DaemonClient, Endpoint
from devagent.errors import DevagentError
from devagent.guest.workload import parse_workload
from devagent.lab import libvirt_guest as guest
from devagent.lab.layout import LabHost
from devagent.orchestrate import migrate
from devagent.report import MigrationReport
from devagent.vocab import parse_size

LIBVIRT_DEMO_LAB = "lvdemo"
DEMO_DOMAIN = "demo-domain"
BOOT_TIMEOUT_S = 180.0
BASELINE_S = 3.0  # steady guest I/O on the source before each migration
PROBE_MEASURES = ("guest_io_errors", "guest_verify_failures", "integrity")


async def run_libvirt_demo(
    *,
    storage: str,
    link_rate: str,
    disk_size: str,
    ram: str,
    workload: str,
    migrations: int,
    say: Callable[[str], None],
    verbose: bool,
) -> list[MigrationReport]:
    """Every migration's report, in order; it stops after the first that is not healthy."""
    lab = await fresh_lab(LIBVIRT_DEMO_LAB, 2, link_rate, loopback=False, say=say, libvirt=True)
    try:
        hosts = {h.name: h for h in lab.hosts[:2]}
        ends = {h.name: Endpoint(url=h.url, token=lab.token, name=h.name) for h in lab.hosts[:2]}
        probe = parse_workload(workload)
        with Spinner(f"libvirt defines and starts {DEMO_DOMAIN} on host a", enabled=verbose):
            await asyncio.to_thread(
                guest.define_and_start, hosts["a"], DEMO_DOMAIN, parse_size(disk_size), probe,
                parse_size(ram) >> 20,
            )  # fmt: skip
            await guest.wait_io(lab.hosts, DEMO_DOMAIN, beats=1, timeout=BOOT_TIMEOUT_S)
        with Spinner(f"adopting {DEMO_DOMAIN}'s disk (copy onto an agent, pivot)", enabled=verbose):
            async with DaemonClient(ends["a"]) as client:
                adopted = await client.post_as(f"/v1/libvirt/{DEMO_DOMAIN}/adopt", Adopted)
        say(f"{DEMO_DOMAIN}'s {', '.join(d.node for d in adopted.disks)} served by host a's agent")
        reports: list[MigrationReport] = []
        source, destination = "a", "b"
        for index in range(migrations):
            await asyncio.sleep(BASELINE_S)
            count = f" ({index + 1} of {migrations})" if migrations > 1 else ""
            say(f"migrating {DEMO_DOMAIN} {source} → {destination} ({storage}){count}")
            before = guest.GuestErrors.of(guest.probe_events(lab.hosts, DEMO_DOMAIN))
            with MigrationProgress(enabled=verbose) as progress:
                report = await migrate(
                    ends[source], ends[destination], DEMO_DOMAIN, storage=storage,
                    link_rate_bps=lab.link_rate_bps, progress=progress,
                )  # fmt: skip
            if report.status == "completed":
                await _probe_figures(
                    report, before, lab.hosts, hosts[destination], ends[destination]
                )
            reports.append(report)
            if not healthy([report]):
                break
            source, destination = destination, source
        return reports
    finally:
        say(f"removing the lab {LIBVIRT_DEMO_LAB!r}")
        await asyncio.to_thread(lab.down)


async def _probe_figures(
    report: MigrationReport,
    before: guest.GuestErrors,
    hosts: list[LabHost],
    there: LabHost,
    end: Endpoint,
) -> None:
    """The probe's errors since ``before`` (both hosts' console logs), the disk's integrity
    there."""
    errors = guest.GuestErrors.of(guest.probe_events(hosts, report.vm))
    report.guest_io_errors = errors.io_errors - before.io_errors
    report.guest_verify_failures = errors.verify_failures - before.verify_failures
    try:
        image = await guest.served_image(end, report.vm)
        report.integrity = await guest.integrity(hosts, there, report.vm, image)
    except DevagentError as err:
        report.integrity = f"not checked: {err}"
    for row in report.devices:
        if row.kind == "disk":
            row.integrity = report.integrity
    for measure in PROBE_MEASURES:
        report.missing.pop(measure, None)
