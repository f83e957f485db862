"""The libvirt domains a host's daemon serves the disks of, as its :class:`Host` holds
them: a domain on its way here (:class:`IncomingDomain`, made by
:mod:`devagent.daemon.libvirt_incoming`), and the record of each domain served here, which
a restarted daemon takes up again (its agents supervised like a VM's)."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from devagent.daemon.agents import AgentProcess
from devagent.errors import DevagentError

log = logging.getLogger(__name__)


@dataclass
class IncomingDomain:
    """A domain on its way here: its disks' agents, and the push receivers beside them."""

    name: str
    source: str
    agents: dict[str, AgentProcess]
    receivers: dict[str, AgentProcess] = field(default_factory=dict)
    committing: asyncio.Lock = field(default_factory=asyncio.Lock)
    began: bool = False  # the commit began: the guest runs here (or is about to)


# --- the record of the domains served here -----------------------------------------------------

#: Each domain's agents, saved in its folder (``ROOT/domains/NAME/domain.json``) whenever the
#: host takes its disks on (adopt, vm start --libvirt, a migration's commit) and removed when
#: it lets them go: a daemon that restarts takes them up again.
RECORD = "domain.json"


def record_path(root: Path, name: str) -> Path:
    return root / "domains" / name / RECORD


def save_domain(root: Path, name: str, agents: list[AgentProcess]) -> None:
    path = record_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps([agent.to_json() for agent in agents]))
    partial.replace(path)  # never half a record


def forget_domain(root: Path, name: str) -> None:
    record_path(root, name).unlink(missing_ok=True)


async def adopt_domains(root: Path) -> dict[str, list[AgentProcess]]:
    """The domains a previous daemon served here, their agents taken up again (one that
    died meanwhile restarted on its replica); a record that cannot be read is skipped."""
    found: dict[str, list[AgentProcess]] = {}
    for record in sorted((root / "domains").glob(f"*/{RECORD}")):
        name = record.parent.name
        try:
            agents = [AgentProcess.from_json(a) for a in json.loads(record.read_text())]
        except (OSError, ValueError, TypeError, DevagentError) as err:
            log.warning("domain %s: cannot read %s: %s", name, record, err)
            continue
        for agent in agents:
            if not agent.alive:
                log.warning("domain %s: the agent of %s is gone; restarting it", name, agent.node)
                await agent.start()
        found[name] = agents
        log.info("domain %s: its disks %s served here again", name,
                 ", ".join(a.node for a in agents))  # fmt: skip
    return found


async def supervise_domains(served: dict[str, list[AgentProcess]]) -> list[str]:
    """Restart each agent of a served domain that died (the domain's QEMU does not
    reconnect by itself: libvirt sets no reconnect-delay; the agent serves its replica for
    the migrations and peers to come). Returns the disks restarted."""
    restarted = []
    for name, agents in list(served.items()):
        for agent in agents:
            if agent.pid is not None and not agent.alive and served.get(name) is agents:
                log.error("domain %s: the agent of %s died (%s); restarting it",
                          name, agent.node, agent.tail(2))  # fmt: skip
                try:
                    await agent.start()
                except DevagentError as err:
                    log.error("domain %s: its agent of %s will not restart: %s",
                              name, agent.node, err)  # fmt: skip
                    continue
                restarted.append(f"{name}/{agent.node}")
    return restarted
