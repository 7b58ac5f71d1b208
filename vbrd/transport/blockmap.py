"""The block map: what the repository's data mover received for one disk.

The data mover does not write restore points; the Manager does, once every disk of the VM is
durable. The mover leaves this file behind and the Manager turns it into the point's disk
index: for a full backup the map's blocks over an all-zero disk, for an incremental the map's
blocks over the previous point's index (blocks the map does not name are unchanged).

Format, version 1, all integers big-endian::

    header   24 bytes  magic "VBRDBMAP", version u16, flags u16 (0),
                       block_size u32, disk_size u64
    entries  45 bytes  block_no u64, length u32, kind u8 (0 zero, 1 data), sha256 32 bytes
                       (32 zero bytes for a zero block); block_no strictly increasing;
                       length is the block's real length (the disk's last block may be short)
    trailer  40 bytes  entry count u64, sha256 of every byte before this digest

The file is written under a temporary name, fsynced and renamed, so it exists complete or not
at all.
"""
from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from vbrd.errors import TransportError

MAGIC = b"VBRDBMAP"
VERSION = 1
HEADER = struct.Struct(">8sHHIQ")
ENTRY = struct.Struct(">QIB32s")
TRAILER_COUNT = struct.Struct(">Q")
DIGEST_SIZE = 32
KIND_ZERO = 0
KIND_DATA = 1
_NO_DIGEST = bytes(DIGEST_SIZE)
_FLUSH_AT = 1 << 20


def partial_path(path: str) -> str:
    """Where the map is written until it is complete."""
    return f"{path}.partial"


class BlockMapError(TransportError):
    """A block map file is damaged or not a block map."""


@dataclass(frozen=True, slots=True)
class MapEntry:
    """One block; ``digest`` is ``None`` for an all-zero block (nothing stored)."""

    block_no: int
    length: int
    digest: bytes | None


class BlockMapWriter:
    """Appends entries in block order and publishes the file atomically on :meth:`finish`."""

    def __init__(self, path: str, block_size: int, disk_size: int) -> None:
        self.path = path
        self.block_size = block_size
        self.disk_size = disk_size
        self.count = 0
        self._tmp = partial_path(path)
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in finish/abort
        self._hash = hashlib.sha256()
        self._buf = bytearray()
        self._last = -1
        self._write(HEADER.pack(MAGIC, VERSION, 0, block_size, disk_size))

    def _write(self, data: bytes) -> None:
        self._hash.update(data)
        self._buf += data
        if len(self._buf) >= _FLUSH_AT:
            self._file.write(self._buf)
            self._buf.clear()

    def add(self, block_no: int, length: int, digest: bytes | None) -> None:
        if block_no <= self._last:
            raise BlockMapError(
                f"block {block_no} arrived after block {self._last}; blocks must come in order"
            )
        if not 0 < length <= self.block_size or block_no * self.block_size + length > (
            self.disk_size
        ):
            raise BlockMapError(
                f"block {block_no} of {length} bytes does not fit a disk of {self.disk_size} "
                f"bytes in blocks of {self.block_size}"
            )
        self._last = block_no
        self.count += 1
        if digest is None:
            self._write(ENTRY.pack(block_no, length, KIND_ZERO, _NO_DIGEST))
        else:
            self._write(ENTRY.pack(block_no, length, KIND_DATA, digest))

    def finish(self) -> str:
        """Write the trailer, make the file durable and give it its final name."""
        self._write(TRAILER_COUNT.pack(self.count))
        self._buf += self._hash.digest()
        self._file.write(self._buf)
        self._buf.clear()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self.path

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


@dataclass(frozen=True, slots=True)
class BlockMap:
    path: str
    block_size: int
    disk_size: int
    count: int

    def __iter__(self) -> Iterator[tuple[int, bytes | None]]:
        """``(block_no, digest)`` pairs, what a point's disk index takes; ``None`` is zero."""
        for e in self.entries():
            yield e.block_no, e.digest

    def entries(self) -> Iterator[MapEntry]:
        """The entries in block order, read in chunks so a large map never sits in memory."""
        with open(self.path, "rb") as f:
            f.seek(HEADER.size)
            left = self.count
            while left:
                n = min(left, 1 << 14)
                chunk = f.read(n * ENTRY.size)
                for no, length, kind, digest in ENTRY.iter_unpack(chunk):
                    yield MapEntry(no, length, digest if kind == KIND_DATA else None)
                left -= n


def read_block_map(path: str) -> BlockMap:
    """Open and check a block map (magic, version, size and checksum)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
            if len(head) < HEADER.size:
                raise BlockMapError(f"block map {path} is truncated ({size} bytes)")
            magic, version, _flags, block_size, disk_size = HEADER.unpack(head)
            if magic != MAGIC:
                raise BlockMapError(f"{path} is not a block map (magic {magic!r})")
            if version != VERSION:
                raise BlockMapError(f"block map {path} has unknown version {version}")
            body = size - HEADER.size - TRAILER_COUNT.size - DIGEST_SIZE
            if body < 0 or body % ENTRY.size:
                raise BlockMapError(f"block map {path} is truncated ({size} bytes)")
            h = hashlib.sha256(head)
            left = body + TRAILER_COUNT.size
            while left:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    raise BlockMapError(f"block map {path} is truncated")
                h.update(chunk)
                left -= len(chunk)
            f.seek(HEADER.size + body)
            (count,) = TRAILER_COUNT.unpack(f.read(TRAILER_COUNT.size))
            if h.digest() != f.read(DIGEST_SIZE):
                raise BlockMapError(f"block map {path} fails its checksum")
            if count * ENTRY.size != body:
                raise BlockMapError(
                    f"block map {path} names {count} entries but holds {body // ENTRY.size}"
                )
    except OSError as e:
        raise BlockMapError(f"cannot read block map {path}: {e.strerror or e}") from None
    return BlockMap(path, block_size, disk_size, count)
