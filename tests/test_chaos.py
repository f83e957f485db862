"""The chaos command's pure parts: the runs drawn from a seed, the phase a fault landed in,
the outcomes a phase allows, the table."""

from __future__ import annotations

import pytest

from devagent.chaos.checks import report_violations
from devagent.chaos.draw import (
    FAULTS,
    NO_FAULT,
    Action,
    Phase,
    draw,
    parse_faults,
    parse_phases,
    parse_strategies,
    past_no_return,
    phase_at,
    phases_of,
)
from devagent.chaos.record import Outcome, RunRecord, expected_outcomes, markdown, table
from devagent.errors import UsageError
from devagent.report import MigrationReport
from devagent.vocab import Strategy


def test_the_same_seed_draws_the_same_runs_and_another_seed_others() -> None:
    faults, strategies = parse_faults(None), parse_strategies(None)
    assert draw(1, 40, faults, strategies) == draw(1, 40, faults, strategies)
    assert draw(1, 40, faults, strategies) != draw(2, 40, faults, strategies)


def test_every_fault_comes_once_before_any_comes_twice() -> None:
    runs = draw(7, len(FAULTS) + 3, parse_faults(None), parse_strategies(None))
    assert sorted(r.fault for r in runs[: len(FAULTS)]) == sorted(FAULTS)


def test_a_drawn_phase_is_one_its_strategy_goes_through() -> None:
    for run in draw(3, 200, parse_faults(None), parse_strategies(None)):
        assert run.phase in phases_of(run.strategy)
        assert run.link in ("100mbit", "1gbit") and run.workload in ("moderate", "heavy")
    assert Phase.TAIL in phases_of(Strategy.PRECOPY)  # its replica not let go yet
    assert Phase.MIRROR not in phases_of(Strategy.POSTCOPY)


def test_faults_and_strategies_are_chosen_by_name_or_prefix() -> None:
    assert parse_faults("kill-source") == ("kill-source-agent", "kill-source-daemon",
                                           "kill-source-net")  # fmt: skip
    assert parse_faults("link-down,disk") == ("link-down", "disk-full", "disk-readonly")
    with pytest.raises(UsageError, match="no fault 'explode'"):
        parse_faults("explode")
    assert parse_strategies("hybrid") == (Strategy.HYBRID,)
    with pytest.raises(UsageError, match="not shared"):
        parse_strategies("shared")


def test_none_draws_migrations_without_a_fault_and_is_never_drawn_unasked() -> None:
    assert NO_FAULT not in parse_faults(None) and NO_FAULT not in parse_faults("all")
    runs = draw(1, 5, parse_faults("none"), parse_strategies("hybrid"))
    assert {(r.fault, r.action, r.target) for r in runs} == {(NO_FAULT, Action.NONE, None)}
    with pytest.raises(UsageError, match="give it alone"):
        parse_faults("none,link-down")


def test_phases_narrow_the_draw_to_the_strategies_that_go_through_them() -> None:
    runs = draw(5, 30, parse_faults(None), parse_strategies(None), phases=parse_phases("mirror"))
    assert {(r.strategy, r.phase) for r in runs} == {(Strategy.PRECOPY, Phase.MIRROR)}
    both = draw(5, 60, parse_faults(None), parse_strategies(None),
                phases=parse_phases("switchover,tail"))  # fmt: skip
    assert {r.phase for r in both} == {Phase.SWITCHOVER, Phase.TAIL}
    with pytest.raises(UsageError, match="no strategy goes through mirror"):
        draw(5, 3, parse_faults(None), parse_strategies("hybrid"), phases=(Phase.MIRROR,))
    with pytest.raises(UsageError, match="no phase boot"):
        parse_phases("ram,boot")


def test_the_phase_a_fault_landed_in_is_read_from_the_timeline() -> None:
    timeline = {"destination_ready": 0.5, "ram_started": 0.6, "ram_completed": 2.0,
                "resumed": 2.2, "disk_local": 9.0, "released": 9.3}  # fmt: skip
    hybrid, precopy = Strategy.HYBRID, Strategy.PRECOPY
    assert phase_at(timeline, 0.2, hybrid) is Phase.PREPARE
    assert phase_at(timeline, 1.0, hybrid) is Phase.RAM
    assert phase_at(timeline, 2.1, hybrid) is Phase.SWITCHOVER
    assert phase_at(timeline, 5.0, hybrid) is Phase.TAIL
    assert phase_at(timeline, 9.1, hybrid) is Phase.RELEASE
    assert phase_at(timeline, 12.0, hybrid) is Phase.AFTER
    assert phase_at({"destination_ready": 0.4}, 3.0, hybrid) is Phase.PREPARE  # no further
    mirrored = {"destination_ready": 0.5, "mirror_started": 0.6, "ram_started": 4.0,
                "ram_completed": 6.0, "resumed": 6.2, "committed": 6.3, "disk_local": 6.4,
                "released": 6.6}  # fmt: skip
    assert phase_at(mirrored, 1.0, precopy) is Phase.MIRROR
    assert phase_at(mirrored, 6.25, precopy) is Phase.TAIL  # not let go yet
    assert phase_at(mirrored, 6.45, precopy) is Phase.RELEASE


def test_a_read_only_space_is_not_aimed_past_the_point_of_no_return() -> None:
    plans = draw(3, 40, ["disk-readonly", "disk-full"], parse_strategies(None))
    assert {p.phase for p in plans if p.fault == "disk-full"} >= {Phase.RELEASE}
    assert Phase.RELEASE not in {p.phase for p in plans if p.fault == "disk-readonly"}
    assert past_no_return(Action.DISK_READONLY, Phase.AFTER)
    assert not past_no_return(Action.DISK_READONLY, Phase.TAIL)
    assert not past_no_return(Action.DISK_FULL, Phase.RELEASE)


def test_after_the_switchover_only_completed_is_allowed() -> None:
    assert expected_outcomes(Phase.RAM) == (Outcome.COMPLETED, Outcome.ROLLED_BACK)
    assert expected_outcomes(Phase.SWITCHOVER) == (Outcome.COMPLETED, Outcome.ROLLED_BACK)
    assert expected_outcomes(Phase.TAIL) == (Outcome.COMPLETED,)
    assert expected_outcomes(Phase.RELEASE) == (Outcome.COMPLETED,)
    assert expected_outcomes(None, faulted=False) == (Outcome.COMPLETED,)


def test_the_table_counts_runs_and_violations_per_fault_and_phase() -> None:
    plans = draw(1, 3, ("link-down",), (Strategy.HYBRID,))
    records = [
        RunRecord(plan=plans[0], vm="v", source="a", destination="b", phase_hit=Phase.RAM),
        RunRecord(
            plan=plans[1],
            vm="v",
            source="b",
            destination="a",
            phase_hit=Phase.RAM,
            violations=["lost a write"],
        ),
        RunRecord(plan=plans[2], vm="v", source="a", destination="b", phase_hit=Phase.TAIL),
    ]
    cells = table(records)
    assert (cells["link-down"]["ram"].runs, cells["link-down"]["ram"].violations) == (2, 1)
    text = markdown(records)
    assert "| link-down | 2 (1 violated) | 1 |" in text
    assert "3 runs, 1 with an invariant violated." in text


def test_a_report_violates_with_guest_errors_ops_lost_or_a_completed_mismatch() -> None:
    def report(**kw: object) -> MigrationReport:
        base = {"guest_io_errors": 0, "guest_verify_failures": 0, "guest_ops_lost": 0,
                "integrity": "ok", "status": "completed"}  # fmt: skip
        return MigrationReport(vm="v", source="a", destination="b", storage="hybrid",
                               **{**base, **kw})  # type: ignore[arg-type]  # fmt: skip

    assert report_violations("m", report()) == []
    assert report_violations("m", report(guest_ops_lost=None, integrity=None)) == []
    [lost] = report_violations("m", report(guest_ops_lost=3))
    assert "went back 3 I/O operations" in lost
    [failed] = report_violations("m", report(guest_verify_failures=1))
    assert failed == "m: guest I/O errors 0, verify failures 1"
    assert report_violations("m", report(integrity="mismatch: x")) == ["m: integrity mismatch: x"]
    # A rolled-back migration's destination integrity says nothing of the guest's disk.
    assert report_violations("m", report(integrity="mismatch: x", status="rolled back")) == []
