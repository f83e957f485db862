"""Backend specs: a JSON-able description of a backend, and the code that opens one.

    {"kind": "local",  "path": "/x.img", "read_only": false}
    {"kind": "remote", "address": "tcp:HOST:PORT" | "unix:/PATH", "export": "",
     "io_timeout": 120, "connect_timeout": 10}
    {"kind": "fetch",  "path": "/replica.img", "remote": {a local or remote spec},
     "chunk_size": 65536, "rate_limit": null, "copier": true, "then_local": false,
     "copy_workers": 2, "copy_batch": 1048576, "present": BASE64}

``check_spec`` validates and fills defaults (``UsageError`` naming the bad field);
``open_backend`` opens the backend; ``Duties`` runs what a spec asks for after opening
(``then_local``: once the replica is complete, swap the agent to ``Local(replica)`` and drop
the remote). A fetch's ``present`` (base64 bits, bit ``i & 7`` of byte ``i >> 3`` for chunk
``i``) names chunks already in the replica, e.g. pushed by a mirror before a switchover; it
only seeds a new presence bitmap, never overrides one an earlier run of the agent kept.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from devagent.agent.agent import BlockAgent
from devagent.agent.backend import Backend, Local
from devagent.agent.fetch import Fetch, bits_to_chunks
from devagent.agent.mirror import Mirrored
from devagent.agent.remote import Remote
from devagent.errors import DevagentError, StateError, UsageError
from devagent.vocab import parse_address

log = logging.getLogger(__name__)

Spec = dict[str, Any]
#: How often ``then_local`` retries a swap the agent's state refused (a quiesce in progress).
THEN_LOCAL_RETRY_S = 1.0

_FIELDS: dict[str, dict[str, tuple[type | tuple[type, ...], Any]]] = {
    # field: (accepted types, default; ... means required)
    "local": {"path": (str, ...), "read_only": (bool, False)},
    "remote": {
        "address": (str, ...),
        "export": (str, ""),
        "io_timeout": ((int, float), 120.0),
        "connect_timeout": ((int, float), 10.0),
    },
    "fetch": {
        "path": (str, ...),
        "remote": (dict, ...),
        "chunk_size": (int, 64 * 1024),
        "rate_limit": ((int, float, type(None)), None),
        "copier": (bool, True),
        "then_local": (bool, False),
        "copy_workers": (int, 2),
        "copy_batch": (int, 1 << 20),
        "present": (str, ""),
    },
}


def check_spec(spec: Any, *, where: str = "backend") -> Spec:
    """A validated copy of ``spec`` with defaults filled in."""
    if not isinstance(spec, Mapping):
        raise UsageError(f"{where}: a backend spec is a JSON object, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in _FIELDS:
        raise UsageError(f"{where}: 'kind' must be one of {sorted(_FIELDS)}, got {kind!r}")
    fields = _FIELDS[kind]
    unknown = sorted(set(spec) - set(fields) - {"kind"})
    if unknown:
        raise UsageError(f"{where}: unknown field(s) for a {kind} backend: {unknown}")
    out: Spec = {"kind": kind}
    for name, (types, default) in fields.items():
        if name not in spec:
            if default is ...:
                raise UsageError(f"{where}: a {kind} backend needs {name!r}")
            out[name] = default
            continue
        value = spec[name]
        if isinstance(value, bool) and bool not in _as_tuple(types):
            raise UsageError(f"{where}.{name}: expected a number, got {value!r}")
        if not isinstance(value, types):
            raise UsageError(f"{where}.{name}: wrong type {type(value).__name__} ({value!r})")
        out[name] = value
    if kind == "remote":
        parse_address(out["address"])
        if out["io_timeout"] <= 0 or out["connect_timeout"] <= 0:
            raise UsageError(f"{where}: timeouts must be positive")
    if kind == "fetch":
        out["remote"] = check_spec(out["remote"], where=f"{where}.remote")
        if out["remote"]["kind"] == "fetch":
            raise UsageError(f"{where}.remote: a fetch backend cannot fetch from a fetch")
        size = out["chunk_size"]
        if size < 4096 or size & (size - 1) or size > 8 << 20:
            raise UsageError(f"{where}.chunk_size: a power of two in 4 KiB..8 MiB, got {size}")
        if out["rate_limit"] is not None and out["rate_limit"] <= 0:
            raise UsageError(f"{where}.rate_limit: must be positive (or null)")
        if not 1 <= out["copy_workers"] <= 64:
            raise UsageError(f"{where}.copy_workers: 1..64, got {out['copy_workers']}")
        if not size <= out["copy_batch"] <= 32 << 20:
            raise UsageError(f"{where}.copy_batch: chunk_size..32 MiB, got {out['copy_batch']}")
        present_bits(out, where=where)
    return out


def present_bits(spec: Spec, *, where: str = "backend") -> bytes:
    """A fetch spec's ``present`` bits, decoded (``UsageError`` if it is not base64)."""
    try:
        return base64.b64decode(spec.get("present", ""), validate=True)
    except (binascii.Error, ValueError) as err:
        raise UsageError(f"{where}.present: not base64 bits: {err}") from None


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


async def open_backend(spec: Any) -> Backend:
    """Open the backend ``spec`` describes (a fetch backend's copier starts if asked)."""
    spec = check_spec(spec)
    kind = spec["kind"]
    if kind == "local":
        return Local(spec["path"], read_only=spec["read_only"])
    if kind == "remote":
        return await Remote.open(
            spec["address"],
            spec["export"],
            io_timeout=float(spec["io_timeout"]),
            connect_timeout=float(spec["connect_timeout"]),
        )
    source = await open_backend(spec["remote"])
    try:
        fetch = Fetch(
            spec["path"],
            source,
            chunk_size=spec["chunk_size"],
            rate_limit=spec["rate_limit"],
            copy_workers=spec["copy_workers"],
            copy_batch=spec["copy_batch"],
            seed=bits_to_chunks(present_bits(spec), 1 << 62),
        )
    except BaseException:
        await source.close()
        raise
    if spec["copier"]:
        fetch.start_copier()
    return fetch


def backend_status(backend: Backend) -> dict[str, Any]:
    """The figures ``GET /status`` shows for a backend."""
    if isinstance(backend, Fetch | Remote):
        return backend.status()
    if isinstance(backend, Mirrored):
        return {
            "kind": "mirror",
            **backend.stats(),
            "source": backend_status(backend.source),
            "target": backend_status(backend.target),
        }
    if isinstance(backend, Local):
        return {"kind": "local", "path": str(backend.path), "read_only": backend.read_only}
    return {"kind": type(backend).__name__}


class Duties:
    """Background work a spec asks of an agent after its backend is opened."""

    def __init__(self, agent: BlockAgent) -> None:
        self.agent = agent
        self._tasks: dict[int, asyncio.Task[None]] = {}  # id(backend) -> its duty

    def start(self, backend: Backend, spec: Spec) -> None:
        spec = check_spec(spec)
        if spec["kind"] == "fetch" and spec["then_local"] and isinstance(backend, Fetch):
            if not spec["copier"]:
                log.warning("then_local without the copier: waits for the guest to read it all")
            self._tasks[id(backend)] = asyncio.create_task(self._then_local(backend))

    async def _then_local(self, fetch: Fetch) -> None:
        try:
            await fetch.wait_complete()
        except DevagentError as err:
            log.error("replica %s: cannot make it durable, staying on Fetch: %s", fetch.path, err)
            return
        while self.agent.backend is fetch:
            local = Local(fetch.path)
            try:
                old = await self.agent.swap_backend(local)
            except StateError as err:  # held by /quiesce, say: try again shortly
                await local.close()
                log.info("replica %s complete, swap to Local put off: %s", fetch.path, err)
                await asyncio.sleep(THEN_LOCAL_RETRY_S)
                continue
            except BaseException:
                await local.close()
                raise
            log.info(
                "export %r: replica %s complete; now served by %r, remote %r dropped",
                self.agent.export_name,
                fetch.path,
                local,
                fetch.remote,
            )
            self._tasks.pop(id(fetch), None)
            await old.close()

    async def cancel(self, backend: Backend) -> None:
        task = self._tasks.pop(id(backend), None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def cancel_all(self) -> None:
        for key in list(self._tasks):
            task = self._tasks.pop(key)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def spec_for_image(image: str | Path, read_only: bool = False) -> Spec:
    return {"kind": "local", "path": str(image), "read_only": read_only}
