"""The control channel of a net agent process: a small HTTP JSON API on a unix socket (mode
0600), in the style of the block agent's (``devagent.agent.control``).  The daemon drives the
NIC's part of a migration through it; it is never in the data path.

    GET  /status                       the agent's figures: counters (``net_frames_buffered``,
                                       ``net_frames_forwarded``, ``net_frames_lost``, frames
                                       and bytes each way), hold, forward, uplink, links
    POST /hold {"max_frames", "max_bytes"}   keep the frames for the VM (bounded) instead of
                                       delivering them; released by the agent itself after
                                       ``max_hold_s`` if nobody does
    POST /release                      deliver the kept frames in order, then go on
    POST /forward {"peer": "HOST:PORT"}   send the uplink's frames to that peer agent (if
                                       held, the kept frames first: the hold ends)
    POST /stop-forward                 deliver them to the local VM again
    POST /swap {"uplink": SPEC}        open SPEC (``{"kind": "tap", "name": NAME}``) and make
                                       it the uplink without losing a frame
    POST /stop                         stop the agent (the process exits)

Each handler is a thin adapter: decode the body into its type (:mod:`devagent.net.messages`;
a bad body answers 400 naming the field's path), call one method of the :class:`NetAgent`,
encode the answer (a Struct of the same module).

Errors are JSON ``{"error": ...}``: 400 for a bad request, 409 for the wrong state, 502 for
a peer agent that cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from devagent.control_api import answer, body_as, errors
from devagent.net.agent import NetAgent
from devagent.net.messages import (
    ForwardAnswer,
    ForwardRequest,
    HoldAnswer,
    HoldRequest,
    StopAnswer,
    SwapAnswer,
    SwapRequest,
    UplinkSpec,
)
from devagent.net.uplink import Uplink, open_uplink

log = logging.getLogger(__name__)

#: Opens the uplink a spec describes (a fake opens a fake).
UplinkOpener = Callable[[UplinkSpec], Uplink]

AGENT_KEY = web.AppKey("net_agent", NetAgent)
STOP_KEY = web.AppKey("stop", asyncio.Event)
OPENER_KEY: web.AppKey[UplinkOpener] = web.AppKey("opener")


async def _status(request: web.Request) -> web.Response:
    return answer(request.app[AGENT_KEY].stats())


async def _hold(request: web.Request) -> web.Response:
    body = await body_as(request, HoldRequest)
    agent = request.app[AGENT_KEY]
    agent.hold(max_frames=body.max_frames, max_bytes=body.max_bytes)
    return answer(HoldAnswer(held=True, hold=agent.stats().hold))


async def _release(request: web.Request) -> web.Response:
    return answer(request.app[AGENT_KEY].release())


async def _forward(request: web.Request) -> web.Response:
    host, port = (await body_as(request, ForwardRequest)).hostport()
    handed_over = await request.app[AGENT_KEY].forward(host, port)
    return answer(ForwardAnswer(forwarding=f"{host}:{port}", handed_over=handed_over))


async def _stop_forward(request: web.Request) -> web.Response:
    return answer(await request.app[AGENT_KEY].stop_forward())


async def _swap(request: web.Request) -> web.Response:
    body = await body_as(request, SwapRequest)
    new = request.app[OPENER_KEY](body.uplink)
    agent = request.app[AGENT_KEY]
    try:
        old = await agent.swap_uplink(new)
    except BaseException:
        await new.close()
        raise
    return answer(SwapAnswer(old=repr(old), new=repr(new)))


async def _stop(request: web.Request) -> web.Response:
    request.app[STOP_KEY].set()
    return answer(StopAnswer(stopping=True))


def build_control_app(
    agent: NetAgent, stop: asyncio.Event, opener: UplinkOpener = open_uplink
) -> web.Application:
    app = web.Application(middlewares=[errors])
    app[AGENT_KEY] = agent
    app[STOP_KEY] = stop
    app[OPENER_KEY] = opener
    app.router.add_get("/status", _status)
    app.router.add_post("/hold", _hold)
    app.router.add_post("/release", _release)
    app.router.add_post("/forward", _forward)
    app.router.add_post("/stop-forward", _stop_forward)
    app.router.add_post("/swap", _swap)
    app.router.add_post("/stop", _stop)
    return app


async def serve_control(
    agent: NetAgent, path: Path, stop: asyncio.Event, opener: UplinkOpener = open_uplink
) -> web.AppRunner:
    """Start the control API on ``path``; the caller cleans the returned runner up."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    runner = web.AppRunner(build_control_app(agent, stop, opener), access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    os.chmod(path, 0o600)
    return runner
