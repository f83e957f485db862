"""devagentd: the host daemon. One per host; it starts, watches and migrates the VMs of its
host and supervises their device agents, behind an HTTP JSON API that requires a bearer
token.

* :mod:`.main`: the process (arguments, serve, the supervision loop);
* :mod:`.api`: the HTTP routes, thin adapters over the modules below (the migration's
  routes are :mod:`.migration.routes`);
* :mod:`.host`: the host as the daemon knows it (name, address, folders, VMs, exports);
* :mod:`.vms`: the VMs (request, QEMU configuration, the managed VM, device exchange, the
  destination's incoming VM, the manager);
* :mod:`.migration`: live migration, source and destination;
* :mod:`.supervised`, :mod:`.agents`, :mod:`.nics`: the agent processes (a disk's, a NIC's)
  and their control sockets;
* :mod:`.exports`: disks served to other hosts (remote device access);
* :mod:`.netstat`: the link's byte counters.
"""
