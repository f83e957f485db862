"""Run one block agent in the foreground until cancelled (or SIGINT/SIGTERM from the CLI)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from devagent.agent.agent import BlockAgent
from devagent.agent.control import serve_control
from devagent.agent.listener import UnixListener, bind_unix, drop_unix
from devagent.agent.messages import BackendSpec
from devagent.agent.spec import check_spec, open_backend, spec_for_image
from devagent.errors import UsageError
from devagent.tls import Tls

log = logging.getLogger(__name__)


async def serve(
    image: str | Path | None = None,
    *,
    backend_spec: BackendSpec | object = None,
    unix: str | Path | UnixListener | None = None,
    tcp: tuple[str, int] | None = None,
    name: str = "",
    read_only: bool = False,
    on_ready: Callable[[BlockAgent], None] | None = None,
    stop: asyncio.Event | None = None,
    control: str | Path | None = None,
    tls: Tls | None = None,
) -> None:
    """Serve ``image`` (or the backend ``backend_spec`` describes: a spec, or its decoded
    JSON) until ``stop`` is set or the task is cancelled, then stop cleanly. With ``tls``,
    TCP clients must turn to TLS and present a host's certificate ``tls`` admits.

    The unix socket (``unix``: a path, or a socket bound already) listens before the backend
    opens (a remote one dials its peer): a client that connects meanwhile (the VM's QEMU,
    started beside the agent) waits in its backlog and is served once the backend is. A
    socket given bound is this function's from its first line: whatever fails before the
    agent serves it (a bad argument, the backend) closes it and removes its file."""
    listener = unix if isinstance(unix, UnixListener) else None
    agent, runner = None, None
    try:
        if unix is None and tcp is None:
            raise UsageError("give a unix socket path or a TCP address to listen on")
        if (image is None) == (backend_spec is None):
            raise UsageError("give either an image or a backend spec")
        if backend_spec is not None and read_only:
            raise UsageError("read-only goes into the backend spec ('read_only' of a local one)")
        spec = check_spec(backend_spec) if image is None else spec_for_image(image, read_only)
        if isinstance(unix, (str, Path)):
            listener = bind_unix(Path(unix))
        backend = await open_backend(spec)
        agent = BlockAgent(backend, name)
        agent.duties.start(backend, spec)
        if listener is not None:
            await agent.listen_unix(listener)
            listener = None  # the agent's: it removes the file as it stops
        if tcp is not None:
            await agent.listen_tcp(*tcp, tls=tls)
        stop = stop if stop is not None else asyncio.Event()
        if control is not None:
            runner = await serve_control(agent, Path(control), stop)
        if on_ready is not None:
            on_ready(agent)
        await stop.wait()
    finally:
        if listener is not None:
            drop_unix(listener)
        if agent is not None:
            await asyncio.shield(agent.duties.cancel_all())
            await asyncio.shield(agent.stop())
        if runner is not None:
            await runner.cleanup()
            Path(control or "").unlink(missing_ok=True)
