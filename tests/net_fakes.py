"""A fake QEMU stream netdev for net agent tests: frames in and out of a unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable

from devagent.net.codec import NEED_DATA, Frame, FrameDecoder, encode_frame
from devagent.wait import wait_until

ETH_HEADER = bytes.fromhex("525400000001525400000002") + b"\x08\x00"


def eth(n: int, size: int = 60) -> bytes:
    """A distinct Ethernet frame numbered ``n``."""
    body = n.to_bytes(4, "big")
    return ETH_HEADER + body + bytes(size - len(ETH_HEADER) - len(body))


class FakeVm:
    """The QEMU side of a stream connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.received: list[bytes] = []

    @classmethod
    async def over_socket(cls, sock: socket.socket) -> FakeVm:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    async def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(encode_frame(f) for f in frames))
        await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def _decode(self) -> None:
        while (event := self.decoder.next_event()) is not NEED_DATA:
            if isinstance(event, Frame):
                self.received.append(event.data)
            else:
                return

    async def receive(self, count: int, timeout: float = 5.0) -> list[bytes]:
        """Wait until ``count`` frames in all have come; return them all."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(self.received)} of {count} frames came")
            data = await asyncio.wait_for(self.reader.read(1 << 16), left)
            if not data:
                raise ConnectionError(f"closed after {len(self.received)} of {count} frames")
            self.decoder.receive_data(data)
            self._decode()
        return self.received

    async def nothing_for(self, seconds: float = 0.2) -> bool:
        """True when no byte comes for ``seconds``."""
        try:
            data = await asyncio.wait_for(self.reader.read(1 << 16), seconds)
        except TimeoutError:
            return True
        self.decoder.receive_data(data)
        self._decode()
        return False

    async def closed_by_peer(self, timeout: float = 5.0) -> bool:
        try:
            while await asyncio.wait_for(self.reader.read(1 << 16), timeout):
                pass
        except (TimeoutError, ConnectionError):
            return False
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def until(
    condition: Callable[[], bool], timeout: float = 5.0, what: str = "the agent's state"
) -> None:
    """Until ``condition()`` holds: the agent's counters and links have no event to wait on,
    so this asks again, through the one wait helper (a deadline, and a reason)."""
    await wait_until(condition, timeout=timeout, what=what, interval=0.005)


class LogEvent(logging.Handler):
    """An ``asyncio.Event`` set by the first log record whose message contains ``text``:
    for waiting until the code under test says it did something."""

    def __init__(self, logger: str, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.logger = logging.getLogger(logger)
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()

    def __enter__(self) -> asyncio.Event:
        self.logger.addHandler(self)
        self.saved_level = self.logger.level
        if not self.logger.isEnabledFor(logging.INFO):
            self.logger.setLevel(logging.INFO)
        return self.event

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved_level)
