"""The API's answers go through JSON and come back equal (the daemon encodes them once, a
reader decodes them once), and an answer of the wrong shape names the field's path."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from aiohttp.test_utils import TestServer

from devagent.api_types import (
    Devices,
    DiskExchange,
    DiskRow,
    Health,
    MigrationProgress,
    MigrationStatus,
    NicRow,
    PauseAnswer,
    ProbeAnswer,
    ResumeAnswer,
    VmList,
    VmStatus,
)
from devagent.client import DaemonClient, Endpoint
from devagent.daemon.api import build_app
from devagent.daemon.host import Host
from devagent.errors import NotFound, PeerError
from devagent.guest.probe import Heartbeat, Paused
from devagent.report import MigrationReport
from migration_fakes import vm_status

BEAT = Heartbeat(
    hb=3, t_ms=300, phase="run", ops=5, reads=2, writes=3, ops_total=90, errors=0,
    verify_failures=0, lat_max_us=900, lat_p99_us=500, written_blocks=12, digest="ab",
    host_time=1.5,
)  # fmt: skip


def again(message: object, kind: type[object]) -> object:
    return msgspec.json.decode(msgspec.json.encode(message), type=kind)


def test_a_vm_status_with_its_last_heartbeat() -> None:
    status = msgspec.structs.replace(vm_status("v", "running"), last_heartbeat=BEAT)
    assert again(status, VmStatus) == status


def test_device_rows_are_told_apart_by_their_kind() -> None:
    rows = Devices(devices=[
        DiskRow(vm="v", device="disk0", image="/i", state="direct"),
        NicRow(vm="v", device="net0", address="10.0.0.2/24", mac="m", tap="t", agent_pid=None,
               stream_socket="/s", state="unreachable: gone"),
    ])  # fmt: skip
    raw = msgspec.json.decode(msgspec.json.encode(rows))
    assert [d["kind"] for d in raw["devices"]] == ["disk", "nic"]
    assert "agent" not in raw["devices"][0]  # absent, as before, when the agent did not answer
    assert again(rows, Devices) == rows


def test_probe_answers_name_the_command_they_answer() -> None:
    paused = PauseAnswer(
        event=Paused(digest="ab", written_blocks=1, ops_total=2, host_time=3.0, table_digest="ab")
    )
    assert again(paused, ProbeAnswer) == paused  # type: ignore[arg-type]
    resumed = ResumeAnswer(event=BEAT)
    assert again(resumed, ProbeAnswer) == resumed  # type: ignore[arg-type]


def test_a_migration_status_with_its_report() -> None:
    report = MigrationReport(vm="v", source="a", destination="b", storage="hybrid")
    report.timeline["ram_started"] = 0.5
    job = MigrationStatus(id="1", vm="v", phase="ram", started_at=1.0, finished_at=None,
                          progress=MigrationProgress(ram_total=10, ram_transferred=4),
                          report=report)  # fmt: skip
    raw = msgspec.json.decode(msgspec.json.encode(job))
    assert raw["progress"] == {"ram_total": 10, "ram_transferred": 4}  # only what was said
    assert again(job, MigrationStatus) == job


def test_a_wrong_answer_names_the_field() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.duration_s"):
        msgspec.json.decode(b'{"vm": "v", "device": "d", "duration_s": "x"}', type=DiskExchange)


async def test_the_client_decodes_the_daemons_answers(tmp_path: Path) -> None:
    host = Host(name="a", address="127.0.0.1", port=0, root=tmp_path, shared_dir=tmp_path)
    async with TestServer(build_app(host, "t")) as server:
        endpoint = Endpoint(url=str(server.make_url("")), token="t", name="a")
        async with DaemonClient(endpoint) as client:
            assert (await client.get_as("/v1/health", Health)).host == "a"
            assert (await client.get_as("/v1/vms", VmList)).vms == []
            with pytest.raises(NotFound, match="host a: no VM"):
                await client.get_as("/v1/vms/nope", VmStatus)
            with pytest.raises(PeerError, match=r"answered badly: .*field `vms`"):
                await client.get_as("/v1/health", VmList)
