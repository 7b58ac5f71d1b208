"""The repository as a backup user relies on it: what goes in comes out, bit for bit.

Each test drives the real repository the way the data path does (zero test, digest,
compress, has_blocks, put_block, set_block, commit) on small disks of 64 KiB blocks.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from pathlib import Path

import pytest

from vbrd.errors import CorruptBlockError, NotFound, RepositoryError, UsageError
from vbrd.repository import (
    BlockCodec,
    BlockDamaged,
    PointInfo,
    Repository,
    block_digest,
    is_zero,
)

BS = 64 * 1024
DISK = 2000
CODEC = BlockCodec(3)


# --- helpers: disks made of chosen blocks, and the data path in miniature ---------------


def random_block(seed: int, size: int = BS) -> bytes:
    return random.Random(seed).randbytes(size)


def text_block(seed: int, size: int = BS) -> bytes:
    rnd = random.Random(seed)
    lines = b"".join(
        b'{"ts":%d,"level":"info","msg":"GET /api/items/%d 200"}\n'
        % (1700000000 + rnd.randrange(10**6), rnd.randrange(10**5))
        for _ in range(size // 40 + 1)
    )
    return lines[:size]


def mixed_image(seed: int, blocks: int, tail: int = 0) -> bytes:
    """Zero, text and random blocks in a seeded order, plus a short last block of ``tail``."""
    rnd = random.Random(seed)
    parts = []
    for n in range(blocks):
        kind = rnd.choice(["zero", "text", "random"])
        if kind == "zero":
            parts.append(bytes(BS))
        elif kind == "text":
            parts.append(text_block(seed * 1000 + n))
        else:
            parts.append(random_block(seed * 1000 + n))
    if tail:
        parts.append(random_block(seed * 1000 + blocks, tail))
    return b"".join(parts)


def image_of(blocks: list[bytes | None]) -> bytes:
    return b"".join(bytes(BS) if b is None else b for b in blocks)


def store_blocks(
    repo: Repository, disk, image: bytes, block_numbers: list[int] | range | None = None
) -> int:
    """What a data mover does for each block; returns the bytes put_block wrote."""
    written = 0
    view = memoryview(image)
    for n in block_numbers if block_numbers is not None else range(disk.block_count):
        block = view[n * BS : (n + 1) * BS]
        if is_zero(block):
            disk.set_block(n, None)
            continue
        digest = block_digest(block)
        if not repo.has_blocks([digest])[0]:
            written += repo.put_block(digest, CODEC.compress(block))
        disk.set_block(n, digest)
    return written


def backup(
    repo: Repository,
    vm: str,
    image: bytes,
    *,
    parent: str | None = None,
    changed: list[int] | None = None,
    disk_key: int = DISK,
) -> PointInfo:
    """A full backup of one disk, or with ``changed`` an incremental of only those blocks."""
    with repo.begin_point(vm, session_id="s-test", metadata={"vmx": {"memsize": "4096"}},
                          parent=parent) as point:
        disk = point.add_disk(disk_key, label="Hard disk 1", capacity=len(image),
                              inherit=changed is not None)
        store_blocks(repo, disk, image, changed)
        disk.change_id = "52 de 9f 0a/7"
        return point.commit()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def restored(repo: Repository, point_id: str, where: Path, disk_key: int = DISK) -> bytes:
    dest = where / f"restore-{point_id}-{disk_key}.img"
    repo.restore_disk(point_id, disk_key, dest)
    return dest.read_bytes()


def block_file(repo: Repository, data: bytes) -> Path:
    h = block_digest(data).hex()
    return repo.path / "blocks" / h[:2] / h


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.create(tmp_path / "repo", block_size=BS)


# --- round trip, dedup, incrementals ------------------------------------------------------


def test_a_mixed_disk_restores_byte_identical_and_zero_blocks_are_not_stored(
    repo: Repository, tmp_path: Path
) -> None:
    image = mixed_image(seed=1, blocks=40, tail=12288)
    data_blocks = {
        image[n * BS : (n + 1) * BS] for n in range(41) if not is_zero(image[n * BS : (n + 1) * BS])
    }
    zero_blocks = 41 - sum(1 for n in range(41) if not is_zero(image[n * BS : (n + 1) * BS]))
    assert zero_blocks > 5  # the seed gives a disk with holes worth testing

    point = backup(repo, "web-01", image)
    dest = tmp_path / "web-01.img"
    stats = repo.restore_disk(point.point_id, DISK, dest)

    assert sha(dest.read_bytes()) == sha(image)
    assert dest.stat().st_size == len(image)
    assert dest.stat().st_blocks * 512 < len(image)  # the holes stay holes
    assert stats.zero_blocks == zero_blocks
    assert repo.stats().blocks == len(data_blocks)  # one file per distinct data block
    assert point.disks[0].data_bytes == len(image) - zero_blocks * BS


def test_identical_disks_of_two_vms_and_two_points_are_stored_once(
    repo: Repository, tmp_path: Path
) -> None:
    image = mixed_image(seed=2, blocks=24)
    backup(repo, "vm-a", image)
    after_first = repo.stats()

    second = backup(repo, "vm-b", image)
    third = backup(repo, "vm-a", image)

    assert repo.stats().stored_bytes == after_first.stored_bytes
    assert repo.stats().blocks == after_first.blocks
    assert [p.vm for p in repo.points()] == ["vm-a", "vm-b", "vm-a"]
    for point in (second, third):
        assert sha(restored(repo, point.point_id, tmp_path)) == sha(image)


def test_put_block_writes_a_block_once(repo: Repository) -> None:
    block = random_block(7)
    digest = block_digest(block)
    with repo.begin_point("vm", session_id="s", metadata={}, parent=None) as point:
        first = repo.put_block(digest, CODEC.compress(block))
        again = repo.put_block(digest, CODEC.compress(block))
        point.add_disk(DISK, label="d", capacity=BS, inherit=False).set_block(0, digest)
        point.commit()
    assert first > 0 and again == 0
    assert repo.read_block(digest) == block


def test_an_incremental_point_restores_the_changed_disk_and_the_old_point_the_old_one(
    repo: Repository, tmp_path: Path
) -> None:
    blocks: list[bytes | None] = [random_block(i) if i % 3 else None for i in range(16)]
    old = image_of(blocks)
    full = backup(repo, "db-01", old)

    blocks[1] = random_block(101)  # data → other data
    blocks[4] = text_block(104)
    blocks[6] = None  # data → zeros (trimmed)
    blocks[9] = random_block(109)  # zeros → data
    new = image_of(blocks)
    incremental = backup(repo, "db-01", new, parent=full.point_id, changed=[1, 4, 6, 9])

    assert incremental.parent == full.point_id
    assert sha(restored(repo, incremental.point_id, tmp_path)) == sha(new)
    assert sha(restored(repo, full.point_id, tmp_path)) == sha(old)
    assert incremental.disks[0].changed_blocks == 3
    assert 0 < incremental.stored_bytes < full.stored_bytes
    assert repo.latest_point("db-01") == repo.point(incremental.point_id)
    assert repo.disk_index(incremental.point_id, DISK).change_id == "52 de 9f 0a/7"


def test_an_incremental_of_a_grown_disk_keeps_the_old_blocks(
    repo: Repository, tmp_path: Path
) -> None:
    old = image_of([random_block(1), None, random_block(2)])
    full = backup(repo, "vm", old)
    new = old + image_of([None, text_block(3)])
    grown = backup(repo, "vm", new, parent=full.point_id, changed=[4])
    assert sha(restored(repo, grown.point_id, tmp_path)) == sha(new)


def test_an_incremental_cannot_inherit_across_a_change_of_the_last_short_block(
    repo: Repository,
) -> None:
    full = backup(repo, "vm", random_block(1, BS + 4096))
    with repo.begin_point("vm", session_id="s", metadata={}, parent=full.point_id) as point:
        with pytest.raises(UsageError, match="changed size"):
            point.add_disk(DISK, label="d", capacity=2 * BS, inherit=True)


def test_inherit_needs_a_parent_with_that_disk(repo: Repository) -> None:
    full = backup(repo, "vm", random_block(1))
    with repo.begin_point("vm", session_id="s", metadata={}, parent=None) as point:
        with pytest.raises(UsageError, match="no parent"):
            point.add_disk(DISK, label="d", capacity=BS, inherit=True)
    with repo.begin_point("vm", session_id="s", metadata={}, parent=full.point_id) as point:
        with pytest.raises(UsageError, match=f"{full.point_id} has no such disk"):
            point.add_disk(2001, label="d2", capacity=BS, inherit=True)


def test_a_point_keeps_metadata_and_disks_as_given(repo: Repository) -> None:
    metadata = {
        "config": {"name": "web-01", "numCPU": 2},
        "vmx": 'displayName = "web-01"\n',
        "hardware": {"disks": [{"key": 2000, "label": "Hard disk 1"}]},
        "guest": {"guestId": "ubuntu64Guest", "ipAddress": "10.0.0.5"},
    }
    with repo.begin_point("web-01", session_id="sess-9", metadata=metadata,
                          parent=None) as point:
        disk = point.add_disk(2000, label="Hard disk 1", capacity=3 * BS, inherit=False)
        store_blocks(repo, disk, image_of([None, random_block(5), None]))
        disk.change_id = "52 aa/1"
        point.add_disk(2001, label="Hard disk 2", capacity=BS, inherit=False)
        info = point.commit()

    listed = repo.point(info.point_id)
    assert listed == info
    assert listed.metadata == metadata
    assert listed.session_id == "sess-9"
    assert [(d.key, d.label, d.capacity, d.change_id) for d in listed.disks] == [
        (2000, "Hard disk 1", 3 * BS, "52 aa/1"),
        (2001, "Hard disk 2", BS, None),
    ]
    assert listed.created.endswith("Z")
    assert json.dumps(listed.to_dict())  # the API serves it as is


# --- what is and is not visible ---------------------------------------------------------


def test_a_point_is_invisible_until_commit_and_gone_after_abort(
    repo: Repository, tmp_path: Path
) -> None:
    other = Repository.open(repo.path)
    with pytest.raises(RuntimeError):
        with repo.begin_point("vm", session_id="s", metadata={}, parent=None) as point:
            disk = point.add_disk(DISK, label="d", capacity=2 * BS, inherit=False)
            store_blocks(repo, disk, image_of([random_block(1), random_block(2)]))
            assert other.points() == []
            assert other.latest_point("vm") is None
            raise RuntimeError("transport failed")
    assert other.points() == []
    assert not any(p.name.startswith(".tmp-") for p in (repo.path / "points").rglob("*"))


def test_leaving_the_writer_without_commit_aborts(repo: Repository) -> None:
    with repo.begin_point("vm", session_id="s", metadata={}, parent=None) as point:
        point.add_disk(DISK, label="d", capacity=BS, inherit=False)
    assert repo.points() == []
    with pytest.raises(UsageError, match="already committed or aborted"):
        point.commit()


def test_leftovers_of_a_crashed_writer_are_ignored_and_cleaned_by_the_next_writer(
    repo: Repository,
) -> None:
    backup(repo, "vm", random_block(1))
    half_point = repo.path / "points" / "vm" / ".tmp-20250101T000000Z-0badc0de"
    half_point.mkdir()
    (half_point / "disk-2000.idx").write_bytes(b"half written")
    half_block = repo.path / "tmp" / f"{'ab' * 32}.4242.0"
    half_block.write_bytes(b"half a block")

    assert [p.vm for p in repo.points()] == ["vm"]
    backup(repo, "vm", random_block(2))

    assert not half_point.exists()
    assert not half_block.exists()
    assert len(repo.points("vm")) == 2


def test_points_lists_committed_points_oldest_first_and_by_vm(repo: Repository) -> None:
    first = backup(repo, "app/01 (prod)", random_block(1))
    other = backup(repo, "db", random_block(2))
    second = backup(repo, "app/01 (prod)", random_block(3))
    assert [p.point_id for p in repo.points("app/01 (prod)")] == [first.point_id, second.point_id]
    assert [p.point_id for p in repo.points()] == [first.point_id, other.point_id,
                                                   second.point_id]
    assert repo.points("nobody") == []


def test_an_unknown_point_or_disk_is_named(repo: Repository) -> None:
    point = backup(repo, "vm", random_block(1))
    with pytest.raises(NotFound, match="20200101T000000Z-00000000"):
        repo.point("20200101T000000Z-00000000")
    with pytest.raises(NotFound, match=r"\.\./etc"):
        repo.point("../etc")
    with pytest.raises(NotFound, match=f"{point.point_id} has no disk 2042"):
        repo.disk_index(point.point_id, 2042)


# --- retention and gc -----------------------------------------------------------------------


def test_retention_keeps_the_newest_and_gc_frees_only_blocks_no_point_names(
    repo: Repository, tmp_path: Path
) -> None:
    shared, only_1_and_b, only_1, only_2, only_3 = (random_block(i) for i in range(5))
    p1 = backup(repo, "vm", image_of([shared, only_1_and_b, only_1]))
    p2 = backup(repo, "vm", image_of([shared, only_2]))
    p3 = backup(repo, "vm", image_of([shared, only_3]))
    b = backup(repo, "vm-b", image_of([only_1_and_b]))

    assert repo.apply_retention("vm", keep=1) == [p1.point_id, p2.point_id]
    assert [p.point_id for p in repo.points("vm")] == [p3.point_id]
    before = repo.stats()
    gc = repo.gc()

    freed = [only_1, only_2]
    assert gc.blocks_removed == 2
    assert gc.bytes_freed == sum(len(CODEC.compress(x)) for x in freed)
    assert repo.stats().blocks == before.blocks - 2
    for block in freed:
        with pytest.raises(BlockDamaged, match="missing"):
            repo.read_block(block_digest(block))
    assert sha(restored(repo, p3.point_id, tmp_path)) == sha(image_of([shared, only_3]))
    assert sha(restored(repo, b.point_id, tmp_path)) == sha(only_1_and_b)
    assert repo.verify() == []


def test_retention_refuses_to_keep_nothing(repo: Repository) -> None:
    backup(repo, "vm", random_block(1))
    with pytest.raises(UsageError, match="at least one"):
        repo.apply_retention("vm", keep=0)
    assert len(repo.points("vm")) == 1


def test_gc_waits_for_a_writer_and_keeps_what_it_is_writing(
    repo: Repository, tmp_path: Path
) -> None:
    image = image_of([random_block(1), random_block(2)])
    with repo.begin_point("vm", session_id="s", metadata={}, parent=None) as point:
        disk = point.add_disk(DISK, label="d", capacity=len(image), inherit=False)
        store_blocks(repo, disk, image)
        with pytest.raises(RepositoryError, match="in use by a writer"):
            Repository.open(repo.path).gc(timeout=0.2)
        info = point.commit()
    assert repo.gc().blocks_removed == 0
    assert sha(restored(repo, info.point_id, tmp_path)) == sha(image)


def test_a_writer_does_not_trust_what_it_knew_about_blocks_after_gc_elsewhere(
    repo: Repository, tmp_path: Path
) -> None:
    image = image_of([random_block(1), text_block(2)])
    old = backup(repo, "vm", image)  # this process now "knows" these blocks are stored
    elsewhere = Repository.open(repo.path)
    elsewhere.delete_point(old.point_id)
    assert elsewhere.gc().blocks_removed == 2

    again = backup(repo, "vm", image)
    assert sha(restored(repo, again.point_id, tmp_path)) == sha(image)
    assert repo.verify() == []


def test_commit_refuses_a_point_naming_a_block_that_was_never_stored(
    repo: Repository,
) -> None:
    with repo.begin_point("vm", session_id="s", metadata={}, parent=None) as point:
        disk = point.add_disk(DISK, label="d", capacity=4 * BS, inherit=False)
        disk.set_block(3, block_digest(b"never stored"))
        with pytest.raises(RepositoryError, match=f"disk {DISK}, offset {3 * BS}.*never stored"):
            point.commit()
    assert repo.points() == []


# --- damage: verify names it, restore refuses it ---------------------------------------------


def test_one_corrupt_byte_stops_restore_and_is_named_by_verify(
    repo: Repository, tmp_path: Path
) -> None:
    blocks: list[bytes | None] = [random_block(i) for i in range(6)]
    blocks[2] = None
    point = backup(repo, "vm", image_of(blocks))
    victim = block_file(repo, blocks[4])  # type: ignore[arg-type]
    damaged = bytearray(victim.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    victim.chmod(0o600)
    victim.write_bytes(damaged)

    dest = tmp_path / "out" / "vm.img"
    dest.parent.mkdir()
    with pytest.raises(CorruptBlockError) as caught:
        repo.restore_disk(point.point_id, DISK, dest)
    message = str(caught.value)
    assert point.point_id in message and f"disk {DISK}" in message
    assert f"offset {4 * BS}" in message
    assert list(dest.parent.iterdir()) == []  # no image, no partial file

    problems = repo.verify(point.point_id)
    assert len(problems) == 1
    assert (problems[0].point, problems[0].disk, problems[0].offset) == (
        point.point_id, DISK, 4 * BS)
    assert f"restore point {point.point_id}, disk {DISK}, offset {4 * BS}" in str(problems[0])
    with pytest.raises(RepositoryError, match=f"{point.point_id}.*damaged and quarantined"):
        repo.restore_disk(point.point_id, DISK, dest)


def test_verify_reports_every_place_a_bad_shared_block_is_used(repo: Repository) -> None:
    shared = random_block(1)
    a = backup(repo, "vm-a", image_of([shared, random_block(2)]))
    b = backup(repo, "vm-b", image_of([random_block(3), shared]))
    block_file(repo, shared).unlink()
    problems = repo.verify()
    found = {(p.point, p.disk, p.offset) for p in problems}
    assert found == {(a.point_id, DISK, 0), (b.point_id, DISK, BS)}
    assert all("missing" in p.reason for p in problems)


def test_a_point_whose_metadata_does_not_match_its_manifest_is_not_listed_as_good(
    repo: Repository,
) -> None:
    good = backup(repo, "vm", random_block(1))
    bad = backup(repo, "vm", random_block(2))
    metadata = repo.path / "points" / "vm" / bad.point_id / "metadata.json"
    metadata.write_text(metadata.read_text().replace('"s-test"', '"s-evil"'))

    assert [p.point_id for p in repo.points()] == [good.point_id]
    assert repo.latest_point("vm") == good
    with pytest.raises(RepositoryError, match="metadata.json does not match the manifest"):
        repo.point(bad.point_id)
    problems = repo.verify()
    assert [(p.point, p.disk, p.offset) for p in problems] == [(bad.point_id, None, None)]
    assert "metadata.json does not match the manifest" in problems[0].reason


def test_a_damaged_index_is_reported_and_never_restored(repo: Repository, tmp_path: Path) -> None:
    point = backup(repo, "vm", image_of([random_block(1), random_block(2)]))
    index = repo.path / "points" / "vm" / point.point_id / "disk-2000.idx"
    raw = bytearray(index.read_bytes())
    raw[-3] ^= 0xFF
    index.write_bytes(raw)

    problems = repo.verify()
    assert [(p.point, p.disk, p.offset) for p in problems] == [(point.point_id, DISK, None)]
    assert "disk-2000.idx does not match the manifest" in problems[0].reason
    with pytest.raises(RepositoryError, match="disk-2000.idx does not match"):
        repo.restore_disk(point.point_id, DISK, tmp_path / "x.img")
    assert not (tmp_path / "x.img").exists()


# --- opening ------------------------------------------------------------------------------------


def test_opening_a_missing_path_says_it_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match=f"{tmp_path / 'nope'}: does not exist"):
        Repository.open(tmp_path / "nope")


def test_opening_a_directory_that_is_not_a_repository_says_so(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    with pytest.raises(RepositoryError, match="not a vbrd repository \\(no config file\\)"):
        Repository.open(tmp_path / "docs")
    (tmp_path / "docs" / "config").write_text("[core]\nbare = false\n")
    with pytest.raises(RepositoryError, match="not a vbrd repository"):
        Repository.open(tmp_path / "docs")


def test_an_unknown_format_version_is_refused_by_name(repo: Repository) -> None:
    config = json.loads((repo.path / "config").read_text())
    config["version"] = 2
    (repo.path / "config").write_text(json.dumps(config))
    with pytest.raises(RepositoryError, match=r"format version 2 is not supported .*version 1"):
        Repository.open(repo.path)


def test_create_refuses_an_existing_repository_or_a_non_empty_directory(
    repo: Repository, tmp_path: Path
) -> None:
    with pytest.raises(RepositoryError, match="already a repository"):
        Repository.create(repo.path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(RepositoryError, match="not an empty directory"):
        Repository.create(tmp_path / "busy")
    with pytest.raises(RepositoryError, match="block size 1000"):
        Repository.create(tmp_path / "odd", block_size=1000)


def test_open_or_create_keeps_an_existing_repositorys_settings(
    repo: Repository, tmp_path: Path
) -> None:
    again = Repository.open_or_create(repo.path, block_size=1 << 20, compression_level=9)
    assert (again.block_size, again.compression_level) == (BS, 3)
    fresh = Repository.open_or_create(tmp_path / "new", block_size=1 << 20, compression_level=9)
    assert Repository.open(fresh.path).block_size == 1 << 20
    assert Repository.open(fresh.path).compression_level == 9


def test_a_block_that_is_not_a_zstd_frame_is_refused(repo: Repository) -> None:
    block = random_block(1)
    with pytest.raises(RepositoryError, match="not a zstd frame"):
        repo.put_block(block_digest(block), block)
    oversized = random_block(2, 2 * BS)
    with pytest.raises(RepositoryError, match="more than the repository's block size"):
        repo.put_block(block_digest(oversized), CODEC.compress(oversized))


def test_a_block_stored_by_another_process_is_synced_by_the_point_naming_it(
    repo: Repository, tmp_path: Path
) -> None:
    """The repository's data mover stores blocks; the Manager commits the point."""
    image = image_of([random_block(1), None, text_block(2)])
    mover = Repository.open(repo.path)
    with mover.writing():
        for n in (0, 2):
            block = image[n * BS : (n + 1) * BS]
            mover.put_block(block_digest(block), CODEC.compress(block))

    with repo.begin_point("vm", session_id="s", metadata={}, parent=None) as point:
        disk = point.add_disk(DISK, label="d", capacity=len(image), inherit=False)
        disk.set_block(0, block_digest(image[:BS]))
        disk.set_block(2, block_digest(image[2 * BS :]))
        info = point.commit()
    assert sha(restored(repo, info.point_id, tmp_path)) == sha(image)
    assert info.stored_bytes == repo.stats().stored_bytes


def test_a_commit_does_not_fsync_again_what_the_data_mover_made_durable(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = image_of([random_block(3), None, text_block(4)])
    digests = [block_digest(image[:BS]), block_digest(image[2 * BS :])]
    mover = Repository.open(repo.path)
    with mover.writing():
        for n, digest in ((0, digests[0]), (2, digests[1])):
            mover.put_block(digest, CODEC.compress(image[n * BS : (n + 1) * BS]))
        mover.make_blocks_durable(digests)

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with repo.begin_point("vm", session_id="s", metadata={}, parent=None) as point:
        disk = point.add_disk(DISK, label="d", capacity=len(image), inherit=False)
        disk.blocks_durable = True
        disk.set_block(0, digests[0])
        disk.set_block(2, digests[1])
        info = point.commit()
    assert synced, "the commit fsynced nothing at all"
    assert not [p for p in synced if "/blocks/" in p], "blocks were fsynced a second time"
    assert sha(restored(repo, info.point_id, tmp_path)) == sha(image)
    assert info.stored_bytes == repo.stats().stored_bytes


def test_a_block_said_durable_but_missing_still_fails_the_commit(repo: Repository) -> None:
    with pytest.raises(RepositoryError, match="never stored"):
        with repo.begin_point("vm", session_id="s", metadata={}, parent=None) as point:
            disk = point.add_disk(DISK, label="d", capacity=BS, inherit=False)
            disk.blocks_durable = True
            disk.set_block(0, block_digest(random_block(5)))
            point.commit()


def test_the_format_is_as_documented(repo: Repository) -> None:
    point = backup(repo, "web 01", image_of([random_block(1), None]))
    config = json.loads((repo.path / "config").read_text())
    assert config["format"] == "vbrd-repository" and config["version"] == 1
    assert config["block_size"] == BS and config["compression"]["algorithm"] == "zstd"
    point_dir = repo.path / "points" / "web%2001" / point.point_id
    assert sorted(p.name for p in point_dir.iterdir()) == [
        "disk-2000.idx", "manifest.json", "metadata.json"]
    manifest = json.loads((point_dir / "manifest.json").read_text())
    for name in ("disk-2000.idx", "metadata.json"):
        data = (point_dir / name).read_bytes()
        assert manifest["files"][name] == {"size": len(data), "sha256": sha(data)}
    assert block_file(repo, random_block(1)).exists()
    # fsynced at commit, then made read-only: a later writer trusts it without reading it
    assert (os.stat(block_file(repo, random_block(1))).st_mode & 0o777) == 0o400


def test_two_points_written_at_once_share_blocks_and_both_restore(
    repo: Repository, tmp_path: Path
) -> None:
    """The data path stores blocks from worker threads while other sessions do the same."""
    shared = [random_block(i) for i in range(8)]
    images = {
        "vm-a": image_of([*shared, random_block(100), None]),
        "vm-b": image_of([None, *shared, text_block(200)]),
    }
    points: dict[str, PointInfo] = {}

    def run(vm: str) -> None:
        points[vm] = backup(repo, vm, images[vm])

    threads = [threading.Thread(target=run, args=(vm,)) for vm in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert repo.stats().blocks == 10
    for vm, image in images.items():
        assert sha(restored(repo, points[vm].point_id, tmp_path)) == sha(image)


def test_set_range_zero_clears_inherited_blocks(repo: Repository, tmp_path: Path) -> None:
    blocks: list[bytes | None] = [random_block(i) for i in range(6)]
    full = backup(repo, "vm", image_of(blocks))
    with repo.begin_point("vm", session_id="s", metadata={}, parent=full.point_id) as point:
        disk = point.add_disk(DISK, label="d", capacity=6 * BS, inherit=True)
        assert list(disk.blocks_of(BS + 10, 2 * BS)) == [1, 2, 3]
        disk.set_range_zero(1, 3)
        trimmed = point.commit()
    blocks[1:4] = [None, None, None]
    assert sha(restored(repo, trimmed.point_id, tmp_path)) == sha(image_of(blocks))
    assert trimmed.disks[0].blocks == 3 and trimmed.disks[0].changed_blocks == 0


def test_fields_a_later_v1_writer_adds_are_ignored(repo: Repository) -> None:
    point = backup(repo, "vm", random_block(1))
    point_dir = repo.path / "points" / "vm" / point.point_id
    doc = json.loads((point_dir / "metadata.json").read_text())
    doc["encryption"] = None
    doc["disks"][0]["thin"] = True
    data = json.dumps(doc).encode()
    (point_dir / "metadata.json").write_bytes(data)
    manifest = json.loads((point_dir / "manifest.json").read_text())
    manifest["files"]["metadata.json"] = {"size": len(data), "sha256": sha(data)}
    (point_dir / "manifest.json").write_text(json.dumps(manifest))

    assert repo.point(point.point_id) == point
    assert repo.verify() == []


# --- restored images bypass the page cache, where the filesystem allows it ---------------------


def direct_opens(monkeypatch: pytest.MonkeyPatch, *, refuse: bool) -> list[str]:
    """Record the paths opened with O_DIRECT; with ``refuse`` the filesystem says EINVAL."""
    import errno

    from vbrd.repository import store

    seen: list[str] = []
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            seen.append(str(path))
            if refuse:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(store.os, "open", fake_open)
    return seen


def test_a_restored_image_is_written_past_the_page_cache(
        repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = direct_opens(monkeypatch, refuse=False)
    image = mixed_image(11, 12, tail=1536)  # the short last block cannot be written direct
    info = backup(repo, "vm-a", image)
    assert sha(restored(repo, info.point_id, tmp_path)) == sha(image)
    assert any(".partial-" in p for p in seen), "the image was not written with O_DIRECT"


def test_a_filesystem_without_o_direct_gets_the_same_image_through_the_page_cache(
        repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = direct_opens(monkeypatch, refuse=True)
    image = mixed_image(12, 10, tail=4096)
    info = backup(repo, "vm-a", image)
    assert sha(restored(repo, info.point_id, tmp_path)) == sha(image)
    assert seen, "O_DIRECT was never tried"
