"""The libvirt domains a host's daemon serves the disks of, as its :class:`Host` holds
them: a domain on its way here (:class:`IncomingDomain`, made by
:mod:`devagent.daemon.libvirt_incoming`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from devagent.daemon.agents import AgentProcess


@dataclass
class IncomingDomain:
    """A domain on its way here: its disks' agents, and the push receivers beside them."""

    name: str
    source: str
    agents: dict[str, AgentProcess]
    receivers: dict[str, AgentProcess] = field(default_factory=dict)
    committing: asyncio.Lock = field(default_factory=asyncio.Lock)
    began: bool = False  # the commit began: the guest runs here (or is about to)
