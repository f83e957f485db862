"""Backend specs, the agent process with a spec (in process and as `agent serve
--backend-json`), the control API's POST /swap and backend_status, then_local."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from devagent.agent.agent import BlockAgent
from devagent.agent.backend import Local
from devagent.agent.fetch import Fetch
from devagent.agent.listener import bind_unix, drop_unix
from devagent.agent.messages import FetchSpec, LocalSpec, RemoteSpec
from devagent.agent.remote import Remote
from devagent.agent.serve import serve
from devagent.agent.spec import check_spec, open_backend
from devagent.errors import PeerError, StateError, UsageError
from devagent.nbd.client import NbdClient
from devagent.wait import wait_until

SIZE = 4 << 20


async def until(condition: Callable[[], bool], what: str = "condition") -> None:
    """Poll until ``condition()`` holds; a hang guard (30 s), not a timing assertion."""
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} never became true")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.img"
    path.write_bytes(random.Random(11).randbytes(SIZE))
    return path


@pytest.fixture
async def source_agent(source: Path) -> AsyncIterator[int]:
    agent = BlockAgent(Local(source, read_only=True), "src")
    _, port = await agent.listen_tcp("127.0.0.1", 0)
    try:
        yield port
    finally:
        await agent.stop()


def test_specs_are_validated_with_clear_errors() -> None:
    local = check_spec({"kind": "local", "path": "/x"})
    assert local == LocalSpec(path="/x", read_only=False)
    assert msgspec.json.decode(msgspec.json.encode(local)) == {
        "kind": "local",
        "path": "/x",
        "read_only": False,
        "space_hold_s": 120.0,
    }
    fetch = check_spec(
        {"kind": "fetch", "path": "/r", "remote": {"kind": "remote", "address": "tcp:h:1"}}
    )
    assert isinstance(fetch, FetchSpec) and isinstance(fetch.remote, RemoteSpec)
    assert fetch.chunk_size == 65536 and fetch.copier and not fetch.then_local
    assert fetch.remote.io_timeout == 120.0 and fetch.remote.export == ""
    bad: list[tuple[Any, str]] = [
        ([], "Expected `object`, got `array`"),
        ({"kind": "nfs"}, "Invalid value 'nfs' - at `\\$.kind`"),
        ({"kind": "local"}, "missing required field `path`"),
        ({"kind": "local", "path": "/x", "colour": 1}, "unknown field `colour`"),
        ({"kind": "local", "path": 3}, "Expected `str`, got `int` - at `\\$.path`"),
        ({"kind": "remote", "address": "10.0.0.1:1"}, "tcp:HOST:PORT"),
        (
            {
                "kind": "fetch",
                "path": "/r",
                "remote": {"kind": "local", "path": "/x"},
                "copy_workers": 0,
            },
            "Expected `int` >= 1 - at `\\$.copy_workers`",
        ),
        (
            {
                "kind": "fetch",
                "path": "/r",
                "remote": {"kind": "local", "path": "/x"},
                "rate_limit": -1,
            },
            "Expected `float` > 0.0 - at `\\$.rate_limit`",
        ),
        (
            {"kind": "remote", "address": "tcp:h:1", "io_timeout": True},
            "Expected `float`, got `bool` - at `\\$.io_timeout`",
        ),
        ({"kind": "remote", "address": "tcp:h:1", "io_timeout": 0}, "> 0.0"),
        (
            {"kind": "fetch", "path": "/r", "remote": {"kind": "local"}},
            "backend: .*missing required field `path` - at `\\$.remote`",
        ),
        (
            {
                "kind": "fetch",
                "path": "/r",
                "remote": {"kind": "local", "path": "/x"},
                "chunk_size": 5000,
            },
            "power of two",
        ),
        (
            {
                "kind": "fetch",
                "path": "/r",
                "remote": {
                    "kind": "fetch",
                    "path": "/s",
                    "remote": {"kind": "local", "path": "/x"},
                },
            },
            "Invalid value 'fetch' - at `\\$.remote.kind`",  # a fetch cannot fetch from a fetch
        ),
    ]
    for spec, message in bad:
        with pytest.raises(UsageError, match=message):
            check_spec(spec)


def test_a_fetch_spec_goes_without_its_defaults_and_restarts_without_its_seeds() -> None:
    """The seeds (``present``, ``zeroes``: up to a bit per chunk) go to the agent that swaps
    to the replica, not to its command line when restarted (its bitmap file knows then);
    a field at its default is not sent at all."""
    spec = FetchSpec(path="/r", remote=RemoteSpec(address="tcp:h:1"), present="AQ==",
                     zeroes="Ag==")  # fmt: skip
    sent = msgspec.json.decode(msgspec.json.encode(spec))
    assert sent["present"] == "AQ==" and sent["zeroes"] == "Ag==" and "copier" not in sent
    again = msgspec.json.decode(msgspec.json.encode(spec.without_seeds()))
    assert "present" not in again and "zeroes" not in again
    assert again["kind"] == "fetch" and again["path"] == "/r" and check_spec(again) == (
        msgspec.structs.replace(spec, present="", zeroes="")
    )  # fmt: skip
    with pytest.raises(ValueError, match="zeroes: not base64 bits"):
        FetchSpec(path="/r", remote=RemoteSpec(address="tcp:h:1"), zeroes="#")


async def test_open_backend_opens_each_kind(
    source: Path, source_agent: int, tmp_path: Path
) -> None:
    local = await open_backend(LocalSpec(path=str(source), read_only=True))
    assert isinstance(local, Local) and local.read_only and local.size == SIZE
    await local.close()
    remote = await open_backend(RemoteSpec(address=f"tcp:127.0.0.1:{source_agent}", export="src"))
    assert isinstance(remote, Remote) and remote.size == SIZE
    await remote.close()
    spec = {
        "kind": "fetch",
        "path": str(tmp_path / "r.img"),
        "remote": {"kind": "remote", "address": f"tcp:127.0.0.1:{source_agent}", "export": "src"},
    }
    fetch = await open_backend(check_spec(spec))
    try:
        assert isinstance(fetch, Fetch) and fetch.copier_running
        await fetch.wait_complete()
        assert (tmp_path / "r.img").read_bytes() == source.read_bytes()
    finally:
        await fetch.close()


async def control(sock: Path, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    connector = aiohttp.UnixConnector(path=str(sock))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, f"http://agent{path}", json=body) as response,
    ):
        return response.status, await response.json()


async def test_swap_through_the_control_api_then_local(
    source: Path, source_agent: int, tmp_path: Path
) -> None:
    start = tmp_path / "start.img"
    start.write_bytes(bytes(SIZE))
    sock, ctl = tmp_path / "a.sock", tmp_path / "a.ctl"
    stop = asyncio.Event()
    ready: list[BlockAgent] = []
    task = asyncio.create_task(
        serve(start, unix=sock, name="disk", control=ctl, stop=stop, on_ready=ready.append)
    )
    try:
        await until(lambda: bool(ready), "the agent")
        status, body = await control(ctl, "GET", "/status")
        assert body["backend_status"] == {"kind": "local", "path": str(start), "read_only": False}
        replica = tmp_path / "replica.img"
        remote_spec = {"kind": "remote", "address": f"tcp:127.0.0.1:{source_agent}"}
        fetch_spec = {
            "kind": "fetch",
            "path": str(replica),
            "remote": {**remote_spec, "export": "src"},
            "rate_limit": 8 << 20,
            "then_local": True,
        }
        status, body = await control(ctl, "POST", "/swap", {"backend": {"kind": "nfs"}})
        assert status == 400 and "Invalid value 'nfs' - at `$.backend.kind`" in body["error"]
        small = tmp_path / "small.img"
        small.write_bytes(bytes(4096))
        status, body = await control(
            ctl, "POST", "/swap", {"backend": {"kind": "local", "path": str(small)}}
        )
        assert status == 400 and "bytes" in body["error"]
        status, body = await control(ctl, "POST", "/swap", {"backend": fetch_spec})
        assert status == 200, body
        assert body["old"] == f"Local({str(start)!r})"
        assert "Fetch" in body["new"] and body["hold_s"] >= 0
        async with await NbdClient.connect(unix=sock, export="disk") as client:
            assert await client.read(SIZE - 8192, 8192) == source.read_bytes()[-8192:]
            _, body = await control(ctl, "GET", "/status")
            seen = body["backend_status"]
            assert seen["kind"] in ("fetch", "local")  # it may already have finished
            if seen["kind"] == "fetch":
                assert seen["size"] == SIZE and seen["remote"]["connected"] is True
            agent = ready[0]  # then_local: the agent swaps itself to Local(replica)
            await asyncio.wait_for(agent.duties.wait(agent.backend), 30)
            _, body = await control(ctl, "GET", "/status")
            assert body["backend_status"] == {
                "kind": "local",
                "path": str(replica),
                "read_only": False,
            }
            assert await client.read(0, SIZE) == source.read_bytes()
            await client.write(0, b"\x99" * 4096)  # the replica is now the disk
        assert replica.read_bytes()[:4096] == b"\x99" * 4096
        assert source.read_bytes()[:4096] != b"\x99" * 4096
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert not sock.exists() and not ctl.exists()


async def _socket_of(path: Path) -> None:
    for _ in range(1000):
        if path.exists():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path} never appeared")


async def test_the_unix_socket_listens_before_the_backend_opens(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that connects while the backend opens (QEMU started beside its agent, the
    agent still dialling its remote peer) waits, and is served once it is open; a backend
    that cannot open leaves no socket, and a client waiting sees its connection close."""
    opened = asyncio.Event()

    async def slow(spec: Any, **args: Any) -> Any:
        await opened.wait()
        if "nowhere" in str(spec):
            raise PeerError("the source's agent cannot be reached")
        return await open_backend(spec, **args)

    monkeypatch.setattr("devagent.agent.serve.open_backend", slow)
    sock, stop = tmp_path / "a.sock", asyncio.Event()
    task = asyncio.create_task(serve(source, unix=sock, name="disk", stop=stop))
    try:
        await _socket_of(sock)
        assert sock.stat().st_mode & 0o777 == 0o600
        connecting = asyncio.create_task(NbdClient.connect(unix=sock, export="disk"))
        await asyncio.sleep(0.05)
        assert not connecting.done()  # in the backlog, no greeting yet
        opened.set()
        async with await asyncio.wait_for(connecting, 10) as client:
            assert await client.read(0, 4096) == source.read_bytes()[:4096]
    finally:
        stop.set()
        opened.set()
        await asyncio.wait_for(task, 30)
    assert not sock.exists()

    opened.clear()
    spec = {"kind": "local", "path": str(tmp_path / "nowhere.img")}
    failing = asyncio.create_task(serve(backend_spec=spec, unix=sock, name="disk"))
    await _socket_of(sock)
    connecting = asyncio.create_task(NbdClient.connect(unix=sock, export="disk"))
    await asyncio.sleep(0.05)
    opened.set()
    with pytest.raises(PeerError, match="cannot be reached"):
        await asyncio.wait_for(failing, 10)
    assert not sock.exists()
    with pytest.raises(PeerError):
        await asyncio.wait_for(connecting, 10)


async def test_serve_needs_an_image_or_a_spec(tmp_path: Path, source: Path) -> None:
    with pytest.raises(UsageError):
        await serve(unix=tmp_path / "s")
    with pytest.raises(UsageError):
        await serve(source, backend_spec={"kind": "local", "path": str(source)}, unix="s")
    bound = bind_unix(tmp_path / "b.sock")  # given bound, serve's from its first line
    with pytest.raises(UsageError):
        await serve(unix=bound)
    assert not (tmp_path / "b.sock").exists()


def test_a_unix_socket_appears_listening_and_never_over_a_file(tmp_path: Path) -> None:
    """The socket's file appears once it listens (bound under a staging name, renamed):
    a client that sees it connects; mode 0600. A stale socket (an agent that died, in its
    bind too) is replaced; a file that is not a socket is never replaced."""
    path, staged = tmp_path / "a.sock", tmp_path / ".a.sock.new"
    for stale in (path, staged):
        with socket.socket(socket.AF_UNIX) as dead:
            dead.bind(str(stale))
    listener = bind_unix(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sock"]
    assert path.stat().st_mode & 0o777 == 0o600 and listener.path == path
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
    drop_unix(listener)
    assert not path.exists()
    path.write_text("someone's data")
    with pytest.raises(OSError, match="not a socket"):
        bind_unix(path)
    assert path.read_text() == "someone's data" and not staged.exists()


@pytest.fixture
async def cli_agent() -> AsyncIterator[Callable[..., Any]]:
    procs: list[asyncio.subprocess.Process] = []

    async def start(*args: str) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "devagent.cli.agent_cmd", "serve", *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


async def test_agent_serve_backend_json_with_a_real_client(
    source: Path, source_agent: int, tmp_path: Path, cli_agent: Callable[..., Any]
) -> None:
    sock, ctl, replica = tmp_path / "f.sock", tmp_path / "f.ctl", tmp_path / "replica.img"
    spec = {
        "kind": "fetch",
        "path": str(replica),
        "remote": {"kind": "remote", "address": f"tcp:127.0.0.1:{source_agent}", "export": "src"},
        "copier": False,
        "then_local": True,
    }
    bad = await cli_agent("--backend-json", "{nope", "--unix", str(sock))
    _, err = await asyncio.wait_for(bad.communicate(), 30)
    assert bad.returncode == 2 and b"--backend-json" in err
    empty = tmp_path / "no-certificates"
    empty.mkdir()
    uncertified = await cli_agent(str(source), "--unix", str(sock), "--tls-dir", str(empty))
    _, err = await asyncio.wait_for(uncertified.communicate(), 30)
    assert uncertified.returncode == 1 and b"Error" in err, err
    assert not sock.exists()  # it listened first, and let go of it
    proc = await cli_agent(
        *("--backend-json", json.dumps(spec), "--unix", str(sock), "--control", str(ctl)),
        *("--name", "disk"),
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert b"listening on unix:" in line, line
    await until(ctl.exists, "the control socket")
    out = tmp_path / "copy.img"
    # nbdcopy reads it all through the agent: every chunk arrives by copy-on-read
    nbdcopy = await asyncio.create_subprocess_exec(
        "nbdcopy", f"nbd+unix:///disk?socket={sock}", str(out)
    )
    assert await asyncio.wait_for(nbdcopy.wait(), 60) == 0
    assert out.read_bytes() == source.read_bytes()

    async def local_status() -> Any:
        _, body = await control(ctl, "GET", "/status")
        return body["backend_status"] if body["backend_status"]["kind"] == "local" else None

    # another process: its control API is the only one to ask
    seen = await wait_until(local_status, timeout=30, what="the agent's swap to Local")
    assert seen["path"] == str(replica)
    assert replica.read_bytes() == source.read_bytes()
    os.kill(proc.pid, signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert not sock.exists()


async def qemu_io(uri: str, *commands: str) -> None:
    args = [a for command in commands for a in ("-c", command)]
    proc = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", "raw", *args, uri, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and b"Pattern verification failed" not in out, out


async def test_a_fetch_agent_killed_and_restarted_keeps_every_acknowledged_write(
    source: Path, source_agent: int, tmp_path: Path, cli_agent: Callable[..., Any]
) -> None:
    sock, replica = tmp_path / "k.sock", tmp_path / "replica.img"
    spec = json.dumps(
        {
            "kind": "fetch",
            "path": str(replica),
            "remote": {
                "kind": "remote",
                "address": f"tcp:127.0.0.1:{source_agent}",
                "export": "src",
            },
            "copier": False,
        }
    )
    uri = f"nbd+unix:///disk?socket={sock}"
    writes = ("write -P 0x5a 70000 3000", "write -P 0x6b 1M 64k", "write -P 0x7c 2000000 200000")
    checks = ("read -P 0x5a 70000 3000", "read -P 0x6b 1M 64k", "read -P 0x7c 2000000 200000")
    first = await cli_agent("--backend-json", spec, "--unix", str(sock), "--name", "disk")
    assert first.stdout is not None
    await asyncio.wait_for(first.stdout.readline(), 30)
    await qemu_io(uri, "read 3M 64k", *writes)  # no flush: only the page cache has them
    first.kill()  # SIGKILL: no final sync, no bitmap write at exit
    await first.wait()
    second = await cli_agent("--backend-json", spec, "--unix", str(sock), "--name", "disk")
    assert second.stdout is not None
    await asyncio.wait_for(second.stdout.readline(), 30)
    await qemu_io(uri, *checks)
    # the bytes around the partial writes are still the source's
    expected = bytearray(source.read_bytes())
    expected[70000:73000] = b"\x5a" * 3000
    expected[1 << 20 : (1 << 20) + 65536] = b"\x6b" * 65536
    expected[2000000:2200000] = b"\x7c" * 200000
    copy = tmp_path / "copy.img"
    nbdcopy = await asyncio.create_subprocess_exec("nbdcopy", uri, str(copy))
    assert await asyncio.wait_for(nbdcopy.wait(), 60) == 0
    assert copy.read_bytes() == expected
    second.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(second.wait(), 30) == 0


async def test_swap_a_local_disk_for_a_remote_one_under_a_client(tmp_path: Path) -> None:
    """Remote device access: an agent re-pointed from a local file to another agent's disk
    while a client keeps writing; every write lands where the backend was at its time."""
    far = tmp_path / "far.img"
    far.write_bytes(bytes(SIZE))
    far_agent = BlockAgent(Local(far), "far")
    _, port = await far_agent.listen_tcp("127.0.0.1", 0)
    near = tmp_path / "near.img"
    near.write_bytes(bytes(SIZE))
    sock, ctl = tmp_path / "n.sock", tmp_path / "n.ctl"
    stop = asyncio.Event()
    ready: list[BlockAgent] = []
    task = asyncio.create_task(
        serve(near, unix=sock, name="disk", control=ctl, stop=stop, on_ready=ready.append)
    )
    try:
        await until(lambda: bool(ready), "the agent")
        async with await NbdClient.connect(unix=sock, export="disk") as client:
            swapped = asyncio.Event()
            written: list[tuple[int, bool]] = []

            async def writer() -> None:
                for i in range(200):
                    if i == 190:  # the last ten go once the swap has answered, however slow
                        await swapped.wait()
                    after = swapped.is_set()
                    await client.write(i * 4096, bytes([i + 1]) * 4096)
                    written.append((i, after))
                    await asyncio.sleep(0)

            writing = asyncio.create_task(writer())
            await until(lambda: len(written) >= 20, "writes before the swap")
            spec = {"kind": "remote", "address": f"tcp:127.0.0.1:{port}", "export": "far"}
            status, body = await control(ctl, "POST", "/swap", {"backend": spec})
            swapped.set()
            assert status == 200, body
            await writing
            _, body = await control(ctl, "GET", "/status")
            assert body["backend_status"]["kind"] == "remote"
            assert body["backend_status"]["connected"] is True
        near_data, far_data = near.read_bytes(), far.read_bytes()
        for i, after in written:
            block = bytes([i + 1]) * 4096
            here, there = near_data[i * 4096 : (i + 1) * 4096], far_data[i * 4096 : (i + 1) * 4096]
            if after:  # sent once the swap had answered: on the far disk only
                assert there == block and here == bytes(4096)
            else:  # sent before or during the swap: on exactly one of them
                assert (here, there) in ((block, bytes(4096)), (bytes(4096), block))
        assert far_data[199 * 4096 : 200 * 4096] == bytes([200]) * 4096
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await far_agent.stop()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_then_local_under_a_pipelined_client_loses_and_hangs_nothing(
    source: Path, source_agent: int, tmp_path: Path, seed: int
) -> None:
    """A migration's tail in miniature: a seeded Fetch replica fills (copier and
    copy-on-read) and swaps itself to Local while 16 workers pipeline reads, writes,
    partial writes and flushes. Every request answers (the hang guard), every read sees
    the last write or the source, and the final disk is exactly that."""
    rng = random.Random(seed)
    block, n_blocks = 4096, SIZE // 4096
    replica = tmp_path / "replica.img"
    seeded = sorted(rng.sample(range(SIZE // 65536), 16))  # chunks a mirror "pushed"
    image = bytearray(SIZE)
    original = source.read_bytes()
    for chunk in seeded:
        image[chunk * 65536 : (chunk + 1) * 65536] = original[chunk * 65536 : (chunk + 1) * 65536]
    replica.write_bytes(bytes(image))
    bits = bytearray(SIZE // 65536 // 8)
    for chunk in seeded:
        bits[chunk >> 3] |= 1 << (chunk & 7)
    spec = {
        "kind": "fetch",
        "path": str(replica),
        "remote": {"kind": "remote", "address": f"tcp:127.0.0.1:{source_agent}", "export": "src"},
        "then_local": True,
        "rate_limit": 6 << 20,  # the tail lasts while the workers run
        "copy_batch": 65536,
        "present": base64.b64encode(bytes(bits)).decode(),
    }
    sock, ctl = tmp_path / "t.sock", tmp_path / "t.ctl"
    stop = asyncio.Event()
    ready: list[BlockAgent] = []
    task = asyncio.create_task(
        serve(None, backend_spec=spec, unix=sock, name="disk", control=ctl, stop=stop,
              on_ready=ready.append)
    )  # fmt: skip
    model = {i: original[i * block : (i + 1) * block] for i in range(n_blocks)}
    went_local = asyncio.Event()
    after_local = 0
    try:
        await until(lambda: bool(ready), "the agent")
        async with await NbdClient.connect(unix=sock, export="disk") as client:

            async def worker(me: int) -> None:
                nonlocal after_local
                mine = [i for i in range(n_blocks) if i % 16 == me]  # no two workers share one
                while not went_local.is_set() or after_local < 400:
                    i = rng.choice(mine)
                    action = rng.random()
                    if action < 0.45:
                        got = await client.read(i * block, block)
                        assert got == model[i], f"block {i}: stale or lost data"
                    elif action < 0.9:
                        if rng.random() < 0.3:  # a partial write: the rest must survive
                            cut = rng.randrange(512, block, 512)
                            head = rng.randbytes(cut)
                            await client.write(i * block, head)
                            model[i] = head + model[i][cut:]
                        else:
                            model[i] = rng.randbytes(block)
                            await client.write(i * block, model[i])
                    else:
                        await client.flush()
                    if went_local.is_set():
                        after_local += 1

            async def watch() -> None:
                agent = ready[0]
                await agent.duties.wait(agent.backend)
                _, body = await control(ctl, "GET", "/status")
                assert body["backend_status"]["kind"] == "local"
                went_local.set()

            await asyncio.wait_for(asyncio.gather(watch(), *(worker(w) for w in range(16))), 60)
            final = await client.read(0, SIZE)
        assert final == b"".join(model[i] for i in range(n_blocks))
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert replica.read_bytes() == b"".join(model[i] for i in range(n_blocks))


async def test_retire_answers_once_nothing_can_land_any_more(tmp_path: Path) -> None:
    """A receiver's /retire: the writes it took are on disk when it answers, its sockets are
    closed (a push still on the wire has nowhere to land), and the agent exits."""
    image = tmp_path / "receive.img"
    image.write_bytes(bytes(SIZE))
    sock, ctl = tmp_path / "r.sock", tmp_path / "r.ctl"
    stop = asyncio.Event()
    ready: list[BlockAgent] = []
    task = asyncio.create_task(
        serve(image, unix=sock, name="receive", control=ctl, stop=stop, on_ready=ready.append)
    )
    await until(lambda: bool(ready), "the agent")
    client = await NbdClient.connect(unix=sock, export="receive")
    writes = [asyncio.create_task(client.write(i * 65536, bytes([i + 1]) * 65536))
              for i in range(32)]  # fmt: skip
    # One yield, no more: each write task runs (in creation order, before this one resumes)
    # up to sending its request, and the agent takes them while /retire is on its way.
    await asyncio.sleep(0)
    status, body = await control(ctl, "POST", "/retire")
    assert status == 200 and body["retired"] is True
    done = await asyncio.gather(*writes, return_exceptions=True)
    data = image.read_bytes()
    for i, outcome in enumerate(done):  # acknowledged means on disk; none half-written
        block = data[i * 65536 : (i + 1) * 65536]
        if outcome is None:
            assert block == bytes([i + 1]) * 65536
        else:
            assert block in (bytes(65536), bytes([i + 1]) * 65536)
    with pytest.raises(PeerError, match="cannot connect"):
        await NbdClient.connect(unix=sock, export="receive")
    await asyncio.wait_for(task, 10)  # the agent's serve loop ends by itself
    with contextlib.suppress(Exception):
        await client.close()


@pytest.fixture
def read_only_space(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs holding ``disk.img`` (1 MiB), mounted read-only."""
    space = tmp_path / "space"
    space.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(space)], check=True)
    try:
        (space / "disk.img").write_bytes(bytes(1 << 20))
        subprocess.run(["mount", "-o", "remount,ro", str(space)], check=True)
        yield space
    finally:
        subprocess.run(["umount", "-l", str(space)], check=False)


async def test_a_backend_on_a_read_only_space_cannot_be_opened_and_says_why(
    tmp_path: Path, read_only_space: Path
) -> None:
    """A replica (Fetch) or a disk (Local) whose filesystem is read-only: a 409-kind error
    naming the file and the reason (a migration's commit then rolls back at once), never an
    unexpected one (the agent once answered 500, and the source retried for 120 s)."""
    source = tmp_path / "source.img"
    source.write_bytes(bytes(1 << 20))
    replica = str(read_only_space / "replica.img")
    fetch = FetchSpec(path=replica, remote=LocalSpec(path=str(source)))
    for spec in (fetch, LocalSpec(path=str(read_only_space / "disk.img"))):
        with pytest.raises(StateError, match=r"cannot open .*: Read-only file system"):
            await open_backend(spec)


async def test_a_fetch_takes_over_the_connection_its_agent_reads_through(
    source: Path, tmp_path: Path
) -> None:
    """A migration's destination agent reads through to the source until the switchover,
    then swaps to a Fetch of that same export: the Fetch takes the open connection over
    (no second dial, the old backend not closed); on other terms (another I/O timeout) it
    dials its own, and the old connection closes."""
    far = BlockAgent(Local(source, read_only=True), "src")
    _, port = await far.listen_tcp("127.0.0.1", 0)
    remote = RemoteSpec(address=f"tcp:127.0.0.1:{port}", export="src")
    near = BlockAgent(await open_backend(remote), "disk")
    try:
        reading_through = near.backend
        assert isinstance(reading_through, Remote)
        await until(lambda: far.connections == 1, "the read-through connection")
        await near.swap_to(FetchSpec(path=str(tmp_path / "a.img"), remote=remote, copier=False))
        fetch = near.backend
        assert isinstance(fetch, Fetch) and fetch.remote is reading_through
        assert reading_through.connected and far.connections == 1
        assert await fetch.read(SIZE - 4096, 4096) == source.read_bytes()[-4096:]

        other = msgspec.structs.replace(remote, io_timeout=30.0)
        await near.swap_to(FetchSpec(path=str(tmp_path / "b.img"), remote=other, copier=False))
        second = near.backend
        assert isinstance(second, Fetch) and second.remote is not reading_through
        assert not reading_through.connected
        await until(lambda: far.connections == 1, "the old connection closed, the new one up")
        assert await second.read(0, 4096) == source.read_bytes()[:4096]
    finally:
        await near.stop()
        await far.stop()
