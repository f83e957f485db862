"""What the HTTP JSON APIs share (a block agent's control API, :mod:`devagent.agent.control`;
a net agent's, :mod:`devagent.net.control`; the daemon's, :mod:`devagent.daemon.api`): a body
decoded once into its type (:func:`body_as`), an answer encoded once (:func:`answer`), and
JSON errors whose status says what kind of error it was."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from devagent.errors import DevagentError, PeerError, StateError, UsageError
from devagent.wire import decode

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


T = TypeVar("T")


async def body_as(request: web.Request, into: type[T]) -> T:
    """The request's JSON body as an ``into`` (no body is ``{}``): a body that does not fit
    is a :class:`UsageError` naming the field's path. The app's ``client_max_size`` bounds
    what is read."""
    raw = await request.read() if request.can_read_body else b""
    return decode(raw or b"{}", into)


def since_of(request: web.Request) -> float:
    """A route's ``since`` parameter: host time in seconds (none: 0)."""
    try:
        return float(request.query.get("since", "0"))
    except ValueError:
        raise UsageError("'since' must be a number (host time in seconds)") from None


def answer(message: object, status: int = 200) -> web.Response:
    """``message`` (a Struct, a dataclass) as the JSON answer: encoded once, here."""
    return web.Response(
        body=msgspec.json.encode(message), status=status, content_type="application/json"
    )
