"""A disk chain: the snapshot's descriptor, its parent, its parent's parent, down to the base.

The bytes of a snapshot are those of its leaf layer where the leaf holds a grain, else its
parent's, and so on; what no layer holds reads as zeros. A child's ``parentCID`` must match
its parent's ``CID``: otherwise the parent changed after the child was made and the chain no
longer describes one point in time, which we refuse rather than read silently wrong data.

Nothing here does I/O; see :mod:`vbrd.vmdk.steps` for why and :mod:`vbrd.vmdk.reader` for
the drivers.
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from vbrd.errors import TransportError
from vbrd.models import Extent
from vbrd.vmdk.descriptor import (
    FLAT_KINDS,
    SECTOR,
    SPARSE_KINDS,
    Descriptor,
    decode,
    looks_like_descriptor,
)
from vbrd.vmdk.extents import (
    _KDMV_HEADER,
    DATA,
    HOLE,
    KDMV_MAGIC,
    ZERO,
    Fetched,
    FlatExtent,
    Piece,
    SparseExtent,
    TablesMissing,
    ZeroExtent,
    add_piece,
    open_sparse,
)
from vbrd.vmdk.steps import Read, Stat, Steps

#: How much of a file is read to find its descriptor (text descriptors are a few hundred
#: bytes; the one embedded in a hosted sparse file starts at sector 1).
HEAD = 64 * 1024

#: ESXi allows 32 snapshots; a chain longer than this is a loop or corrupt.
MAX_DEPTH = 256

#: ``resolve(location of a descriptor, file name in it) -> location of that file``.
Resolver = Callable[[str, str], str]

AnyExtent = FlatExtent | ZeroExtent | SparseExtent


@dataclass(slots=True)
class Layer:
    """One disk of the chain: its descriptor and its extents in disk order."""

    location: str
    descriptor: Descriptor
    extents: list[AnyExtent]
    _starts: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._starts = [extent.start for extent in self.extents]

    @property
    def capacity(self) -> int:
        return self.descriptor.capacity

    @property
    def files(self) -> list[str]:
        names = [self.location]
        for extent in self.extents:
            if extent.file is not None and extent.file not in names:
                names.append(extent.file)
        return names

    def overlapping(self, offset: int, length: int) -> list[tuple[AnyExtent, int, int]]:
        """(extent, offset, length) for the parts of the range inside this layer's extents."""
        parts = []
        end = min(offset + length, self.capacity)
        index = max(bisect_right(self._starts, offset) - 1, 0)
        while offset < end and index < len(self.extents):
            extent = self.extents[index]
            stop = min(end, extent.start + extent.length)
            if stop > offset:
                parts.append((extent, offset, stop - offset))
                offset = stop
            index += 1
        return parts

    def map(self, offset: int, length: int, out: list[Piece], fetched: Fetched) -> None:
        covered = offset
        for extent, part_offset, part_length in self.overlapping(offset, length):
            extent.map(part_offset, part_length, out, fetched)
            covered = part_offset + part_length
        if covered < offset + length:
            add_piece(out, HOLE, offset + length - covered, None, 0)


class Chain:
    """The layers of a disk, leaf first."""

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers
        self.capacity = layers[0].capacity

    @property
    def files(self) -> list[str]:
        """Every file the chain reads, leaf first (what a transport must be able to open)."""
        return [name for layer in self.layers for name in layer.files]

    # -- reading

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.capacity:
            raise TransportError(
                f"{self.layers[0].location}: cannot read {length} bytes at {offset}: the disk "
                f"holds {self.capacity} bytes"
            )

    def plan(self, offset: int, length: int) -> Steps[list[Piece]]:
        """The pieces (``DATA``/``ZERO``, in order) that make up ``[offset, offset+length)``."""
        self.check_range(offset, length)
        fetched: Fetched = {}
        while True:
            needed = [
                entry
                for layer in self.layers
                for extent, part_offset, part_length in layer.overlapping(offset, length)
                for entry in extent.tables_needed(part_offset, part_length, fetched)
            ]
            if needed:
                answers = yield [read for _, _, read in needed]
                for (extent, index, _), data in zip(needed, answers, strict=True):
                    fetched[(extent, index)] = extent.install(index, data)
            try:
                out: list[Piece] = []
                self._resolve(0, offset, length, out, fetched)
                return out
            except TablesMissing:
                continue  # a layer reached only now needs tables; fetch them too

    def _resolve(
        self, depth: int, offset: int, length: int, out: list[Piece], fetched: Fetched
    ) -> None:
        if length == 0:
            return
        if depth == len(self.layers):
            add_piece(out, ZERO, length, None, 0)
            return
        pieces: list[Piece] = []
        self.layers[depth].map(offset, length, pieces, fetched)
        for kind, size, file, file_offset in pieces:
            if kind == HOLE:
                self._resolve(depth + 1, offset, size, out, fetched)
            else:
                add_piece(out, kind, size, file, file_offset)
            offset += size

    # -- allocation

    def allocated(self, offset: int, length: int) -> Steps[list[Extent]]:
        """The areas of ``[offset, offset+length)`` that any layer holds data for, merged and
        sorted. Everything outside them reads as zeros."""
        self.check_range(offset, length)
        ranges: list[tuple[int, int]] = []
        for layer in self.layers:
            for extent, part_offset, part_length in layer.overlapping(offset, length):
                ranges.extend((yield from extent.allocated(part_offset, part_length)))
        ranges.sort()
        merged: list[Extent] = []
        for start, size in ranges:
            start, end = max(start, offset), min(start + size, offset + length)
            if end <= start:
                continue
            if merged and start <= merged[-1].end:
                last = merged[-1]
                if end > last.end:
                    merged[-1] = Extent(last.offset, end - last.offset)
            else:
                merged.append(Extent(start, end - start))
        return merged


# -- opening


def open_chain(location: str, resolve: Resolver, capacity: int | None = None) -> Steps[Chain]:
    """Open the chain whose leaf descriptor is at ``location``, following parents.

    ``capacity``, when the caller knows it (vSphere's size of the disk), lets a file that is
    no descriptor be named as too short for the disk rather than taken for its extent.
    """
    layers: list[Layer] = []
    seen: set[str] = set()
    while True:
        if location in seen:
            raise TransportError(f"{location}: the disk chain loops back to this file")
        if len(layers) >= MAX_DEPTH:
            raise TransportError(f"{location}: the disk chain is deeper than {MAX_DEPTH}")
        seen.add(location)
        layer = yield from open_layer(location, resolve, capacity)
        if layers:
            _check_parent(layers[-1], layer)
        layers.append(layer)
        descriptor = layer.descriptor
        if not descriptor.has_parent:
            return Chain(layers)
        assert descriptor.parent_hint is not None
        location = resolve(location, descriptor.parent_hint)


def open_layer(location: str, resolve: Resolver,
               capacity: int | None = None) -> Steps[Layer]:
    """Read one descriptor and open (header, grain directory, size) each of its extents."""
    (head,) = yield [Read(location, 0, HEAD, exact=False)]
    embedded = head[:4] == KDMV_MAGIC
    if embedded:
        descriptor = yield from _embedded_descriptor(location, head)
    elif looks_like_descriptor(head):
        if len(head) == HEAD and b"\x00" not in head:
            raise TransportError(f"{location}: descriptor larger than {HEAD} bytes")
        descriptor = Descriptor.parse(decode(head), location)
    else:
        raise (yield from _not_a_descriptor(location, head, capacity))
    extents: list[AnyExtent] = []
    start = 0
    for line in descriptor.extents:
        if line.access == "NOACCESS":
            raise TransportError(
                f"{location}: extent {line.filename or line.kind} is marked NOACCESS"
            )
        if line.kind == "ZERO":
            extents.append(ZeroExtent(start, line.length))
        elif line.kind in FLAT_KINDS:
            assert line.filename is not None
            file = resolve(location, line.filename)
            (size,) = yield [Stat(file)]
            need = line.start_sector * SECTOR + line.length
            if size < need:
                raise TransportError(
                    f"{file}: the extent holds {size} bytes, the descriptor {location} needs "
                    f"{need}"
                )
            extents.append(FlatExtent(start, line.length, file, line.start_sector * SECTOR))
        elif line.kind in SPARSE_KINDS:
            assert line.filename is not None
            file = resolve(location, line.filename)
            own = embedded and file == location
            yield [Stat(file)]
            sparse = yield from open_sparse(
                line.kind, file, start, line.length, head if own else None
            )
            extents.append(sparse)
        else:
            raise TransportError(
                f"{location}: {line.kind} extent {line.filename!r} is a raw device mapping; "
                "read it through the LUN, not the datastore"
            )
        start += line.length
    return Layer(location, descriptor, extents)


def _not_a_descriptor(location: str, head: bytes,
                      capacity: int | None) -> Steps[TransportError]:
    """Why the file at ``location`` is no disk: empty, shorter than the disk, or (as large
    as the disk) most likely the extent that a descriptor names."""
    if not head:
        return TransportError(
            f"{location} is empty (0 bytes): it holds neither a VMDK descriptor nor disk "
            "data; the file was truncated or never written"
        )
    (size,) = yield [Stat(location)]
    if capacity is not None and size < capacity:
        return TransportError(
            f"{location} holds {size} bytes, less than the disk's capacity of {capacity}, "
            "and neither descriptor text nor a hosted sparse header: the file is truncated "
            "or damaged"
        )
    return TransportError(
        f"{location}: not a VMDK descriptor (neither descriptor text nor a hosted sparse "
        "header); open the disk's descriptor, not its extent"
    )


def _embedded_descriptor(location: str, head: bytes) -> Steps[Descriptor]:
    fields = _KDMV_HEADER.unpack_from(head)
    offset, size = fields[5] * SECTOR, fields[6] * SECTOR
    if not size:
        raise TransportError(
            f"{location}: a sparse extent without a descriptor; open the disk's descriptor"
        )
    if offset + size <= len(head):
        text = head[offset : offset + size]
    else:
        (text,) = yield [Read(location, offset, size)]
    return Descriptor.parse(decode(text), location)


def _check_parent(child: Layer, parent: Layer) -> None:
    if child.descriptor.parent_cid != parent.descriptor.cid:
        raise TransportError(
            f"{child.location}: expects its parent {parent.location} to have content id "
            f"{child.descriptor.parent_cid:08x}, it has {parent.descriptor.cid or 0:08x}: "
            "the parent changed after this child was made, so the chain is not one point in "
            "time"
        )


__all__ = ["Chain", "Layer", "Resolver", "open_chain", "open_layer", "DATA", "ZERO", "HOLE"]
