"""The exception root of devagent.

    DevagentError                 anything devagent raises on purpose
    ├── UsageError                our caller asked for something wrong (bad name, bad size)
    ├── NotFound                  a VM, host, lab or file that is not there
    ├── StateError                an operation not allowed in the object's current state
    ├── Forbidden                 the caller's certificate does not allow what it asked
    ├── PeerError                 a peer (daemon, agent, QEMU) answered badly or vanished
    │   └── ProtocolError         a peer sent bytes that break its protocol
    └── EnvironmentProblem        this machine lacks something (package, root, /dev/net/tun)

Layers translate foreign errors into these at their boundary (``raise X(...) from err``);
``asyncio.CancelledError`` is never wrapped.
"""

from __future__ import annotations


class DevagentError(Exception):
    """Base of every error devagent raises on purpose."""


class UsageError(DevagentError):
    """The caller asked for something that cannot be done as asked."""


class NotFound(DevagentError):
    """A named VM, host, lab, device or file does not exist."""


class StateError(DevagentError):
    """An operation was asked of an object in a state that does not allow it."""


class Forbidden(DevagentError):
    """The caller's certificate does not allow what it asked (an operator's route called
    by a host, a peer route by another host than the one the request concerns)."""


class PeerError(DevagentError):
    """A peer (another daemon, an agent, QEMU) failed, vanished or answered badly."""


class ProtocolError(PeerError):
    """A peer sent bytes that violate the protocol spoken with it."""


class EnvironmentProblem(DevagentError):
    """This machine lacks something devagent needs (a package, root, a device node)."""
