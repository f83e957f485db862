"""What a source's migration job keeps on disk, so that a daemon restarted mid-migration
(SIGKILLed, and started again by its service manager) takes the job up again rather than
losing it: the job's :class:`Phase` and what it learned that lived only in memory.

The record is ``<VM's run folder>/migration.json``
(:data:`~devagent.daemon.vms.managed.MIGRATION_RECORD`), written whole (a temporary file
renamed over it) *before* each move of the phase, so that it never says less than the job
did: a record at ``ram`` or before means the destination was never asked to commit. It is
removed once the migration is settled: rolled back (the guest runs here, nothing is left
there) or completed (with the VM's folder, at the release). A job that failed past the
switchover, or a recovery that could not reach the destination, leaves it: a daemon restart
takes that migration up again. A finished job's status lives on in memory only
(``GET /v1/migrations``), as before.

The VM manager keeps a VM whose folder holds a record even when its QEMU is gone (its
agents may serve the disk to the destination); :mod:`.recovery` takes each record up.
"""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Any

import msgspec

from devagent.api_types import MigrationProgress
from devagent.daemon.migration.messages import MigrateRequest, RemoteDisk
from devagent.daemon.migration.plans import Handover
from devagent.daemon.vms.managed import MIGRATION_RECORD
from devagent.errors import EnvironmentProblem
from devagent.report import MigrationReport

log = logging.getLogger(__name__)


class Phase(Enum):
    PREPARING = "preparing"
    RAM = "ram"
    SWITCHOVER = "switchover"
    FINISHING = "finishing"
    COMPLETED = "completed"
    FAILED = "failed"


#: The only moves of a job's phase.
NEXT: dict[Phase, frozenset[Phase]] = {
    Phase.PREPARING: frozenset({Phase.RAM, Phase.FAILED}),
    Phase.RAM: frozenset({Phase.SWITCHOVER, Phase.FAILED}),
    Phase.SWITCHOVER: frozenset({Phase.FINISHING, Phase.FAILED}),
    Phase.FINISHING: frozenset({Phase.COMPLETED, Phase.FAILED}),
    Phase.COMPLETED: frozenset(),
    Phase.FAILED: frozenset(),
}

#: The phases after which the job only goes forward in its own process: the source is
#: fenced (or its QEMU killed) and the destination may have been asked to commit.
PAST_SWITCHOVER = frozenset({Phase.SWITCHOVER, Phase.FINISHING})


class MigrationRecord(msgspec.Struct, kw_only=True):
    """A source job as a restarted daemon needs it (``migration.json``)."""

    id: str
    request: MigrateRequest
    phase: Phase  # the phase the job entered last
    started_at: float
    report: MigrationReport  # the timeline and figures so far
    progress: MigrationProgress = msgspec.field(default_factory=MigrationProgress)
    #: The plan's findings, by node: each source disk as the destination reaches it, and
    #: its size.
    source_disks: dict[str, RemoteDisk] = msgspec.field(default_factory=dict)
    disk_sizes: dict[str, int] = msgspec.field(default_factory=dict)
    bytes_before: int | None = None  # the link's counter at the start
    nic_peers: dict[str, str] = msgspec.field(default_factory=dict)  # node -> HOST:PORT
    #: What the source's disk handed over at the switchover (the chunks a push landed),
    #: for a commit asked again after the restart.
    handover: Handover | None = None


def record_path(run_dir: Path) -> Path:
    return run_dir / MIGRATION_RECORD


def save_record(run_dir: Path, record: MigrationRecord) -> None:
    """Write ``record`` whole: a reader finds the previous one or this one, never half."""
    path = record_path(run_dir)
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_bytes(msgspec.json.encode(record))
        tmp.replace(path)
    except OSError as err:
        raise EnvironmentProblem(f"cannot record migration {record.id} in {path}: {err}") from err


def load_record(run_dir: Path) -> MigrationRecord | None:
    """The record in ``run_dir``; None without one, or with one that cannot be read (said
    in the log: such a migration is left to the operator)."""
    path = record_path(run_dir)
    try:
        return msgspec.convert(_one_disk_record(msgspec.json.decode(path.read_bytes())),
                               MigrationRecord)  # fmt: skip
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as err:
        log.error("cannot read the migration record %s: %s", path, err)
        return None


def _one_disk_record(raw: Any) -> Any:
    """A record from before several disks (``source_disk``, ``disk_size``, a hand-over's
    ``present`` as one string) in today's form: all of it was disk0's."""
    if not isinstance(raw, dict):
        return raw
    if "source_disk" in raw:
        source = raw.pop("source_disk")
        raw["source_disks"] = {"disk0": source} if source else {}
    if "disk_size" in raw:
        raw["disk_sizes"] = {"disk0": raw.pop("disk_size")}
    handover = raw.get("handover")
    if isinstance(handover, dict) and isinstance(handover.get("present"), str):
        handover["present"] = {"disk0": handover["present"]} if handover["present"] else {}
    return raw


def remove_record(run_dir: Path) -> None:
    """The migration is settled: nothing is left to take up."""
    record_path(run_dir).unlink(missing_ok=True)
