"""A writer killed with SIGKILL at any moment leaves the repository whole.

The writer (this file run as a script) backs up two VMs with two disks each in a loop:
fulls and incrementals, retention and gc. It is killed at seeded random moments; after each
kill every listed point must verify and restore to exactly the image it was made from, no
half point may be listed, and the next writer must be able to commit.

Every image is a function of (VM, disk, version), and the version is in the point's
metadata, so the check rebuilds what each point must restore to.
"""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

BS = 16 * 1024
BLOCKS = 48
DISKS = (2000, 2001)
VMS = ("vm-a", "vm-b")
CHANGES_PER_VERSION = 4
KILL_SEEDS = (11, 12, 13, 14, 15, 16, 17)
ROOT = Path(__file__).resolve().parents[2]


# --- the images -----------------------------------------------------------------------------


def _changed(vm: str, key: int, version: int) -> set[int]:
    if version == 0:
        return set(range(BLOCKS))
    return set(random.Random(f"{vm}/{key}/{version}").sample(range(BLOCKS), CHANGES_PER_VERSION))


def _block(vm: str, key: int, n: int, since: int) -> bytes:
    rnd = random.Random(f"{vm}/{key}/{n}/{since}")
    kind = rnd.random()
    if kind < 0.25:
        return bytes(BS)
    if kind < 0.5:  # the same few blocks in every VM and disk: dedup across them
        return random.Random(f"shared/{rnd.randrange(6)}").randbytes(BS)
    return rnd.randbytes(BS)


def image(vm: str, key: int, version: int) -> bytes:
    since = [0] * BLOCKS
    for v in range(1, version + 1):
        for n in _changed(vm, key, v):
            since[n] = v
    return b"".join(_block(vm, key, n, since[n]) for n in range(BLOCKS))


# --- the writer (run as a subprocess) ------------------------------------------------------


def write_point(repo, vm: str, version: int, parent) -> None:  # noqa: ANN001
    """One point of ``vm`` at ``version``: an incremental when the parent is the version before."""
    from vbrd.repository import block_digest, is_zero

    incremental = parent is not None and parent.metadata["version"] == version - 1
    with repo.begin_point(
        vm,
        session_id=f"crash-{version}",
        metadata={"version": version},
        parent=parent.point_id if incremental else None,
    ) as point:
        for key in DISKS:
            disk = point.add_disk(key, label=f"disk {key}", capacity=BLOCKS * BS,
                                  inherit=incremental)
            data = memoryview(image(vm, key, version))
            for n in sorted(_changed(vm, key, version)) if incremental else range(BLOCKS):
                block = data[n * BS : (n + 1) * BS]
                if is_zero(block):
                    disk.set_block(n, None)
                    continue
                digest = block_digest(block)
                if not repo.has_blocks([digest])[0]:
                    repo.put_block(digest, repo.codec.compress(block))
                disk.set_block(n, digest)
        point.commit()


def writer_main(repo_path: str, seed: int) -> None:
    from vbrd.repository import Repository

    repo = Repository.open_or_create(repo_path, block_size=BS)
    rnd = random.Random(seed)
    log = open(Path(repo_path).parent / "commits.log", "a")  # noqa: SIM115
    while True:
        vm = rnd.choice(VMS)
        parent = repo.latest_point(vm)
        version = parent.metadata["version"] + 1 if parent else 0
        if rnd.random() < 0.2:
            version += 1  # a missed session: the next point is a full
        write_point(repo, vm, version, parent)
        log.write(f"{vm} {version}\n")
        log.flush()
        repo.apply_retention(vm, keep=3)
        if rnd.random() < 0.3:
            repo.gc()


# --- the test -------------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_whole(repo_path: Path, scratch: Path) -> int:
    from vbrd.repository import Repository

    repo = Repository.open(repo_path)
    points = repo.points()
    on_disk = [p for vm_dir in (repo_path / "points").iterdir()
               for p in vm_dir.iterdir() if not p.name.startswith(".")]
    assert sorted(p.name for p in on_disk) == sorted(p.point_id for p in points), (
        "a point directory is not listed: a half-written point became visible")
    for point in points:
        assert repo.verify(point.point_id) == [], point.point_id
        assert [d.key for d in point.disks] == list(DISKS)
        for key in DISKS:
            dest = scratch / f"{point.point_id}-{key}.img"
            repo.restore_disk(point.point_id, key, dest)
            expected = image(point.vm, key, point.metadata["version"])
            assert _sha(dest.read_bytes()) == _sha(expected), (point.point_id, key)
            dest.unlink()
    return len(points)


def test_a_writer_killed_at_random_moments_leaves_only_whole_points(tmp_path: Path) -> None:
    from vbrd.repository import Repository

    repo_path = tmp_path / "repo"
    Repository.create(repo_path, block_size=BS)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    listed = 0
    for seed in KILL_SEEDS:
        writer = subprocess.Popen(
            [sys.executable, __file__, "--writer", str(repo_path), str(seed)], env=env
        )
        try:
            time.sleep(random.Random(seed).uniform(0.6, 1.8))
            assert writer.poll() is None, "the writer died by itself"
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
        listed += _check_whole(repo_path, tmp_path)

    commits = (tmp_path / "commits.log").read_text().split("\n")
    assert len(commits) > 2 * len(KILL_SEEDS), "the writer hardly wrote; the kills tested little"
    assert listed > 0

    repo = Repository.open(repo_path)
    vm = "vm-a"
    parent = repo.latest_point(vm)
    write_point(repo, vm, parent.metadata["version"] + 1 if parent else 0, parent)
    repo.gc()
    _check_whole(repo_path, tmp_path)
    leftovers = [p for p in (repo_path / "points").rglob(".tmp-*")] + list(
        (repo_path / "tmp").iterdir())
    assert leftovers == []


if __name__ == "__main__" and sys.argv[1:2] == ["--writer"]:
    writer_main(sys.argv[2], int(sys.argv[3]))
