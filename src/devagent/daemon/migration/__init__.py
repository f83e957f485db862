"""Live migration: where each step of moving a VM between hosts is.

Source daemon (``POST /v1/vms/NAME/migrate``: :class:`.routes.MigrationRoutes` →
:func:`new_job` → ``job.start()``):

* :mod:`.job`       the one job for every strategy: prepare → before RAM → RAM →
                    switchover (fence) → commit → finish (release, report); roll-back before
                    the switchover, forward only after it
* :mod:`.plans`     devagent's four strategies as plans: what the disk does at each step
* :mod:`.qemu_plans` QEMU's own three (the benchmarks' baselines), as plans of the same job
* :mod:`.ram`       QEMU's RAM migration, followed on its events, the same for all
* :mod:`.net`       the NICs' hold, forward and hand-over beside the disk's steps
* :mod:`.report`    the report, built the same way for every strategy
* :mod:`.context`   the narrow view of the host, VM, agents and peer a job needs (fakes in
                    the unit tests stand in for them)
* :mod:`.record`    the job's phase and findings, saved before each move (``migration.json``)
* :mod:`.recovery`  after a daemon restart: each unsettled job taken up again, forward or
                    back as the destination's commit began or not

Destination daemon: :mod:`.destination` (devagent's strategies: ``/v1/incoming``) and
:mod:`.qemu_incoming` (QEMU's: ``/v1/baselines/incoming``).

Messages between them: :mod:`.messages`; step names: :class:`devagent.vocab.Step`.
"""

from __future__ import annotations

from devagent.daemon.migration.context import HostContext, MigratingVm
from devagent.daemon.migration.job import MigrationJob
from devagent.daemon.migration.messages import MigrateRequest
from devagent.daemon.migration.plans import Plan, PostcopyPlan, SharedPlan
from devagent.daemon.migration.pushing import HybridPlan, PrecopyPlan
from devagent.daemon.migration.qemu_plans import (
    QemuCorStreamPlan,
    QemuMirrorActivePlan,
    QemuMirrorPlan,
)
from devagent.daemon.migration.record import Phase
from devagent.vocab import Strategy

PLANS: dict[Strategy, type[Plan]] = {
    plan.strategy: plan
    for plan in (
        SharedPlan,
        PostcopyPlan,
        PrecopyPlan,
        HybridPlan,
        QemuMirrorPlan,
        QemuMirrorActivePlan,
        QemuCorStreamPlan,
    )
}


def plan_for(strategy: Strategy) -> Plan:
    return PLANS[strategy]()


def new_job(host: HostContext, managed: MigratingVm, request: MigrateRequest) -> MigrationJob:
    """The job that moves ``managed`` as ``request`` says (not started yet)."""
    return MigrationJob(host, managed, request, plan_for(request.storage))


__all__ = ["PLANS", "MigrateRequest", "MigrationJob", "Phase", "new_job", "plan_for"]
