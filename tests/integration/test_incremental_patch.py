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


def edge_bytes(size: int, blocks: dict[int, tuple[int, ...]]) -> bytearray:
    """An all-zero disk image whose listed blocks hold one set byte at each given offset
    (negative: from the block's end)."""
    image = bytearray(size)
    for block_no, offsets in blocks.items():
        end = min((block_no + 1) * BS, size)
        for offset in offsets:
            image[(end + offset) if offset < 0 else block_no * BS + offset] = 0xA5
    return image


MIDDLE = BS // 2 + 1


async def test_a_block_holding_only_its_first_middle_or_last_byte_is_data_not_zero(
    tmp_path: Path,
) -> None:
    """Both movers' zero tests look at every byte: a block whose only data is its first, a
    middle or its last byte (a flag, a trailing newline) is stored, not recorded as zero —
    by the proxy side for a full, by the repository side for a block it rebuilds from a
    patch."""
    size = 8 * BS + BS // 2  # the last block is short
    # block 0 only its first byte, 1 only its last, 2 both, 3 a middle one, 4 to 6 zero,
    # 7 its last, 8 (short) its last
    image = edge_bytes(size, {0: (0,), 1: (-1,), 2: (0, -1), 3: (MIDDLE,), 7: (-1,),
                              8: (-1,)})
    disk = tmp_path / "edges.img"
    disk.write_bytes(image)
    repo = new_repo(tmp_path, "repo")

    full, full_point = await backup(repo, disk, tmp_path / "full.map", areas=[Extent(0, size)],
                                    parent=None)

    zero = [n for n, digest in read_block_map(full.index_path) if digest is None]
    assert zero == [4, 5, 6] and full.zero_blocks == 3
    repository = Repository.open(repo)
    repository.restore_disk(full_point, 2000, tmp_path / "full-restored.img")
    assert (tmp_path / "full-restored.img").read_bytes() == bytes(image)

    # the incremental sets one byte of zero blocks 4, 5 and 6 (last, first, middle) and
    # clears the only bytes of blocks 0, 1 and 3: the repository side rebuilds them from the
    # parent's blocks
    changed = edge_bytes(size, {2: (0, -1), 4: (-1,), 5: (0,), 6: (MIDDLE,), 7: (-1,),
                                8: (-1,)})
    disk.write_bytes(changed)
    areas = [Extent(0, 1), Extent(2 * BS - 1, 1), Extent(3 * BS + MIDDLE, 1),
             Extent(5 * BS - 1, 2), Extent(6 * BS + MIDDLE, 1)]
    incr, incr_point = await backup(repo, disk, tmp_path / "incr.map", areas=areas,
                                    parent=full_point)

    rebuilt = dict(read_block_map(incr.index_path))
    assert sorted(rebuilt) == [0, 1, 3, 4, 5, 6]
    assert rebuilt[0] is None and rebuilt[1] is None and rebuilt[3] is None
    assert all(rebuilt[n] is not None for n in (4, 5, 6))
    assert incr.bytes_read == 6
    repository.restore_disk(incr_point, 2000, tmp_path / "incr-restored.img")
    assert (tmp_path / "incr-restored.img").read_bytes() == bytes(changed)
