"""What the agents' control APIs share (a block agent's, :mod:`devagent.agent.control`, and
a net agent's, :mod:`devagent.net.control`): JSON errors whose status says what kind of
error it was."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from devagent.errors import DevagentError, PeerError, StateError, UsageError

log = logging.getLogger(__name__)

#: The status of each kind of error (the first that matches).
STATUS: tuple[tuple[type[DevagentError], int], ...] = (
    (UsageError, 400),
    (StateError, 409),
    (PeerError, 502),
)


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """A devagent error becomes a JSON error with its status (500 for other kinds)."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except DevagentError as err:
        status = next((code for kind, code in STATUS if isinstance(err, kind)), 500)
        log.info("%s %s -> %d: %s", request.method, request.path, status, err)
        return json_error(status, str(err))
