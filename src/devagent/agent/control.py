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
    POST /mirror/rate             {"rate_limit"}: the background copy's bytes/s from now on
    POST /flush                   make what was written durable now
    POST /fence                   refuse the local VM instance (its unix sockets) for good
    POST /unfence                 serve its unix sockets again (a migration rolled back
                                  after a daemon restart); nothing to do when not fenced
    POST /stop                    stop serving (answer or fail every request), then exit
    POST /retire                  the same, answering once nothing is in flight any more

Each handler is a thin adapter: decode the request into its type
(:mod:`devagent.agent.messages`; a bad body answers 400 naming the field's path), call one
method of the :class:`BlockAgent`, encode the answer. The agent owns every state (the hold,
the mirror job, the fence).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from aiohttp import web

from devagent.agent.agent import BlockAgent
from devagent.agent.messages import (
    CutoverRequest,
    MirrorRate,
    MirrorRequest,
    RetireAnswer,
    StopAnswer,
    SwapRequest,
)
from devagent.control_api import answer, body_as, errors
from devagent.errors import UsageError

AGENT_KEY = web.AppKey("agent", BlockAgent)
STOP_KEY = web.AppKey("stop", asyncio.Event)


async def _status(request: web.Request) -> web.Response:
    return answer(request.app[AGENT_KEY].status())


async def _quiesce(request: web.Request) -> web.Response:
    return answer(await request.app[AGENT_KEY].quiesce())


async def _resume(request: web.Request) -> web.Response:
    return answer(request.app[AGENT_KEY].resume())


async def _completions(request: web.Request) -> web.Response:
    try:
        since = float(request.query.get("since", "0"))
    except ValueError:
        raise UsageError("'since' must be a number") from None
    return answer(request.app[AGENT_KEY].completions(since))


async def _swap(request: web.Request) -> web.Response:
    body = await body_as(request, SwapRequest)
    return answer(await request.app[AGENT_KEY].swap_to(body.backend))


async def _mirror(request: web.Request) -> web.Response:
    body = await body_as(request, MirrorRequest)
    return answer(await request.app[AGENT_KEY].start_mirror(body), status=202)


async def _mirror_cutover(request: web.Request) -> web.Response:
    body = await body_as(request, CutoverRequest)
    return answer(await request.app[AGENT_KEY].cutover_mirror(body.keep_source))


async def _mirror_cancel(request: web.Request) -> web.Response:
    return answer(await request.app[AGENT_KEY].cancel_mirror())


async def _mirror_stop(request: web.Request) -> web.Response:
    return answer(await request.app[AGENT_KEY].stop_mirror())


async def _mirror_rate(request: web.Request) -> web.Response:
    body = await body_as(request, MirrorRate)
    return answer(request.app[AGENT_KEY].mirror_rate(body))


async def _flush(request: web.Request) -> web.Response:
    return answer(await request.app[AGENT_KEY].flush())


async def _fence(request: web.Request) -> web.Response:
    return answer(await request.app[AGENT_KEY].fence())


async def _unfence(request: web.Request) -> web.Response:
    return answer(await request.app[AGENT_KEY].unfence())


async def _stop(request: web.Request) -> web.Response:
    request.app[STOP_KEY].set()
    return answer(StopAnswer(stopping=True))


async def _retire(request: web.Request) -> web.Response:
    """Stop serving at once and answer only when no request is in flight and no peer can
    send another (every socket closed, the backend closed); then the process exits. A
    migration's destination retires its receiver this way before the replica is served, so
    no push that was still on the wire can land on it later."""
    started = asyncio.get_running_loop().time()
    await request.app[AGENT_KEY].stop()
    request.app[STOP_KEY].set()
    took = asyncio.get_running_loop().time() - started
    return answer(RetireAnswer(retired=True, took_s=round(took, 6)))


def build_control_app(agent: BlockAgent, stop: asyncio.Event) -> web.Application:
    app = web.Application(middlewares=[errors])
    app[AGENT_KEY] = agent
    app[STOP_KEY] = stop
    app.router.add_get("/status", _status)
    app.router.add_post("/quiesce", _quiesce)
    app.router.add_post("/resume", _resume)
    app.router.add_get("/completions", _completions)
    app.router.add_post("/swap", _swap)
    app.router.add_post("/mirror", _mirror)
    app.router.add_post("/mirror/cutover", _mirror_cutover)
    app.router.add_post("/mirror/cancel", _mirror_cancel)
    app.router.add_post("/mirror/stop", _mirror_stop)
    app.router.add_post("/mirror/rate", _mirror_rate)
    app.router.add_post("/flush", _flush)
    app.router.add_post("/fence", _fence)
    app.router.add_post("/unfence", _unfence)
    app.router.add_post("/stop", _stop)
    app.router.add_post("/retire", _retire)
    return app


async def serve_control(agent: BlockAgent, path: Path, stop: asyncio.Event) -> web.AppRunner:
    """Start the control API on ``path``; the caller cleans the returned runner up."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    runner = web.AppRunner(build_control_app(agent, stop), access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    os.chmod(path, 0o600)
    return runner
