"""QEMU's TLS objects as devagent makes them, on a real QEMU: a host folder's
``dh-params.pem`` is one QEMU loads, and a folder without it is named in the log once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient, QMPError

from devagent.daemon.migration import qemu_tls
from devagent.errors import PeerError
from devagent.tls import DH_PARAMS
from tls_helpers import Certs, make_pki


class BareQemu:
    """A QEMU with no machine, for its QOM objects only."""

    def __init__(self, client: QMPClient) -> None:
        self.client = client

    async def qmp(self, command: str, **arguments: Any) -> Any:
        try:
            return await self.client.execute(command, arguments or None)
        except QMPError as err:
            raise PeerError(f"QMP {command} failed: {err}") from err

    async def objects(self) -> set[str]:
        return {o["name"] for o in await self.qmp("qom-list", path="/objects")}


@pytest.fixture
async def qemu(tmp_path: Path) -> AsyncIterator[BareQemu]:
    sock = tmp_path / "qmp.sock"
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
        "-qmp", f"unix:{sock},server=on,wait=off",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    client = QMPClient("bare")
    try:
        for _ in range(200):
            if sock.exists():
                break
            await asyncio.sleep(0.02)
        await client.connect(str(sock))
        yield BareQemu(client)
    finally:
        await client.disconnect()
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    qemu_tls._warned.clear()
    return make_pki(tmp_path)


async def test_qemu_loads_the_hosts_dh_group_as_a_server(
    qemu: BareQemu, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    tls = certs.host("b")
    assert (tls.folder / DH_PARAMS).exists()
    with caplog.at_level(logging.WARNING, logger=qemu_tls.__name__):
        args = await qemu_tls.add_creds(qemu, tls, "server", peer="a")
    assert args == {"tls-creds": qemu_tls.SERVER_CREDS, "tls-authz": f"{qemu_tls.AUTHZ}-a"}
    assert {qemu_tls.SERVER_CREDS, f"{qemu_tls.AUTHZ}-a"} <= await qemu.objects()
    assert not caplog.records


async def test_a_folder_without_dh_params_is_named_once(
    qemu: BareQemu, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    tls = certs.host("b")
    (tls.folder / DH_PARAMS).unlink()
    with caplog.at_level(logging.WARNING, logger=qemu_tls.__name__):
        for _ in range(2):  # QEMU generates its own, each time: it still works
            await qemu_tls.add_creds(qemu, tls, "server", peer="a")
    assert qemu_tls.SERVER_CREDS in await qemu.objects()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(tls.folder) in warnings[0] and DH_PARAMS in warnings[0]
