"""Saved records as the daemon wrote them before they were typed still load, typed."""

from __future__ import annotations

import json
from pathlib import Path

from devagent.agent.messages import FetchSpec, RemoteSpec
from devagent.daemon.agents import AgentProcess
from devagent.daemon.vms.manager import _Record

OLD_VM_JSON = {
    "request": {"name": "v1", "ram_mb": 128, "disk_size": 1 << 30, "workload": "moderate",
                "disk": None, "kernel": None, "initrd": None, "append": None,
                "storage": "local", "agent": True,
                "disk_from": {"url": "http://b", "token": "t", "name": "b"}, "nics": 0},
    "config": {"name": "v1", "ram_mb": 128, "cpus": 1, "accel": "tcg", "kernel": "/k",
               "initrd": None, "append": None,
               "disks": [{"node": "disk0", "path": None, "format": "raw",
                          "nbd_socket": "/run/disk0.nbd", "nbd_export": "disk0",
                          "reconnect_delay_s": 1, "direct": False, "unmap": False,
                          "backing_nbd": None, "copy_on_read": False}],
               "nics": [], "incoming": False, "extra_args": []},
    "pid": 4242,
    "role": "running",
    "image": "/remote/b/v1",
    "agents": [{"vm": "v1", "node": "disk0", "image": "/remote/b/v1", "run_dir": "/run",
                "pid": 4243, "listen_address": "10.0.0.1",
                "backend": {"kind": "remote", "address": "tcp:10.0.0.2:4000", "export": "v1"},
                "tcp_address": "tcp:10.0.0.1:4001"}],
    "nics": [],
    "receiver": None,
}  # fmt: skip


def test_an_old_vm_json_loads_typed(tmp_path: Path) -> None:
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(OLD_VM_JSON))
    record = _Record.read(path)
    (agent,) = record.agents
    assert agent.backend == RemoteSpec(address="tcp:10.0.0.2:4000", export="v1")
    assert record.config.disks[0].reconnect_delay_s == 1 and record.pid == 4242
    assert AgentProcess.from_json(agent.to_json()) == agent


def test_a_fetch_backend_round_trips_through_the_record() -> None:
    remote = {"kind": "remote", "address": "tcp:10.0.0.2:4000", "export": "v1"}
    saved = {**OLD_VM_JSON["agents"][0], "backend": {
        "kind": "fetch", "path": "/home.img", "remote": remote, "copier": True,
        "then_local": True, "rate_limit": 1000}}  # fmt: skip
    agent = AgentProcess.from_json(saved)
    assert isinstance(agent.backend, FetchSpec) and agent.backend.rate_limit == 1000
    assert agent.argv()[-2:] == ["--backend-json", json.dumps(agent.to_json()["backend"],
                                                              separators=(",", ":"))]  # fmt: skip
