"""The records of ``devagent bench migrate``, as declared types (msgspec Structs): the plan,
the machine, one :class:`Run` per migration (its report a :class:`MigrationReport`), the
:class:`Scenario` summaries and the :class:`Results` file that holds them all.

The bench builds them; they are written as JSON once (``runs-so-far.jsonl`` as each run
ends, ``results.json`` at the end) and read back once, here (:func:`read_results`, for
``bench migrate --from``); the statistics and the plots see attributes, never a dict.

Stored files are read as any earlier version wrote them: fields added since (``boot_s``,
``ratio``, the newer report measures...) default to None; a stored summary is dropped, the
runs say it again; and a report the bench made up for its own failures, once only
``{"status", "error"}``, is made whole (:func:`upgrade_run`).
"""

from __future__ import annotations

import msgspec

from devagent.errors import UsageError
from devagent.report import MigrationReport
from devagent.wire import convert


class Plan(msgspec.Struct, frozen=True, omit_defaults=True):
    """What to run: every strategy, per link rate and workload, ``runs`` times."""

    links: tuple[str, ...]
    workloads: tuple[str, ...]
    strategies: tuple[str, ...]
    runs: int
    disk_size: str
    ram_mb: int
    prefill: str
    span: str | None = None  # None: the profile's own
    #: How many disks the guest has, per scenario (each ``disk_size``, written by the
    #: probe): 1, and e.g. 3 for a set of disks moved as one (devagent's strategies only:
    #: QEMU's own move one disk).
    disks: tuple[int, ...] = (1,)
    #: The lab without certificates: every link in plaintext (the TLS comparison's other half).
    insecure: bool = False

    def workload_spec(self, workload: str) -> str:
        spec = f"{workload},prefill={self.prefill}"
        return spec if self.span is None or workload == "idle" else f"{spec},span={self.span}"

    def strategies_for(self, disks: int) -> tuple[str, ...]:
        """The strategies of a scenario with ``disks`` disks (QEMU's own move one)."""
        if disks == 1:
            return self.strategies
        return tuple(s for s in self.strategies if s in ("shared", "postcopy", "precopy", "hybrid"))

    @property
    def count(self) -> int:
        per_link = sum(len(self.strategies_for(d)) for d in self.disks)
        return len(self.links) * len(self.workloads) * per_link * self.runs


class Machine(msgspec.Struct, kw_only=True):
    """Where the matrix ran, and how busy the machine was before and after."""

    os: str
    kernel: str
    cpus: int | None
    cpu: str
    qemu: str
    python: str
    load_average: list[float]
    load_average_end: list[float] | None = None
    duration_s: float | None = None


class TimelinePoint(msgspec.Struct, array_like=True, frozen=True):
    """One probe heartbeat around a run, ``[t, ops, host]`` in the JSON."""

    t: float  # seconds after the migrate command
    ops: int  # guest I/O completed in the heartbeat's 100 ms
    host: str  # "a" (the source) or "b"


class Run(msgspec.Struct, kw_only=True):
    """One migration of the matrix. Figures an older bench did not keep are None."""

    link: str
    workload: str
    strategy: str
    run: int  # its index among the scenario's runs of this strategy, from 0
    vm: str
    disks: int = 1  # the guest's disks
    boot_s: float | None = None  # booting the guest and its prefill (with another at once)
    setup_s: float | None = None  # the resume and the steady baseline
    report: MigrationReport
    migrate_s: float | None = None  # the migrate call, report and all
    #: Both hosts' heartbeats, in time order; None: not kept (a stored copy left them out).
    timeline: list[TimelinePoint] | None = None
    ratio: float | None = None  # total_time_s / limit_s
    wall_s: float | None = None  # resume to removal: what the run cost
    hb_gap_ms: float | None = None  # the largest heartbeat gap, the same way for all


class StrategyRow(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One strategy in one scenario: medians over its completed runs (None: no run had the
    measure), the most guest errors in one run, how many runs kept their data, its errors."""

    runs: int
    completed: int
    time_to_switchover_s: float | None
    total_time_s: float | None
    downtime_ms: float | None
    max_io_gap_ms: float | None
    #: None, and left out of the JSON: runs older than the measure.
    io_gap_excess_ms: float | None = None
    guest_max_latency_ms: float | None
    guest_p99_latency_ms: float | None
    io_rate_ratio: float | None
    bytes_between_hosts: float | None
    limit_s: float | None
    guest_io_errors: int | None  # the most in one run
    guest_verify_failures: int | None  # the most in one run
    #: The most in one run (None, and left out of the JSON: runs older than the measure).
    guest_ops_lost: int | None = None
    net_frames_buffered: float | None
    net_frames_forwarded: float | None
    net_frames_lost: float | None
    ping_max_gap_ms: float | None
    ratio: float | None  # total_time_s / limit_s
    hb_gap_ms: float | None
    integrity_ok: int
    errors: list[str]


class Scenario(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One link rate and workload: a row per strategy, the best strategy moving the disk
    (by median total / limit), and devagent's heartbeat gap ÷ each QEMU baseline's."""

    link: str
    workload: str
    disks: int = 1
    strategies: dict[str, StrategyRow]
    best: str | None
    best_ratio: float | None
    gap_vs_qemu: dict[str, dict[str, float | None]]  # devagent's -> baseline -> ratio


class Rederived(msgspec.Struct):
    """Where ``--from`` read stored runs, and the runs whose figures came out different."""

    source: str = msgspec.field(name="from")
    command: str
    changed: dict[str, list[str]]  # vm -> the names that changed


class Results(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``results.json``. A ``runs-so-far.jsonl`` read back has runs alone."""

    plan: Plan | None = None
    machine: Machine | None = None
    runs: list[Run]
    summary: list[Scenario] = []
    command: str | None = None
    note: str | None = None
    rederived: Rederived | None = None


def upgrade_run(data: object) -> object:
    """A stored run (parsed JSON) as this version reads it. The bench once kept a report of
    only ``status`` and ``error`` for its own failures (a guest that did not boot, a
    migration it gave up on); such a report gains the fields every report has, from its
    run (the hosts' names were not kept: they stay empty)."""
    if not isinstance(data, dict):
        return data
    report = data.get("report")
    if not isinstance(report, dict) or "vm" in report:
        return data
    made_whole = {"vm": data.get("vm", ""), "source": "", "destination": "",
                  "storage": data.get("strategy", ""), **report}  # fmt: skip
    return {**data, "report": made_whole}


def read_results(raw: bytes, *, jsonl: bool, what: str) -> Results:
    """A stored ``results.json``, or a ``runs-so-far.jsonl`` (one run a line), of this
    version or an earlier one; :class:`~devagent.errors.UsageError` naming the bad field's
    path otherwise. The stored summary is dropped: it is for the runs to say again."""
    if jsonl:
        lines = enumerate(raw.splitlines(), 1)
        return Results(runs=[_run(line, f"{what}, line {n}") for n, line in lines if line.strip()])
    data = _parsed(raw, what)
    if isinstance(data, dict):
        data.pop("summary", None)
        if isinstance(data.get("runs"), list):
            data["runs"] = [upgrade_run(one) for one in data["runs"]]
    return convert(data, Results, what=what)


def _run(line: bytes, what: str) -> Run:
    return convert(upgrade_run(_parsed(line, what)), Run, what=what)


def _parsed(raw: bytes, what: str) -> object:
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as err:
        raise UsageError(f"{what}: {err}") from None
