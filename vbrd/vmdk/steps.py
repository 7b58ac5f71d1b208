"""The I/O a chain needs, as values: the chain's logic asks, a driver answers.

Opening a chain, mapping a read onto its files and listing its allocated areas are written
once, as generators that yield batches of requests and receive the answers in the same order.
A synchronous driver answers them with ``os.pread`` on local files (san, hotadd); an
asynchronous one answers a whole batch concurrently with HTTP range requests (nbd). That is
why nothing in :mod:`vbrd.vmdk.chain` performs I/O itself.
"""
from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Read:
    """``length`` bytes of ``file`` at ``offset``; with ``exact=False`` a short answer at the
    end of the file is fine (descriptor heads)."""

    file: str
    offset: int
    length: int
    exact: bool = True


@dataclass(frozen=True, slots=True)
class Stat:
    """The size of ``file`` in bytes; also proves it can be opened."""

    file: str


@dataclass(frozen=True, slots=True)
class DataRanges:
    """Which parts of ``[offset, offset + length)`` of ``file`` hold data, as
    ``[(offset, length), ...]``; a source that cannot tell answers the whole range."""

    file: str
    offset: int
    length: int


Request = Read | Stat | DataRanges
Steps = Generator[list[Request], list[Any], T]


@dataclass(frozen=True, slots=True)
class Span:
    """Several adjacent :class:`Read` requests of one file served by one larger read."""

    file: str
    offset: int
    length: int
    parts: tuple[tuple[int, Read], ...]  # (index in the batch, request)


def coalesce(batch: list[Request], limit: int = 8 << 20) -> tuple[list[Span], list[int]]:
    """Merge the batch's exact :class:`Read` requests that touch or overlap in the same file
    into spans of at most ``limit`` bytes (grain tables of hosted sparse files lie back to
    back, so a scan of a region becomes one request). Returns the spans and the indexes of
    the requests that are not exact reads."""
    reads = sorted(
        (req.file, req.offset, index, req)
        for index, req in enumerate(batch)
        if isinstance(req, Read) and req.exact
    )
    others = [i for i, req in enumerate(batch) if not (isinstance(req, Read) and req.exact)]
    spans: list[Span] = []
    current: list[tuple[int, Read]] = []
    file, start, end = "", 0, 0
    for req_file, offset, index, req in reads:
        req_end = offset + req.length
        if current and req_file == file and offset <= end and max(end, req_end) - start <= limit:
            current.append((index, req))
            end = max(end, req_end)
            continue
        if current:
            spans.append(Span(file, start, end - start, tuple(current)))
        current, file, start, end = [(index, req)], req_file, offset, req_end
    if current:
        spans.append(Span(file, start, end - start, tuple(current)))
    return spans, others


def split_span(span: Span, data: bytes, answers: list[Any]) -> None:
    """Hand each request of ``span`` its slice of the span's ``data``."""
    view = memoryview(data)
    for index, req in span.parts:
        start = req.offset - span.offset
        answers[index] = bytes(view[start : start + req.length])
