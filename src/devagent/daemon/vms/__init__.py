"""The VMs a daemon runs, one module per concern:

- :mod:`.request`: what a user asks (``VmRequest`` and the other bodies), decoded once;
- :mod:`.config`: how a request becomes a QEMU configuration (``build_config``);
- :mod:`.managed`: a VM as the daemon keeps it (``ManagedVm``: console, heartbeats, probe
  commands, role, status, record);
- :mod:`.exchange`: device dynamic exchange under a running VM;
- :mod:`.incoming`: the migration's destination half (and a disk coming home);
- :mod:`.arrival`: what follows a commit's mark (the guest run here, its NICs released, a
  fetched replica watched until Local), on a commit and after a daemon restart;
- :mod:`.manager`: every VM of the host (``VmManager``: start, remove, adoption,
  supervision).
"""

from devagent.vocab import parse_size

from .config import GuestBoot, TestGuest, build_config, disk_spec, image_digest, image_format
from .managed import ManagedVm, RoleEvent, VmRole
from .manager import VmManager
from .request import NAME_RE, DiskRequest, Storage, VmRequest, VmRequestBody

__all__ = [
    "NAME_RE",
    "DiskRequest",
    "GuestBoot",
    "ManagedVm",
    "RoleEvent",
    "Storage",
    "TestGuest",
    "VmManager",
    "VmRequest",
    "VmRequestBody",
    "VmRole",
    "build_config",
    "disk_spec",
    "image_digest",
    "image_format",
    "parse_size",
]
