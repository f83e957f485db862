"""devagentd: the host daemon. One per host; it starts, watches and migrates the VMs of its
host and supervises their device agents, behind an HTTP JSON API that requires a bearer
token."""
