"""Exports: disks that live on this host and are served, by an agent of their own, to VMs on
other hosts (remote device access). An export's folder ``<host dir>/exports/<name>/`` holds
its image, its agent's sockets and ``export.json``; a restarted daemon adopts the agents that
still run.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import msgspec

from devagent.agent.presence import presence_path
from devagent.api_types import Export
from devagent.daemon.agents import AgentProcess
from devagent.daemon.vms.request import MAX_DISK_BYTES, MIN_DISK_BYTES, decode
from devagent.errors import NotFound, PeerError, StateError, UsageError
from devagent.vocab import parse_size

log = logging.getLogger(__name__)


class ExportManager:
    def __init__(self, host_name: str, root: Path, address: str):
        self.host_name = host_name
        self.root = root / "exports"
        self.address = address
        self.exports: dict[str, AgentProcess] = {}

    def get(self, name: str) -> AgentProcess:
        try:
            return self.exports[name]
        except KeyError:
            raise NotFound(f"no export {name!r} on host {self.host_name}") from None

    async def create(self, name: str, size: int) -> AgentProcess:
        """A new zero-filled disk of ``size`` bytes, served on TCP to peers."""
        if name in self.exports:
            raise StateError(f"export {name!r} already exists on host {self.host_name}")
        folder = self.root / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        image = folder / "disk.img"
        with image.open("wb") as f:
            f.truncate(size)
        agent = AgentProcess(
            vm=name, node="export", image=str(image), run_dir=str(folder),
            listen_address=self.address,
        )  # fmt: skip
        self.exports[name] = agent
        try:
            await agent.start()
        except BaseException:
            await self.remove(name)
            raise
        if agent.tcp_address is None:
            await self.remove(name)
            raise PeerError(f"export {name!r}: its agent reports no TCP address")
        (folder / "export.json").write_text(json.dumps(agent.to_json()))
        log.info(
            "export %s on host %s: %s (%d bytes)", name, self.host_name, agent.tcp_address, size
        )
        return agent

    async def take_over(
        self, name: str, agent: AgentProcess, forget: Callable[[], None]
    ) -> AgentProcess:
        """Make the disk a VM's ``agent`` serves an export ``name``: the agent stops, and an
        export's agent serves the same image on the same address under the same export
        name (a peer reading it reconnects, and goes on); then ``forget`` takes the disk
        out of the VM's record. The image stays where it is: it goes when the export does.

        A daemon killed part-way loses nothing: the export's record is written before the
        VM's agent stops, without a process (a restart drops it: the VM's agent, restarted
        by its supervisor, still serves the disk, and the migration keeps it again); once
        the export's agent runs it is recorded with it, and a restart adopts it and takes
        the disk out of the VM's record (:func:`kept_disks`) if ``forget`` never ran."""
        if name in self.exports:
            raise StateError(f"export {name!r} already exists on host {self.host_name}")
        folder = self.root / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        kept = AgentProcess(
            vm=name, node=agent.node, image=agent.image, run_dir=str(folder),
            listen_address=self.address, tcp_address=agent.tcp_address,
        )  # fmt: skip
        record = folder / "export.json"
        record.write_text(json.dumps(kept.to_json()))  # claimed, not started: no pid
        await agent.stop()
        # A presence file beside it is a fetched replica's, complete long since: stale.
        presence_path(Path(agent.image)).unlink(missing_ok=True)
        self.exports[name] = kept
        try:
            await kept.start()
        except BaseException:
            self.exports.pop(name, None)
            shutil.rmtree(folder, ignore_errors=True)
            raise
        record.write_text(json.dumps(kept.to_json()))
        forget()
        log.warning("export %s on host %s: VM %s's %s kept here (%s)",
                    name, self.host_name, agent.vm, agent.node, kept.tcp_address)  # fmt: skip
        return kept

    async def remove(self, name: str) -> None:
        agent = self.exports.pop(name, None)
        if agent is None:
            raise NotFound(f"no export {name!r} on host {self.host_name}")
        await agent.stop()
        image = Path(agent.image)
        # A VM's disk kept here: devagent's own (in the disks folder) goes with the export;
        # a user's own image never does.
        if not image.is_relative_to(self.root / name) and image.is_relative_to(
            self.root.parent / "disks"
        ):
            for path in (image, presence_path(image)):
                path.unlink(missing_ok=True)
        shutil.rmtree(self.root / name, ignore_errors=True)
        log.info("export %s removed from host %s", name, self.host_name)

    async def adopt_all(self) -> None:
        for record in sorted(self.root.glob("*/export.json")):
            try:
                agent = AgentProcess.from_json(json.loads(record.read_text()))
            except (OSError, ValueError, TypeError) as err:
                log.warning("cannot read %s: %s", record, err)
                continue
            if agent.pid is None:  # a keep the daemon's end interrupted (take_over)
                log.warning("export %s was never started: dropping its record (its VM's "
                            "agent serves the disk)", agent.vm)  # fmt: skip
                shutil.rmtree(record.parent, ignore_errors=True)
                continue
            if agent.alive:
                self.exports[agent.vm] = agent
                log.info("adopted export %s (agent pid %s)", agent.vm, agent.pid)
            else:
                log.warning("export %s: its agent is gone; restarting it", agent.vm)
                self.exports[agent.vm] = agent
                await agent.start()

    async def supervise_once(self) -> list[str]:
        restarted = []
        for name, agent in list(self.exports.items()):
            if agent.pid is not None and not agent.alive and name in self.exports:
                log.error("export %s: its agent died (%s); restarting it", name, agent.tail(2))
                try:
                    await agent.start()
                except PeerError as err:
                    log.error("export %s: agent will not restart: %s", name, err)
                    continue
                restarted.append(name)
        return restarted

    def kept_disks(self) -> dict[str, str]:
        """The image each export serves, by export name (a VM's disk kept here is
        ``export_name(VM, node)``)."""
        return {name: agent.image for name, agent in self.exports.items()}

    @staticmethod
    def status(agent: AgentProcess) -> Export:
        return Export(
            name=agent.vm,
            address=agent.tcp_address,
            export=agent.export,
            image=agent.image,
            size=Path(agent.image).stat().st_size,
            agent_pid=agent.pid,
            alive=agent.alive,
        )


#: An export's name: its VM's (``NAME``), with its disk's node beyond the first disk's
#: (``NAME-disk1``: :func:`~devagent.daemon.vms.request.export_name`).
ExportName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")]


class ExportRequest(msgspec.Struct, frozen=True):
    """The ``POST /v1/exports`` body: a new disk ``size`` bytes (or "1G") large."""

    name: ExportName
    size: int | str = 1 << 30

    def checked(self) -> tuple[str, int]:
        """The export's name and size in bytes, once the size is in range."""
        size = parse_size(self.size)
        if not MIN_DISK_BYTES <= size <= MAX_DISK_BYTES:
            raise UsageError("'size' must be from 1M to 1T (at $.size)")
        return self.name, size


EXPORT_RULES = {
    "name": "'name' must be 1-40 characters of a-z, 0-9 and '-'",
    "size": "'size' must be a size in bytes or with a K, M or G suffix",
}


def parse_export_request(raw: bytes) -> tuple[str, int]:
    """The ``POST /v1/exports`` body: the export's name and size in bytes."""
    return decode(raw, ExportRequest, EXPORT_RULES).checked()
