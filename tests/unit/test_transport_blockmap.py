"""The block map the repository's data mover leaves for the Manager, and block planning."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from vbrd.models import Extent
from vbrd.transport.blockmap import BlockMapError, BlockMapWriter, MapEntry, read_block_map
from vbrd.transport.source import block_runs, chunks

MiB = 1 << 20


def digest(n: int) -> bytes:
    return hashlib.sha256(str(n).encode()).digest()


def test_a_block_map_reads_back_what_was_written(tmp_path: Path) -> None:
    path = str(tmp_path / "disk.map")
    disk_size = 5 * MiB + 512
    writer = BlockMapWriter(path, MiB, disk_size)
    written = [MapEntry(0, MiB, digest(0)), MapEntry(2, MiB, None), MapEntry(5, 512, digest(5))]
    for e in written:
        writer.add(e.block_no, e.length, e.digest)
    assert writer.finish() == path
    assert not os.path.exists(path + ".partial")
    bmap = read_block_map(path)
    assert (bmap.block_size, bmap.disk_size, bmap.count) == (MiB, disk_size, 3)
    assert list(bmap.entries()) == written


def test_a_damaged_block_map_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "disk.map")
    writer = BlockMapWriter(path, MiB, 4 * MiB)
    writer.add(1, MiB, digest(1))
    writer.finish()
    data = bytearray(Path(path).read_bytes())
    data[30] ^= 0xFF
    Path(path).write_bytes(data)
    with pytest.raises(BlockMapError, match="fails its checksum"):
        read_block_map(path)
    Path(path).write_bytes(data[:50])
    with pytest.raises(BlockMapError, match="truncated"):
        read_block_map(path)


def test_blocks_must_come_in_order_and_fit_the_disk(tmp_path: Path) -> None:
    writer = BlockMapWriter(str(tmp_path / "m"), MiB, 3 * MiB + 10)
    writer.add(1, MiB, digest(1))
    with pytest.raises(BlockMapError, match="after block 1"):
        writer.add(1, MiB, digest(1))
    with pytest.raises(BlockMapError, match="does not fit"):
        writer.add(3, MiB, digest(3))
    writer.abort()
    assert not list(tmp_path.iterdir())


def test_areas_become_the_whole_blocks_they_touch() -> None:
    areas = [Extent(MiB + 10, 20), Extent(5 * MiB - 1, 2), Extent(0, 1), Extent(9 * MiB, MiB)]
    # the last area lies past the end of a 8.5 MiB disk and is dropped
    assert block_runs(areas, 8 * MiB + MiB // 2, MiB) == [(0, 2), (4, 6)]
    assert block_runs([Extent(0, 3 * MiB), Extent(MiB, MiB)], 10 * MiB, MiB) == [(0, 3)]
    assert list(chunks([(0, 5), (7, 8)], 2)) == [(0, 2), (2, 2), (4, 1), (7, 1)]
