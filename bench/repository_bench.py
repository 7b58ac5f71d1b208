#!/usr/bin/env python3
"""Write throughput of the repository against the bare per-block work, in the same run.

The baseline is what the data path must do anyway on two threads: read each block of a
synthetic disk image (bench/make_disk.py), skip zero blocks, SHA-256 and zstd the rest, and
throw the result away. The measured run does the same and stores the blocks through the
repository (has_blocks, put_block, set_block, commit with its fsyncs). The ratio of the two
throughputs is what storing costs; 1.0 would mean storage is free. The two alternate for a
few rounds and the best of each counts, because a shared machine is noisy.

    python3 bench/repository_bench.py                 # 1 GiB image, 1 MiB blocks
    python3 bench/repository_bench.py --size 0.25 --json

The image and the repositories live under bench/work/ (ignored by git); the image is kept
between runs, the repositories are removed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import make_disk  # noqa: E402

from vbrd.repository import BlockCodec, Repository, block_digest, is_zero  # noqa: E402

WORK = HERE / "work"


def run_threads(threads: int, blocks: int, work: Callable[[int], None]) -> float:
    """Seconds for ``threads`` threads to call ``work`` once per block number."""
    numbers = itertools.count()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            while (n := next(numbers)) < blocks:
                work(n)
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    started = time.perf_counter()
    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def cpu_seconds() -> float:
    """User and system time of this process: what the work cost, whoever else is running."""
    t = os.times()
    return t.user + t.system


def baseline(image: Path, block_size: int, level: int, threads: int) -> float:
    codec = BlockCodec(level)
    size = image.stat().st_size
    fd = os.open(image, os.O_RDONLY)
    try:

        def work(n: int) -> None:
            block = os.pread(fd, block_size, n * block_size)
            if not is_zero(block):
                block_digest(block)
                codec.compress(block)

        return run_threads(threads, -(-size // block_size), work)
    finally:
        os.close(fd)


def store(
    image: Path, repo_dir: Path, block_size: int, level: int, threads: int
) -> dict[str, float]:
    repo = Repository.create(repo_dir, block_size=block_size, compression_level=level)
    codec = BlockCodec(level)
    size = image.stat().st_size
    fd = os.open(image, os.O_RDONLY)
    stored = [0]
    count_lock = threading.Lock()
    try:
        started = time.perf_counter()
        with repo.begin_point("bench", session_id="bench", metadata={}, parent=None) as point:
            disk = point.add_disk(2000, label="Hard disk 1", capacity=size, inherit=False)

            def work(n: int) -> None:
                block = os.pread(fd, block_size, n * block_size)
                if is_zero(block):
                    return
                digest = block_digest(block)
                if not repo.has_blocks([digest])[0]:
                    written = repo.put_block(digest, codec.compress(block))
                    with count_lock:
                        stored[0] += written
                disk.set_block(n, digest)

            ingest = run_threads(threads, disk.block_count, work)
            before_commit = time.perf_counter()
            point.commit()
        total = time.perf_counter() - started
    finally:
        os.close(fd)
    return {
        "ingest_seconds": ingest,
        "commit_seconds": total - (before_commit - started),
        "total_seconds": total,
        "stored_bytes": stored[0],
    }


def restore(repo_dir: Path, dest: Path, threads: int) -> float:
    repo = Repository.open(repo_dir)
    point = repo.points("bench")[-1]
    started = time.perf_counter()
    repo.restore_disk(point.point_id, 2000, dest, threads=threads)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=1.0, help="image size in GiB (default 1)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=1 << 20)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repo-dir", type=Path, default=WORK,
                    help="where the repositories are made (default bench/work)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best counts")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()

    WORK.mkdir(exist_ok=True)
    size = int(a.size * (1 << 30)) // make_disk.ALIGN * make_disk.ALIGN
    image = WORK / f"disk-{size}-{a.seed}.img"
    if not image.exists() or image.stat().st_size != size:
        make_disk.make(str(image), size, a.seed)
    with open(image, "rb") as f:  # both runs read from the page cache
        while f.read(8 << 20):
            pass

    repo_dir = a.repo_dir / f"repo-{os.getpid()}"
    dest = a.repo_dir / f"restore-{os.getpid()}.img"
    bases: list[float] = []
    runs: list[dict[str, float]] = []
    base_cpu: list[float] = []
    store_cpu: list[float] = []
    try:
        for _ in range(a.rounds):  # interleaved, so a busy moment hurts both sides alike
            cpu = cpu_seconds()
            bases.append(baseline(image, a.block_size, a.level, a.threads))
            base_cpu.append(cpu_seconds() - cpu)
            shutil.rmtree(repo_dir, ignore_errors=True)
            cpu = cpu_seconds()
            runs.append(store(image, repo_dir, a.block_size, a.level, a.threads))
            store_cpu.append(cpu_seconds() - cpu)
        restore_seconds = restore(repo_dir, dest, a.threads)
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)
        dest.unlink(missing_ok=True)

    base_seconds = min(bases)
    ingest = min(r["ingest_seconds"] for r in runs)
    best = min(runs, key=lambda r: r["total_seconds"])
    result = {
        "image_bytes": size,
        "threads": a.threads,
        "block_size": a.block_size,
        "level": a.level,
        "rounds": a.rounds,
        "baseline_mb_s": size / base_seconds / 1e6,
        "baseline_spread": (max(bases) - base_seconds) / base_seconds,
        "ingest_mb_s": size / ingest / 1e6,
        "durable_mb_s": size / best["total_seconds"] / 1e6,
        "commit_seconds": best["commit_seconds"],
        "stored_bytes": best["stored_bytes"],
        "ratio_ingest": base_seconds / ingest,
        "ratio_durable": base_seconds / best["total_seconds"],
        "ratios_per_round": [b / r["total_seconds"] for b, r in zip(bases, runs, strict=True)],
        "ratio_cpu": min(base_cpu) / min(store_cpu),
        "baseline_cpu_seconds": min(base_cpu),
        "store_cpu_seconds": min(store_cpu),
        "restore_mb_s": size / restore_seconds / 1e6,
    }
    if a.json:
        print(json.dumps(result))
        return
    print(f"image {size / (1 << 30):.2f} GiB, blocks {a.block_size} B, zstd {a.level}, "
          f"{a.threads} threads")
    print(f"baseline (read, zero test, SHA-256, zstd): {result['baseline_mb_s']:8.0f} MB/s "
          f"(best of {a.rounds}; slowest +{result['baseline_spread']:.0%})")
    print(f"repository, blocks stored:                 {result['ingest_mb_s']:8.0f} MB/s  "
          f"ratio {result['ratio_ingest']:.2f}")
    print(f"repository, point committed (fsync):       {result['durable_mb_s']:8.0f} MB/s  "
          f"ratio {result['ratio_durable']:.2f}  (commit {best['commit_seconds']:.2f} s)")
    print(f"CPU seconds (user+sys): baseline {result['baseline_cpu_seconds']:.2f}, "
          f"repository {result['store_cpu_seconds']:.2f}  ratio {result['ratio_cpu']:.2f}")
    print("ratio per round: " + ", ".join(f"{r:.2f}" for r in result["ratios_per_round"]))
    print(f"stored {best['stored_bytes'] / 1e6:.0f} MB; restore {result['restore_mb_s']:.0f} MB/s")


if __name__ == "__main__":
    main()
