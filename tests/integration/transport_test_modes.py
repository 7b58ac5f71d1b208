"""Transport modes for testing the data movers on raw image files, no vSphere needed.

Registered in the proxy's data mover process through ``SourceSpec.plugin_modules``, so the
movers load them exactly as they load installed plugins. Each mode reads the file named by
``task.extra["image"]``:

- ``raw``: reads it; ``extents()`` reports the file's data areas (holes are unallocated).
- ``flaky``: as ``raw``, but every read at or past ``task.extra["fail_at"]`` fails, as a
  transport whose connection breaks mid-disk.
- ``nosan``: ``probe`` says no (no SAN path from this proxy).
- ``locked``: ``probe`` says yes, ``open`` fails.
- ``slow``: as ``raw``, sleeping ``task.extra["delay"]`` seconds per read.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from vbrd import hookimpl
from vbrd.errors import TransportError
from vbrd.models import DiskTask, Extent, ProbeResult


class ImageReader:
    def __init__(self, path: str, fail_at: int | None = None, delay: float = 0.0) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.fail_at = fail_at
        self.delay = delay

    async def extents(self) -> AsyncIterator[Extent]:
        offset = 0
        while offset < self.size:
            try:
                start = os.lseek(self.fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                return
            end = os.lseek(self.fd, start, os.SEEK_HOLE)
            yield Extent(start, end - start)
            offset = end

    async def read(self, offset: int, length: int) -> bytes:
        if self.fail_at is not None and offset + length > self.fail_at:
            raise TransportError(f"connection to the host was reset while reading {self.path}")
        if self.delay:
            await asyncio.sleep(self.delay)
        return await asyncio.to_thread(os.pread, self.fd, length, offset)

    async def close(self) -> None:
        os.close(self.fd)


class ImageMode:
    def __init__(self, name: str) -> None:
        self.name = name

    async def probe(self, task: DiskTask, context: Any) -> ProbeResult:
        if self.name == "nosan":
            return ProbeResult.no(f"no SAN path to {task.backing.datastore} from this proxy")
        return ProbeResult.ok()

    async def open(self, task: DiskTask, context: Any) -> ImageReader:
        if self.name == "locked":
            raise TransportError(f"cannot open {task.backing}: the file is locked")
        fail_at = task.extra.get("fail_at") if self.name == "flaky" else None
        delay = float(task.extra.get("delay", 0.0)) if self.name == "slow" else 0.0
        return ImageReader(task.extra["image"], fail_at, delay)


@hookimpl
def vbrd_transport_modes() -> list[ImageMode]:
    return [ImageMode(n) for n in ("raw", "flaky", "nosan", "locked", "slow")]
