"""An incremental that reads only the changed areas: the repository side rebuilds each block.

What a user checks: the incremental's restore point restores bit for bit, the proxy read
exactly the changed bytes (not the 1 MiB blocks around them), and an unchanged block is
neither read nor stored again.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from tests.integration.test_data_movers import BS, RULES, make_image, new_repo, spec_for
from vbrd.models import Extent
from vbrd.repository import Repository
from vbrd.transport import TransferResult, run_transfer
from vbrd.transport.blockmap import read_block_map

MiB = 1 << 20
KiB = 1 << 10


async def backup(repo: Path, image: Path, out: Path, *, areas: list[Extent],
                 parent: str | None) -> tuple[TransferResult, str]:
    """One disk's transfer and the restore point made of it, as the Manager makes it."""
    result = await run_transfer(spec_for(image, ["raw"], areas), str(repo), RULES,
                                on_progress=lambda p: None, index_out=str(out),
                                parent_point=parent)
    repository = Repository.open(repo)
    size = image.stat().st_size
    with repository.begin_point("web01", session_id="s", metadata={}, parent=parent) as point:
        disk = point.add_disk(2000, label="Hard disk 1", capacity=size,
                              inherit=parent is not None)
        for block_no, digest in read_block_map(result.index_path):
            disk.set_block(block_no, digest)
        return result, point.commit().point_id


def scatter(image: Path, seed: int) -> list[Extent]:
    """Guest-like writes: small scattered ones, one over a whole block, one that zeroes a
    whole block, one into a hole, one into the short last block."""
    rnd = random.Random(seed)
    size = image.stat().st_size
    writes: list[tuple[int, bytes]] = []
    for _ in range(40):
        n = rnd.choice((4, 8, 16, 64, 200)) * KiB
        writes.append((rnd.randrange(0, (size - n) // 4096) * 4096, rnd.randbytes(n)))
    writes.append((5 * BS - 4096, rnd.randbytes(BS + 8192)))  # a whole block and its edges
    writes.append((20 * BS, bytes(BS)))                       # block 20 becomes all zero
    writes.append((size - 4096, rnd.randbytes(4096)))        # the short last block
    with open(image, "r+b") as f:
        for offset, data in writes:
            os.pwrite(f.fileno(), data, offset)
    return [Extent(offset, len(data)) for offset, data in writes]


@pytest.fixture()
def disk(tmp_path: Path) -> Path:
    """64 MiB and 12 KiB of the bench's content (holes, text, random): the last block is
    short."""
    return make_image(tmp_path / "disk.img", 64 * MiB + 3 * 4096, seed=11)


async def test_an_incremental_reads_only_the_changes_and_restores_bit_for_bit(
    disk: Path, tmp_path: Path
) -> None:
    repo = new_repo(tmp_path, "repo")
    size = disk.stat().st_size
    full, full_point = await backup(repo, disk, tmp_path / "full.map",
                                    areas=[Extent(0, size)], parent=None)
    changed = tmp_path / "changed.img"
    shutil.copyfile(disk, changed)
    areas = scatter(changed, seed=5)
    stored_before = Repository.open(repo).stats().stored_bytes

    incr, incr_point = await backup(repo, changed, tmp_path / "incr.map", areas=areas,
                                    parent=full_point)

    union = bytearray(size)
    for a in areas:
        union[a.offset:a.end] = b"\1" * a.length
    assert incr.bytes_read == union.count(1) < full.bytes_read / 10
    touched = {n for a in areas for n in range(a.offset // BS, (a.end - 1) // BS + 1)}
    assert {n for n, _ in read_block_map(incr.index_path)} == touched
    assert incr.blocks_total == len(touched)
    repository = Repository.open(repo)
    assert repository.disk_index(incr_point, 2000).digest(20) is None  # zeroed: stores nothing
    assert 0 < repository.stats().stored_bytes - stored_before == incr.bytes_stored

    restored = tmp_path / "restored.img"
    repository.restore_disk(incr_point, 2000, restored)
    assert restored.read_bytes() == changed.read_bytes()
    repository.restore_disk(full_point, 2000, tmp_path / "full.img")
    assert (tmp_path / "full.img").read_bytes() == disk.read_bytes()
    assert repository.verify() == []


async def test_unchanged_blocks_of_a_patched_incremental_are_not_stored_again(
    disk: Path, tmp_path: Path
) -> None:
    repo = new_repo(tmp_path, "repo")
    size = disk.stat().st_size
    _, full_point = await backup(repo, disk, tmp_path / "full.map",
                                 areas=[Extent(0, size)], parent=None)
    stored = Repository.open(repo).stats()
    # CBT may report an area the guest rewrote with the same bytes: the rebuilt block is the
    # parent's, so nothing new is stored
    incr, point = await backup(repo, disk, tmp_path / "same.map",
                               areas=[Extent(3 * BS + 4096, 8192), Extent(40 * BS, 4096)],
                               parent=full_point)
    assert incr.bytes_read == 8192 + 4096
    assert incr.bytes_stored == 0
    assert Repository.open(repo).stats().stored_bytes == stored.stored_bytes
    restored = tmp_path / "restored.img"
    Repository.open(repo).restore_disk(point, 2000, restored)
    assert restored.read_bytes() == disk.read_bytes()
