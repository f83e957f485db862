"""The daemon API's migration routes: thin adapters that decode a message, call one step of
:mod:`.job` (source), :mod:`.destination` or :mod:`.qemu_incoming`, and encode the answer.
When the daemon starts (its VMs adopted), the migrations a previous daemon left unsettled as
their source are taken up again under their own ids (:mod:`.recovery`).

    POST   /v1/vms/{name}/migrate             start a migration (MigrateRequest) → 202;
                                              a libvirt domain adopted here:
                                              :mod:`devagent.daemon.libvirt_migration`
    GET    /v1/migrations[/{id}]              migrations this host ran as the source
    POST   /v1/incoming                       (peer) prepare an incoming VM (IncomingRequest)
    POST   /v1/incoming/{name}/listening      (peer) until its QEMU listens: IncomingAnswer
    POST   /v1/incoming/{name}/receivers      (peer) receivers for a push begun beside RAM
    POST   /v1/incoming/{name}/commit         (peer) the VM arrived: keep it (CommitRequest)
    DELETE /v1/incoming/{name}                (peer) roll back: remove it
    POST   /v1/baselines/incoming             (peer) the same for a QEMU-only strategy
    POST   /v1/baselines/incoming/{name}/commit       (peer) the RAM arrived: run the guest
    POST   /v1/baselines/incoming/{name}/stream-done  (peer) wait for its block-stream
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from aiohttp import web

from devagent.api_types import Migrations, Removed
from devagent.control_api import answer, body_as
from devagent.daemon.auth import require_source
from devagent.daemon.libvirt_migration import DomainMigration
from devagent.daemon.migration import destination, new_job, qemu_incoming
from devagent.daemon.migration.context import HostContext
from devagent.daemon.migration.job import MigrationJob
from devagent.daemon.migration.messages import (
    BaselineIncoming,
    CommitAnswer,
    CommitRequest,
    IncomingRequest,
    MigrateRequest,
    ReceiversRequest,
)
from devagent.daemon.migration.recovery import recovered_jobs
from devagent.daemon.vms import ManagedVm
from devagent.errors import NotFound, StateError, UsageError
from devagent.qemu.vm import VmState

if TYPE_CHECKING:
    from devagent.daemon.host import Host

T = TypeVar("T")


class MigrationRoutes:
    """The routes, and the migrations this host ran as the source."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.jobs: dict[str, MigrationJob | DomainMigration] = {}
        self.commits = destination.Commits(host)  # the destination's, one per incoming VM
        self.starts = destination.Starts()  # the destination's: each incoming VM's start

    def add_to(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/vms/{name}/migrate", self.migrate)
        router.add_get("/v1/migrations", self.list_migrations)
        router.add_get("/v1/migrations/{id}", self.get_migration)
        router.add_post("/v1/incoming", self.prepare_incoming)
        router.add_post("/v1/incoming/{name}/listening", self.incoming_listening)
        router.add_post("/v1/incoming/{name}/receivers", self.incoming_receivers)
        router.add_post("/v1/incoming/{name}/commit", self.commit_incoming)
        router.add_delete("/v1/incoming/{name}", self.abort_incoming)
        router.add_post("/v1/baselines/incoming", self.prepare_baseline)
        router.add_post("/v1/baselines/incoming/{name}/commit", self.commit_baseline)
        router.add_post("/v1/baselines/incoming/{name}/stream-done", self.stream_done)

    # -- source ------------------------------------------------------------------------------

    async def recover(self, host: HostContext | None = None) -> list[MigrationJob]:
        """After a daemon restart, once its VMs are adopted: take up every unsettled
        migration this host was the source of, each under its own id, so that a client
        following ``GET /v1/migrations/{id}`` sees it again (``host``: the tests' fake)."""
        context = host if host is not None else HostContext.of(self.host)
        jobs = recovered_jobs(context, list(self.host.vms.vms.values()))
        for job in jobs:
            self.jobs[job.id] = job
            job.start()
        return jobs

    async def on_startup(self, app: web.Application) -> None:
        await self.recover()

    async def migrate(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        migration = await body_as(request, MigrateRequest)
        busy = [j for j in self.jobs.values() if j.managed.name == name and j.finished_at is None]
        if busy:
            raise StateError(f"{name} is already migrating (job {busy[0].id})")
        if self.host.tls is not None and migration.to.host is None:
            raise UsageError(
                f"the destination {migration.to.name or migration.to.url!r} must be named by "
                "its host name (its certificate's): the migration's TLS checks it"
            )
        job: MigrationJob | DomainMigration
        if name not in self.host.vms.vms and name in self.host.adopted:  # a libvirt domain
            job = DomainMigration(self.host, name, migration)
        else:
            managed = self.host.vms.get(name)
            managed.vm.require(VmState.RUNNING)
            job = new_job(HostContext.of(self.host), managed, migration)
        self.jobs[job.id] = job
        job.start()
        return answer(job.status(), status=202)

    async def list_migrations(self, request: web.Request) -> web.Response:
        return answer(Migrations(migrations=[j.status() for j in self.jobs.values()]))

    async def get_migration(self, request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no migration {job_id!r} on host {self.host.name}")
        return answer(job.status())

    # -- destination -------------------------------------------------------------------------

    async def prepare_incoming(self, request: web.Request) -> web.Response:
        incoming = await body_as(request, IncomingRequest)
        require_source(request, incoming.source, f"VM {incoming.request.name} coming here")
        reply = await destination.prepare(self.host, self.starts, incoming)
        return answer(reply, status=201)

    async def incoming_listening(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]  # (kept after a start that failed removed the VM)
        require_source(request, self.starts.source_of(name), f"waiting for VM {name}'s start")
        return answer(await self.starts.listening(name))

    async def incoming_receivers(self, request: web.Request) -> web.Response:
        wanted = await body_as(request, ReceiversRequest)
        name = self._from_its_source(request, "pushing to")
        if self.commits.known(name):  # (its commit retires receivers: none may start after)
            raise StateError(f"VM {name}'s commit was asked here: no push lands here now")
        return answer(await destination.receivers(self.host, name, wanted.nodes), status=201)

    async def commit_incoming(self, request: web.Request) -> web.Response:
        commit = await body_as(request, CommitRequest)
        name = self._from_its_source(request, "committing")
        return answer(await self.commits.commit(name, commit))

    async def abort_incoming(self, request: web.Request) -> web.Response:
        name = self._from_its_source(request, "rolling back")
        await self.starts.settled(name)  # (an early-prepared VM may still be starting)
        await self.commits.abort(name)
        return answer(Removed(name=name, state="removed"))

    async def prepare_baseline(self, request: web.Request) -> web.Response:
        incoming = await body_as(request, BaselineIncoming)
        require_source(request, incoming.source, f"VM {incoming.request.name} coming here")
        reply = await qemu_incoming.prepare(self.host, incoming)
        return answer(reply, status=201)

    async def commit_baseline(self, request: web.Request) -> web.Response:
        name = self._from_its_source(request, "committing")
        return answer(await self.commits.commit(name, CommitRequest(), using=_baseline_ready))

    async def stream_done(self, request: web.Request) -> web.Response:
        managed = self.host.vms.get(self._from_its_source(request, "streaming"))
        return answer(await qemu_incoming.stream_done(managed))

    def _from_its_source(self, request: web.Request, what: str) -> str:
        """The VM the peer route names; on TLS, the caller must be the host it comes from
        (a VM not here is left to the route: it answers that)."""
        name = request.match_info["name"]
        managed = self.host.vms.vms.get(name)
        if managed is not None:
            require_source(request, managed.source_host, f"{what} VM {name}")
        return name


async def _baseline_ready(managed: ManagedVm, request: CommitRequest) -> CommitAnswer:
    """A QEMU-only strategy's commit (its request carries nothing)."""
    return await qemu_incoming.commit(managed)
