"""Every message of a block agent's control API, as declared types (msgspec Structs).

A request body is decoded once, at the HTTP edge (:func:`decode`), into one of the request
types below; a bad body becomes a :class:`UsageError` naming the field's path
(``Expected `int`, got `str` - at `$.target.chunk_size```). Answers are Structs too, encoded
as the same JSON objects as ever; the daemon may decode them with :func:`msgspec.convert`.

Backend specs are the tagged union :data:`BackendSpec` (tag field ``kind``)::

    {"kind": "local",  "path": "/x.img", "read_only": false}
    {"kind": "remote", "address": "tcp:HOST:PORT" | "unix:/PATH", "export": "",
     "io_timeout": 120, "connect_timeout": 10}
    {"kind": "fetch",  "path": "/replica.img", "remote": {a local or remote spec},
     "chunk_size": 65536, "rate_limit": null, "copier": true, "then_local": false,
     "copy_workers": 3, "copy_batch": 1048576, "present": BASE64}

A fetch's ``present`` (base64 bits, bit ``i & 7`` of byte ``i >> 3`` for chunk ``i``)
names chunks already in the replica, e.g. pushed by a mirror before a switchover.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, TypeVar

import msgspec

from devagent.agent.defaults import (
    CONNECT_TIMEOUT_S,
    COPY_BATCH,
    COPY_WORKERS,
    FETCH_CHUNK,
    IO_TIMEOUT_S,
    MAX_COPY,
    MIRROR_PARALLEL,
    MIRROR_PASSES,
)
from devagent.errors import DevagentError
from devagent.vocab import parse_address

T = TypeVar("T")

Positive = Annotated[float, msgspec.Meta(gt=0)]

# -- backend specs ----------------------------------------------------------------------


class LocalSpec(msgspec.Struct, tag="local", tag_field="kind", forbid_unknown_fields=True):
    """A file or block device of this host."""

    path: str
    read_only: bool = False
    #: How long a write that finds no room (a full or read-only filesystem) is held before
    #: it fails. 0 for a migration's target before the switchover: no guest waits on it,
    #: and its migration rolls back at once with the reason.
    space_hold_s: float = 120.0


class RemoteSpec(msgspec.Struct, tag="remote", tag_field="kind", forbid_unknown_fields=True):
    """A device another agent exports over NBD. Over TCP from an agent with a certificate,
    the connection turns to TLS and the server must present host ``host``'s certificate
    (none named: one for the address's IP)."""

    address: str
    export: str = ""
    host: str = ""
    io_timeout: Positive = IO_TIMEOUT_S
    connect_timeout: Positive = CONNECT_TIMEOUT_S

    def __post_init__(self) -> None:
        try:
            parse_address(self.address)
        except DevagentError as err:
            raise ValueError(f"address: {err}") from None


class FetchSpec(
    msgspec.Struct, tag="fetch", tag_field="kind", forbid_unknown_fields=True, omit_defaults=True
):
    """A local replica filled from ``remote`` on demand and in the background."""

    path: str
    remote: LocalSpec | RemoteSpec  # never a fetch: a fetch cannot fetch from a fetch
    chunk_size: int = FETCH_CHUNK
    rate_limit: Positive | None = None
    copier: bool = True
    then_local: bool = False
    copy_workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = COPY_WORKERS
    copy_batch: int = COPY_BATCH
    present: str = ""  # base64 bits: chunks already in the replica (a push's)
    #: Base64 bits: chunks that read zeroes on the remote (its holes, once it can no longer
    #: change): present without a fetch where the replica reads zeroes too.
    zeroes: str = ""

    def __post_init__(self) -> None:
        size = self.chunk_size
        if size < 4096 or size & (size - 1) or size > 8 << 20:
            raise ValueError(f"chunk_size: a power of two in 4 KiB..8 MiB, got {size}")
        if not size <= self.copy_batch <= 32 << 20:
            raise ValueError(f"copy_batch: chunk_size..32 MiB, got {self.copy_batch}")
        self.present_bits()
        self.zero_bits()

    def present_bits(self) -> bytes:
        """``present``, decoded."""
        return _bits("present", self.present)

    def zero_bits(self) -> bytes:
        """``zeroes``, decoded."""
        return _bits("zeroes", self.zeroes)

    def without_seeds(self) -> FetchSpec:
        """The same replica without ``present`` and ``zeroes``: what an agent restarts
        with (its bitmap file says then what is present; the seeds, up to a bit per chunk,
        would only lengthen its command line)."""
        return msgspec.structs.replace(self, present="", zeroes="")


def _bits(name: str, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"{name}: not base64 bits: {err}") from None


BackendSpec = LocalSpec | RemoteSpec | FetchSpec

# -- requests ---------------------------------------------------------------------------


class SwapRequest(msgspec.Struct):
    """``POST /swap``: make the backend ``backend`` describes the agent's."""

    backend: BackendSpec


class MirrorRequest(msgspec.Struct):
    """``POST /mirror``: mirror the device to ``target`` under the guest."""

    target: BackendSpec
    sync: bool = False
    converge_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0
    rate_limit: Positive | None = None
    target_zeroed: bool = True
    active: bool = False
    parallel: Annotated[int, msgspec.Meta(ge=1, le=64)] = MIRROR_PARALLEL
    max_copy: Annotated[int, msgspec.Meta(ge=4096, le=32 << 20)] = MAX_COPY
    max_passes: Annotated[int, msgspec.Meta(ge=1, le=1000)] = MIRROR_PASSES


class CutoverRequest(msgspec.Struct):
    """``POST /mirror/cutover``; ``keep_source``: go on serving the source (a migration)."""

    keep_source: bool = False


# -- answers ----------------------------------------------------------------------------


class JournalStats(msgspec.Struct):
    state: str
    in_flight: int
    waiting: int
    completed: int
    errors: int
    counts: dict[str, int]
    bytes: dict[str, int]
    max_gap_ms: float
    p99_latency_ms: float
    latency_histogram_us: dict[str, int]


class MirrorStats(msgspec.Struct):
    state: str
    sync: bool
    rate_limit: float | None
    copied_bytes: int
    zeroed_bytes: int
    dirty_bytes: int
    passes: int
    error: str | None
    #: The guest's writes went to both sides before the copy converged (it outran the
    #: copy, or the passes ran out).
    writes_paced: bool = False
    #: Of ``copied_bytes``, those sent as data (its 4 KiB blocks of zeroes went as
    #: write_zeroes requests).
    sent_bytes: int = 0


class LocalStatus(msgspec.Struct, tag="local", tag_field="kind"):
    path: str
    read_only: bool


class RemoteStatus(msgspec.Struct, tag="remote", tag_field="kind"):
    peer: str
    export: str
    state: str
    connected: bool
    reconnects: int
    timeouts: int
    retries: int
    last_error: str | None


class FetchStatus(msgspec.Struct, tag="fetch", tag_field="kind"):
    path: str
    size: int
    chunk_size: int
    present_bytes: int
    complete: bool
    fetched_on_demand_bytes: int
    fetched_in_background_bytes: int
    skipped_as_zero_bytes: int
    copier: bool
    rate_limit: float | None
    remote: RemoteStatus | str  # a local source has no status: its repr
    #: Why the replica takes no writes now (full, read-only): the guest's writes go to the
    #: remote meanwhile. None: it takes them.
    spilling: str | None = None
    spilled_bytes: int = 0  # guest bytes written to the remote for want of room, in all


class MirrorStatus(msgspec.Struct, tag="mirror", tag_field="kind"):
    state: str
    sync: bool
    rate_limit: float | None
    copied_bytes: int
    zeroed_bytes: int
    dirty_bytes: int
    passes: int
    error: str | None
    source: BackendStatus
    target: BackendStatus
    writes_paced: bool = False  # as MirrorStats'
    sent_bytes: int = 0  # as MirrorStats'


class OtherStatus(msgspec.Struct, tag="other", tag_field="kind"):
    """A backend of no kind above (only test fakes): its class name."""

    name: str


BackendStatus = LocalStatus | RemoteStatus | FetchStatus | MirrorStatus | OtherStatus


class AgentStats(msgspec.Struct):
    export: str
    size: int
    state: str
    connections: int
    addresses: list[str]
    journal: JournalStats


class StatusAnswer(msgspec.Struct):
    """``GET /status``."""

    export: str
    size: int
    state: str
    connections: int
    addresses: list[str]
    journal: JournalStats
    pid: int
    backend: str
    held: bool
    backend_status: BackendStatus


class QuiesceAnswer(msgspec.Struct):
    drained_in_s: float


class ResumeAnswer(msgspec.Struct):
    held_s: float


class CompletionsAnswer(msgspec.Struct):
    completions: list[float]
    complete: bool


class SwapAnswer(msgspec.Struct):
    old: str
    new: str
    hold_s: float


class MirrorStarted(msgspec.Struct):
    mirror: MirrorStats
    target: str


class CutoverAnswer(msgspec.Struct):
    held_from: float
    held_s: float
    mirror: MirrorStats
    new: str


class MirrorCancelled(msgspec.Struct):
    cancelled: bool
    mirror: MirrorStats


class MirrorRate(msgspec.Struct):
    """``POST /mirror/rate``: the bytes per second the background copy may move from now on
    (None: no limit). The answer gives the same, as the mirror has it."""

    rate_limit: Positive | None = None


class MirrorStopped(msgspec.Struct):
    """``POST /mirror/stop``: the chunks the target may still lack, as base64 bits."""

    chunk_size: int
    chunks: int
    dirty: str
    dirty_bytes: int
    mirror: MirrorStats


class FlushAnswer(msgspec.Struct):
    flushed_in_s: float


class FenceAnswer(msgspec.Struct):
    """``POST /fence``: the connections dropped, and the chunks of ``chunk_size`` that read
    zeroes now (the disk's holes, as base64 bits; empty when none is known), which the
    destination need not fetch."""

    fenced: bool
    dropped: int
    chunk_size: int = FETCH_CHUNK
    zeroes: str = ""


class UnfenceAnswer(msgspec.Struct):
    """``POST /unfence``: whether the agent was fenced, and the unix sockets it serves again
    (none when it was not fenced)."""

    unfenced: bool
    listening: list[str]


class StopAnswer(msgspec.Struct):
    stopping: bool


class RetireAnswer(msgspec.Struct):
    retired: bool
    took_s: float
