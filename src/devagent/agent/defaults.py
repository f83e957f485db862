"""The agent's tunable defaults, in one place: the backend specs, the mirror job and the
control API use them, and the daemon imports them from here instead of repeating them."""

from __future__ import annotations

#: A Fetch backend's chunk: the unit of presence, of copy-on-read and of a mirror's dirty set.
FETCH_CHUNK = 64 << 10
#: Batches a Fetch backend's background copier keeps in flight (and copies a pre-copy's
#: mirror does). Two left the link idle while one batch was read, encrypted, decrypted and
#: stored: 75-89 MB/s on a 1 Gbit/s link, and TLS slower than plaintext; with three the
#: fetch takes the same time with TLS as without.
COPY_WORKERS = 3
#: Bytes one batch of the background copier asks of the remote.
COPY_BATCH = 1 << 20
#: Seconds a remote backend waits for one request (a network cut shorter than it is waited out).
IO_TIMEOUT_S = 120.0
#: Seconds a remote backend waits to connect.
CONNECT_TIMEOUT_S = 10.0

#: A mirror's chunk: the unit of its dirty set.
MIRROR_CHUNK = 64 << 10
#: Most bytes one mirror copy moves (neighbouring dirty chunks go in one request).
MAX_COPY = 1 << 20
#: Mirror copies in flight.
MIRROR_PARALLEL = 4
#: Passes a mirror job makes before it gives up converging (or, active, goes write-through).
MIRROR_PASSES = 50

#: A quiesce that nobody resumes is resumed by the agent itself after this many seconds.
MAX_HOLD_S = 30.0
#: A mirror whose passes ran out may still cut over with this much left to copy while the
#: guest's I/O is held (the last copy runs at disk speed; the hold stays short).
MAX_CUTOVER_DIRTY = 32 << 20
