"""Drivers that run a chain's steps against real files.

:class:`VmdkChain` answers with local files in the calling thread: blocking, meant to be used
from worker threads (``asyncio.to_thread``); reads of one chain may run in several threads at
once. :class:`AsyncVmdkChain` answers a batch of requests concurrently over HTTP and splits
large data reads into chunks fetched in parallel.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

from vbrd.errors import TransportError
from vbrd.models import Extent
from vbrd.vmdk.chain import Chain, open_chain
from vbrd.vmdk.extents import DATA, Piece
from vbrd.vmdk.sources import AsyncFileSpace, AsyncRangeSource, FileSpace, RangeSource
from vbrd.vmdk.steps import DataRanges, Read, Request, Stat, Steps, T, coalesce, split_span

#: Allocation is listed window by window so that a huge disk never needs all its grain
#: tables or all its extents in memory at once.
ALLOCATION_WINDOW = 1 << 30


def windows(capacity: int, window: int = ALLOCATION_WINDOW) -> list[tuple[int, int]]:
    """The (offset, length) windows in which allocation is listed."""
    return [(start, min(window, capacity - start)) for start in range(0, capacity, window)]


class ExtentJoiner:
    """Joins extents that touch across window boundaries, keeping one back."""

    def __init__(self) -> None:
        self._pending: Extent | None = None

    def add(self, extents: list[Extent]) -> list[Extent]:
        """Feed a window's extents (sorted); returns those that are complete."""
        ready = []
        for extent in extents:
            pending = self._pending
            if pending is not None and extent.offset <= pending.end:
                end = max(pending.end, extent.end)
                self._pending = Extent(pending.offset, end - pending.offset)
                continue
            if pending is not None:
                ready.append(pending)
            self._pending = extent
        return ready

    def finish(self) -> list[Extent]:
        pending, self._pending = self._pending, None
        return [pending] if pending is not None else []


def _short(request: Read, got: int) -> TransportError:
    return TransportError(
        f"{request.file}: asked for {request.length} bytes at {request.offset}, got {got}: the "
        "file is shorter than its descriptor or grain tables say"
    )


class VmdkChain:
    """A chain on local files, read synchronously."""

    def __init__(self, chain: Chain, sources: dict[str, RangeSource]) -> None:
        self.chain = chain
        self._sources = sources

    @classmethod
    def open(cls, location: str, space: FileSpace, capacity: int | None = None) -> VmdkChain:
        """Open the chain whose leaf descriptor is ``location``; every file of the chain is
        opened (so failures show here, naming the file), or none stays open. ``capacity``:
        the disk's size as vSphere reports it, when known (see
        :func:`vbrd.vmdk.chain.open_chain`)."""
        sources: dict[str, RangeSource] = {}

        def source(name: str) -> RangeSource:
            if name not in sources:
                sources[name] = space.open(name)
            return sources[name]

        try:
            chain = _run(open_chain(location, space.resolve, capacity),
                         lambda batch: _answer(batch, source))
        except BaseException:
            for opened in sources.values():
                opened.close()
            raise
        return cls(chain, sources)

    @property
    def capacity(self) -> int:
        return self.chain.capacity

    @property
    def files(self) -> list[str]:
        return self.chain.files

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes of the chain at ``offset``."""
        pieces = _run(self.chain.plan(offset, length), self._answer)
        if len(pieces) == 1 and pieces[0][0] == DATA:
            return self._data(pieces[0])
        return b"".join(self._data(p) if p[0] == DATA else bytes(p[1]) for p in pieces)

    def allocated_extents(self, window: int = ALLOCATION_WINDOW) -> Iterator[Extent]:
        """The areas any layer holds data for, in order; the rest reads as zeros."""
        joiner = ExtentJoiner()
        for start, length in windows(self.capacity, window):
            yield from joiner.add(self.allocated_in(start, length))
        yield from joiner.finish()

    def allocated_in(self, offset: int, length: int) -> list[Extent]:
        """The allocated areas within one window (clipped to it)."""
        return _run(self.chain.allocated(offset, length), self._answer)

    def close(self) -> None:
        for source in self._sources.values():
            source.close()
        self._sources.clear()

    def __enter__(self) -> VmdkChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _data(self, piece: Piece) -> bytes:
        _, length, file, offset = piece
        data = self._sources[file].pread(offset, length)
        if len(data) != length:
            raise _short(Read(file, offset, length), len(data))
        return data

    def _answer(self, batch: list[Request]) -> list[Any]:
        return _answer(batch, self._sources.__getitem__)


class ThreadedChainReader:
    """A :class:`vbrd.protocols.DiskReader` over a local :class:`VmdkChain`: the snapshot's
    bytes from local files or devices, each blocking call in a worker thread so several
    chunks are read at once."""

    def __init__(self, chain: VmdkChain) -> None:
        self._chain = chain
        self.size = chain.capacity

    async def extents(self) -> AsyncIterator[Extent]:
        """Allocated areas of the chain (the union of its layers'; holes of flat files
        through SEEK_DATA), listed a window at a time in a worker thread."""
        joiner = ExtentJoiner()
        for start, length in windows(self.size):
            window = await asyncio.to_thread(self._chain.allocated_in, start, length)
            for extent in joiner.add(window):
                yield extent
        for extent in joiner.finish():
            yield extent

    async def read(self, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self._chain.read, offset, length)

    async def close(self) -> None:
        await asyncio.to_thread(self._chain.close)


def _answer(batch: list[Request], source: Any) -> list[Any]:
    answers: list[Any] = []
    for request in batch:
        if isinstance(request, Read):
            data = source(request.file).pread(request.offset, request.length)
            if request.exact and len(data) != request.length:
                raise _short(request, len(data))
            answers.append(data)
        elif isinstance(request, Stat):
            answers.append(source(request.file).size)
        else:
            answers.append(source(request.file).data_ranges(request.offset, request.length))
    return answers


def _run(steps: Steps[T], answer: Any) -> T:
    try:
        batch = next(steps)
        while True:
            batch = steps.send(answer(batch))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


class AsyncVmdkChain:
    """A chain read over the network, with several requests in flight."""

    def __init__(
        self, chain: Chain, sources: dict[str, AsyncRangeSource], chunk: int = 1 << 20
    ) -> None:
        self.chain = chain
        self._sources = sources
        self._chunk = chunk

    @classmethod
    async def open(
        cls, location: str, space: AsyncFileSpace, chunk: int = 1 << 20,
        capacity: int | None = None,
    ) -> AsyncVmdkChain:
        sources: dict[str, AsyncRangeSource] = {}
        locks: dict[str, asyncio.Lock] = {}

        async def source(name: str) -> AsyncRangeSource:
            async with locks.setdefault(name, asyncio.Lock()):
                if name not in sources:
                    sources[name] = await space.open(name)
            return sources[name]

        try:
            chain = await _run_async(
                open_chain(location, space.resolve, capacity),
                lambda batch: _answer_async(batch, source),
            )
        except BaseException:
            for opened in sources.values():
                await opened.close()
            raise
        return cls(chain, sources, chunk)

    @property
    def capacity(self) -> int:
        return self.chain.capacity

    @property
    def files(self) -> list[str]:
        return self.chain.files

    async def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes of the chain at ``offset``; large data pieces are fetched
        as concurrent chunk requests."""
        pieces = await _run_async(self.chain.plan(offset, length), self._answer)
        parts: list[Any] = []
        fetches: list[Coroutine[Any, Any, list[bytes]]] = []
        for kind, size, file, file_offset in pieces:
            if kind != DATA:
                parts.append(bytes(size))
                continue
            for start in range(0, size, self._chunk):
                request = Read(file, file_offset + start, min(self._chunk, size - start))
                parts.append(len(fetches))
                fetches.append(self._read_exact(request))
        results = await _gather(fetches)
        received = [results[part] if isinstance(part, int) else [part] for part in parts]
        flat = [chunk for chunks in received for chunk in chunks]
        return flat[0] if len(flat) == 1 else b"".join(flat)

    async def allocated_extents(self, window: int = ALLOCATION_WINDOW) -> AsyncIterator[Extent]:
        """The areas any layer holds data for (over HTTP a flat extent counts as wholly
        allocated: the server cannot tell its holes)."""
        joiner = ExtentJoiner()
        for start, length in windows(self.capacity, window):
            for extent in joiner.add(
                await _run_async(self.chain.allocated(start, length), self._answer)
            ):
                yield extent
        for extent in joiner.finish():
            yield extent

    async def close(self) -> None:
        for source in self._sources.values():
            await source.close()
        self._sources.clear()

    async def _read_exact(self, request: Read) -> list[bytes]:
        parts = await self._sources[request.file].pread_parts(request.offset, request.length)
        got = sum(len(part) for part in parts)
        if got != request.length:
            raise _short(request, got)
        return parts

    async def _answer(self, batch: list[Request]) -> list[Any]:
        async def source(name: str) -> AsyncRangeSource:
            return self._sources[name]

        return await _answer_async(batch, source)


async def _answer_async(batch: list[Request], source: Any) -> list[Any]:
    """Answer a batch concurrently; adjacent reads of one file become one request."""
    answers: list[Any] = [None] * len(batch)
    spans, others = coalesce(batch)

    async def span(item: Any) -> None:
        data = await (await source(item.file)).pread(item.offset, item.length)
        if len(data) != item.length:
            raise _short(Read(item.file, item.offset, item.length), len(data))
        split_span(item, data, answers)

    async def other(index: int) -> None:
        request = batch[index]
        opened = await source(request.file)
        if isinstance(request, Read):
            answers[index] = await opened.pread(request.offset, request.length)
        elif isinstance(request, Stat):
            answers[index] = opened.size
        elif isinstance(request, DataRanges):
            answers[index] = await opened.data_ranges(request.offset, request.length)

    await _gather([span(item) for item in spans] + [other(index) for index in others])
    return answers


async def _gather(coroutines: list[Any]) -> list[Any]:
    """Run concurrently; on the first failure cancel the rest and raise that failure as it is
    (a TaskGroup would wrap it in an ExceptionGroup)."""
    if len(coroutines) == 1:
        return [await coroutines[0]]
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _run_async(steps: Steps[T], answer: Any) -> T:
    try:
        batch = next(steps)
        while True:
            batch = steps.send(await answer(batch))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
