"""The control channel of an agent process: a small HTTP JSON API on a unix socket (mode
0600, so only its host's root reaches it), through which the host daemon supervises the
agent without ever sitting in the data path.

    GET  /status                  the agent's and its journal's figures
    POST /quiesce                 hold new requests, return once none is in flight
    POST /resume                  release the held requests in arrival order
    GET  /completions?since=T     wall-clock times of the completions after T (one per ms at
                                  most; ``complete`` false: the ring no longer reaches T)
    POST /swap {"backend": SPEC}  open SPEC (see ``agent.spec``), make it the agent's backend
                                  (quiesce, switch, resume), close the old one
    POST /mirror                  {"target": SPEC, "sync", "converge_bytes", "rate_limit",
                                  "active", "parallel", "max_copy", "max_passes"}: mirror
                                  the device to another backend under the guest
                                  (``active``: write-through once converged)
    POST /mirror/cutover          once converged: last copy with I/O held, switch to target
                                  (``{"keep_source": true}``: go on serving the source)
    POST /mirror/cancel           stop mirroring, keep serving the source
    POST /mirror/stop             the same, answering the chunks the target may still lack
    POST /flush                   make what was written durable now
    POST /fence                   refuse the local VM instance (its unix sockets) for good
    POST /stop                    stop serving (answer or fail every request), then exit
    POST /retire                  the same, answering once nothing is in flight any more

A quiesce that nobody resumes is resumed by the agent itself after ``max_hold_s``, so a
daemon that dies mid-exchange cannot freeze its guest's disk for ever.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from devagent.agent.agent import BlockAgent
from devagent.agent.mirror import MAX_COPY, Mirrored, cutover
from devagent.agent.spec import Duties, backend_status, check_spec, open_backend
from devagent.control_api import errors, json_body
from devagent.errors import DevagentError, StateError, UsageError

log = logging.getLogger(__name__)

AGENT_KEY = web.AppKey("agent", BlockAgent)
STOP_KEY = web.AppKey("stop", asyncio.Event)
HOLD_KEY = web.AppKey("hold", dict)
MIRROR_KEY = web.AppKey("mirror", dict)
DUTIES_KEY = web.AppKey("duties", Duties)
MAX_HOLD_S = 30.0
#: A mirror whose passes ran out may still cut over with this much left to copy while the
#: guest's I/O is held (the last copy runs at disk speed; the hold stays short).
MAX_CUTOVER_DIRTY = 32 << 20


async def _status(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    stats = agent.stats()
    stats["pid"] = os.getpid()
    stats["backend"] = repr(agent.backend)
    stats["held"] = request.app[HOLD_KEY].get("since") is not None
    stats["backend_status"] = backend_status(agent.backend)
    return web.json_response(stats)


async def _quiesce(request: web.Request) -> web.Response:
    agent, hold = request.app[AGENT_KEY], request.app[HOLD_KEY]
    if hold.get("since") is not None:
        raise StateError("the agent is already quiesced")
    started = time.time()
    await agent.journal.quiesce()
    hold["since"] = time.time()
    hold["timer"] = asyncio.get_running_loop().call_later(MAX_HOLD_S, _auto_resume, agent, hold)
    return web.json_response({"drained_in_s": round(hold["since"] - started, 6)})


def _auto_resume(agent: BlockAgent, hold: dict[str, Any]) -> None:
    log.warning("export %r held for %.0f s without resume: resuming", agent.export_name, MAX_HOLD_S)
    hold["since"] = None
    agent.journal.resume()


async def _resume(request: web.Request) -> web.Response:
    agent, hold = request.app[AGENT_KEY], request.app[HOLD_KEY]
    since = hold.get("since")
    if since is None:
        raise StateError("the agent is not quiesced")
    hold["timer"].cancel()
    hold["since"] = None
    agent.journal.resume()
    return web.json_response({"held_s": round(time.time() - since, 6)})


async def _completions(request: web.Request) -> web.Response:
    try:
        since = float(request.query.get("since", "0"))
    except ValueError:
        raise UsageError("'since' must be a number") from None
    journal = request.app[AGENT_KEY].journal
    times = journal.completions_since(since)
    return web.json_response({"completions": times, "complete": journal.covers(since)})


async def _swap(request: web.Request) -> web.Response:
    agent, duties = request.app[AGENT_KEY], request.app[DUTIES_KEY]
    try:
        body = await request.json()
    except ValueError:
        raise UsageError('the body must be JSON: {"backend": SPEC}') from None
    if not isinstance(body, dict) or "backend" not in body:
        raise UsageError('the body must be {"backend": SPEC}')
    spec = check_spec(body["backend"])
    if request.app[HOLD_KEY].get("since") is not None:
        raise StateError("the agent is quiesced by /quiesce: resume it before a swap")
    new = await open_backend(spec)
    started = time.monotonic()
    try:
        old = await agent.swap_backend(new)
    except BaseException:
        await new.close()
        raise
    hold_s = time.monotonic() - started
    await duties.cancel(old)
    duties.start(new, spec)
    try:
        await old.close()
    except DevagentError as err:
        log.warning("closing the old backend %r failed: %s", old, err)
    return web.json_response({"old": repr(old), "new": repr(new), "hold_s": round(hold_s, 6)})


async def _mirror(request: web.Request) -> web.Response:
    """Start mirroring the served device to ``target`` (a backend spec) under the running
    guest: the agent's backend becomes a :class:`Mirrored` of the current one."""
    agent, jobs = request.app[AGENT_KEY], request.app[MIRROR_KEY]
    body = await json_body(request)
    spec = check_spec(body.get("target"), where="target")
    if isinstance(agent.backend, Mirrored) or jobs.get("task") is not None:
        raise StateError("a mirror is already running")
    if request.app[HOLD_KEY].get("since") is not None:
        raise StateError("the agent is quiesced by /quiesce: resume it first")
    target = await open_backend(spec)
    try:
        mirror = Mirrored(
            agent.backend,
            target,
            sync=bool(body.get("sync", False)),
            rate_limit=body.get("rate_limit"),
            target_zeroed=bool(body.get("target_zeroed", True)),
            parallel=_bounded(body, "parallel", 4, 1, 64),
            max_copy=_bounded(body, "max_copy", MAX_COPY, 4096, 32 << 20),
        )
        await agent.swap_backend(mirror)
    except BaseException:
        await target.close()
        raise
    converge = int(body.get("converge_bytes", 0))
    active = bool(body.get("active", False))
    passes = _bounded(body, "max_passes", 50, 1, 1000)
    jobs["task"] = asyncio.create_task(
        mirror.run(converge_bytes=converge, max_passes=passes, active=active)
    )
    jobs["spec"] = spec
    return web.json_response({"mirror": mirror.stats(), "target": repr(target)}, status=202)


def _bounded(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    """An optional integer field of a request body, within [low, high]."""
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise UsageError(f"'{key}' must be an integer from {low} to {high}")
    return value


def _running_mirror(request: web.Request) -> tuple[Mirrored, asyncio.Task[bool]]:
    agent, jobs = request.app[AGENT_KEY], request.app[MIRROR_KEY]
    task = jobs.get("task")
    if not isinstance(agent.backend, Mirrored) or task is None:
        raise StateError("no mirror is running")
    return agent.backend, task


async def _mirror_cutover(request: web.Request) -> web.Response:
    """Wait for the mirror to converge, then copy the last dirty chunks with guest I/O held
    and switch the agent to the target. The source backend is closed."""
    agent, jobs = request.app[AGENT_KEY], request.app[MIRROR_KEY]
    keep_source = bool((await json_body(request)).get("keep_source", False))
    mirror, task = _running_mirror(request)
    if not await task and mirror.dirty_bytes > MAX_CUTOVER_DIRTY:
        raise StateError(f"the mirror did not converge: {mirror.stats()}")
    started = time.time()
    if keep_source:  # a migration: the target is complete, but this agent serves its own
        await agent.swap_backend(mirror.source, before_switch=mirror.finish)
        retired = mirror.target
    else:
        retired = await cutover(agent)
    held = time.time() - started
    jobs.clear()
    await retired.close()
    return web.json_response(
        {
            "held_from": started,
            "held_s": round(held, 6),
            "mirror": mirror.stats(),
            "new": repr(agent.backend),
        }
    )


async def _end_mirror(request: web.Request) -> Mirrored:
    """Stop the copy job and serve the mirror's source again; the swap waits for the copies
    in flight, so nothing lands on the target after it. The target is closed."""
    agent, jobs = request.app[AGENT_KEY], request.app[MIRROR_KEY]
    mirror, task = _running_mirror(request)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, DevagentError):
        await task
    await agent.swap_backend(mirror.source)
    jobs.clear()
    await mirror.target.close()
    return mirror


async def _mirror_cancel(request: web.Request) -> web.Response:
    """Stop the mirror and go on serving its source."""
    mirror = await _end_mirror(request)
    return web.json_response({"cancelled": True, "mirror": mirror.stats()})


async def _flush(request: web.Request) -> web.Response:
    """Make everything written so far durable now (ahead of a switchover, whose own flush
    then has little left to do)."""
    started = time.monotonic()
    await request.app[AGENT_KEY].backend.flush()
    return web.json_response({"flushed_in_s": round(time.monotonic() - started, 6)})


async def _fence(request: web.Request) -> web.Response:
    dropped = await request.app[AGENT_KEY].fence_local()
    return web.json_response({"fenced": True, "dropped": dropped})


async def _mirror_stop(request: web.Request) -> web.Response:
    """Stop pushing and hand over what is left: the chunks the target may still lack."""
    mirror = await _end_mirror(request)
    dirty = mirror.dirty_bitmap()
    return web.json_response(
        {
            "chunk_size": mirror.chunk_size,
            "chunks": dirty.n_bits,
            "dirty": base64.b64encode(dirty.to_bytes()).decode(),
            "dirty_bytes": mirror.dirty_bytes,
            "mirror": mirror.stats(),
        }
    )


async def _stop(request: web.Request) -> web.Response:
    request.app[STOP_KEY].set()
    return web.json_response({"stopping": True})


async def _retire(request: web.Request) -> web.Response:
    """Stop serving at once and answer only when no request is in flight and no peer can
    send another (every socket closed, the backend closed); then the process exits. A
    migration's destination retires its receiver this way before the replica is served, so
    no push that was still on the wire can land on it later."""
    started = time.monotonic()
    await request.app[AGENT_KEY].stop()
    request.app[STOP_KEY].set()
    return web.json_response({"retired": True, "took_s": round(time.monotonic() - started, 6)})


def build_control_app(
    agent: BlockAgent, stop: asyncio.Event, duties: Duties | None = None
) -> web.Application:
    app = web.Application(middlewares=[errors])
    app[AGENT_KEY] = agent
    app[DUTIES_KEY] = duties if duties is not None else Duties(agent)
    app[STOP_KEY] = stop
    app[HOLD_KEY] = {"since": None}
    app[MIRROR_KEY] = {}
    app.router.add_get("/status", _status)
    app.router.add_post("/quiesce", _quiesce)
    app.router.add_post("/resume", _resume)
    app.router.add_get("/completions", _completions)
    app.router.add_post("/swap", _swap)
    app.router.add_post("/mirror", _mirror)
    app.router.add_post("/mirror/cutover", _mirror_cutover)
    app.router.add_post("/mirror/cancel", _mirror_cancel)
    app.router.add_post("/mirror/stop", _mirror_stop)
    app.router.add_post("/flush", _flush)
    app.router.add_post("/fence", _fence)
    app.router.add_post("/stop", _stop)
    app.router.add_post("/retire", _retire)
    return app


async def serve_control(
    agent: BlockAgent, path: Path, stop: asyncio.Event, duties: Duties | None = None
) -> web.AppRunner:
    """Start the control API on ``path``; the caller cleans the returned runner up."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    runner = web.AppRunner(build_control_app(agent, stop, duties), access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    os.chmod(path, 0o600)
    return runner
