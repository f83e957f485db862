"""devagent: device agents that keep a VM's I/O going through live migration.

Each QEMU VM's devices are served by an agent (an NBD server for disks, a frame
forwarder for NICs) that owns the device's I/O transactions and state, so that a
VM can move between hosts that share no storage without a failed or lost request.
"""

__version__ = "0.1.0"
