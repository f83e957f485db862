"""QEMU driven over QMP: a VM's configuration and its lifecycle object."""
