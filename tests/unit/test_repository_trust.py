"""What the repository checks instead of trusting: torn blocks, damaged points, the clock.

Each test plants the damage a real failure leaves (a power loss after a block's rename, a
flipped byte, a backward clock step, a hostile header) and checks what an administrator
relies on: the next backup restores the right bytes, the newest point survives, a damaged
point is listed as damaged and never built upon.
"""
from __future__ import annotations

import os
import struct
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.unit.test_repository import (
    BS,
    CODEC,
    DISK,
    backup,
    block_file,
    image_of,
    random_block,
    restored,
    sha,
    text_block,
)
from vbrd.errors import RepositoryError, UsageError
from vbrd.repository import Repository, block_digest
from vbrd.repository.index import MAX_INDEX_BLOCKS


class SteppedClock:
    """A wall clock the test moves by hand (backwards too)."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.create(tmp_path / "repo", block_size=BS)


def plant(repo: Repository, data: bytes, content: bytes, *, mode: int = 0o600) -> Path:
    """Leave ``content`` where the block ``data`` belongs, as a crashed writer's rename
    does: the name is right, what is in it was never synced."""
    path = block_file(repo, data)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    path.chmod(mode)
    return path


# --- a block file present but not seen durable is checked, a bad one rewritten --------------


@pytest.mark.parametrize("damage", ["empty", "torn", "other block", "not a frame"])
def test_a_block_left_unsynced_by_a_power_loss_is_checked_and_stored_again(
    repo: Repository, tmp_path: Path, damage: str
) -> None:
    victim, other = random_block(1), text_block(2)
    frame = CODEC.compress(victim)
    content = {"empty": b"", "torn": frame[: len(frame) // 2],
               "other block": CODEC.compress(other), "not a frame": b"\0" * 4096}[damage]
    planted = plant(repo, victim, content)
    image = image_of([victim, None, other])

    # a fresh process (the data mover) that never saw this block made durable
    writer = Repository.open(repo.path)
    point = backup(writer, "vm", image)

    assert sha(restored(repo, point.point_id, tmp_path)) == sha(image)
    assert repo.verify() == []
    assert planted.read_bytes() == frame


def test_a_block_made_durable_is_marked_so_and_not_read_again(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = random_block(3)
    backup(repo, "vm", image_of([block]))
    assert block_file(repo, block).stat().st_mode & 0o222 == 0, "read-only once fsynced"

    writer = Repository.open(repo.path)
    opened: list[str] = []
    real_open = open

    def spy(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    assert writer.has_blocks([block_digest(block)]) == [True]
    assert not [p for p in opened if "/blocks/" in p], "a durable block was read to check it"


def test_put_block_over_a_torn_file_replaces_it(repo: Repository, tmp_path: Path) -> None:
    block = random_block(4)
    plant(repo, block, b"")
    writer = Repository.open(repo.path)
    with writer.begin_point("vm", session_id="s", metadata={}, parent=None) as point:
        assert writer.put_block(block_digest(block), CODEC.compress(block)) > 0
        point.add_disk(DISK, label="d", capacity=BS, inherit=False).set_block(
            0, block_digest(block))
        info = point.commit()
    assert restored(repo, info.point_id, tmp_path) == block


# --- verify quarantines damaged blocks and the points that name them ----------------------------


def test_verify_quarantines_a_damaged_block_and_the_next_full_backup_heals_it(
    repo: Repository, tmp_path: Path
) -> None:
    blocks = [random_block(10), random_block(11), random_block(12)]
    image = image_of(blocks)  # type: ignore[arg-type]
    point = backup(repo, "vm", image)
    victim = block_file(repo, blocks[1])
    victim.chmod(0o600)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    victim.write_bytes(raw)

    problems = repo.verify()

    assert [(p.point, p.disk, p.offset) for p in problems] == [(point.point_id, DISK, BS)]
    assert not victim.exists(), "the damaged block file is taken out of blocks/"
    assert list((repo.path / "quarantine" / "blocks").iterdir())
    assert repo.points("vm") == []
    (damaged,) = repo.damaged_points("vm")
    assert damaged.point_id == point.point_id and "offset" in damaged.reason
    choice = repo.choose_parent("vm")
    assert choice.point is None and point.point_id in (choice.warning or "")

    again = backup(repo, "vm", image)  # a full: the block is missing, so it is stored anew
    assert sha(restored(repo, again.point_id, tmp_path)) == sha(image)
    assert repo.verify() == []
    assert repo.choose_parent("vm").point == again


def test_a_point_whose_metadata_is_damaged_is_never_the_parent(repo: Repository) -> None:
    good = backup(repo, "vm", random_block(1))
    bad = backup(repo, "vm", random_block(2), parent=good.point_id, changed=[0])
    metadata = repo.path / "points" / "vm" / bad.point_id / "metadata.json"
    metadata.write_text(metadata.read_text().replace('"s-test"', '"s-evil"'))

    choice = repo.choose_parent("vm")

    assert choice.point is None, "a full after damage, not an incremental on an older point"
    assert bad.point_id in (choice.warning or "") and "damaged" in (choice.warning or "")
    assert [d.point_id for d in repo.damaged_points("vm")] == [bad.point_id]
    full = backup(repo, "vm", random_block(3))
    assert repo.choose_parent("vm").point == full and repo.choose_parent("vm").warning is None


def test_gc_quarantines_a_point_whose_index_it_cannot_read_and_goes_on(
    repo: Repository,
) -> None:
    keep = backup(repo, "vm", random_block(1))
    broken = backup(repo, "vm", random_block(2))
    (repo.path / "points" / "vm" / broken.point_id / "disk-2000.idx").chmod(0o600)
    (repo.path / "points" / "vm" / broken.point_id / "disk-2000.idx").write_bytes(b"junk")
    other = backup(repo, "vm-b", random_block(3))
    repo.delete_point(keep.point_id)

    stats = repo.gc()

    assert stats.quarantined == [broken.point_id]
    assert stats.blocks_removed == 2, "keep's block and the one only the junk index named"
    assert [d.point_id for d in repo.damaged_points()] == [broken.point_id]
    assert [p.point_id for p in repo.points()] == [other.point_id]
    assert repo.gc().blocks_removed == 0, "gc works on, the damaged point in quarantine"
    repo.delete_point(broken.point_id)
    assert repo.damaged_points() == []


# --- retention and parents follow a per-VM sequence, not the wall clock -------------------------


def test_a_backward_clock_step_does_not_make_retention_delete_the_newest_point(
    tmp_path: Path,
) -> None:
    clock = SteppedClock(datetime(2025, 3, 1, 2, 0, tzinfo=UTC))
    repo = Repository.create(tmp_path / "repo", block_size=BS, clock=clock)
    first = backup(repo, "vm", random_block(1))
    clock.now += timedelta(days=1)
    second = backup(repo, "vm", random_block(2), parent=first.point_id, changed=[0])
    clock.now -= timedelta(days=30)  # NTP fixes a clock that ran a month ahead
    newest_image = random_block(3)
    newest = backup(repo, "vm", newest_image, parent=second.point_id, changed=[0])

    assert [p.sequence for p in (first, second, newest)] == [1, 2, 3]
    assert repo.choose_parent("vm").point == newest
    assert repo.latest_point("vm") == newest
    assert repo.apply_retention("vm", keep=1) == [first.point_id, second.point_id]
    assert [p.point_id for p in repo.points("vm")] == [newest.point_id]
    assert sha(restored(repo, newest.point_id, tmp_path)) == sha(newest_image)


# --- decompression and index sizes are bounded --------------------------------------------------


def test_verify_never_decompresses_more_than_a_block(repo: Repository) -> None:
    block = random_block(5)
    point = backup(repo, "vm", image_of([block]))
    bomb = CODEC.compress(bytes(256 << 20))  # a few KiB that claim 256 MiB
    path = block_file(repo, block)
    path.chmod(0o600)
    path.write_bytes(bomb)

    tracemalloc.start()
    try:
        problems = repo.verify(point.point_id)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert [(p.point, p.offset) for p in problems] == [(point.point_id, 0)]
    assert "more than a block" in problems[0].reason
    assert peak < 32 << 20, f"verify allocated {peak} bytes for one block"


def huge_index(block_size: int, blocks: int) -> bytes:
    """An index header and a zstd frame header that claim ``blocks`` entries."""
    header = struct.pack("<8sHHIQQ", b"VBRDIDX\0", 1, 32, block_size, blocks * block_size,
                         blocks)
    # single-segment frame, 8-byte content size, then one empty raw last block
    frame = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", blocks * 32) + b"\x01\0\0"
    return header + frame


def test_an_index_claiming_an_enormous_disk_is_refused_before_allocating(
    repo: Repository, tmp_path: Path
) -> None:
    first = backup(repo, "vm", random_block(6))
    second = backup(repo, "vm-b", random_block(7))
    for point in (first, second):
        index = repo.path / "points" / point.vm / point.point_id / "disk-2000.idx"
        index.chmod(0o600)
        index.write_bytes(huge_index(BS, 1 << 40))

    stats = repo.gc()  # decodes every index, checked or not: not a MemoryError
    assert stats.quarantined == [first.point_id, second.point_id]
    assert all("more than the" in d.reason for d in repo.damaged_points())


def test_a_disk_needing_more_index_entries_than_the_cap_is_refused_by_name(
    repo: Repository,
) -> None:
    with repo.begin_point("vm", session_id="s", metadata={}, parent=None) as point:
        with pytest.raises(UsageError, match="blocks.*at most"):
            point.add_disk(DISK, label="d", capacity=(MAX_INDEX_BLOCKS + 1) * BS, inherit=False)


# --- read paths never create a repository -------------------------------------------------------


def test_only_create_makes_a_repository(tmp_path: Path) -> None:
    mistyped = tmp_path / "mnt" / "backup-repo"
    with pytest.raises(RepositoryError, match=str(mistyped)):
        Repository.open(mistyped)
    assert not mistyped.exists() and not mistyped.parent.exists()
    repo = Repository.open_or_create(mistyped, block_size=BS)
    assert repo.just_created and Repository.open(mistyped).block_size == BS
    again = Repository.open_or_create(mistyped, block_size=BS)
    assert not again.just_created and again.config.repo_id == repo.config.repo_id


def test_retention_never_deletes_the_only_point(repo: Repository) -> None:
    only = backup(repo, "vm", random_block(1))
    with pytest.raises(UsageError, match="at least one"):
        repo.apply_retention("vm", keep=0)
    assert repo.apply_retention("vm", keep=1) == []
    assert repo.points("vm") == [only]
    assert os.path.isdir(repo.path / "points" / "vm" / only.point_id)
