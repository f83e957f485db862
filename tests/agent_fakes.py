"""A fake in-memory backend for agent tests: optional gates hold operations until released."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from devagent.agent.backend import Backend, BackendError, Extent
from devagent.nbd.proto import Errno


class MemoryBackend(Backend):
    def __init__(self, size: int = 1 << 20, *, hold: bool = False) -> None:
        self.data = bytearray(size)
        self.hold = hold
        self.release = asyncio.Event()
        self.started = 0  # operations that reached the backend
        self.log: list[tuple[str, int, int]] = []
        self.fail: Errno | None = None
        self.closed = False

    @property
    def size(self) -> int:
        return len(self.data)

    async def _enter(self, op: str, offset: int, length: int) -> None:
        self.started += 1
        if self.hold:
            await self.release.wait()
        if self.fail is not None:
            raise BackendError(f"{op} failed on purpose", self.fail)
        self.log.append((op, offset, length))

    async def read(self, offset: int, length: int) -> bytes:
        await self._enter("read", offset, length)
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._enter("write", offset, len(data))
        self.data[offset : offset + len(data)] = data

    async def flush(self) -> None:
        await self._enter("flush", 0, 0)

    async def trim(self, offset: int, length: int) -> None:
        await self._enter("trim", offset, length)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        await self._enter("zero", offset, length)
        self.data[offset : offset + length] = bytes(length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        await self._enter("status", offset, length)
        return [Extent(length)]

    async def close(self) -> None:
        self.closed = True


async def until(condition: Callable[[], bool], what: str = "condition") -> None:
    """Poll until ``condition()`` holds; a hang guard (30 s), not a timing assertion."""
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} never became true")


def read_bytes(path: Path, offset: int = 0, length: int = -1) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)
