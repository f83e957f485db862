"""Run inside a network namespace (``ip netns exec NS python net_lab_client.py ...``): talk
to the test guest's TCP services and print one JSON line saying what came back.

    echo HOST PORT BYTES SEED [RATE]   send BYTES pseudo-random bytes (at most RATE bytes/s),
                                  half-close, read the echo
    stream HOST PORT LINES        read the lines "1\\n2\\n..." up to LINES, check each one
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import sys
import threading
import time


def echo(host: str, port: int, size: int, seed: int, rate: int = 0) -> dict[str, object]:
    data = random.Random(seed).randbytes(size)
    sock = socket.create_connection((host, port), timeout=60)
    received = bytearray()

    def read() -> None:
        while chunk := sock.recv(1 << 16):
            received.extend(chunk)

    started = time.monotonic()
    reader = threading.Thread(target=read)
    reader.start()
    view = memoryview(data)
    for offset in range(0, size, 8192):
        sock.sendall(view[offset : offset + 8192])
        if rate:  # paced, so that what the test does meanwhile lands mid-stream
            time.sleep(max(0.0, started + (offset + 8192) / rate - time.monotonic()))
    sock.shutdown(socket.SHUT_WR)
    reader.join(120)
    sock.close()
    first_bad = next(
        (i for i, (a, b) in enumerate(zip(data, received, strict=False)) if a != b), None
    )
    return {
        "sent": size,
        "received": len(received),
        "intact": bytes(received) == data,
        "first_difference": first_bad,
        "sha256": hashlib.sha256(received).hexdigest(),
        "seconds": round(time.monotonic() - started, 3),
    }


def stream(host: str, port: int, lines: int) -> dict[str, object]:
    sock = socket.create_connection((host, port), timeout=60)
    expected = 1
    pending = b""
    good = True
    while expected <= lines:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        *complete, pending = (pending + chunk).split(b"\n")
        for line in complete[: lines - expected + 1]:
            good = good and line == str(expected).encode()
            expected += 1
    sock.close()
    return {"lines": expected - 1, "in_sequence": good and expected > lines}


def main(argv: list[str]) -> None:
    kind, host, port = argv[0], argv[1], int(argv[2])
    if kind == "echo":
        result = echo(host, port, int(argv[3]), int(argv[4]), *(int(a) for a in argv[5:6]))
    elif kind == "stream":
        result = stream(host, port, int(argv[3]))
    else:
        raise SystemExit(f"unknown request {kind!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
