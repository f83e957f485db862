"""The test guest as a libvirt domain: its definition, its probe running a workload on its
disk ``vda``, its console a unix socket logged to a file.

The console's paths are in libvirt's own folders (``/var/lib/libvirt``,
``/var/log/libvirt``), which are each host's own: the definition needs no rewriting when
the domain moves, and a reader finds the console where the domain runs
(:mod:`devagent.lab.libvirt_guest` reads it in a lab).
"""

from __future__ import annotations

from pathlib import Path

from devagent.guest.build import load_guest
from devagent.guest.workload import Workload


def console(name: str) -> str:
    """Domain ``name``'s console socket, as its host's libvirt sees it."""
    return f"/var/lib/libvirt/{name}-console.sock"


def console_log(name: str) -> str:
    return f"/var/log/libvirt/{name}-console.log"


def file_disk(image: Path) -> str:
    """A raw file disk vda."""
    return (
        "<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>"
        f"<source file='{image}'/><target dev='vda' bus='virtio'/></disk>"
    )


def nbd_disk(export: str, socket: str) -> str:
    """Disk vda reached on an agent's unix socket."""
    return (
        "<disk type='network' device='disk'><driver name='qemu' type='raw' cache='none'/>"
        f"<source protocol='nbd' name='{export}'><host transport='unix' socket='{socket}'/>"
        "</source><target dev='vda' bus='virtio'/></disk>"
    )


def probe_guest_domain(name: str, disk: str, workload: Workload, ram_mb: int = 128) -> str:
    """The test guest as domain ``name`` with ``disk`` (:func:`file_disk`,
    :func:`nbd_disk`), its probe running ``workload``. Its RAM is whole MiB (libvirt rounds
    it so): under TCG on QEMU before 9.0 its RAM migration can lose stores
    (:data:`devagent.qemu.config.TCG_RAM_EXTRA_KB`), most in the guest's first seconds."""
    guest = load_guest()
    return f"""<domain type='qemu'>
  <name>{name}</name><memory unit='MiB'>{ram_mb}</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{guest.kernel}</kernel><initrd>{guest.initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 {workload.to_kernel_arg()}</cmdline></os>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_crash>destroy</on_crash>
  <devices>
    {disk}
    <serial type='unix'><source mode='bind' path='{console(name)}'/>
      <log file='{console_log(name)}' append='on'/><target port='0'/></serial>
  </devices>
</domain>"""
