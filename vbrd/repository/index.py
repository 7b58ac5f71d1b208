"""A disk's block index: one digest per block number, and its file format.

The index is a flat array of 32-byte digests, ``ZERO_DIGEST`` marking an all-zero block, so
that looking up block ``n`` is a slice and an 8 GiB disk at 1 MiB blocks is 256 KiB. On disk
the array is one zstd frame: the runs of zero markers of a thin disk cost next to nothing,
and random digests cost 0.1 % more than raw.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import zstandard

from vbrd.repository.blocks import DIGEST_SIZE, ZERO_DIGEST

INDEX_MAGIC = b"VBRDIDX\0"
INDEX_VERSION = 1
# magic, version, digest size, block size, capacity, block count
_HEADER = struct.Struct("<8sHHIQQ")

MAX_INDEX_BLOCKS = 1 << 26
"""The most blocks one disk's index may hold: 64 TiB at 1 MiB blocks, 2 GiB of entries.

Checked before anything is allocated, so a damaged or hostile header cannot make a reader
decompress terabytes; a disk that needs more is refused when its index is begun."""


class IndexFormatError(ValueError):
    """The bytes are not a block index this version understands."""


def block_count(capacity: int, block_size: int) -> int:
    """Blocks needed to cover ``capacity`` bytes; the last one may be short."""
    return -(-capacity // block_size)


class DigestList(Sequence["bytes | None"]):
    """A read-only view of an index's entries: ``digests[n]`` is a digest or None (zero)."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    def __len__(self) -> int:
        return len(self._raw) // DIGEST_SIZE

    @overload
    def __getitem__(self, i: int) -> bytes | None: ...

    @overload
    def __getitem__(self, i: slice) -> list[bytes | None]: ...

    def __getitem__(self, i: int | slice) -> bytes | None | list[bytes | None]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"block {i} is outside the index ({n} blocks)")
        entry = self._raw[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
        return None if entry == ZERO_DIGEST else entry


@dataclass(frozen=True)
class DiskIndex:
    """The blocks of one disk in one restore point."""

    point_id: str
    disk_key: int
    label: str
    capacity: int
    block_size: int
    change_id: str | None
    entries: bytes
    """``block_count`` digests of 32 bytes, back to back; ZERO_DIGEST for a zero block."""

    @property
    def block_count(self) -> int:
        return len(self.entries) // DIGEST_SIZE

    def __len__(self) -> int:
        return self.block_count

    @property
    def digests(self) -> DigestList:
        return DigestList(self.entries)

    def digest(self, block_no: int) -> bytes | None:
        return self.digests[block_no]

    def block_length(self, block_no: int) -> int:
        """Bytes block ``block_no`` covers: ``block_size`` except for a short last block."""
        return min(self.block_size, self.capacity - block_no * self.block_size)

    def nonzero(self) -> Iterator[tuple[int, bytes]]:
        """``(block number, digest)`` for every block that holds data, in disk order."""
        raw, zero = self.entries, ZERO_DIGEST
        for n in range(len(raw) // DIGEST_SIZE):
            entry = raw[n * DIGEST_SIZE : (n + 1) * DIGEST_SIZE]
            if entry != zero:
                yield n, entry

    def unique_digests(self) -> set[bytes]:
        return digest_set(self.entries)


def digest_set(entries: bytes) -> set[bytes]:
    """The distinct blocks a run of entries names (zero blocks are none)."""
    found = {entries[i : i + DIGEST_SIZE] for i in range(0, len(entries), DIGEST_SIZE)}
    found.discard(ZERO_DIGEST)
    return found


def encode_index(entries: bytes | bytearray, *, capacity: int, block_size: int) -> bytes:
    count = len(entries) // DIGEST_SIZE
    if count != block_count(capacity, block_size) or len(entries) % DIGEST_SIZE:
        raise ValueError(f"{len(entries)} bytes of entries do not cover {capacity} bytes")
    header = _HEADER.pack(INDEX_MAGIC, INDEX_VERSION, DIGEST_SIZE, block_size, capacity, count)
    payload = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(bytes(entries))
    return header + payload


def decode_index(data: bytes) -> tuple[int, int, bytes]:
    """``(capacity, block_size, entries)`` of an index file's bytes."""
    if len(data) < _HEADER.size:
        raise IndexFormatError("index file is shorter than its header")
    magic, version, digest_size, block_size, capacity, count = _HEADER.unpack_from(data)
    if magic != INDEX_MAGIC:
        raise IndexFormatError("not a block index (bad magic)")
    if version != INDEX_VERSION:
        raise IndexFormatError(f"block index version {version} is not supported")
    if digest_size != DIGEST_SIZE or block_size <= 0:
        raise IndexFormatError(f"block index with {digest_size}-byte digests is not supported")
    if count != block_count(capacity, block_size):
        raise IndexFormatError(f"{count} blocks do not cover a capacity of {capacity} bytes")
    if count > MAX_INDEX_BLOCKS:
        raise IndexFormatError(f"index claims {count} blocks, more than the {MAX_INDEX_BLOCKS} "
                               f"an index may hold")
    expected = count * DIGEST_SIZE
    payload = data[_HEADER.size :]
    try:
        declared = zstandard.frame_content_size(payload)
        if declared != expected:
            raise IndexFormatError(f"index holds {declared} bytes of entries, not {expected}")
        entries = zstandard.ZstdDecompressor().decompress(payload)
    except zstandard.ZstdError as exc:
        raise IndexFormatError(f"cannot decompress the index: {exc}") from exc
    if len(entries) != expected:
        raise IndexFormatError(f"index holds {len(entries)} bytes of entries, not {expected}")
    return capacity, block_size, entries
