"""devagent: device agents that keep a VM's I/O going through live migration.

Each QEMU VM's devices are served by an agent (an NBD server for disks, a frame
forwarder for NICs) that owns the device's I/O transactions and state, so that a
VM can move between hosts that share no storage without a failed or lost request.

Where things are (each package's own docstring says more):

* A guest's disk request: QEMU's NBD client → :mod:`devagent.agent.nbd_server` (the NBD
  protocol itself is :mod:`devagent.nbd`, pure codecs) → the agent's journal
  (:mod:`.agent.journal`; held by :mod:`.agent.hold` during a quiesce) → its backend
  (:mod:`.agent.backend` ``Local``, :mod:`.agent.remote` ``Remote``, :mod:`.agent.fetch`
  ``Fetch``, :mod:`.agent.mirror` ``Mirrored``) → the reply.
* A guest's frame: QEMU's ``stream`` netdev → :mod:`devagent.net.agent` (framing
  :mod:`.net.codec`, connections :mod:`.net.link`) → its uplink (:mod:`.net.uplink`, a tap)
  or, after a migration, the peer agent.
* The host daemon: :mod:`devagent.daemon` (its API :mod:`.daemon.api`, the VMs
  :mod:`.daemon.vms`, the agents' processes :mod:`.daemon.supervised`).
* A migration, step by step: :mod:`devagent.daemon.migration` (the job :mod:`.job`, one
  plan per strategy :mod:`.plans` and :mod:`.qemu_plans`, the destination's half
  :mod:`.destination`).
* The words every layer shares (sizes, rates, addresses, strategies, step names):
  :mod:`devagent.vocab`; typed messages at the JSON edge: :mod:`devagent.wire`; waiting with
  a deadline: :mod:`devagent.wait`; processes: :mod:`devagent.process`; errors:
  :mod:`devagent.errors`.
* The CLI :mod:`devagent.cli` (talks to daemons only, through :mod:`devagent.client` and
  :mod:`devagent.orchestrate`), the lab of namespace hosts :mod:`devagent.lab`, the test
  guest :mod:`devagent.guest`, the benchmarks :mod:`devagent.migbench`.
"""

__version__ = "0.1.0"
