"""What the demos share: a fresh lab, and whether a migration was healthy."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from devagent.report import MigrationReport

if TYPE_CHECKING:
    from devagent.lab.lab import Lab


def healthy(reports: list[MigrationReport]) -> bool:
    """Every migration completed with no guest error or verify failure, no guest I/O
    forgotten, integrity ok (every disk's), no frame lost on a NIC."""
    return all(
        r.status == "completed"
        and r.guest_io_errors == 0
        and r.guest_verify_failures == 0
        and not r.guest_ops_lost
        and r.integrity == "ok"
        and all(d.integrity == "ok" for d in r.devices if d.kind == "disk")
        and not r.net_frames_lost
        for r in reports
    )


async def fresh_lab(
    name: str,
    hosts: int,
    link_rate: str | None,
    *,
    loopback: bool,
    say: Callable[[str], None],
    libvirt: bool = False,
) -> Lab:
    """A new lab of ``hosts`` hosts named ``name`` (``libvirt``: a libvirtd in each),
    removing one a previous run left."""
    from devagent.lab.lab import Lab

    if name in Lab.list():
        say(f"removing the lab {name!r} a previous run left")
        await asyncio.to_thread(Lab.load(name).down)
    say(f"making a {hosts}-host lab (link {link_rate or 'unshaped'})")
    return await asyncio.to_thread(
        Lab.up, name=name, hosts=hosts, link_rate=link_rate, loopback=loopback,
        with_libvirt=libvirt,
    )  # fmt: skip
