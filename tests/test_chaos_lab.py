"""A short chaos on a real 3-host lab, a fixed seed, each class of fault once: a SIGKILL
(of an agent, a daemon, the destination's QEMU), a SIGSTOP, a link cut, a full replica
space and a read-only one, every invariant checked after each run by ``devagent chaos``'s
own checks: the VM on exactly one host and answering over its NIC, no guest I/O error, the
disk intact, nothing left on the other host, the outcome the phase allows, the next
migration successful."""

from __future__ import annotations

from pathlib import Path

import pytest

from devagent.chaos.draw import draw, parse_strategies
from devagent.chaos.record import RunRecord, markdown
from devagent.chaos.runner import GuestShape, run_chaos
from devagent.guest.build import GuestImage
from tests.conftest import namespaces, processes_mentioning

pytestmark = [pytest.mark.vm, pytest.mark.lab]

#: The faults, drawn with :data:`SEED`: with it the full space lands in a ``hybrid`` tail (the
#: replica spills to the source), the link cut in a ``precopy`` release, the read-only space
#: in a ``hybrid`` prepare (one after the switchover keeps the disk on the source, which
#: ``devagent chaos --faults disk-readonly --phases tail,switchover`` tries: docs/RELIABILITY.md).
FAULTS = (
    "kill-source-agent",
    "stop-destination-agent",
    "kill-source-daemon",
    "kill-destination-qemu",
    "link-down",
    "disk-full",
    "disk-readonly",
)
SEED = 17
#: One link and one workload keep it short (one guest booted, no 100 Mbit/s tail): the
#: whole matrix is ``devagent chaos``'s.
LINKS, WORKLOADS = ("1gbit",), ("moderate",)


@pytest.mark.timeout(900)
async def test_a_short_chaos_keeps_every_invariant(
    state_dir: Path, guest: GuestImage, tmp_path: Path
) -> None:
    plans = draw(SEED, len(FAULTS), FAULTS, parse_strategies(None), LINKS, WORKLOADS)
    assert sorted(p.fault for p in plans) == sorted(FAULTS)
    seen: list[RunRecord] = []

    def keep(record: RunRecord) -> None:
        seen.append(record)
        print(f"run {record.plan.index}: {record.plan.fault} in {record.phase_hit}: "
              f"{record.outcome}, {record.wall_s} s {record.violations}")  # fmt: skip

    records = await run_chaos(
        plans, minutes=None, out=tmp_path, say=print, on_record=keep,
        shape=GuestShape(disk="256M", prefill="96M"),
    )  # fmt: skip
    print("\n" + markdown(records))
    for record in records:
        print(f"{record.plan.fault} in {record.phase_hit}: {record.outcome}, fault "
              f"{record.fault_detail or record.fault_error}, I/O again "
              f"{record.io_resumed_s} s after it, {record.wall_s} s")  # fmt: skip
    assert len(records) == len(FAULTS) and seen == records
    assert [r.violations for r in records if not r.ok] == []
    assert all(r.fault_error is None for r in records)
    assert (tmp_path / "runs.jsonl").read_text().count("\n") == len(FAULTS)
    # The chaos lab is gone, with everything it ran.
    assert processes_mentioning(str(state_dir)) == []
    assert not [ns for ns in namespaces() if ns.startswith("da-chaos")]
