"""The daemon's HTTP JSON API (aiohttp). Every route but none requires ``Authorization:
Bearer TOKEN``; errors are JSON objects ``{"error": message}`` with a 4xx/5xx status."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from devagent.daemon.host import Host

HOST_KEY = web.AppKey("host", Host)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def token_middleware(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return json_error(401, "missing or wrong bearer token")
        return await handler(request)

    return check


async def health(request: web.Request) -> web.Response:
    host = request.app[HOST_KEY]
    return web.json_response({"host": host.name, "address": host.address, "port": host.port})


def build_app(host: Host, token: str) -> web.Application:
    app = web.Application(middlewares=[token_middleware(token)])
    app[HOST_KEY] = host
    app.router.add_get("/v1/health", health)
    return app
