"""Removing a lab whatever is left of it: its processes, its namespaces, veths and bridge,
then its folder. Idempotent, and it trusts the state file only as a hint: it also sweeps by
name (``da-L-*``, ``dav-L-*``, ``dab-L``) and by process (see :mod:`devagent.lab.procs`),
so it works on a half-made lab or a missing state file.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from devagent.errors import StateError
from devagent.lab import net, procs
from devagent.lab.layout import (
    BRIDGE_PREFIX,
    NAME_RE,
    NETNS_PREFIX,
    VETH_PREFIX,
    LabHost,
    bridge_name,
    lab_names,
    present_objects,
)

log = logging.getLogger("devagent.lab.lab")


def destroy(name: str, labdir: Path, hosts: Sequence[LabHost]) -> bool:
    """Remove lab ``name`` (folder ``labdir``, ``hosts`` as far as they are known): kill its
    processes (daemons, the sessions they lead, everything in its namespaces or working under
    its folder), delete its namespaces, veths and bridge, then its folder. Returns whether
    anything was found. Raises :class:`StateError` naming what could not be removed."""
    namespaces, links = _network_objects(name, hosts)
    found = bool(namespaces or links or labdir.exists())
    problems: list[str] = []
    if _stop_processes(name, labdir, hosts, namespaces, problems):
        found = True
    if namespaces or links:
        _delete_network(name, namespaces, links, problems)
    if labdir.exists():
        try:
            shutil.rmtree(labdir)
        except OSError as err:
            problems.append(f"folder {labdir} not removed: {err}")
    if problems:
        raise StateError(f"teardown of lab {name!r} incomplete: " + "; ".join(problems))
    if found:
        log.info("lab %s removed", name)
    return found


def _network_objects(name: str, hosts: Sequence[LabHost]) -> tuple[set[str], set[str]]:
    """The lab's namespaces and links present now: by name, and the hosts' recorded ones."""
    if shutil.which("ip") is None:
        return set(), set()
    namespaces, links = present_objects(name)
    present_ns = set(net.netns_names())
    namespaces |= {h.netns for h in hosts if h.netns and h.netns in present_ns}
    return namespaces, links


def _stop_processes(
    name: str, labdir: Path, hosts: Sequence[LabHost], namespaces: set[str], problems: list[str]
) -> bool:
    """Terminate every process of the lab; whether there was any. Adds to ``problems``."""
    found = False
    daemons = [h.pid for h in hosts if h.pid]
    for grace in (5.0, 1.0):  # a second sweep for anything started during the first
        victims = procs.session_of(daemons, labdir) | procs.under_path(labdir)
        for ns in namespaces:
            victims |= net.netns_pids(ns)
        if not victims:
            break
        found = True
        _log_victims(name, victims)
        stuck = procs.terminate(victims, grace_s=grace)
        if stuck:
            problems.append(f"processes that would not die: {sorted(stuck)}")
            break
    return found


def _delete_network(name: str, namespaces: set[str], links: set[str], problems: list[str]) -> None:
    """Delete the namespaces, then the links (the bridge last). Adds to ``problems``."""
    if os.geteuid() != 0:
        problems.append(
            f"namespaces/links {sorted(namespaces | links)} remain: deleting them needs root"
        )
        return
    bridge = bridge_name(name)
    for ns in sorted(namespaces):
        net.run(["ip", "netns", "del", ns], check=False)
    # Deleting a namespace destroys its veth pairs; the bridge goes last.
    for link in sorted(links, key=lambda n: n == bridge):
        net.run(["ip", "link", "del", link], check=False)
    left = [ns for ns in net.netns_names() if ns in namespaces]
    left += [link for link in net.link_names() if link in links]
    if left:
        problems.append(f"network objects not deleted: {left}")


def _log_victims(name: str, pids: set[int]) -> None:
    for pid in sorted(pids):
        log.debug("lab %s: stopping pid %d: %s", name, pid, " ".join(procs.cmdline(pid)))


def leftover_names(name_prefix: str = "") -> list[str]:
    """Every lab found by state folder or by the ``da-``/``dab-``/``dav-`` name prefixes
    whose name starts with ``name_prefix``."""
    names = set(lab_names())
    if shutil.which("ip") is not None:
        for ns in net.netns_names():
            if ns.startswith(NETNS_PREFIX):
                names.add(ns[len(NETNS_PREFIX) :].split("-", 1)[0])
        for link in net.link_names():
            if link.startswith(BRIDGE_PREFIX):
                names.add(link[len(BRIDGE_PREFIX) :])
            elif link.startswith(VETH_PREFIX):
                names.add(link[len(VETH_PREFIX) :].split("-", 1)[0])
    return sorted(n for n in names if NAME_RE.match(n) and n.startswith(name_prefix))
