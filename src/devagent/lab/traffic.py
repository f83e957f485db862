"""Traffic to a guest from a host of a lab, for the NIC's measures: a 10 ms ping and a TCP
echo stream checked byte for byte.  Both run inside the host's namespace as child processes
(``ip netns exec``), which :class:`Pinger` and :class:`EchoStream` stop and reap, also on
failure (use them as context managers).

The stream's client is this module run as a program::

    python -m devagent.lab.traffic echo HOST PORT [--seed N] [--rate BYTES_PER_S] [--max-s S]

It sends a pseudo-random stream (8 KiB blocks, each its own, so no slip or loss can match
by chance) until its standard input closes (or ``--max-s``), half-closes, reads the echo to
its end while checking every byte, and prints one JSON line: bytes sent and received, the
offset of the first wrong byte, whether the connection was reset, timings.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import msgspec

from devagent.errors import PeerError
from devagent.report import largest_gap_at
from devagent.wait import wait_until_blocking

BLOCK = 8192
PING_INTERVAL_S = 0.01
_PING_LINE = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)")


def block(seed: int, index: int) -> bytes:
    """Block ``index`` of the stream made from ``seed``."""
    return random.Random(seed * 1_000_003 + index).randbytes(BLOCK)


# -- ping ------------------------------------------------------------------------------------


def parse_ping(text: str) -> list[tuple[float, int]]:
    """(wall-clock time, icmp_seq) of every answer in the output of ``ping -D``."""
    found = []
    for line in text.splitlines():
        match = _PING_LINE.match(line.strip())
        if match:
            found.append((float(match.group(1)), int(match.group(2))))
    return found


def ping_max_gap(
    answers: Sequence[tuple[float, int]], start: float, end: float
) -> tuple[float, float] | None:
    """(when, seconds) of the largest gap between two consecutive answers over
    [start, end] (counting from the last answer before ``start``)."""
    return largest_gap_at((at for at, _ in answers), start, end)


def wait_for_ping(netns: str, address: str, timeout: float = 90.0) -> float:
    """Ping ``address`` from namespace ``netns`` until it answers; the seconds it took."""
    started = time.monotonic()

    def answered() -> bool:
        argv = ["ip", "netns", "exec", netns, "ping", "-n", "-c", "1", "-W", "1", address]
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0

    wait_until_blocking(
        answered, timeout=timeout, what=f"{address} answering a ping from {netns}", interval=0.1
    )
    return time.monotonic() - started


class Pinger:
    """``ping -D -i 0.01 ADDRESS`` inside namespace ``netns``, its output in ``log``."""

    def __init__(self, netns: str, address: str, log: Path) -> None:
        self.netns, self.address, self.log = netns, address, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = ["ip", "netns", "exec", self.netns, "ping", "-n", "-D"]
        argv += ["-i", str(PING_INTERVAL_S), "-W", "1", self.address]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def answers(self) -> list[tuple[float, int]]:
        try:
            return parse_ping(self.log.read_text(errors="replace"))
        except OSError:
            return []

    def stop(self) -> list[tuple[float, int]]:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.answers()

    def __enter__(self) -> Pinger:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# -- the echo stream -------------------------------------------------------------------------


class EchoStream:
    """The echo client (this module as a program) inside namespace ``netns``."""

    def __init__(
        self, netns: str, address: str, port: int = 7, *, seed: int = 1, rate: int = 256 << 10
    ) -> None:
        self.argv = [
            "ip", "netns", "exec", netns, sys.executable, "-m", "devagent.lab.traffic",
            "echo", address, str(port), "--seed", str(seed), "--rate", str(rate),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    def finish(self, timeout: float = 120.0) -> EchoResult:
        """Stop sending, wait for the rest of the echo; the client's figures."""
        assert self.proc is not None
        try:
            out, errs = self.proc.communicate(timeout=timeout)  # closes its stdin first
        except subprocess.TimeoutExpired as err:
            self.proc.kill()
            self.proc.communicate()
            raise PeerError(f"the echo stream did not end within {timeout:.0f} s") from err
        if self.proc.returncode != 0 or not out.strip():
            raise PeerError(f"the echo client failed: {errs.decode(errors='replace')[-2000:]}")
        last = out.decode().strip().splitlines()[-1]
        try:
            return msgspec.json.decode(last, type=EchoResult)
        except msgspec.DecodeError as err:
            raise PeerError(f"the echo client's figures do not fit: {err}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def __enter__(self) -> EchoStream:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()


class EchoResult(msgspec.Struct):
    """The echo client's figures (its one line of JSON on stdout)."""

    sent: int  # bytes
    received: int
    first_difference: int | None  # offset of the first echoed byte that is not what was sent
    reset: bool  # the connection was reset
    intact: bool  # every byte sent came back, unchanged
    sending_s: float
    seconds: float
    timed_out: bool = False  # the echo stopped coming for 60 s


@dataclass
class _Echoed:
    """What the client's reader thread has seen so far."""

    received: int = 0
    first_difference: int | None = None
    reset: bool = False
    timed_out: bool = False


def echo_client(host: str, port: int, seed: int, rate: int, max_s: float) -> EchoResult:
    """The program's work: see the module's docstring."""
    sock = socket.create_connection((host, port), timeout=60)
    sock.settimeout(60)
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()  # until the parent closes it
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    state = _Echoed()
    started = time.monotonic()

    def read() -> None:
        index, expected = 0, block(seed, 0)
        offset = 0  # within ``expected``
        try:
            while chunk := sock.recv(1 << 16):
                view = memoryview(chunk)
                while view:
                    take = min(len(view), BLOCK - offset)
                    if (
                        state.first_difference is None
                        and view[:take] != expected[offset : offset + take]
                    ):
                        wrong = next(
                            i
                            for i in range(take)
                            if view[i] != expected[offset + i]  # the first wrong byte
                        )
                        state.first_difference = state.received + wrong
                    state.received += take
                    view, offset = view[take:], offset + take
                    if offset == BLOCK:
                        index, offset = index + 1, 0
                        expected = block(seed, index)
        except ConnectionResetError:
            state.reset = True
        except TimeoutError:
            state.timed_out = True

    reader = threading.Thread(target=read)
    reader.start()
    sent = 0
    try:
        while not stop.is_set() and time.monotonic() - started < max_s:
            sock.sendall(block(seed, sent // BLOCK))
            sent += BLOCK
            time.sleep(max(0.0, started + sent / rate - time.monotonic()))
        sending_s = time.monotonic() - started
        sock.shutdown(socket.SHUT_WR)
    except (ConnectionResetError, BrokenPipeError):
        state.reset = True
        sending_s = time.monotonic() - started
    reader.join(120)
    sock.close()
    return EchoResult(
        sent=sent,
        received=state.received,
        first_difference=state.first_difference,
        reset=state.reset,
        intact=state.received == sent and state.first_difference is None,
        sending_s=round(sending_s, 3),
        seconds=round(time.monotonic() - started, 3),
        timed_out=state.timed_out,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devagent.lab.traffic")
    sub = parser.add_subparsers(dest="kind", required=True)
    echo = sub.add_parser("echo", help="a checked echo stream until stdin closes")
    echo.add_argument("host")
    echo.add_argument("port", type=int)
    echo.add_argument("--seed", type=int, default=1)
    echo.add_argument("--rate", type=int, default=256 << 10, help="bytes per second sent")
    echo.add_argument("--max-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    with contextlib.suppress(BrokenPipeError):
        result = echo_client(args.host, args.port, args.seed, args.rate, args.max_s)
        print(msgspec.json.encode(result).decode())


if __name__ == "__main__":
    main()
