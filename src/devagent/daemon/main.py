"""Entry point of ``devagentd``: parse the command line, build the app, serve until signalled."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from devagent.daemon.api import build_app
from devagent.daemon.host import Host
from devagent.daemon.libvirt_domains import adopt_domains, supervise_domains
from devagent.daemon.standby import StandbyPool, use_pool
from devagent.errors import DevagentError
from devagent.guestnet import GuestNetwork
from devagent.libvirt_link import LibvirtLink
from devagent.tls import Tls, use_tls


def _libvirt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--libvirt",
        metavar="URI",
        help="this host's libvirtd (e.g. qemu:///system): the daemon follows its domains' "
        "events, and serves and moves the disks of the domains it adopts",
    )
    parser.add_argument(
        "--libvirt-peer-uri",
        metavar="TEMPLATE",
        help="how this host's libvirtd reaches a peer's for a migration, {address} the "
        "peer's (default: qemu+tls://{address}/system; qemu+tcp:// with --insecure)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="devagentd",
        description="devagent host daemon: runs the VMs of one host and their device agents.",
    )
    parser.add_argument("--host-name", required=True, help="this host's name in the lab (a, b, …)")
    parser.add_argument(
        "--listen", required=True, metavar="ADDR:PORT", help="address and port of the HTTP API"
    )
    parser.add_argument("--dir", required=True, type=Path, help="this host's state folder")
    parser.add_argument(
        "--token-file", required=True, type=Path, help="file holding the API bearer token"
    )
    security = parser.add_mutually_exclusive_group(required=True)
    security.add_argument(
        "--tls-dir",
        type=Path,
        help="this host's certificate folder ('devagent pki issue HOST'): HTTPS with client "
        "certificates, NBD with STARTTLS, TLS on every link; SIGHUP reads it again",
    )
    security.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP and NBD, the token the only guard: for a closed lab only",
    )
    parser.add_argument(
        "--tls-peer",
        dest="tls_peers",
        action="append",
        default=[],
        metavar="HOST",
        help="with --tls-dir: the hosts whose certificates this host's agents admit on NBD "
        "(repeat; default: any host of the CA)",
    )
    parser.add_argument(
        "--shared-dir",
        type=Path,
        default=None,
        help="folder every host of the lab sees (for the 'shared' storage baseline)",
    )
    _libvirt_arguments(parser)
    parser.add_argument(
        "--guest-bridge", help="bridge of this host that VM NICs' taps join (NICs need it)"
    )
    parser.add_argument(
        "--guest-addresses",
        metavar="FIRST-LAST/PREFIX",
        help="addresses this host gives its VMs' NICs (with --guest-bridge)",
    )
    args = parser.parse_args(argv)
    if (args.guest_bridge is None) != (args.guest_addresses is None):
        parser.error("--guest-bridge and --guest-addresses go together")
    return args


async def serve(args: argparse.Namespace) -> None:
    addr, _, port = args.listen.rpartition(":")
    token = args.token_file.read_text().strip()
    network = None
    if args.guest_bridge is not None:
        network = GuestNetwork.parse(args.guest_bridge, args.guest_addresses)
    log = logging.getLogger("devagentd")
    tls = None
    if args.insecure:
        log.warning("--insecure: plain HTTP and NBD; anyone on the network can read the disks")
    else:
        tls = Tls(args.tls_dir, args.tls_peers)
        use_tls(tls)  # this daemon's calls to its peers carry its host certificate
    host = Host(
        name=args.host_name,
        address=addr,
        port=int(port),
        root=args.dir,
        shared_dir=args.shared_dir,
        network=network,
        tls=tls,
        libvirt=LibvirtLink(args.libvirt, args.host_name) if args.libvirt else None,
        libvirt_peer_uri=args.libvirt_peer_uri
        or f"qemu+{'tcp' if args.insecure else 'tls'}://{{address}}/system",
    )
    if host.libvirt is not None:
        try:
            await host.libvirt.open()
        except DevagentError as err:  # opened again at its first use
            log.warning("libvirt not reachable yet: %s", err)
    (host.root / "logs").mkdir(parents=True, exist_ok=True)
    pool = StandbyPool(host.root / "logs" / "standby.log")
    use_pool(pool)
    pool.fill()  # agents started ahead: a new agent is up sooner
    await host.vms.warm_up()
    await host.exports.adopt_all()
    await host.vms.adopt_all(kept=host.exports.kept_disks())
    host.adopted.update(await adopt_domains(host.root))
    app = build_app(host, token)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ssl = tls.server if tls is not None else None
    site = web.TCPSite(runner, addr, int(port), reuse_address=True, ssl_context=ssl)
    await site.start()
    scheme = "https" if tls is not None else "http"
    log.info("host %s listening on %s://%s", args.host_name, scheme, args.listen)
    stop = asyncio.Event()
    supervisor = asyncio.create_task(supervise(host, stop), name="supervisor")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_certificates, host)
    await stop.wait()
    await supervisor
    await runner.cleanup()
    await pool.close()


def reload_certificates(host: Host) -> None:
    """SIGHUP: read the host's certificates again, for the API and its agents' next
    connections; running VMs and open connections are not touched."""
    log = logging.getLogger("devagentd")
    if host.tls is None:
        log.info("SIGHUP: --insecure, no certificates to read")
        return
    try:
        host.tls.reload()
    except DevagentError as err:
        log.error("SIGHUP: kept the certificates loaded before: %s", err)
        return
    for pid in host.agent_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGHUP)


SUPERVISE_EVERY_S = 0.25


async def supervise(host: Host, stop: asyncio.Event) -> None:
    """Restart the agents that die, a pass every :data:`SUPERVISE_EVERY_S`, until ``stop``
    is set (a timer, not a wait for a condition: it has no deadline)."""
    log = logging.getLogger("devagentd.supervisor")
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SUPERVISE_EVERY_S)
            return
        try:
            await host.exports.supervise_once()
            await host.vms.supervise_once()
            await supervise_domains(host.adopted)
        except Exception:
            log.exception("supervision pass failed")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s devagentd[{args.host_name}] %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(serve(args))
