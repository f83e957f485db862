"""A unix socket that listens before its agent serves it: the VM's QEMU, started beside the
agent, may connect at once and waits in the backlog (:func:`devagent.agent.serve.serve`)."""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path

#: Connections a unix socket holds before they are accepted (QEMU's connect at its start).
UNIX_BACKLOG = 16


@dataclass(frozen=True)
class UnixListener:
    """A unix socket listening at ``path`` (:func:`bind_unix`), not served yet."""

    sock: socket.socket
    path: Path


def bind_unix(path: Path) -> UnixListener:
    """A listening unix socket at ``path`` (a stale socket file there replaced), mode 0600:
    plaintext, for the VM's own QEMU, so root's alone. The file appears only once the
    socket listens (bound beside it under a staging name, then renamed): whoever sees it
    may connect, and waits in the backlog until the socket is served."""
    staged = path.with_name(f".{path.name}.new")
    for stale in (path, staged):
        if stale.is_socket():
            stale.unlink(missing_ok=True)
        elif stale.exists():  # (renamed over, it would be lost)
            raise OSError(errno.EADDRINUSE, "a file that is not a socket is there", str(stale))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(staged))
    except BaseException:
        sock.close()
        raise
    try:
        os.chmod(staged, 0o600)  # before it listens: no one connects before
        sock.listen(UNIX_BACKLOG)
        os.rename(staged, path)
    except BaseException:
        sock.close()
        staged.unlink(missing_ok=True)
        raise
    sock.setblocking(False)
    return UnixListener(sock, path)


def drop_unix(listener: UnixListener) -> None:
    """A socket of :func:`bind_unix` that will not be served: closed, its file removed (a
    client waiting in its backlog sees the connection close)."""
    listener.sock.close()
    listener.path.unlink(missing_ok=True)
