#!/usr/bin/env python3
"""The measured steps of the benchmark, each run as its own process by bench/run.py.

A step is a process so that its wall time, CPU time and peak memory are those of its whole
process tree (the parent reads them with ``wait4``: a vbrd backup's data movers are children
of the Manager, reaped before it exits, so their CPU and memory count too). Each step prints
one JSON object on stdout with what only it can tell (bytes read, the restore point, ...).

    steps.py backup  --config CFG --job JOB          a vbrd job through the real Manager
    steps.py restore --repo R --vm VM --disk KEY --to IMG
    steps.py verify  --repo R --vm VM
    steps.py read FILE                               the raw limits, on the image file
    steps.py hash FILE [--threads 2]
    steps.py pipeline FILE [--threads 2 --level 3 --block-size 1048576]
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# VBRD_BENCH_TREE: another copy of vbrd to measure (bench/run.py's "before" variant)
sys.path.insert(0, os.environ.get("VBRD_BENCH_TREE") or str(HERE.parent))

READ_CHUNK = 1 << 20
RESTORE_THREADS = 4  # vbrd.repository.RESTORE_THREADS (steps import vbrd only when they run)


def backup(config: Path, job: str) -> dict[str, Any]:
    from vbrd.config import load_config
    from vbrd.engine import Engine

    async def run() -> dict[str, Any]:
        engine = Engine(load_config(config))
        try:
            session = await engine.start_job(job, trigger="cli")
            status = await engine.wait_session(session)
            events = engine.catalog.events(session)
        finally:
            engine.close()
        disks = [e for e in events if e["type"] == "disk.transferred"]
        points = [e for e in events if e["type"] == "point.committed"]
        problems = [e.get("message", "") for e in events
                    if e["type"] == "log" and e.get("level") in ("warning", "error")]
        return {
            "status": status,
            "session": session,
            "point": points[-1]["point_id"] if points else None,
            "bytes_read": sum(d["bytes_read"] for d in disks),
            "bytes_sent": sum(d["bytes_sent"] for d in disks),
            "bytes_stored": sum(d["bytes_stored"] for d in disks),
            "incremental": all(d["incremental"] for d in disks) if disks else False,
            "mode": ",".join(d["mode"] for d in disks),
            "reason": "; ".join(d.get("reason", "") for d in disks),
            "messages": problems,
            "failure": next((e.get("reason", "") for e in events
                             if e["type"] == "session.finished"), ""),
        }

    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run())


def restore(repo: Path, vm: str, disk: int, dest: Path, threads: int) -> dict[str, Any]:
    from vbrd.repository import Repository

    repository = Repository.open(repo)
    point = repository.points(vm)[-1]
    stats = repository.restore_disk(point.point_id, disk, dest, threads=threads)
    return {"point": point.point_id, "bytes_written": stats.bytes_written,
            "blocks": stats.blocks, "zero_blocks": stats.zero_blocks}


def verify(repo: Path, vm: str, threads: int) -> dict[str, Any]:
    from vbrd.repository import Repository

    repository = Repository.open(repo)
    point = repository.points(vm)[-1]
    problems = repository.verify(point.point_id, threads=threads)
    return {"point": point.point_id, "problems": [str(p) for p in problems]}


def read(path: Path) -> dict[str, Any]:
    """Read the whole file in 1 MiB preads: on this kind of machine the fastest way tried
    (a reused 8 MiB buffer is slower: it does not stay in the CPU's caches)."""
    fd = os.open(path, os.O_RDONLY)
    total = 0
    try:
        while data := os.pread(fd, READ_CHUNK, total):
            total += len(data)
    finally:
        os.close(fd)
    return {"bytes_read": total}


def _blocks(path: Path, block_size: int, threads: int,
            work: Callable[[bytes], None]) -> int:
    """Call ``work`` on every block of the file from ``threads`` threads; bytes read."""
    size = path.stat().st_size
    count = -(-size // block_size)
    numbers = itertools.count()
    errors: list[BaseException] = []
    fd = os.open(path, os.O_RDONLY)

    def loop() -> None:
        try:
            while (n := next(numbers)) < count:
                work(os.pread(fd, block_size, n * block_size))
        except BaseException as e:  # re-raised after the join
            errors.append(e)

    try:
        pool = [threading.Thread(target=loop) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        os.close(fd)
    if errors:
        raise errors[0]
    return size


def hash_only(path: Path, block_size: int, threads: int) -> dict[str, Any]:
    from vbrd.repository.blocks import block_digest, is_zero

    def work(block: bytes) -> None:
        if not is_zero(block):
            block_digest(block)

    return {"bytes_read": _blocks(path, block_size, threads, work)}


def pipeline(path: Path, block_size: int, threads: int, level: int) -> dict[str, Any]:
    """Read, zero test, SHA-256 and zstd every block: the work any block store must do."""
    from vbrd.repository.blocks import BlockCodec, block_digest, is_zero

    codec = BlockCodec(level)
    stored: dict[bytes, int] = {}

    def work(block: bytes) -> None:
        if not is_zero(block):
            digest = block_digest(block)
            stored[digest] = len(codec.compress(block))

    read_bytes = _blocks(path, block_size, threads, work)
    return {"bytes_read": read_bytes, "bytes_stored": sum(stored.values()),
            "blocks": len(stored)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    b = sub.add_parser("backup")
    b.add_argument("--config", type=Path, required=True)
    b.add_argument("--job", required=True)
    r = sub.add_parser("restore")
    r.add_argument("--repo", type=Path, required=True)
    r.add_argument("--vm", required=True)
    r.add_argument("--disk", type=int, default=2000)
    r.add_argument("--to", type=Path, required=True)
    r.add_argument("--threads", type=int, default=RESTORE_THREADS)
    v = sub.add_parser("verify")
    v.add_argument("--repo", type=Path, required=True)
    v.add_argument("--vm", required=True)
    v.add_argument("--threads", type=int, default=2)
    for name in ("read", "hash", "pipeline"):
        p = sub.add_parser(name)
        p.add_argument("file", type=Path)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--level", type=int, default=3)
        p.add_argument("--block-size", type=int, default=1 << 20)
    a = ap.parse_args()
    if a.step == "backup":
        out = backup(a.config, a.job)
    elif a.step == "restore":
        out = restore(a.repo, a.vm, a.disk, a.to, a.threads)
    elif a.step == "verify":
        out = verify(a.repo, a.vm, a.threads)
    elif a.step == "read":
        out = read(a.file)
    elif a.step == "hash":
        out = hash_only(a.file, a.block_size, a.threads)
    else:
        out = pipeline(a.file, a.block_size, a.threads, a.level)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
