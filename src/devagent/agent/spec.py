"""Backend specs (the typed union in :mod:`devagent.agent.messages`): checking one that
arrived as JSON, opening the backend it describes, and the status a backend reports.

``check_spec`` turns a decoded JSON value into a ``LocalSpec | RemoteSpec | FetchSpec``
(``UsageError`` naming the bad field's path); ``open_backend`` opens the backend;
:class:`devagent.agent.duties.Duties` runs what a spec asks for after opening. A fetch's
``present`` bits only seed a new presence bitmap, never override one an earlier run of the
agent kept.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from devagent.agent.backend import Backend, Local, cannot_open
from devagent.agent.fetch import Fetch
from devagent.agent.messages import (
    BackendSpec,
    BackendStatus,
    FetchSpec,
    LocalSpec,
    LocalStatus,
    MirrorStatus,
    OtherStatus,
    RemoteSpec,
)
from devagent.agent.mirror import Mirrored
from devagent.agent.remote import Remote, RemoteState
from devagent.errors import UsageError

_SPEC: type[BackendSpec] = BackendSpec  # type: ignore[assignment]


def check_spec(spec: object, *, where: str = "backend") -> BackendSpec:
    """``spec`` (a decoded JSON value, or a spec already) as a typed spec with its defaults;
    a bad one is a UsageError naming ``where`` and the field's path."""
    if isinstance(spec, LocalSpec | RemoteSpec | FetchSpec):
        return spec
    try:
        return msgspec.convert(spec, _SPEC)
    except msgspec.ValidationError as err:
        raise UsageError(f"{where}: {err}") from None


def serves(backend: Backend | None, spec: LocalSpec | RemoteSpec) -> Remote | None:
    """``backend`` if it is an open connection to the very export ``spec`` names, on the
    same terms (the certificate asked of the peer, the I/O timeout)."""
    if not isinstance(backend, Remote) or not isinstance(spec, RemoteSpec):
        return None
    if backend.state is RemoteState.CLOSED:
        return None
    ours = (backend.address, backend.export, backend.host, backend.io_timeout)
    return backend if ours == (spec.address, spec.export, spec.host, spec.io_timeout) else None


async def open_backend(spec: BackendSpec, *, current: Backend | None = None) -> Backend:
    """Open the backend ``spec`` describes (a fetch backend's copier starts if asked).

    A Fetch whose remote ``current`` already serves (:func:`serves`: a migration's
    destination agent reads through to the source until the switchover) takes that
    connection over rather than dialling again: no new connection, TLS handshake or
    close of the old one on the switchover's path. The caller must then not close
    ``current`` (the Fetch owns it: ``new.remote is current``)."""
    if isinstance(spec, LocalSpec):
        return Local(spec.path, read_only=spec.read_only, space_hold_s=spec.space_hold_s)
    if isinstance(spec, RemoteSpec):
        return await Remote.open(
            spec.address,
            spec.export,
            io_timeout=spec.io_timeout,
            connect_timeout=spec.connect_timeout,
            host=spec.host,
        )
    taken = serves(current, spec.remote)
    source = taken or await open_backend(spec.remote)
    try:
        fetch = Fetch(
            spec.path,
            source,
            chunk_size=spec.chunk_size,
            rate_limit=spec.rate_limit,
            copy_workers=spec.copy_workers,
            copy_batch=spec.copy_batch,
            seed=spec.present_bits(),
            zeroes=spec.zero_bits(),
        )
    except OSError as err:  # its replica or presence file (a read-only space, say)
        if taken is None:
            await source.close()
        raise cannot_open(Path(spec.path), err) from err
    except BaseException:
        if taken is None:
            await source.close()
        raise
    if spec.copier:
        fetch.start_copier()
    return fetch


def backend_status(backend: Backend) -> BackendStatus:
    """The figures ``GET /status`` shows for a backend."""
    if isinstance(backend, Fetch | Remote):
        return backend.status()
    if isinstance(backend, Mirrored):
        return MirrorStatus(
            **msgspec.structs.asdict(backend.stats()),
            source=backend_status(backend.source),
            target=backend_status(backend.target),
        )
    if isinstance(backend, Local):
        return LocalStatus(path=str(backend.path), read_only=backend.read_only)
    return OtherStatus(name=type(backend).__name__)


def spec_for_image(image: str | Path, read_only: bool = False) -> LocalSpec:
    return LocalSpec(path=str(image), read_only=read_only)
