"""The extents of one disk layer and how a range of the disk maps onto their files.

A layer's extents lie back to back in the virtual disk. Each maps a range to *pieces*:

- ``DATA``: bytes of a file at an offset,
- ``ZERO``: zeros this layer asserts (a zero grain, a ``ZERO`` extent),
- ``HOLE``: nothing here; the parent layer answers (the base's holes read as zeros).

Sparse extents find grains through a grain directory (read when the layer is opened) and
grain tables (read on demand and cached). Three sparse formats share that shape:

- hosted sparse ``KDMV`` (monolithicSparse/twoGbMaxExtentSparse; what ``qemu-img`` makes):
  32-bit sector pointers, 64 KiB grains, 512 entries per table;
- ``COWD`` (vmfsSparse, ESXi deltas on VMFS 5): 32-bit sector pointers, 512-byte grains,
  4096 entries per table;
- SESparse (ESXi deltas on VMFS 6 and disks over 2 TB): 64-bit entries whose top nibble is the
  grain's state, 4 KiB grains, 4096 entries per table.
"""
from __future__ import annotations

import struct
import sys
import threading
from array import array
from itertools import compress
from typing import Any, ClassVar

from vbrd.errors import TransportError
from vbrd.vmdk.descriptor import SECTOR
from vbrd.vmdk.steps import DataRanges, Read, Steps

HOLE, ZERO, DATA = 0, 1, 2

#: A piece: [kind, length, file or None, offset in file]. Lists, so that runs can grow in place.
Piece = list[Any]

#: Grain tables fetched for one call, by (extent, table index): a call never depends on the
#: shared cache keeping what it fetched, so eviction by concurrent readers cannot starve it.
Fetched = dict[tuple["SparseExtent", int], "array[int]"]

KDMV_MAGIC = b"KDMV"
COWD_MAGIC = b"COWD"
SESPARSE_MAGIC = 0xCAFEBABE
SESPARSE_VOLATILE_MAGIC = 0xCAFECAFE
SESPARSE_VERSION = 0x0000000200000001

_KDMV_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_COWD_HEADER = struct.Struct("<4sIIIIIII")
_SESPARSE_HEADER = struct.Struct("<26Q")
_SESPARSE_VOLATILE = struct.Struct("<4Q")

_KDMV_ZERO_GRAIN = 1 << 2
_KDMV_COMPRESSED = 1 << 16
_KDMV_MARKERS = 1 << 17
_GD_AT_END = 0xFFFFFFFFFFFFFFFF

#: Grain tables kept per extent. Tables are 2-32 KiB, so this bounds the cache to 2-32 MiB per
#: extent while covering 32 GiB (KDMV) to 2 GiB (COWD) of disk.
TABLE_CACHE = 1024


def add_piece(out: list[Piece], kind: int, length: int, file: str | None, offset: int) -> None:
    """Append a piece, growing the last one when it continues it (same kind; for data the
    same file at the next offset), so that contiguous grains become one read."""
    if out:
        last = out[-1]
        if last[0] == kind and (
            kind != DATA or (last[2] == file and last[3] + last[1] == offset)
        ):
            last[1] += length
            return
    out.append([kind, length, file, offset])


class TablesMissing(Exception):
    """A grain table needed for a mapping is neither cached nor fetched for this call;
    the caller fetches :attr:`reads` and retries."""

    def __init__(self, reads: list[Read]) -> None:
        super().__init__(f"{len(reads)} grain tables to load")
        self.reads = reads


class FlatExtent:
    """A range of a plain file (``-flat.vmdk``, ``VMFS``/``FLAT`` extents)."""

    def __init__(self, start: int, length: int, file: str, file_offset: int) -> None:
        self.start, self.length, self.file, self.file_offset = start, length, file, file_offset

    def tables_needed(
        self, offset: int, length: int, fetched: Fetched | None = None
    ) -> list[tuple[SparseExtent, int, Read]]:
        return []

    def map(self, offset: int, length: int, out: list[Piece], fetched: Fetched) -> None:
        add_piece(out, DATA, length, self.file, self.file_offset + offset - self.start)

    def allocated(self, offset: int, length: int) -> Steps[list[tuple[int, int]]]:
        file_offset = self.file_offset + offset - self.start
        (ranges,) = yield [DataRanges(self.file, file_offset, length)]
        shift = self.start - self.file_offset
        return [(start + shift, size) for start, size in ranges]


class ZeroExtent:
    """A ``ZERO`` extent: reads as zeros, holds nothing."""

    file = None

    def __init__(self, start: int, length: int) -> None:
        self.start, self.length = start, length

    def tables_needed(
        self, offset: int, length: int, fetched: Fetched | None = None
    ) -> list[tuple[SparseExtent, int, Read]]:
        return []

    def map(self, offset: int, length: int, out: list[Piece], fetched: Fetched) -> None:
        add_piece(out, ZERO, length, None, 0)

    def allocated(self, offset: int, length: int) -> Steps[list[tuple[int, int]]]:
        return []
        yield  # pragma: no cover  (makes this a generator like the others)


class SparseExtent:
    """Common grain-directory logic; subclasses decode their directory and table entries."""

    format: ClassVar[str]
    entry_code: ClassVar[str]  # array typecode of directory and table entries

    def __init__(
        self,
        start: int,
        length: int,
        file: str,
        grain: int,
        table_entries: int,
        directory: array[int],
    ) -> None:
        self.start, self.length, self.file = start, length, file
        self.grain = grain
        self.table_entries = table_entries
        self.coverage = grain * table_entries
        self.directory = directory
        self._tables: dict[int, array[int]] = {}
        self._lock = threading.Lock()
        needed = -(-length // self.coverage)
        if len(directory) < needed:
            raise TransportError(
                f"{file}: the {self.format} grain directory has {len(directory)} entries, "
                f"{needed} are needed for {length} bytes"
            )

    # -- what subclasses define

    def table_offset(self, index: int) -> int | None:
        """Byte offset in the file of grain table ``index``; None when it is not allocated."""
        raise NotImplementedError

    def grain_at(self, entry: int) -> tuple[int, int]:
        """(kind, byte offset in the file) of a grain table entry."""
        raise NotImplementedError

    # -- grain tables

    def table_read(self, index: int) -> Read | None:
        offset = self.table_offset(index)
        if offset is None:
            return None
        return Read(self.file, offset, self.table_entries * array(self.entry_code).itemsize)

    def install(self, index: int, data: bytes) -> array[int]:
        table = array(self.entry_code)
        table.frombytes(data)
        if sys.byteorder == "big":
            table.byteswap()
        with self._lock:
            if len(self._tables) >= TABLE_CACHE:
                self._tables.pop(next(iter(self._tables)))
            self._tables[index] = table
        return table

    def _table(self, index: int, fetched: Fetched) -> array[int] | None:
        table = self._tables.get(index)
        if table is None:
            table = fetched.get((self, index))
        if table is not None:
            return table
        read = self.table_read(index)
        if read is None:
            return None
        raise TablesMissing([read])

    def tables_needed(
        self, offset: int, length: int, fetched: Fetched | None = None
    ) -> list[tuple[SparseExtent, int, Read]]:
        first = (offset - self.start) // self.coverage
        last = (offset - self.start + length - 1) // self.coverage
        needed = []
        for index in range(first, last + 1):
            if index in self._tables or (fetched and (self, index) in fetched):
                continue
            read = self.table_read(index)
            if read is not None:
                needed.append((self, index, read))
        return needed

    # -- mapping

    def map(self, offset: int, length: int, out: list[Piece], fetched: Fetched) -> None:
        pos = offset - self.start
        end = pos + length
        grain, entries, coverage, file = self.grain, self.table_entries, self.coverage, self.file
        grain_at = self.grain_at
        while pos < end:
            index = pos // coverage
            stop = min(end, (index + 1) * coverage)
            table = self._table(index, fetched)
            if table is None:
                add_piece(out, HOLE, stop - pos, None, 0)
                pos = stop
                continue
            base = index * entries
            run = self._uniform(table, pos // grain - base, (stop - 1) // grain - base)
            if run is not None:
                kind, where = run
                within = pos - pos // grain * grain
                add_piece(out, kind, stop - pos, file if kind == DATA else None, where + within)
                pos = stop
                continue
            while pos < stop:
                number = pos // grain
                within = pos - number * grain
                size = min(grain - within, stop - pos)
                kind, where = grain_at(table[number - base])
                add_piece(out, kind, size, file if kind == DATA else None, where + within)
                pos += size

    def _uniform(self, table: array[int], first: int, last: int) -> tuple[int, int] | None:
        """(kind, file offset of slot ``first``) when slots ``first..last`` are all holes or,
        in formats whose entries are sector numbers, all zero grains or one contiguous run of
        data; None when they must be looked at grain by grain. Checked with C-level array
        operations, since a grain loop in Python is slow for 512-byte grains."""
        if first >= last:
            return None
        slots = table[first : last + 1]
        if slots[0] == 0:
            return (HOLE, 0) if slots.count(0) == len(slots) else None
        return self._uniform_entries(slots)

    def _uniform_entries(self, slots: array[int]) -> tuple[int, int] | None:
        return None

    def allocated(self, offset: int, length: int) -> Steps[list[tuple[int, int]]]:
        """The grains of ``[offset, offset + length)`` this extent holds data for (zero
        grains hold none)."""
        pos, end = offset - self.start, offset - self.start + length
        indexes = range(pos // self.coverage, (end - 1) // self.coverage + 1)
        tables = {index: self._tables.get(index) for index in indexes}
        missing = [
            (index, read)
            for index, table in tables.items()
            if table is None and (read := self.table_read(index)) is not None
        ]
        if missing:
            answers = yield [read for _, read in missing]
            for (index, _), data in zip(missing, answers, strict=True):
                tables[index] = self.install(index, data)
        ranges: list[tuple[int, int]] = []
        for index in indexes:
            table = tables[index]
            if table is None:
                continue
            lo_pos, hi_pos = max(pos, index * self.coverage), min(end, (index + 1) * self.coverage)
            base = index * self.table_entries
            first, last = lo_pos // self.grain - base, (hi_pos - 1) // self.grain - base
            for slot in compress(range(first, last + 1), table[first : last + 1]):
                if self.grain_at(table[slot])[0] != DATA:
                    continue
                grain_start = (base + slot) * self.grain
                lo = max(grain_start, lo_pos) + self.start
                hi = min(grain_start + self.grain, hi_pos) + self.start
                if ranges and ranges[-1][0] + ranges[-1][1] == lo:
                    ranges[-1] = (ranges[-1][0], hi - ranges[-1][0])
                else:
                    ranges.append((lo, hi - lo))
        return ranges


class HostedSparseExtent(SparseExtent):
    """``KDMV``: monolithicSparse / twoGbMaxExtentSparse, and qemu-img's snapshot deltas."""

    format = "hosted sparse (KDMV)"
    entry_code = "I"

    def __init__(self, *args: object, zero_grain: bool, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.zero_grain = zero_grain

    def table_offset(self, index: int) -> int | None:
        sector = self.directory[index]
        return sector * SECTOR if sector else None

    def grain_at(self, entry: int) -> tuple[int, int]:
        if entry == 0:
            return HOLE, 0
        if entry == 1 and self.zero_grain:
            return ZERO, 0
        return DATA, entry * SECTOR

    def _uniform_entries(self, slots: array[int]) -> tuple[int, int] | None:
        first = slots[0]
        if first == 1 and self.zero_grain:
            return (ZERO, 0) if slots.count(1) == len(slots) else None
        return _contiguous(slots, self.grain // SECTOR)


class CowdExtent(SparseExtent):
    """``COWD``: vmfsSparse deltas (``-delta.vmdk``) of ESXi on VMFS 5."""

    format = "vmfsSparse (COWD)"
    entry_code = "I"

    def table_offset(self, index: int) -> int | None:
        sector = self.directory[index]
        return sector * SECTOR if sector else None

    def grain_at(self, entry: int) -> tuple[int, int]:
        return (DATA, entry * SECTOR) if entry else (HOLE, 0)

    def _uniform_entries(self, slots: array[int]) -> tuple[int, int] | None:
        return _contiguous(slots, self.grain // SECTOR)


def _contiguous(slots: array[int], step: int) -> tuple[int, int] | None:
    """One DATA run when the slots point at consecutive grains of the file."""
    first = slots[0]
    end = first + len(slots) * step
    if end - step > 0xFFFFFFFF:
        return None
    expected = array(slots.typecode, range(first, end, step))
    return (DATA, first * SECTOR) if slots == expected else None


class SeSparseExtent(SparseExtent):
    """SESparse (``-sesparse.vmdk``): 64-bit entries, state in the top nibble.

    Grain states follow qemu's reader (block/vmdk.c): 0 unallocated (the parent answers),
    1 unmapped by the guest and 2 zero (both read as zeros), 3 allocated, with the cluster
    number's bits shuffled as ``((e >> 48) & 0xfff) | ((e & 0xffffffffffff) << 12)``.
    """

    format = "SESparse"
    entry_code = "Q"

    def __init__(self, *args: object, tables_offset: int, grains_offset: int, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.tables_offset = tables_offset
        self.grains_offset = grains_offset

    def table_offset(self, index: int) -> int | None:
        entry = self.directory[index]
        if entry == 0:
            return None
        if entry & 0xFFFFFFFF00000000 != 0x1000000000000000:
            raise TransportError(
                f"{self.file}: SESparse grain directory entry {index} is corrupt ({entry:#x})"
            )
        return self.tables_offset + (entry & 0xFFFFFFFF) * self.table_entries * 8

    def grain_at(self, entry: int) -> tuple[int, int]:
        state = entry >> 60
        if entry == 0:
            return HOLE, 0
        if state in (1, 2):
            return ZERO, 0
        if state == 3:
            cluster = ((entry & 0x0FFF000000000000) >> 48) | ((entry & 0x0000FFFFFFFFFFFF) << 12)
            return DATA, self.grains_offset + cluster * self.grain
        raise TransportError(f"{self.file}: SESparse grain table entry {entry:#x} is corrupt")


# -- opening sparse extents


def open_sparse(
    kind: str, file: str, start: int, length: int, head: bytes | None
) -> Steps[SparseExtent]:
    """Read the header and grain directory of a sparse extent file.

    ``head`` is the file's first bytes when the caller already has them (a monolithicSparse
    file is both the descriptor and the extent)."""
    if head is None or len(head) < SECTOR:
        (head,) = yield [Read(file, 0, SECTOR)]
    magic = head[:4]
    if kind == "SPARSE" and magic == KDMV_MAGIC:
        return (yield from _open_kdmv(file, start, length, head))
    if kind == "VMFSSPARSE" and magic == COWD_MAGIC:
        return (yield from _open_cowd(file, start, length, head))
    if kind == "SESPARSE" and struct.unpack_from("<Q", head)[0] == SESPARSE_MAGIC:
        return (yield from _open_sesparse(file, start, length, head))
    raise TransportError(f"{file}: not a {kind} extent (magic {magic!r})")


def _directory(data: bytes, code: str) -> array[int]:
    directory = array(code)
    directory.frombytes(data)
    if sys.byteorder == "big":
        directory.byteswap()
    return directory


def _open_kdmv(file: str, start: int, length: int, head: bytes) -> Steps[SparseExtent]:
    fields = _KDMV_HEADER.unpack_from(head)
    version, flags, capacity, grain_sectors = fields[1:5]
    table_entries, gd_sector, algorithm = fields[7], fields[9], fields[-1]
    if gd_sector == _GD_AT_END or algorithm or flags & (_KDMV_COMPRESSED | _KDMV_MARKERS):
        raise TransportError(
            f"{file}: a streamOptimized (compressed) VMDK is an export format, not a disk "
            "vSphere runs from; it is not read by transport modes"
        )
    if version not in (1, 2, 3) or not grain_sectors or not table_entries or not gd_sector:
        raise TransportError(
            f"{file}: unsupported hosted sparse header (version {version}, grain "
            f"{grain_sectors} sectors, {table_entries} entries per table)"
        )
    if capacity * SECTOR < length:
        raise TransportError(
            f"{file}: holds {capacity * SECTOR} bytes, the descriptor says {length}"
        )
    grain = grain_sectors * SECTOR
    count = -(-capacity * SECTOR // (grain * table_entries))
    (data,) = yield [Read(file, gd_sector * SECTOR, count * 4)]
    return HostedSparseExtent(
        start, length, file, grain, table_entries, _directory(data, "I"),
        zero_grain=bool(flags & _KDMV_ZERO_GRAIN),
    )


def _open_cowd(file: str, start: int, length: int, head: bytes) -> Steps[SparseExtent]:
    _, version, _, capacity, grain_sectors, gd_sector, gd_entries, _ = _COWD_HEADER.unpack_from(
        head
    )
    if not grain_sectors or not gd_sector or not gd_entries:
        raise TransportError(
            f"{file}: unsupported vmfsSparse header (version {version}, grain {grain_sectors})"
        )
    if capacity * SECTOR < length:
        raise TransportError(
            f"{file}: holds {capacity * SECTOR} bytes, the descriptor says {length}"
        )
    (data,) = yield [Read(file, gd_sector * SECTOR, gd_entries * 4)]
    return CowdExtent(start, length, file, grain_sectors * SECTOR, 4096, _directory(data, "I"))


def _open_sesparse(file: str, start: int, length: int, head: bytes) -> Steps[SparseExtent]:
    (
        _, version, capacity, grain_sectors, table_sectors, _, _, _, _, _,
        volatile_offset, _, _, _, _, _,
        gd_offset, gd_sectors, tables_offset, _, _, _, _, _, grains_offset, _,
    ) = _SESPARSE_HEADER.unpack_from(head)
    if version != SESPARSE_VERSION or grain_sectors != 8 or table_sectors != 64:
        raise TransportError(
            f"{file}: unsupported SESparse header (version {version:#x}, grain "
            f"{grain_sectors} sectors, tables of {table_sectors} sectors)"
        )
    if capacity * SECTOR < length:
        raise TransportError(
            f"{file}: holds {capacity * SECTOR} bytes, the descriptor says {length}"
        )
    volatile, directory = yield [
        Read(file, volatile_offset * SECTOR, _SESPARSE_VOLATILE.size),
        Read(file, gd_offset * SECTOR, gd_sectors * SECTOR),
    ]
    magic, _, _, replay_journal = _SESPARSE_VOLATILE.unpack_from(volatile)
    if magic != SESPARSE_VOLATILE_MAGIC:
        raise TransportError(f"{file}: SESparse volatile header is corrupt")
    if replay_journal:
        raise TransportError(
            f"{file}: SESparse journal needs replaying (the disk was not closed cleanly); "
            "it is only consistent once ESXi has opened it again"
        )
    return SeSparseExtent(
        start, length, file, grain_sectors * SECTOR, table_sectors * SECTOR // 8,
        _directory(directory, "Q"),
        tables_offset=tables_offset * SECTOR, grains_offset=grains_offset * SECTOR,
    )
