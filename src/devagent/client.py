"""Client of a devagentd's HTTP API, used by the CLI and by daemons talking to their peers.

Each call returns the decoded JSON body; a 4xx/5xx answer becomes the matching devagent
error carrying the daemon's own message, and a daemon that cannot be reached becomes a
:class:`PeerError` naming its URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

from devagent.errors import DevagentError, NotFound, PeerError, StateError, UsageError

DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Endpoint:
    """Where a daemon listens and the token it wants."""

    url: str
    token: str
    name: str = ""

    def to_json(self) -> dict[str, str]:
        return {"url": self.url, "token": self.token, "name": self.name}

    @classmethod
    def from_json(cls, data: Any) -> Endpoint:
        if not isinstance(data, dict) or not isinstance(data.get("url"), str):
            raise UsageError("a peer must be given as {'url': …, 'token': …}")
        return cls(
            url=data["url"], token=str(data.get("token", "")), name=str(data.get("name", ""))
        )


_STATUS_ERRORS: dict[int, type[DevagentError]] = {
    400: UsageError,
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
        self._session = aiohttp.ClientSession(
            base_url=self.endpoint.url,
            headers={"Authorization": f"Bearer {self.endpoint.token}"},
            timeout=self._timeout,
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

    async def get(self, path: str, **params: Any) -> Any:
        return await self.request("GET", path, params=params or None)

    async def post(self, path: str, body: Any = None) -> Any:
        return await self.request("POST", path, body=body if body is not None else {})

    async def delete(self, path: str) -> Any:
        return await self.request("DELETE", path)

    async def request(
        self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        if self._session is None:
            raise StateError("DaemonClient used outside 'async with'")
        who = self.endpoint.name or self.endpoint.url
        try:
            async with self._session.request(method, path, json=body, params=params) as resp:
                try:
                    payload = await resp.json(content_type=None)
                except ValueError:
                    payload = {"error": (await resp.text())[:200]}
                if resp.status >= 400:
                    message = payload.get("error") if isinstance(payload, dict) else None
                    error = _STATUS_ERRORS.get(resp.status, PeerError)
                    raise error(f"host {who}: {message or f'HTTP {resp.status}'}")
                return payload
        except (aiohttp.ClientError, TimeoutError) as err:
            raise PeerError(f"host {who} ({self.endpoint.url}) unreachable: {err!r}") from err
