"""Client of a devagentd's HTTP API, used by the CLI and by daemons talking to their peers.

``get_as``, ``post_as`` and ``delete_as`` decode the answer once into its declared type
(:mod:`devagent.api_types`, or a migration message); an answer that does not fit is a
:class:`PeerError` naming the field's path. ``get``, ``post`` and ``delete`` return the plain
JSON (for a caller that only passes it on). A request body is a Struct or plain JSON. A 4xx/5xx
answer becomes the matching devagent error carrying the daemon's own message, and a daemon
that cannot be reached becomes a :class:`PeerError` naming its URL.

An ``https://`` daemon is called with this process's certificate (the CLI's operator
certificate, a daemon's host certificate: :func:`devagent.tls.use_tls`), and must present the
certificate of the host the endpoint names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
import msgspec

from devagent.errors import (
    DevagentError,
    Forbidden,
    NotFound,
    PeerError,
    StateError,
    UsageError,
)
from devagent.tls import as_name, process_tls

DEFAULT_TIMEOUT_S = 60.0


T = TypeVar("T")
Params = Mapping[str, str | int | float]


class Endpoint(msgspec.Struct, frozen=True):
    """Where a daemon listens and the token it wants (its JSON: ``{"url", "token", "name"}``,
    in requests that name a peer)."""

    url: str
    token: str = ""
    name: str = ""

    @property
    def host(self) -> str | None:
        """The host it names, whose certificate its daemon must present (None: its name is
        a URL; the URL's address is checked then)."""
        return as_name(self.name)

    def to_json(self) -> dict[str, str]:
        return {"url": self.url, "token": self.token, "name": self.name}

    @classmethod
    def from_json(cls, data: object) -> Endpoint:
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as err:
            raise UsageError(f"a peer must be given as {{'url': …, 'token': …}}: {err}") from None


_STATUS_ERRORS: dict[int, type[DevagentError]] = {
    400: UsageError,
    403: Forbidden,
    404: NotFound,
    409: StateError,
    422: UsageError,
}


class DaemonClient:
    """``async with DaemonClient(endpoint) as c: await c.get("/v1/vms")``."""

    def __init__(self, endpoint: Endpoint, timeout: float = DEFAULT_TIMEOUT_S):
        self.endpoint = endpoint
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> DaemonClient:
        connector = None
        if self.endpoint.url.startswith("http://") and process_tls() is not None:
            raise StateError(
                f"host {self._who}: {self.endpoint.url} is plain HTTP, and this process "
                "speaks TLS: its token would cross the network in clear (use https://)"
            )
        if self.endpoint.url.startswith("https://"):
            tls = process_tls()
            if tls is None:
                raise StateError(
                    f"host {self._who} speaks HTTPS and this process has no certificate "
                    "(a lab's is found with --lab; see 'devagent pki')"
                )
            connector = aiohttp.TCPConnector(ssl=tls.client)
        self._session = aiohttp.ClientSession(
            base_url=self.endpoint.url,
            headers={"Authorization": f"Bearer {self.endpoint.token}"},
            timeout=self._timeout,
            connector=connector,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get_as(self, path: str, into: type[T], **params: str | int | float) -> T:
        """``GET path`` decoded as an ``into``."""
        return self._decoded("GET", path, await self._call("GET", path, params=params), into)

    async def post_as(self, path: str, into: type[T], body: object = None) -> T:
        """``POST path`` (``body``: a Struct or plain JSON; none is ``{}``) decoded as an
        ``into``."""
        raw = await self._call("POST", path, body={} if body is None else body)
        return self._decoded("POST", path, raw, into)

    async def delete_as(self, path: str, into: type[T]) -> T:
        return self._decoded("DELETE", path, await self._call("DELETE", path), into)

    async def get(self, path: str, **params: str | int | float) -> Any:
        return _plain(await self._call("GET", path, params=params))

    async def post(self, path: str, body: object = None) -> Any:
        return _plain(await self._call("POST", path, body={} if body is None else body))

    async def delete(self, path: str) -> Any:
        return _plain(await self._call("DELETE", path))

    def _decoded(self, method: str, path: str, raw: bytes, into: type[T]) -> T:
        try:
            return msgspec.json.decode(raw, type=into)
        except msgspec.DecodeError as err:
            raise PeerError(f"host {self._who}: {method} {path} answered badly: {err}") from None

    @property
    def _who(self) -> str:
        return self.endpoint.name or self.endpoint.url

    async def _call(
        self, method: str, path: str, body: object = None, params: Params | None = None
    ) -> bytes:
        """The answer's body, once its status says it succeeded."""
        if self._session is None:
            raise StateError("DaemonClient used outside 'async with'")
        data = None if body is None else msgspec.json.encode(body)
        headers = {"Content-Type": "application/json"} if data is not None else None
        try:
            async with self._session.request(
                method,
                path,
                data=data,
                headers=headers,
                params=params or None,
                server_hostname=self.endpoint.host,  # a loopback lab's hosts share 127.0.0.1
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    error = _STATUS_ERRORS.get(resp.status, PeerError)
                    raise error(f"host {self._who}: {_error_of(raw) or f'HTTP {resp.status}'}")
                return raw
        except (aiohttp.ClientError, TimeoutError) as err:
            raise PeerError(f"host {self._who} ({self.endpoint.url}) unreachable: {err!r}") from err


class _Error(msgspec.Struct):
    error: str


def _error_of(raw: bytes) -> str | None:
    """The daemon's ``{"error": message}``, or the start of whatever else it answered."""
    try:
        return msgspec.json.decode(raw, type=_Error).error
    except msgspec.DecodeError:
        return raw[:200].decode(errors="replace") or None


def _plain(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as err:
        raise PeerError(f"the daemon answered no JSON: {raw[:200]!r}") from err
