"""The daemon's API over mutual TLS, with real certificates and a real HTTPS server: who is
refused, with what error, and that nothing changed and others are still served."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from devagent.client import DaemonClient, Endpoint
from devagent.daemon.api import build_app
from devagent.daemon.host import Host
from devagent.daemon.main import parse_args
from devagent.errors import EnvironmentProblem, Forbidden, PeerError, StateError
from devagent.tls import Tls, use_tls
from tls_helpers import Certs, make_pki

TOKEN = "s3cret"


@dataclass
class Served:
    host: Host
    url: str
    certs: Certs

    async def call(
        self, tls: Tls | None, method: str, path: str, body: Any = None, name: str = "a"
    ) -> Any:
        """``method path`` with ``tls``'s certificate (None: none), expecting host ``name``."""
        use_tls(tls)
        endpoint = Endpoint(url=self.url, token=TOKEN, name=name)
        async with DaemonClient(endpoint, timeout=10) as client:
            if method == "GET":
                return await client.get(path)
            if method == "DELETE":
                return await client.delete(path)
            return await client.post(path, body)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """Host a's daemon API on HTTPS with a's certificate."""
    certs = make_pki(tmp_path)
    host = Host(name="a", address="127.0.0.1", port=0, root=tmp_path / "a", tls=certs.host("a"))
    assert host.tls is not None
    runner = web.AppRunner(build_app(host, TOKEN))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=host.tls.server)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Served(host, f"https://127.0.0.1:{port}", certs)
    finally:
        use_tls(None)
        await runner.cleanup()


async def still_serves(served: Served) -> None:
    """The operator is still served, and no VM was made."""
    assert await served.call(served.certs.operator(), "GET", "/v1/vms") == {"vms": []}


async def test_the_operator_is_served_and_the_host_answers_as_itself(served: Served) -> None:
    health = await served.call(served.certs.operator(), "GET", "/v1/health")
    assert health["host"] == "a"


@pytest.mark.parametrize("who", ["none", "another CA", "expired"])
async def test_a_caller_without_a_valid_certificate_is_refused_at_the_handshake(
    served: Served, who: str
) -> None:
    tls = {"none": None, "another CA": served.certs.stranger(), "expired": served.certs.expired()}
    if tls[who] is None:
        use_tls(None)
        with pytest.raises(Exception, match="no certificate"):
            await served.call(None, "GET", "/v1/vms")
        # Even a client that does without a certificate of its own gets nothing.
        context = ssl.create_default_context(cafile=str(served.certs.host("a").ca))
        context.check_hostname = False
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(
                    f"{served.url}/v1/vms",
                    ssl=context,
                    headers={"Authorization": f"Bearer {TOKEN}"},
                ) as resp:
                    await resp.read()
    else:
        with pytest.raises(PeerError, match="unreachable"):
            await served.call(tls[who], "POST", "/v1/vms", {"name": "x", "disk_size": "8M"})
    await still_serves(served)


async def test_a_host_may_not_call_an_operators_route(served: Served) -> None:
    with pytest.raises(Forbidden, match="needs an operator's certificate, not host b's"):
        await served.call(served.certs.host("b"), "POST", "/v1/vms", {"name": "x"})
    assert (await served.call(served.certs.host("b"), "GET", "/v1/vms")) == {"vms": []}
    await still_serves(served)


async def test_a_peer_route_is_for_the_host_the_request_names(served: Served) -> None:
    incoming = {"request": {"name": "v"}, "config": {"name": "v"}, "disks": [], "source": "c"}
    with pytest.raises(Forbidden, match="concerns host c, and the caller is host b"):
        await served.call(served.certs.host("b"), "POST", "/v1/incoming", incoming)
    with pytest.raises(Forbidden, match="peer route: only a host's certificate"):
        await served.call(served.certs.operator(), "POST", "/v1/incoming", incoming)
    await still_serves(served)


async def test_a_vms_commit_and_abort_are_its_source_hosts_alone(served: Served) -> None:
    """VM v came from host b: host c may neither commit nor abort it, nor start receivers
    for a push to it."""

    class Arriving:
        name, source_host = "v", "b"

    served.host.vms.vms["v"] = Arriving()  # type: ignore[assignment]
    c = served.certs.host("c")
    with pytest.raises(
        Forbidden, match="committing VM v concerns host b, and the caller is host c"
    ):
        await served.call(c, "POST", "/v1/incoming/v/commit", {})
    with pytest.raises(Forbidden, match="rolling back VM v concerns host b"):
        await served.call(c, "DELETE", "/v1/incoming/v")
    with pytest.raises(Forbidden, match="pushing to VM v concerns host b"):
        await served.call(c, "POST", "/v1/incoming/v/receivers", {"nodes": ["disk0"]})
    with pytest.raises(Forbidden, match="settling VM v's disk concerns host b"):
        await served.call(c, "POST", "/v1/vms/v/devices/disk0/settle")
    with pytest.raises(Forbidden, match="waiting for VM v's start: no source host is named"):
        await served.call(c, "POST", "/v1/incoming/v/listening")  # (no start of it here)
    assert "v" in served.host.vms.vms


async def test_a_daemon_presenting_another_hosts_certificate_is_not_trusted(
    served: Served,
) -> None:
    """The caller expects host b at that address; host a's certificate answers."""
    with pytest.raises(PeerError, match=r"certificate|hostname"):
        await served.call(served.certs.operator(), "GET", "/v1/health", name="b")
    await still_serves(served)


def test_the_daemon_wants_certificates_or_an_explicit_insecure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["--host-name", "a", "--listen", "127.0.0.1:1", "--dir", "/x", "--token-file", "/t"]
    with pytest.raises(SystemExit):
        parse_args(base)
    assert "one of the arguments --tls-dir --insecure is required" in capsys.readouterr().err
    assert parse_args([*base, "--insecure"]).insecure
    assert parse_args([*base, "--tls-dir", "/p", "--tls-peer", "b"]).tls_peers == ["b"]


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        ({"config": {"name": "v", "extra_args": ["-drive", "file=/etc/shadow"]}},
         "a peer may not give QEMU options: -drive file=/etc/shadow"),
        ({"disks": [{"node": "disk0", "image": "/etc/passwd"}]},
         "/etc/passwd: a shared disk must be in this host's shared folder"),
    ],
)  # fmt: skip
async def test_a_source_host_may_not_choose_qemu_options_or_files_here(
    served: Served, change: dict[str, Any], refused: str
) -> None:
    incoming = {"request": {"name": "v"}, "config": {"name": "v"}, "disks": [], "source": "b"}
    with pytest.raises(Forbidden, match=re.escape(refused)):
        await served.call(served.certs.host("b"), "POST", "/v1/incoming", incoming | change)
    await still_serves(served)


async def test_a_host_not_among_the_daemons_peers_is_refused(tmp_path: Path) -> None:
    certs = make_pki(tmp_path)
    host = Host(name="a", address="127.0.0.1", port=0, root=tmp_path / "a",
                tls=Tls(certs.dir("a"), peers=("a", "b")))  # fmt: skip
    assert host.tls is not None
    runner = web.AppRunner(build_app(host, TOKEN))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=host.tls.server)
    await site.start()
    served = Served(host, f"https://127.0.0.1:{runner.addresses[0][1]}", certs)
    try:
        with pytest.raises(Forbidden, match="host c is not among this host's peers"):
            await served.call(certs.host("c"), "GET", "/v1/vms")
        assert await served.call(certs.host("b"), "GET", "/v1/vms") == {"vms": []}
    finally:
        use_tls(None)
        await runner.cleanup()


async def test_a_tls_process_never_sends_its_token_over_plain_http(served: Served) -> None:
    use_tls(served.certs.operator())
    plain = Endpoint(url=served.url.replace("https://", "http://"), token=TOKEN, name="a")
    with pytest.raises(StateError, match="its token would cross the network in clear"):
        async with DaemonClient(plain) as client:
            await client.get("/v1/health")


def test_a_reload_of_files_that_do_not_fit_keeps_the_certificate_loaded(
    tmp_path: Path,
) -> None:
    certs = make_pki(tmp_path)
    tls = certs.host("a")
    folder = certs.dir("a")
    (folder / "server-key.pem").write_bytes((certs.dir("b") / "server-key.pem").read_bytes())
    with pytest.raises(EnvironmentProblem, match="cannot load the certificates"):
        tls.reload()
    # the live context still holds a's matching pair: a handshake works
    client = certs.host("b").client
    server_side, client_side = socket.socketpair()
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(
            tls.server.wrap_socket(server_side, server_side=True, do_handshake_on_connect=False)
        )
        peer = stack.enter_context(
            client.wrap_socket(client_side, server_hostname="a", do_handshake_on_connect=False)
        )
        done = threading.Thread(target=server.do_handshake)
        done.start()
        peer.do_handshake()
        done.join(10)
        assert peer.getpeercert() is not None
