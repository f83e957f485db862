"""The block device agent: one process per VM disk, between QEMU's NBD client and the disk.

A request's way: :mod:`.nbd_server` (connections, the NBD protocol through
:mod:`devagent.nbd.server_codec`) → :mod:`.journal` (every request from arrival to reply;
:mod:`.hold` holds new ones while those in flight drain) → the agent's backend, swappable
under the guest:

* :mod:`.backend`: the ``Backend`` interface and ``Local`` (a file or block device here);
* :mod:`.remote`: ``Remote`` (the device on another host, through that host's agent);
* :mod:`.fetch`: ``Fetch`` (a local replica filled on demand and in the background; its
  bitmap :mod:`.presence`, its chunk locks and pacing :mod:`.chunks`);
* :mod:`.mirror`: ``Mirrored`` (the device pushed to another backend while served; its
  states :mod:`.mirror_states`; the control API's job around it :mod:`.mirror_job`).

The agent itself: :mod:`.agent` (``BlockAgent``: its state table, one method per control
request), :mod:`.control` (the control API on a unix socket, thin over the agent),
:mod:`.messages` (every control message as a type), :mod:`.spec` (backend specs: check,
open), :mod:`.duties` (background work a spec asks for), :mod:`.defaults`,
:mod:`.lifecycle` (the state-table guard), :mod:`.state` (device state hand-over),
:mod:`.serve` (the process), :mod:`.bench` (against qemu-nbd).
"""
