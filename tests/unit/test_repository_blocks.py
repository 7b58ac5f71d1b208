"""The per-block work of the data path and the block index format."""
from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from pathlib import Path

import pytest

from vbrd.repository import BlockCodec, Repository, block_digest, is_zero
from vbrd.repository.index import DiskIndex, IndexFormatError, decode_index, encode_index

MiB = 1 << 20


def test_block_digest_is_sha256_of_any_buffer() -> None:
    data = os.urandom(5000)
    expected = hashlib.sha256(data).digest()
    assert block_digest(data) == expected
    assert block_digest(memoryview(data)) == expected
    assert block_digest(bytearray(data)) == expected
    assert len(expected) == 32


@pytest.mark.parametrize("make", [bytes, bytearray, lambda b: memoryview(bytearray(b))])
def test_is_zero_tells_zero_blocks_from_blocks_with_one_set_byte(make) -> None:
    for size in (4096, MiB, MiB + 512):
        assert is_zero(make(bytes(size)))
        for where in (0, size // 2, size - 1):
            block = bytearray(size)
            block[where] = 1
            assert not is_zero(make(bytes(block)))
    assert is_zero(memoryview(bytes(3 * MiB))[MiB : 2 * MiB])
    assert is_zero(b"")


def test_is_zero_does_not_copy_a_memoryview() -> None:
    """A copy of 1 MiB per block would cost as much as hashing it; memcmp is ~20x cheaper."""
    view = memoryview(bytearray(MiB))
    started = time.perf_counter()
    for _ in range(200):
        assert is_zero(view)
    per_block = (time.perf_counter() - started) / 200
    assert per_block < 0.5e-3  # item-by-item comparison takes ~4 ms here


def test_codec_round_trips_and_checks_the_length_it_expects() -> None:
    codec = BlockCodec(3)
    data = b"log line\n" * 100_000 + os.urandom(1000)
    frame = codec.compress(memoryview(data))
    assert len(frame) < len(data) // 10
    assert codec.decompress(frame) == data
    assert codec.decompress(frame, expected_size=len(data)) == data
    with pytest.raises(ValueError, match=f"expected {len(data) - 1}"):
        codec.decompress(frame, expected_size=len(data) - 1)
    with pytest.raises(ValueError):
        codec.decompress(frame[:-10])
    with pytest.raises(ValueError, match="not a zstd frame"):
        codec.decompress(b"plain bytes, not zstd")


def test_codec_is_safe_to_share_between_threads() -> None:
    codec = BlockCodec(1)
    blocks = [random.Random(i).randbytes(64 * 1024) + bytes(64 * 1024) for i in range(32)]
    failures: list[int] = []

    def work(offset: int) -> None:
        for i in range(offset, len(blocks), 4):
            if codec.decompress(codec.compress(blocks[i])) != blocks[i]:
                failures.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_codec_rejects_a_level_zstd_does_not_have() -> None:
    with pytest.raises(ValueError, match="level 23"):
        BlockCodec(23)


def test_index_file_round_trips_including_a_short_last_block() -> None:
    entries = b"".join(
        bytes(32) if i % 3 == 0 else hashlib.sha256(b"%d" % i).digest() for i in range(11)
    )
    capacity = 10 * 4096 + 100
    capacity_back, block_size, entries_back = decode_index(
        encode_index(entries, capacity=capacity, block_size=4096)
    )
    assert (capacity_back, block_size, entries_back) == (capacity, 4096, entries)
    index = DiskIndex("p", 2000, "d", capacity, 4096, None, entries)
    assert index.digests[0] is None and index.digests[1] == hashlib.sha256(b"1").digest()
    assert [n for n, _ in index.nonzero()] == [i for i in range(11) if i % 3]
    assert index.block_length(10) == 100 and index.block_length(9) == 4096


def test_index_decoding_refuses_damage_with_a_reason() -> None:
    good = encode_index(bytes(64), capacity=8192, block_size=4096)
    with pytest.raises(IndexFormatError, match="bad magic"):
        decode_index(b"X" + good[1:])
    with pytest.raises(IndexFormatError, match="shorter than its header"):
        decode_index(good[:10])
    with pytest.raises(IndexFormatError, match="version"):
        decode_index(good[:8] + b"\x09\x00" + good[10:])
    with pytest.raises(IndexFormatError):
        decode_index(good[:-4])


def test_a_64_gib_disk_index_is_small_and_quick_when_the_disk_is_sparse(tmp_path: Path) -> None:
    repo = Repository.create(tmp_path / "repo", block_size=MiB)
    codec = BlockCodec(3)
    capacity = 64 << 30
    data = {n: random.Random(n).randbytes(4096) + bytes(MiB - 4096) for n in (0, 7, 65535)}
    started = time.perf_counter()
    with repo.begin_point("big", session_id="s", metadata={}, parent=None) as point:
        disk = point.add_disk(2000, label="d", capacity=capacity, inherit=False)
        for n, block in data.items():
            digest = block_digest(block)
            repo.put_block(digest, codec.compress(block))
            disk.set_block(n, digest)
        info = point.commit()
    index = repo.disk_index(info.point_id, 2000)
    elapsed = time.perf_counter() - started

    assert index.block_count == 65536
    assert dict(index.nonzero()) == {n: block_digest(b) for n, b in data.items()}
    index_file = repo.path / "points" / "big" / info.point_id / "disk-2000.idx"
    assert index_file.stat().st_size < 4096  # 2 MiB of entries, mostly zero markers
    assert elapsed < 5
    assert info.disks[0].data_bytes == 3 * MiB
