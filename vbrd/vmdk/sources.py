"""Where a chain's bytes come from: local files (san, hotadd) or HTTP ranges (nbd).

A *file space* names files (``resolve`` a name found in a descriptor relative to that
descriptor) and opens them as *range sources*: ``size`` plus ``pread``. Local sources are
synchronous and thread-safe (``os.pread`` has no shared file position), so one chain can be
read from several worker threads at once. HTTP sources are asynchronous; a semaphore shared
by a disk's sources bounds the requests in flight.
"""
from __future__ import annotations

import asyncio
import errno
import os
import posixpath
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from vbrd.errors import TransportError

if TYPE_CHECKING:  # aiohttp costs a data mover that reads local files a third of a second
    import aiohttp
    from yarl import URL


class RangeSource(Protocol):
    """A file read by offset, from any thread."""

    name: str
    size: int

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; short only at the end of the file."""
        ...

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The parts of the range that hold data (the whole range when unknown)."""
        ...

    def close(self) -> None: ...


class AsyncRangeSource(Protocol):
    """A file read by offset over the network."""

    name: str
    size: int

    async def pread(self, offset: int, length: int) -> bytes: ...

    async def pread_parts(self, offset: int, length: int) -> list[bytes]:
        """The same bytes as ``pread``, in the pieces they arrived in, so that a caller
        assembling a larger buffer copies them once (copies dominate the cost of reading
        over HTTP)."""
        ...

    async def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]: ...

    async def close(self) -> None: ...


class FileSpace(Protocol):
    """Names and opens the files of a chain, synchronously."""

    def resolve(self, base: str, name: str) -> str: ...

    def open(self, location: str) -> RangeSource: ...


class AsyncFileSpace(Protocol):
    """Names and opens the files of a chain over the network."""

    def resolve(self, base: str, name: str) -> str: ...

    async def open(self, location: str) -> AsyncRangeSource: ...


# --------------------------------------------------------------------------------------------
# local files


class LocalFile:
    """A local file opened read-only."""

    def __init__(self, path: str, *, fd: int | None = None) -> None:
        """Open ``path``, or take ``fd``, already opened (confined) by the caller, as it."""
        self.name = path
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise TransportError(f"{path}: cannot open: {exc.strerror}") from exc
        self._fd = fd
        self.size = os.fstat(self._fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
            if len(data) == length or not data:
                return data
            parts = [data]  # very large reads may come back in pieces
            got = len(data)
            while got < length:
                more = os.pread(self._fd, length - got, offset + got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            return b"".join(parts)
        except OSError as exc:
            raise TransportError(
                f"{self.name}: read of {length} bytes at {offset} failed: {exc.strerror}"
            ) from exc

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """SEEK_DATA/SEEK_HOLE; a file system that cannot tell (NFS v3) reports all data."""
        end = min(offset + length, self.size)
        ranges: list[tuple[int, int]] = []
        pos = offset
        try:
            while pos < end:
                try:
                    start = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # no data after pos
                        break
                    raise
                if start >= end:
                    break
                stop = min(os.lseek(self._fd, start, os.SEEK_HOLE), end)
                ranges.append((start, stop - start))
                pos = stop
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return [(offset, end - offset)] if end > offset else []
            raise TransportError(
                f"{self.name}: cannot list allocated areas: {exc.strerror}"
            ) from exc
        return ranges

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalFileSpace:
    """Files on this machine. Relative names resolve beside the descriptor; absolute ones
    go through ``map_absolute`` (an ESXi parent hint ``/vmfs/volumes/ds/...`` names a path on
    the host, which the san mode maps to where this proxy sees that datastore)."""

    def __init__(self, map_absolute: Callable[[str], str] | None = None) -> None:
        self._map_absolute = map_absolute

    def resolve(self, base: str, name: str) -> str:
        name = name.replace("\\", "/")
        if posixpath.isabs(name):
            return self._map_absolute(name) if self._map_absolute else name
        return posixpath.normpath(posixpath.join(posixpath.dirname(base), name))

    def open(self, location: str) -> LocalFile:
        return LocalFile(location)


# --------------------------------------------------------------------------------------------
# HTTP


_CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)")


class HttpRangeSource:
    """A file read with HTTP ``Range`` requests (vCenter's and ESXi's ``/folder`` access).

    ``limiter`` is shared by all sources of one disk so that the disk keeps a bounded number
    of requests in flight whatever the caller does."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str | URL,
        name: str,
        size: int,
        limiter: asyncio.Semaphore,
        retries: int = 2,
    ) -> None:
        self.session, self.url, self.name, self.size = session, url, name, size
        self._limiter = limiter
        self._retries = retries

    @classmethod
    async def open(
        cls,
        session: aiohttp.ClientSession,
        url: str | URL,
        name: str,
        limiter: asyncio.Semaphore,
    ) -> HttpRangeSource:
        """Ask for the first byte: proves the file is there and that ranges are honoured,
        and gives the size from ``Content-Range``."""
        source = cls(session, url, name, 0, limiter)
        status, headers, _ = await source._get(0, 1, probe=True)
        if status == 416:
            match = _CONTENT_RANGE.fullmatch(headers.get("Content-Range", ""))
            source.size = int(match.group(3)) if match and match.group(3) != "*" else 0
            return source
        match = _CONTENT_RANGE.fullmatch(headers.get("Content-Range", ""))
        if not match or match.group(3) == "*":
            raise TransportError(f"{name}: the server did not say how large the file is")
        source.size = int(match.group(3))
        return source

    async def pread(self, offset: int, length: int) -> bytes:
        parts = await self.pread_parts(offset, length)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def pread_parts(self, offset: int, length: int) -> list[bytes]:
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return []
        _, _, parts = await self._get(offset, length)
        return parts

    async def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        end = min(offset + length, self.size)
        return [(offset, end - offset)] if end > offset else []

    async def close(self) -> None:
        """The session belongs to the file space."""

    async def _get(
        self, offset: int, length: int, probe: bool = False
    ) -> tuple[int, dict[str, str], list[bytes]]:
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        for attempt in range(self._retries + 1):
            try:
                async with self._limiter, self.session.get(self.url, headers=headers) as resp:
                    if resp.status == 206:
                        match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
                        if not match or match.group(1) is None or int(match.group(1)) != offset:
                            raise TransportError(
                                f"{self.name}: the server answered another range than bytes "
                                f"{offset}-{offset + length - 1}"
                            )
                        parts = []
                        got = 0
                        while part := await resp.content.readany():
                            parts.append(part)
                            got += len(part)
                        if got != length and not probe:
                            raise TransportError(
                                f"{self.name}: asked for {length} bytes at {offset}, got {got}"
                            )
                        return resp.status, dict(resp.headers), parts
                    if resp.status == 416 and probe:
                        return resp.status, dict(resp.headers), []
                    raise self._status_error(resp.status, resp.reason or "")
            except (_client_errors() + (TimeoutError,)) as exc:
                if attempt == self._retries:
                    raise TransportError(f"{self.name}: {self._what(exc)}") from exc
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def _status_error(self, status: int, reason: str) -> TransportError:
        if status == 200:
            return TransportError(
                f"{self.name}: the server ignores Range requests (answered 200 with the whole "
                "file); refusing to download it whole"
            )
        if status == 404:
            return TransportError(
                f"{self.name}: not found (HTTP 404: no such file, datastore or datacenter)"
            )
        if status in (401, 403):
            return TransportError(
                f"{self.name}: access refused (HTTP {status} {reason}); check the vCenter user "
                "and its datastore browse privilege"
            )
        return TransportError(f"{self.name}: HTTP {status} {reason}")

    @staticmethod
    def _what(exc: BaseException) -> str:
        return str(exc) or type(exc).__name__


def _client_errors() -> tuple[type[Exception], ...]:
    """aiohttp's retryable errors; imported here because only HTTP sources need aiohttp, and
    an HTTP source's session has imported it already."""
    import aiohttp

    return (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
