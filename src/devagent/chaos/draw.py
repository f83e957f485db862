"""What a chaos run does, drawn from the seed: the strategy, the link, the workload, the
fault and the phase it lands in. Pure: the same seed and options give the same runs.

A fault is an action on a target (``kill-source-agent``: SIGKILL of the source's block
agent) or a condition of the lab (``link-down``, ``disk-full``, ``disk-readonly``). A phase
is a window of the migration's timeline (:data:`PHASE_STEPS`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from enum import StrEnum

import msgspec

from devagent.errors import UsageError
from devagent.vocab import Step, Strategy


class Action(StrEnum):
    KILL = "kill"  # SIGKILL; a daemon is started again 2 s later, as a service manager would
    STOP = "stop"  # SIGSTOP, and SIGCONT 10 s later
    LINK_DOWN = "link"  # the destination's link down for 1 to 30 s
    DISK_FULL = "disk-full"  # the destination's replica space filled up, for a while
    DISK_READONLY = "disk-readonly"  # the destination's replica space read-only, for a while
    NONE = "none"  # no fault: a plain migration, the next run's brings the guest back


class Target(StrEnum):
    SOURCE_AGENT = "source-agent"
    DESTINATION_AGENT = "destination-agent"
    SOURCE_DAEMON = "source-daemon"
    DESTINATION_DAEMON = "destination-daemon"
    SOURCE_NET = "source-net"
    DESTINATION_NET = "destination-net"
    DESTINATION_QEMU = "destination-qemu"


#: Every fault by its name, ``kill-source-agent`` … ``disk-readonly``.
FAULTS: dict[str, tuple[Action, Target | None]] = {
    **{f"{a}-{t}": (a, t) for a in (Action.KILL, Action.STOP) for t in Target},
    "link-down": (Action.LINK_DOWN, None),
    "disk-full": (Action.DISK_FULL, None),
    "disk-readonly": (Action.DISK_READONLY, None),
}
#: ``--faults none``: migrations without a fault, back and forth (a ping-pong). Never drawn
#: unless asked for by name.
NO_FAULT = "none"


class Phase(StrEnum):
    PREPARE = "prepare"
    MIRROR = "mirror"  # precopy: the mirror before RAM
    RAM = "ram"
    SWITCHOVER = "switchover"
    TAIL = "tail"  # from the guest's resume there until the source lets the replicas go
    RELEASE = "release"
    AFTER = "after"  # the fault came after the migration ended


#: Each phase's window on the report's timeline: from the first step to the second (None:
#: the migrate command, or the end).
PHASE_STEPS: dict[Phase, tuple[Step | None, Step | None]] = {
    Phase.PREPARE: (None, Step.DESTINATION_READY),
    Phase.MIRROR: (Step.MIRROR_STARTED, Step.RAM_STARTED),
    Phase.RAM: (Step.RAM_STARTED, Step.RAM_COMPLETED),
    Phase.SWITCHOVER: (Step.RAM_COMPLETED, Step.RESUMED),
    Phase.TAIL: (Step.RESUMED, Step.DISK_LOCAL),
    Phase.RELEASE: (Step.DISK_LOCAL, Step.RELEASED),
}
#: How far into its phase a fault may land, at most (the phase may end sooner: the run
#: records the phase it really landed in).
PHASE_DELAY_S: dict[Phase, float] = {
    Phase.PREPARE: 0.3,
    Phase.MIRROR: 2.0,
    Phase.RAM: 1.5,
    Phase.SWITCHOVER: 0.0,
    Phase.TAIL: 3.0,
    Phase.RELEASE: 0.0,
}
#: The phases before the switchover: a fault there may roll the migration back.
BEFORE_SWITCHOVER = frozenset({Phase.PREPARE, Phase.MIRROR, Phase.RAM})

DEVAGENT_STRATEGIES = (Strategy.HYBRID, Strategy.POSTCOPY, Strategy.PRECOPY)
LINKS = ("100mbit", "1gbit")
WORKLOADS = ("moderate", "heavy")
FAULT_GROUPS = {"all": tuple(FAULTS), NO_FAULT: (NO_FAULT,)}


def phases_of(strategy: Strategy) -> tuple[Phase, ...]:
    """The phases a migration with ``strategy`` goes through. A precopy's tail is short:
    its replica is whole at the switchover, and the source lets it go (``disk_local``) once
    the NICs' hand-over is done."""
    mirror = (Phase.MIRROR,) if strategy is Strategy.PRECOPY else ()
    return (Phase.PREPARE, *mirror, Phase.RAM, Phase.SWITCHOVER, Phase.TAIL, Phase.RELEASE)


def past_no_return(action: Action, phase: Phase | None) -> bool:
    """A read-only replica space from the release on: the replica is the VM's only disk by
    then (the source let it go), so the guest's writes fail as on any host whose disk
    fails; no migration can help it. Such a fault is not drawn, and one that lands there
    is recorded as such, not as a violation."""
    return action is Action.DISK_READONLY and phase in (Phase.RELEASE, Phase.AFTER)


def phase_at(timeline: dict[str, float], t: float, strategy: Strategy) -> Phase:
    """The phase a fault at ``t`` seconds (from the migrate command) landed in."""
    landed = Phase.PREPARE
    for phase in phases_of(strategy):
        first = PHASE_STEPS[phase][0]
        start = 0.0 if first is None else timeline.get(first)
        if start is not None and start <= t:
            landed = phase
    end = timeline.get(Step.RELEASED)
    return Phase.AFTER if end is not None and t >= end else landed


class RunPlan(msgspec.Struct, frozen=True):
    """One run as drawn."""

    index: int
    strategy: Strategy
    link: str
    workload: str
    fault: str  # a key of FAULTS, or NO_FAULT
    phase: Phase
    delay_s: float  # into the phase
    duration_s: float  # how long a stop, a cut or a disk condition lasts

    @property
    def action(self) -> Action:
        return _kind(self.fault)[0]

    @property
    def target(self) -> Target | None:
        return _kind(self.fault)[1]


def _kind(fault: str) -> tuple[Action, Target | None]:
    return (Action.NONE, None) if fault == NO_FAULT else FAULTS[fault]


def parse_faults(text: str | None) -> tuple[str, ...]:
    """``--faults``: names of :data:`FAULTS`, or prefixes of them (``kill``, ``stop-source``),
    or ``all``, or ``none`` (:data:`NO_FAULT`, alone); comma-separated."""
    if not text:
        return tuple(FAULTS)
    chosen: list[str] = []
    for word in (w.strip() for w in text.split(",") if w.strip()):
        group = FAULT_GROUPS.get(word) or tuple(f for f in FAULTS if f.startswith(word))
        if not group:
            raise UsageError(
                f"no fault {word!r}: the faults are {', '.join(FAULTS)}; or {NO_FAULT} alone"
            )
        chosen.extend(f for f in group if f not in chosen)
    if NO_FAULT in chosen and len(chosen) > 1:
        raise UsageError(f"--faults {NO_FAULT} runs migrations without a fault: give it alone")
    return tuple(chosen)


def parse_phases(text: str | None) -> tuple[Phase, ...]:
    """``--phases``: comma-separated phase names (default all)."""
    if not text:
        return tuple(PHASE_STEPS)
    names = [w.strip() for w in text.split(",") if w.strip()]
    known = [p.value for p in PHASE_STEPS]
    wrong = [n for n in names if n not in known]
    if wrong:
        raise UsageError(f"no phase {', '.join(wrong)}: the phases are {', '.join(known)}")
    return tuple(Phase(n) for n in names)


def parse_strategies(text: str | None) -> tuple[Strategy, ...]:
    if not text:
        return DEVAGENT_STRATEGIES
    names = [w.strip() for w in text.split(",") if w.strip()]
    wrong = [n for n in names if n not in {s.value for s in DEVAGENT_STRATEGIES}]
    if wrong:
        allowed = ", ".join(DEVAGENT_STRATEGIES)
        raise UsageError(f"chaos runs devagent's strategies ({allowed}), not {', '.join(wrong)}")
    return tuple(Strategy(n) for n in names)


def draw(
    seed: int,
    runs: int,
    faults: Sequence[str],
    strategies: Sequence[Strategy],
    links: Sequence[str] = LINKS,
    workloads: Sequence[str] = WORKLOADS,
    phases: Sequence[Phase] = tuple(PHASE_STEPS),
) -> list[RunPlan]:
    """``runs`` runs from ``seed``. Faults take turns (every fault once before any twice,
    each round shuffled), so that a short run still covers each fault. ``phases`` narrows
    the phases a fault may be aimed at (a strategy without any of them is not drawn)."""
    strategies = [s for s in strategies if set(phases_of(s)) & set(phases)]
    if not strategies:
        raise UsageError(f"no strategy goes through {', '.join(phases)}")
    rng = random.Random(seed)
    plans: list[RunPlan] = []
    order: list[str] = []
    for index in range(runs):
        if not order:
            order = list(faults)
            rng.shuffle(order)
        fault = order.pop()
        strategy = rng.choice(strategies)
        action = _kind(fault)[0]
        aims = [p for p in phases_of(strategy) if p in phases and not past_no_return(action, p)]
        phase = rng.choice(aims or [p for p in phases_of(strategy) if p in phases])
        duration = {
            Action.KILL: 2.0,
            Action.STOP: 10.0,
            Action.LINK_DOWN: float(rng.randint(1, 30)),
        }.get(action, float(rng.randint(5, 20)))
        plans.append(
            RunPlan(
                index=index,
                strategy=strategy,
                link=rng.choice(list(links)),
                workload=rng.choice(list(workloads)),
                fault=fault,
                phase=phase,
                delay_s=round(rng.uniform(0.0, PHASE_DELAY_S[phase]), 3),
                duration_s=duration,
            )
        )
    return plans
