"""What the agent's helpers (:mod:`.duties`, :mod:`.mirror_job`) need of their agent: its
backend, its export's name and the swap of one backend for another, as a protocol, so
they do not import the agent that owns them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from devagent.agent.backend import Backend


class SwapsBackends(Protocol):
    """:class:`devagent.agent.agent.BlockAgent`, as its duties and mirror job see it."""

    @property
    def backend(self) -> Backend: ...

    @property
    def export_name(self) -> str: ...

    async def swap_backend(
        self, new: Backend, *, before_switch: Callable[[], Awaitable[object]] | None = None
    ) -> Backend: ...
