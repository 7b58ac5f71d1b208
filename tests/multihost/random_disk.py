"""A transport mode for bandwidth tests: a disk of seeded random bytes, made while it is read.

Registered in a proxy's data mover because the proxy's agent.toml allows it
(``plugin_modules``; the module must be importable on the proxy host, as it is on this
machine). The disk is ``task.capacity`` bytes of incompressible data that no repository holds
yet (``task.extra["seed"]``), so every byte of it crosses the network, and no image file has
to be written first.
"""
from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

from vbrd import hookimpl
from vbrd.models import DiskTask, Extent, ProbeResult

CHUNK = 1 << 20


class RandomReader:
    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed

    async def extents(self) -> AsyncIterator[Extent]:
        yield Extent(0, self.size)

    def _bytes(self, offset: int, length: int) -> bytes:
        out = bytearray()
        for start in range(offset, offset + length, CHUNK):
            n = min(CHUNK, offset + length - start)
            out += random.Random(self.seed * 1_000_003 + start).randbytes(n)
        return bytes(out)

    async def read(self, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self._bytes, offset, length)

    async def close(self) -> None:
        pass


class RandomMode:
    name = "random"

    async def probe(self, task: DiskTask, context: Any) -> ProbeResult:
        return ProbeResult.ok()

    async def open(self, task: DiskTask, context: Any) -> RandomReader:
        return RandomReader(task.capacity, int(task.extra.get("seed", 0)))


@hookimpl
def vbrd_transport_modes() -> list[Any]:
    return [RandomMode()]
