"""End to end: the test guest's NIC on a real net agent whose uplink is a tap on a bridge in
a network namespace of this test's own (``net...``).  From the namespace: ping the guest,
push bytes through its echo service and read its numbered stream, every byte checked;
then swap the agent's uplink to a second tap and restart the agent under a live stream; and
a real live migration to a second QEMU and agent, driven in the order the daemon will use.
Everything (QEMU, agent, namespace with its taps and bridge) goes, even on failure."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devagent.guest.build import GuestImage
from devagent.lab.net import pin_bridge_address
from devagent.qemu.config import NicSpec, VmConfig
from devagent.qemu.vm import Vm
from tests.conftest import namespaces, processes_mentioning

pytestmark = [
    pytest.mark.vm,
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and taps need root"),
]

HOST_IP, GUEST_IP = "10.77.0.1", "10.77.0.10"
CLIENT = Path(__file__).with_name("net_lab_client.py")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Namespace:
    name: str

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def add_tap(self, tap: str) -> None:
        ip("-n", self.name, "tuntap", "add", "dev", tap, "mode", "tap")
        ip("-n", self.name, "link", "set", tap, "master", "br0", "up")

    def client(self, *args: str) -> dict[str, Any]:
        done = self.run(sys.executable, str(CLIENT), *args, timeout=300)
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result


@pytest.fixture
def netns() -> Iterator[Namespace]:
    """A namespace with a bridge (the host's address on it) and a tap on the bridge."""
    ns = Namespace(f"net-e2e-{os.getpid()}")
    ip("netns", "add", ns.name)
    try:
        ip("-n", ns.name, "link", "set", "lo", "up")
        ip("-n", ns.name, "link", "add", "br0", "type", "bridge")
        pin_bridge_address("br0", ns.name)  # taps come and go: its MAC must not follow them
        ip("-n", ns.name, "addr", "add", f"{HOST_IP}/24", "dev", "br0")
        ip("-n", ns.name, "link", "set", "br0", "up")
        ns.add_tap("tap0")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "delete", ns.name], check=False, timeout=30)
        assert ns.name not in namespaces()


class AgentProcess:
    """``devagent agent net`` inside the namespace, as the daemon would run it."""

    def __init__(
        self, ns: Namespace, folder: Path, tap: str, name: str = "net0", *extra: str
    ) -> None:
        self.ns, self.folder, self.tap, self.extra = ns, folder, tap, extra
        self.control = folder / f"{name}.ctl"
        self.log = folder / f"{name}-agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, vm_socket: Path) -> None:
        argv = [
            "ip", "netns", "exec", self.ns.name,
            sys.executable, "-c", "from devagent.cli import main; main()",
            "agent", "net", "--vm-socket", str(vm_socket), "--tap", self.tap,
            "--control", str(self.control), "--vm", "netvm", "--nic", "net0", *self.extra,
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        connector = aiohttp.UnixConnector(path=str(self.control))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.request(method, f"http://agent{path}", json=body) as response,
        ):
            answer = await response.json()
            assert response.status == 200, answer
            return answer

    async def status_when(self, test: Any, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            if self.control.exists():
                try:
                    status: dict[str, Any] = await self.call("GET", "/status")
                    if test(status):
                        return status
                except aiohttp.ClientError:
                    pass
            assert time.monotonic() < deadline, self.log.read_text()[-2000:]
            await asyncio.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
async def nic_vm(
    guest: GuestImage, state_dir: Path, netns: Namespace
) -> AsyncIterator[tuple[Vm, AgentProcess, list[bytes]]]:
    folder = state_dir / "netvm"
    folder.mkdir()
    socket_path = folder / "net0.sock"
    config = VmConfig(
        name="netvm",
        kernel=str(guest.kernel),
        initrd=str(guest.initrd),
        append=f"console=ttyS0 quiet panic=-1 devagent.ip={GUEST_IP}/24",
        nics=(NicSpec(id="net0", stream_socket=str(socket_path), mac="52:54:00:77:00:10"),),
    )
    console: list[bytes] = []
    vm = Vm(config, folder / "vm", on_console=lambda data, _: console.append(data))
    agent = AgentProcess(netns, folder, "tap0")
    try:
        await vm.launch()
        agent.start(socket_path)
        yield vm, agent, console
    finally:
        agent.stop()
        await vm.stop()
        assert processes_mentioning(str(state_dir)) == []


async def wait_console(vm: Vm, console: list[bytes], text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text.encode() not in b"".join(console):
        assert not vm.exited, vm.log_tail()
        assert time.monotonic() < deadline, b"".join(console)[-2000:].decode(errors="replace")
        await asyncio.sleep(0.2)


async def test_guest_nic_through_the_net_agent(
    nic_vm: tuple[Vm, AgentProcess, list[bytes]], netns: Namespace
) -> None:
    vm, agent, console = nic_vm
    await agent.status_when(lambda s: s["vm_connected"])
    await wait_console(vm, console, "DEVAGENT-NET-SERVICES")

    pinged = await asyncio.to_thread(netns.run, "ping", "-c", "3", "-w", "60", GUEST_IP)
    assert pinged.returncode == 0, pinged.stdout + pinged.stderr
    assert " 0% packet loss" in pinged.stdout or "3 received" in pinged.stdout

    echoed = await asyncio.to_thread(netns.client, "echo", GUEST_IP, "7", str(1 << 20), "7")
    assert echoed["received"] == echoed["sent"] == 1 << 20
    assert echoed["intact"], echoed
    streamed = await asyncio.to_thread(netns.client, "stream", GUEST_IP, "19", "100000")
    assert streamed == {"lines": 100000, "in_sequence": True}

    status = await agent.call("GET", "/status")
    counters = status["counters"]
    assert counters["from_vm_frames"] > 700 and counters["to_vm_frames"] > 700
    assert counters["from_vm_bytes"] > 1 << 20 and counters["to_vm_bytes"] > 1 << 20
    assert status["uplink"]["name"] == "tap0"
    assert all(n == 0 for n in status["bad_frames"]["vm"].values()), status
    lost = {k: v for k, v in status["lost"].items() if v}
    assert set(lost) <= {"no_vm"}, status  # only frames from before QEMU was reached


async def test_swap_and_agent_restart_under_a_live_stream(
    nic_vm: tuple[Vm, AgentProcess, list[bytes]], netns: Namespace
) -> None:
    vm, agent, console = nic_vm
    await agent.status_when(lambda s: s["vm_connected"])
    await wait_console(vm, console, "DEVAGENT-NET-SERVICES")
    netns.add_tap("tap1")

    size = 3 << 20
    echo = asyncio.create_task(
        asyncio.to_thread(netns.client, "echo", GUEST_IP, "7", str(size), "11")
    )
    await agent.status_when(lambda s: s["counters"]["to_vm_bytes"] > 256 << 10, timeout=120)
    swapped = await agent.call("POST", "/swap", {"uplink": {"kind": "tap", "name": "tap1"}})
    assert swapped["new"] == "TapUplink('tap1')"
    status = await agent.status_when(lambda s: s["uplink"]["rx_frames"] > 0, timeout=60)
    assert status["uplink"]["name"] == "tap1"
    result = await echo
    assert result["received"] == size and result["intact"], result
    status = await agent.call("GET", "/status")
    print(f"\nafter the swap: {status['counters']}, lost {status['lost']}")

    # The agent dies mid-stream and a new one takes its place: QEMU, the stream server,
    # takes the new connection; TCP in the guest and the namespace retransmits the rest.
    # The stream is paced (3 s at 1 MiB/s), so the kill lands in its middle: unpaced, a
    # quiet machine had echoed all of it before the kill came (the new agent then carried
    # nothing, and the test failed).
    paced = str(1 << 20)
    echo = asyncio.create_task(
        asyncio.to_thread(netns.client, "echo", GUEST_IP, "7", str(size), "12", paced)
    )
    before = status["counters"]["to_vm_bytes"]
    await agent.status_when(lambda s: s["counters"]["to_vm_bytes"] > before + (256 << 10))
    assert not echo.done()
    agent.stop(signal.SIGKILL)
    agent.tap = "tap1"
    agent.start(Path(status["vm_socket"]))
    await agent.status_when(lambda s: s["vm_connected"] and s["vm_connects"] == 1)
    result = await echo
    assert result["received"] == size and result["intact"], result
    status = await agent.call("GET", "/status")
    assert status["uplink"]["name"] == "tap1" and status["counters"]["to_vm_bytes"] > 0
    print(f"restart mid-stream ({result['seconds']} s): {status['counters']}")


async def migration_status(vm: Vm, *wanted: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = await vm.qmp("query-migrate")
        if info.get("status") in wanted:
            return info
        assert info.get("status") not in ("failed", "cancelled"), info
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.05)


async def test_nic_through_a_live_migration_in_the_order_the_daemon_will_use(
    guest: GuestImage, state_dir: Path, netns: Namespace
) -> None:
    """Both hosts' taps on one bridge (one L2 segment), one agent each.  The destination's
    agent holds from the start; at the pre-switchover pause the source's agent holds; once
    the guest runs on the destination the source forwards (its kept frames first) and the
    destination releases.  A TCP echo stream through all of it comes back intact."""
    folder = state_dir / "netvm"
    folder.mkdir()
    netns.add_tap("tap1")
    peer_port = 17800
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        migration_port = probe.getsockname()[1]

    def config(side: str, incoming: bool) -> VmConfig:
        return VmConfig(
            name="netvm",
            kernel=str(guest.kernel),
            initrd=str(guest.initrd),
            append=f"console=ttyS0 quiet panic=-1 devagent.ip={GUEST_IP}/24",
            nics=(
                NicSpec(
                    id="net0", stream_socket=str(folder / f"{side}.sock"), mac="52:54:00:77:00:10"
                ),
            ),
            incoming=incoming,
        )

    console: list[bytes] = []
    source = Vm(config("src", False), folder / "src", on_console=lambda d, _: console.append(d))
    dest = Vm(config("dst", True), folder / "dst")
    agent_a = AgentProcess(netns, folder, "tap0", "a")
    agent_b = AgentProcess(netns, folder, "tap1", "b", "--peer-listen", f"127.0.0.1:{peer_port}")
    try:
        await source.launch()
        await dest.launch()
        agent_a.start(folder / "src.sock")
        agent_b.start(folder / "dst.sock")
        await agent_a.status_when(lambda s: s["vm_connected"])
        await agent_b.status_when(lambda s: s["vm_connected"])
        await wait_console(source, console, "DEVAGENT-NET-SERVICES")
        await agent_b.call("POST", "/hold", {})
        # Frames the bridge sent before an agent reached its QEMU are lost (counted as
        # no_vm) and are no business of the migration: count only what is lost from here.
        lost_before = [(await agent.call("GET", "/status"))["lost"] for agent in (agent_a, agent_b)]
        await dest.qmp("migrate-incoming", uri=f"tcp:127.0.0.1:{migration_port}")

        size = 8 << 20
        echo = asyncio.create_task(
            asyncio.to_thread(netns.client, "echo", GUEST_IP, "7", str(size), "21", str(2 << 20))
        )
        await agent_a.status_when(lambda s: s["counters"]["to_vm_bytes"] > 512 << 10, 60)
        await source.qmp(
            "migrate-set-capabilities",
            capabilities=[{"capability": "pause-before-switchover", "state": True}],
        )
        await source.qmp("migrate", uri=f"tcp:127.0.0.1:{migration_port}")
        await migration_status(source, "pre-switchover")
        await agent_a.call("POST", "/hold", {})  # the guest is stopped here now
        await source.qmp("migrate-continue", state="pre-switchover")
        done = await migration_status(source, "completed")
        while (await dest.qmp("query-status"))["status"] != "running":
            await asyncio.sleep(0.02)
        forwarded = await agent_a.call("POST", "/forward", {"peer": f"127.0.0.1:{peer_port}"})
        released = await agent_b.call("POST", "/release")

        result = await echo
        assert result["received"] == size and result["intact"], result
        stopped = await agent_a.call("POST", "/stop-forward")
        a = await agent_a.call("GET", "/status")
        b = await agent_b.call("GET", "/status")
        print(
            f"\nmigration {done.get('total-time')} ms, echo {result['seconds']} s; "
            f"source handed over {forwarded['handed_over']}, forwarded {stopped['frames']}; "
            f"destination released {released['delivered']}; lost a={a['lost']} b={b['lost']}"
        )
        assert b["counters"]["to_vm_bytes"] > 1 << 20  # the stream's end went through b
        assert [a["lost"], b["lost"]] == lost_before
        assert released["lost"] == 0
    finally:
        agent_a.stop()
        agent_b.stop()
        await source.stop()
        await dest.stop()
        assert processes_mentioning(str(state_dir)) == []
