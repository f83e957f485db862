"""NBD over TLS on an agent's TCP export, with real clients: libnbd's nbdinfo, QEMU's
qemu-img and qemu-io, our own client; and the agent's Remote backend against qemu-nbd with
TLS. Each refusal is checked to leave the disk as it was while another client is served."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devagent.agent.agent import BlockAgent
from devagent.agent.backend import Local
from devagent.agent.bench import run_bench
from devagent.agent.remote import Remote
from devagent.errors import PeerError
from devagent.nbd.client import NbdClient
from devagent.nbd.proto import NbdProtocolError
from devagent.process import wait_exit
from devagent.tls import Tls, use_tls
from test_nbd_clients import MiB, make_sparse, run
from test_remote import free_port
from tls_helpers import Certs, make_pki

SIZE = 8 << 20


@dataclass
class Served:
    agent: BlockAgent
    image: Path
    port: int
    certs: Certs

    def uri(self, who: str) -> str:
        """nbdinfo's URI, with host ``who``'s certificates."""
        return f"nbds://127.0.0.1:{self.port}/disk?tls-certificates={self.certs.dir(who)}"

    def qemu(self, who: str) -> list[str]:
        """qemu-img's and qemu-io's --object and --image-opts, as host ``who``."""
        return [
            "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={self.certs.dir(who)}",
            "--image-opts",
            f"driver=nbd,host=127.0.0.1,port={self.port},export=disk,tls-creds=tls0",
        ]  # fmt: skip


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """Host a's agent serving a disk on TCP, TLS required, admitting hosts a and b."""
    certs = make_pki(tmp_path)
    image = tmp_path / "disk.img"
    make_sparse(image, SIZE, {0: b"\x11" * MiB})
    agent = BlockAgent(Local(image), "disk")
    tls = Tls(certs.dir("a"), peers=("a", "b"))
    _, port = await agent.listen_tcp("127.0.0.1", 0, tls=tls)
    try:
        yield Served(agent, image, port, certs)
    finally:
        use_tls(None)
        await agent.stop()


async def test_the_unix_socket_for_the_vms_own_qemu_is_plaintext_and_roots_alone(
    served: Served, tmp_path: Path
) -> None:
    sock = tmp_path / "agent.sock"
    await served.agent.listen_unix(sock)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    out = await run("nbdinfo", "--size", f"nbd+unix:///disk?socket={sock}")
    assert out.strip() == str(SIZE)


async def test_nbdinfo_with_tls_certificates_reads_the_export(served: Served) -> None:
    out = await run("nbdinfo", served.uri("b"))
    assert "with TLS" in out and f"export-size: {SIZE}" in out


async def test_qemu_io_writes_and_qemu_img_reads_back_through_tls(served: Served) -> None:
    await run("qemu-io", *served.qemu("b"), "-c", "write -P 0xab 1M 256k")
    out = await run("qemu-io", *served.qemu("b"), "-c", "read -P 0xab 1M 256k")
    assert "read 262144/262144 bytes" in out
    info = await run("qemu-img", "info", *served.qemu("b"))
    assert "virtual size: 8 MiB" in info
    with served.image.open("rb") as disk:
        disk.seek(MiB)
        assert disk.read(256 << 10) == b"\xab" * (256 << 10)


async def test_our_client_turns_to_tls_and_checks_the_servers_name(served: Served) -> None:
    tls = served.certs.host("b")
    async with await NbdClient.connect(
        host="127.0.0.1", port=served.port, export="disk", tls=tls.client, server_name="a"
    ) as client:
        assert await client.read(0, 4096) == b"\x11" * 4096
    with pytest.raises(PeerError, match="TLS with NBD server c failed"):
        await NbdClient.connect(
            host="127.0.0.1", port=served.port, export="disk", tls=tls.client, server_name="c"
        )


@pytest.mark.parametrize(
    ("who", "logged"),
    [
        ("stranger", "certificate verify failed"),  # another CA's certificate
        ("late", "certificate has expired"),
        ("c", "host c is not among this one's peers (a, b)"),  # not a peer of this agent
    ],
)
async def test_a_client_the_agent_does_not_admit_is_refused_and_changes_nothing(
    served: Served, who: str, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The client trusts the agent (it has the CA) but presents a certificate the agent
    must refuse; QEMU's client, too, says why it cannot go on."""
    before = served.image.read_bytes()
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=str(served.certs.dir("a") / "ca-cert.pem"))
    client.load_cert_chain(
        str(served.certs.dir(who) / "client-cert.pem"),
        str(served.certs.dir(who) / "client-key.pem"),
    )
    with pytest.raises((PeerError, NbdProtocolError)):
        async with await NbdClient.connect(
            host="127.0.0.1", port=served.port, export="disk", tls=client, server_name="a"
        ) as nbd:
            await nbd.write(0, b"\xee" * 65536)
    assert logged in caplog.text
    out = await run("qemu-io", *served.qemu(who), "-c", "write -P 0xee 0 64k", check=False)
    assert "wrote" not in out and "qemu-io:" in out, out
    assert served.image.read_bytes() == before
    assert "export-size" in await run("nbdinfo", served.uri("b"))  # others still served


async def test_a_plaintext_client_is_told_tls_is_required(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    before = served.image.read_bytes()
    out = await run("qemu-io", "-f", "raw", f"nbd://127.0.0.1:{served.port}/disk",
                    "-c", "write -P 0xee 0 64k", check=False)  # fmt: skip
    assert "TLS is required: send NBD_OPT_STARTTLS first" in out, out
    with pytest.raises(NbdProtocolError, match="ERR_TLS_REQD"):
        await NbdClient.connect(host="127.0.0.1", port=served.port, export="disk")
    nbdinfo = await run("nbdinfo", f"nbd://127.0.0.1:{served.port}/disk", check=False)
    assert "export-size" not in nbdinfo
    assert "TLS is required" in caplog.text
    assert served.image.read_bytes() == before
    assert "export-size" in await run("nbdinfo", served.uri("b"))


async def test_remote_backend_against_qemu_nbd_with_tls(tmp_path: Path) -> None:
    """The agent's Remote, with host b's certificate, against qemu-nbd serving as host a
    (x509, verifying b's certificate)."""
    certs = make_pki(tmp_path)
    image = tmp_path / "q.img"
    make_sparse(image, SIZE, {2 * MiB: b"\x33" * MiB})
    pid_file = tmp_path / "q.pid"
    port = free_port()
    parent = await asyncio.create_subprocess_exec(
        "qemu-nbd", "-f", "raw", "-x", "q", "-b", "127.0.0.1", "-p", str(port), "-t", "--fork",
        "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={certs.dir('a')},verify-peer=on",
        "--tls-creds", "tls0", f"--pid-file={pid_file}", str(image),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(parent.communicate(), 30)
    assert parent.returncode == 0, err
    server = int(pid_file.read_text())
    use_tls(certs.host("b"))
    try:
        remote = await Remote.open(f"tcp:127.0.0.1:{port}", "q", host="a")
        try:
            assert remote.size == SIZE
            assert await remote.read(2 * MiB, 4096) == b"\x33" * 4096
            await remote.write(0, b"\x44" * 65536, fua=True)
            assert await remote.read(0, 65536) == b"\x44" * 65536
        finally:
            await remote.close()
        with pytest.raises(PeerError, match=r"certificate|hostname"):
            await Remote.open(f"tcp:127.0.0.1:{port}", "q", host="c", connect_timeout=5)
    finally:
        use_tls(None)
        os.kill(server, signal.SIGTERM)
        await wait_exit(server, 30, "qemu-nbd")
    with image.open("rb") as disk:
        assert disk.read(65536) == b"\x44" * 65536


@pytest.mark.parametrize("tls", [True, False], ids=["tcp+tls", "unix"])
def test_the_agent_bench_drives_both_servers(tmp_path: Path, tls: bool) -> None:
    """``devagent bench agent [--tls]``, tiny: both servers answer every workload (the
    figures themselves are the benchmark's, in docs/BENCHMARKS.md)."""
    report = run_bench(
        size=16 << 20, count_small=400, count_large=16, rounds=1, workdir=tmp_path, tls=tls
    )
    assert report["transport"] == ("tcp+tls" if tls else "unix")
    assert report["client"].startswith("nbdcopy" if tls else "qemu-img bench")
    small = "seq" if tls else "rand"
    rows = report["results"]
    assert [r["name"] for r in rows] == [
        f"{small}read-4k-qd16", f"{small}write-4k-qd16", "seqread-1m-qd16", "seqwrite-1m-qd16",
    ]  # fmt: skip
    assert all(r["agent"] > 0 and r["qemu_nbd"] > 0 for r in rows), rows
