#!/usr/bin/env python3
"""vbrd against restic and borg, and against the raw limits, on one disk image, in one run.

What runs (each step its own process; wall time, CPU time and peak RSS of its process tree):

1. bench/make_disk.py makes a deterministic image (zero, text-like, word-salad and random
   extents) and a copy with a 2 % change, kept in the work directory between runs.
2. Per round: the lab comes up with that image as the disk of ``linux-vm`` (san-ds, flat);
   restic and borg back up the same file, the lab's flat extent. Then
   - full:    vbrd (san, san with 4 MiB blocks, nbd, hotadd, san without CBT), restic, borg,
              and the raw limits: reading the file, SHA-256 of its blocks, SHA-256 + zstd of
              its blocks (2 threads, Python), ``zstd -T2`` of the file;
   - the 2 % change reaches the lab's disk through its change log (CBT reports it);
   - incr:    the same backups again (vbrd: CBT incremental, or digests for the job without
              CBT; restic and borg re-read the changed file);
   - restore: vbrd restore and verify, ``restic restore``, ``borg extract``, each restored
              image compared with the disk byte for byte.
   The order of the tools alternates from round to round; a cell's value is the best round.
3. The table (markdown and JSON) goes to the results directory, with the machine's
   description and every round's raw numbers.

    bench/run                          # the documented command: set-up, then this
    python3 bench/run.py --size 4 --rounds 2
    python3 bench/run.py --rss-sizes 1,8     # also a vbrd full+incr of 1 and 8 GiB disks
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import make_disk  # noqa: E402

from vbrd.lab import lab as lab_module  # noqa: E402
from vbrd.models import Extent  # noqa: E402

GiB = 1 << 30
MB = 1e6
VM = "linux-vm"
DISK_KEY = 2000
LEVEL = 3
PASSWORD = "vbrd-bench"  # restic always encrypts; the repository is thrown away
PY = sys.executable
QUIET_WAIT = 10.0  # seconds to wait for a quiet machine before each step, at most
QUIET_LOAD = 0.08  # share of all cores that counts as quiet
STEPS = [PY, str(HERE / "steps.py")]

# vbrd jobs: name -> (repository block size, transport, cbt)
VBRD_JOBS = {
    "vbrd-san": ("1MiB", "san", True),
    "vbrd-san-4m": ("4MiB", "san", True),
    "vbrd-nbd": ("1MiB", "nbd", True),
    "vbrd-hotadd": ("1MiB", "hotadd", True),
    "vbrd-nocbt": ("1MiB", "san", False),
}
# "before": the same job run by a copy of this tree whose data path (the movers, the
# repository's write and restore paths, and how the Manager starts a proxy-side mover) is
# taken from BEFORE_COMMIT (by default the commit before the latest round of speed work;
# --before names another, e.g. the one before a change whose cost is measured), so the table
# shows before/after in the same run
BEFORE_JOBS = {"vbrd-san-before": "vbrd-san"}
# run once, untimed, after the lab starts: the first backup through a fresh lab pays for its
# warm-up (the simulator's first calls, the first snapshot), which would land on whichever
# vbrd job comes first in the round
WARMUP_JOB = "vbrd-warmup"
BEFORE_COMMIT = "1952758d9c43edbdaebfa8ed4889a9dc27c5bd80"
BEFORE_FILES = ("vbrd/transport/source.py", "vbrd/transport/target.py",
                "vbrd/transport/mover.py", "vbrd/repository/store.py",
                "vbrd/repository/repository.py", "vbrd/repository/blocks.py",
                "vbrd/manager/data_transport.py", "vbrd/vmdk/sources.py")
PEERS = ("restic", "borg")
RAW = ("raw-read", "raw-sha256", "raw-sha256-zstd", "zstd-cli")


@dataclass
class Sample:
    """One measured step."""

    step: str  # full | incr | restore | verify | limit
    tool: str
    round: int
    wall: float
    cpu: float
    peak_rss: int
    bytes_read: int = 0
    bytes_stored: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class BenchError(Exception):
    pass


# ---- processes --------------------------------------------------------------------------


last_machine_cpu = 0.0  # CPU seconds the whole machine spent during the last step


def foreign_cpu(sample: Sample) -> float:
    """CPU seconds that others (not the step, nor the lab's simulator) spent during it."""
    return max(0.0, last_machine_cpu - sample.cpu - float(sample.extra.get("sim_cpu", 0.0)))


class Spawner:
    """bench/spawn.py, started once while this process is still small (see its docstring)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([PY, str(HERE / "spawn.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str], env: dict[str, str] | None, cwd: Path | None,
            out: Path, err: Path) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = {"argv": argv, "env": dict(env if env is not None else os.environ),
                   "cwd": str(cwd) if cwd else None, "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError("the step spawner (bench/spawn.py) died")
        answer: dict[str, Any] = json.loads(line)
        return answer


_spawner: Spawner | None = None


def measure(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
            what: str) -> tuple[float, float, int, str]:
    """Run ``argv``; its wall time, CPU seconds and peak RSS (bytes), its children's included.

    ``wait4`` gives the rusage of the process and of every descendant it waited for (vbrd's
    Manager reaps its data movers), so a step is charged for its whole process tree.
    """
    global _spawner, last_machine_cpu
    if _spawner is None:
        _spawner = Spawner()
    os.sync()  # a step does not pay for the previous one's writes still in the page cache
    wait_quiet()
    with tempfile.TemporaryDirectory(prefix="vbrd-bench-") as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        busy = machine_busy()
        answer = _spawner.run(argv, env, cwd, out, err)
        last_machine_cpu = machine_busy() - busy
        stdout = out.read_text(errors="replace")
        stderr = err.read_text(errors="replace")
    if answer["returncode"] != 0:
        raise BenchError(f"{what} failed (exit {answer['returncode']}): {stderr[-2000:]}")
    return answer["wall"], answer["cpu"], answer["peak_rss"], stdout


def machine_busy() -> float:
    """CPU seconds all cores spent busy since boot (user, system, interrupts, steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit: float = QUIET_WAIT) -> float:
    """Wait (at most ``limit`` s) until other work leaves the machine nearly idle.

    The machine may be shared; a step measured while something else runs says little.
    Returns the seconds waited.
    """
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = machine_busy()
        time.sleep(0.5)
        if (machine_busy() - before) / 0.5 < QUIET_LOAD * (os.cpu_count() or 1):
            break
    return time.monotonic() - started


def sim_cpu(pid: int) -> float:
    """CPU seconds of the lab's vCenter simulator (it serves snapshots, CBT and nbd reads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def warm(path: Path, written: Path) -> None:
    """Start a step from the same state as every other: what earlier steps wrote under
    ``written`` flushed and out of the page cache, and ``path`` (the disk) in it.

    Without the flush a tool that leaves its repository's writes to the kernel (no fsync)
    would hand their cost to whichever step runs next; without dropping them, each step
    would find less free memory than the one before, and the steps at the end of a round
    would pay for reclaiming what the others left.
    """
    os.sync()
    forget(*(Path(root) / name for root, _dirs, files in os.walk(written) for name in files))
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass


def forget(*paths: Path) -> None:
    """Drop files from the page cache, so the image under test stays cached instead."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # a socket, a dangling link, a file gone meanwhile
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- images -----------------------------------------------------------------------------


def images(work: Path, size_gib: float, seed: int, fraction: float) -> tuple[Path, Path, Path]:
    """The base image, its mutated copy and the changes file, made once and kept."""
    size = int(size_gib * GiB) // make_disk.ALIGN * make_disk.ALIGN
    base = work / f"disk-{size}-{seed}.img"
    mutated = work / f"disk-{size}-{seed}-mut{fraction:g}.img"
    changes = work / f"disk-{size}-{seed}-mut{fraction:g}.jsonl"
    if not base.exists() or base.stat().st_size != size:
        log(f"making the {size_gib:g} GiB image {base.name} (once; kept in {work})")
        tmp = base.with_suffix(".partial")
        make_disk.make(str(tmp), size, seed)
        tmp.rename(base)
    if not mutated.exists() or not changes.exists():
        log(f"making its {fraction:.0%} change {mutated.name}")
        tmp = mutated.with_suffix(".partial")
        subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(base), str(tmp)],
                       check=True)
        make_disk.mutate(str(tmp), fraction, seed + 1000, str(changes))
        tmp.rename(mutated)
    return base, mutated, changes


def read_changes(path: Path) -> list[Extent]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            doc = json.loads(line)
            out.append(Extent(int(doc["offset"]), int(doc["length"])))
    return out


# ---- vbrd ---------------------------------------------------------------------------------


def vbrd_config(lab: dict[str, Any], where: Path) -> Path:
    """The lab's config with this round's state, and a repository and job per vbrd variant."""
    text = Path(lab["vbrd_config"]).read_text()
    text = re.sub(r'(?m)^state_dir = ".*"$', f'state_dir = "{where / "state"}"', text)
    text = re.sub(r'(?m)^api_socket = ".*"$', f'api_socket = "{where / "vbrd.sock"}"', text)
    text = re.sub(r'(?m)^api_listen = ".*"$', 'api_listen = "127.0.0.1:0"', text)
    text = re.sub(r'(?m)^log_level = ".*"$', 'log_level = "warning"', text)
    parts = [text]
    variants = {**VBRD_JOBS, **{b: VBRD_JOBS[a] for b, a in BEFORE_JOBS.items()},
                WARMUP_JOB: VBRD_JOBS["vbrd-san"]}
    for name, (block_size, transport, cbt) in variants.items():
        parts.append(
            f'[repositories.{name}]\npath = "{where / "repo" / name}"\n'
            f'block_size = "{block_size}"\ncompression_level = {LEVEL}\nmax_tasks = 4\n'
            f'address = "local"\nnetwork = "lab"\n\n'
            f'[jobs.{name}]\nvcenter = "lab"\nrepository = "{name}"\ntransport = "{transport}"\n'
            f'cbt = {"true" if cbt else "false"}\nvms = ["{VM}"]\nschedule = ""\n'
            f'retention_points = 7\n')
    path = where / "vbrd.toml"
    path.write_text("\n".join(parts))
    return path


def vbrd_backup(step: str, job: str, rnd: int, config: Path, where: Path, sim: int,
                profile: Path | None = None) -> Sample:
    cpu0 = sim_cpu(sim)
    argv = [*STEPS, "backup", "--config", str(config), "--job", job]
    if profile is not None:
        argv = ["py-spy", "record", "--format", "raw", "--subprocesses", "--rate", "100",
                "--output", str(profile / f"{job}-{step}.txt"), "--", *argv]
    wall, cpu, rss, out = measure(argv, env=tree_env(job, where), cwd=where,
                                  what=f"vbrd job {job}")
    # the step's answer is its last JSON line (a profiler may print after it)
    result = json.loads(next(line for line in reversed(out.splitlines())
                             if line.startswith("{")))
    if result["status"] not in ("success", "warning"):
        raise BenchError(f"vbrd job {job} ended {result['status']}: {result['failure']}; "
                         f"{result['messages']}")
    expect_incremental = step == "incr" and VBRD_JOBS[BEFORE_JOBS.get(job, job)][2]
    if result["incremental"] != expect_incremental:
        raise BenchError(f"vbrd job {job}: the {step} was "
                         f"{'' if result['incremental'] else 'not '}incremental "
                         f"({result['reason']})")
    return Sample(step, job, rnd, wall, cpu, rss, result["bytes_read"], result["bytes_stored"],
                  {"sim_cpu": sim_cpu(sim) - cpu0, "mode": result["mode"],
                   "bytes_sent": result["bytes_sent"], "point": result["point"],
                   "repo_bytes": tree_size(where / "repo" / job), "status": result["status"]})


def before_tree(work: Path, commit: str) -> Path:
    """This tree's vbrd and plugins with the data path of ``commit`` (see BEFORE_JOBS)."""
    tree = work / "before-tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    for part in ("vbrd", "plugins"):
        shutil.copytree(ROOT / part, tree / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in BEFORE_FILES:
        old = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{name}"],
                             capture_output=True, check=True).stdout
        (tree / name).write_bytes(old)
    return tree


_before: Path | None = None


def tree_env(job: str, where: Path) -> dict[str, str] | None:
    """The environment of a step of ``job``; run it in the round's directory, not in this
    tree (``python -m`` puts the working directory first on the import path)."""
    if job not in BEFORE_JOBS:
        return None
    assert _before is not None
    return dict(os.environ, VBRD_BENCH_TREE=str(_before))


# ---- peers --------------------------------------------------------------------------------


def peer_env(where: Path) -> dict[str, str]:
    return dict(os.environ, RESTIC_PASSWORD=PASSWORD,
                RESTIC_CACHE_DIR=str(where / "restic-cache"),
                BORG_BASE_DIR=str(where / "borg-base"),
                BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")


def peers_init(where: Path) -> None:
    env = peer_env(where)
    subprocess.run(["restic", "-r", str(where / "restic"), "init", "--repository-version", "2"],
                   env=env, check=True, capture_output=True)
    subprocess.run(["borg", "init", "-e", "none", str(where / "borg")], env=env, check=True,
                   capture_output=True)


def restic_backup(step: str, rnd: int, disk: Path, where: Path) -> Sample:
    repo = where / "restic"
    before = tree_size(repo)
    wall, cpu, rss, out = measure(
        ["restic", "-r", str(repo), "backup", "--json", "--compression", "auto", "--host",
         "bench", str(disk)], env=peer_env(where), what=f"restic {step}")
    summary = next(json.loads(line) for line in reversed(out.splitlines())
                   if '"summary"' in line)
    return Sample(step, "restic", rnd, wall, cpu, rss, int(summary["total_bytes_processed"]),
                  tree_size(repo) - before, {"data_added": summary.get("data_added")})


def borg_backup(step: str, rnd: int, disk: Path, where: Path) -> Sample:
    repo = where / "borg"
    before = tree_size(repo)
    wall, cpu, rss, out = measure(
        ["borg", "create", "--json", "--compression", f"zstd,{LEVEL}", f"{repo}::{step}",
         str(disk)], env=peer_env(where), what=f"borg {step}")
    stats = json.loads(out)["archive"]["stats"]
    return Sample(step, "borg", rnd, wall, cpu, rss, int(stats["original_size"]),
                  tree_size(repo) - before, {"deduplicated_size": stats.get("deduplicated_size")})


# ---- restores -----------------------------------------------------------------------------


def same_bytes(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def vbrd_restore(rnd: int, disk: Path, where: Path, job: str = "vbrd-san") -> list[Sample]:
    repo = where / "repo" / job
    dest = where / "restore-vbrd.img"
    wall, cpu, rss, out = measure([*STEPS, "restore", "--repo", str(repo), "--vm", VM,
                                   "--disk", str(DISK_KEY), "--to", str(dest)],
                                  env=tree_env(job, where), cwd=where,
                                  what="vbrd restore")
    restored = json.loads(out.strip().splitlines()[-1])
    if not same_bytes(dest, disk):
        raise BenchError(f"vbrd's restore {dest} differs from the disk {disk}")
    dest.unlink()
    samples = [Sample("restore", job, rnd, wall, cpu, rss, 0, 0,
                      {"bytes_written": restored["bytes_written"]})]
    samples[0].extra["foreign_cpu"] = round(foreign_cpu(samples[0]), 2)
    wall, cpu, rss, out = measure([*STEPS, "verify", "--repo", str(repo), "--vm", VM],
                                  env=tree_env(job, where), cwd=where,
                                  what="vbrd verify")
    verified = json.loads(out.strip().splitlines()[-1])
    if verified["problems"]:
        raise BenchError(f"vbrd verify found problems: {verified['problems'][:3]}")
    samples.append(Sample("verify", job, rnd, wall, cpu, rss))
    return samples


def restic_restore(rnd: int, disk: Path, where: Path) -> Sample:
    target = where / "restore-restic"
    wall, cpu, rss, _ = measure(
        ["restic", "-r", str(where / "restic"), "restore", "latest", "--target",
         str(target)], env=peer_env(where), what="restic restore")
    restored = target / str(disk).lstrip("/")
    if not same_bytes(restored, disk):
        raise BenchError(f"restic's restore {restored} differs from the disk {disk}")
    shutil.rmtree(target)
    return Sample("restore", "restic", rnd, wall, cpu, rss)


def borg_restore(rnd: int, disk: Path, where: Path) -> Sample:
    target = where / "restore-borg"
    target.mkdir()
    wall, cpu, rss, _ = measure(["borg", "extract", "--sparse", f"{where / 'borg'}::incr"],
                                env=peer_env(where), cwd=target, what="borg extract")
    restored = target / str(disk).lstrip("/")
    if not same_bytes(restored, disk):
        raise BenchError(f"borg's extract {restored} differs from the disk {disk}")
    shutil.rmtree(target)
    return Sample("restore", "borg", rnd, wall, cpu, rss)


# ---- raw limits ---------------------------------------------------------------------------


def raw_limit(tool: str, rnd: int, disk: Path) -> Sample:
    if tool == "zstd-cli":
        wall, cpu, rss, _ = measure(["sh", "-c", f'zstd -{LEVEL} -T2 -f -v --no-progress '
                                     f'"{disk}" -o /dev/null 2>&1 1>/dev/null | tail -1 >&1'],
                                    what="zstd")
        # "<name> : 26.59%   ( 4.00 GiB =>  1.06 GiB, /dev/null)"
        m = re.search(r":\s*([0-9.]+)%", _)
        stored = int(float(m.group(1)) / 100 * disk.stat().st_size) if m else 0
        return Sample("limit", tool, rnd, wall, cpu, rss, disk.stat().st_size, stored)
    step = {"raw-read": "read", "raw-sha256": "hash", "raw-sha256-zstd": "pipeline"}[tool]
    wall, cpu, rss, out = measure([*STEPS, step, str(disk), "--level", str(LEVEL)], what=tool)
    result = json.loads(out.strip().splitlines()[-1])
    return Sample("limit", tool, rnd, wall, cpu, rss, result["bytes_read"],
                  result.get("bytes_stored", 0))


# ---- one round ----------------------------------------------------------------------------


def ordered(items: list[str], rnd: int) -> list[str]:
    return items if rnd % 2 == 0 else list(reversed(items))


def one_round(rnd: int, base: Path, mutated: Path, changes: list[Extent], work: Path,
              vbrd_jobs: list[str], with_peers: bool, with_raw: bool,
              profile: Path | None = None, with_restores: bool = True) -> list[Sample]:
    where = work / f"round-{rnd}"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    lab_dir = work / "lab"
    if lab_dir.exists():
        lab_module.down(lab_dir)
    log(f"round {rnd + 1}: starting the lab with the image as {VM}'s disk")
    lab_json = lab_module.up(lab_dir, disk_scale=0.0625, guests=False,
                             disk_images={VM: base})
    samples: list[Sample] = []
    try:
        lab = json.loads(lab_json.read_text())
        entry = next(v for v in lab["vms"] if v["name"] == VM)
        disk = Path(entry["disks"][0]["extents"][0])
        sim = int(lab["pids"]["simulator"])
        config = vbrd_config(lab, where)
        forget(base, mutated)
        if with_peers:
            peers_init(where)
        warm(disk, where)
        vbrd_backup("full", WARMUP_JOB, rnd, config, where, sim)
        shutil.rmtree(where / "repo" / WARMUP_JOB)

        def run(step: str, tool: str) -> None:
            # the previous steps' repositories may have pushed the disk out of the cache
            warm(disk, where)
            if tool in VBRD_JOBS or tool in BEFORE_JOBS:
                s = vbrd_backup(step, tool, rnd, config, where, sim, profile)
            elif tool == "restic":
                s = restic_backup(step, rnd, disk, where)
            elif tool == "borg":
                s = borg_backup(step, rnd, disk, where)
            else:
                s = raw_limit(tool, rnd, disk)
            s.extra["foreign_cpu"] = round(foreign_cpu(s), 2)
            log(f"  {step:7} {tool:16} {s.wall:7.2f} s  cpu {s.cpu:6.2f} s  "
                f"rss {s.peak_rss / MB:6.0f} MB  stored {s.bytes_stored / MB:7.1f} MB  "
                f"read {s.bytes_read / MB:7.0f} MB  others' cpu {s.extra['foreign_cpu']:.2f} s")
            samples.append(s)

        tools = list(vbrd_jobs) + (list(PEERS) if with_peers else [])
        for tool in ordered(tools + (list(RAW) if with_raw else []), rnd):
            run("full", tool)
        lab_module.write_extents(lab_dir, VM, DISK_KEY, changes, mutated)
        for tool in ordered(tools, rnd):
            run("incr", tool)
        if not same_bytes(disk, mutated):
            raise BenchError("the lab's disk does not hold the mutated image after the change")
        warm(disk, where)
        restores = [j for j in ("vbrd-san", "vbrd-san-before")
                    if j in vbrd_jobs and with_restores] + (
            list(PEERS) if with_peers else [])
        for tool in ordered(restores, rnd):
            warm(disk, where)
            if tool.startswith("vbrd"):
                got = vbrd_restore(rnd, disk, where, tool)
            elif tool == "restic":
                got = [restic_restore(rnd, disk, where)]
            else:
                got = [borg_restore(rnd, disk, where)]
            for s in got:
                s.extra.setdefault("foreign_cpu", round(foreign_cpu(s), 2))
                log(f"  {s.step:7} {s.tool:16} {s.wall:7.2f} s  cpu {s.cpu:6.2f} s  "
                    f"rss {s.peak_rss / MB:6.0f} MB")
            samples.extend(got)
    finally:
        lab_module.down(lab_dir)
        shutil.rmtree(where, ignore_errors=True)
    return samples


# ---- the table ----------------------------------------------------------------------------


def best(samples: list[Sample]) -> dict[tuple[str, str], Sample]:
    """Per (step, tool), the round with the shortest wall time."""
    out: dict[tuple[str, str], Sample] = {}
    for s in samples:
        key = (s.step, s.tool)
        if key not in out or s.wall < out[key].wall:
            out[key] = s
    return out


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


class Pairs:
    """Ratios between two steps measured in the same round, the median over the rounds.

    The machine's speed drifts between rounds (other tenants of the host), so the ratio of
    two best-of-rounds values can pair a fast round of one tool with a slow round of another;
    a ratio within one round compares like with like.
    """

    def __init__(self, samples: list[Sample]) -> None:
        self.by_round = {(s.step, s.tool, s.round): s for s in samples}
        self.rounds = sorted({s.round for s in samples})

    def ratio(self, a: tuple[str, str], b: tuple[str, str], attr: str = "wall",
              invert: bool = False) -> float | None:
        values = []
        for rnd in self.rounds:
            x, y = self.by_round.get((*a, rnd)), self.by_round.get((*b, rnd))
            if x is None or y is None:
                continue
            num, den = (getattr(y, attr), getattr(x, attr)) if invert else (
                getattr(x, attr), getattr(y, attr))
            if den:
                values.append(num / den)
        return round(statistics.median(values), 3) if values else None


def summarize(samples: list[Sample], size: int) -> dict[str, Any]:
    cells = best(samples)
    pairs = Pairs(samples)
    rows = []
    limit_for = {"full": "raw-sha256-zstd", "incr": "raw-sha256", "restore": "raw-read",
                 "verify": "raw-read"}
    for (step, tool), s in cells.items():
        row: dict[str, Any] = {
            "step": step, "tool": tool, "wall_s": round(s.wall, 3),
            "logical_MBps": round(size / s.wall / MB, 1), "cpu_s": round(s.cpu, 2),
            "peak_rss_MB": round(s.peak_rss / MB, 1), "stored_MB": round(s.bytes_stored / MB, 2),
            "read_MB": round(s.bytes_read / MB, 2),
            "rounds_wall_s": [round(x.wall, 3) for x in samples
                              if (x.step, x.tool) == (step, tool)],
            **{k: v for k, v in s.extra.items()
               if k in ("sim_cpu", "mode", "repo_bytes", "foreign_cpu")},
        }
        for peer in PEERS:
            if (step, peer) not in cells or tool in PEERS:
                continue
            row[f"vs_{peer}"] = {
                attr_name: pairs.ratio((step, tool), (step, peer), attr)
                for attr_name, attr in (("wall", "wall"), ("cpu", "cpu"),
                                        ("peak_rss", "peak_rss"), ("stored", "bytes_stored"),
                                        ("read", "bytes_read"))
            }
        lim = cells.get(("limit", limit_for.get(step, "")))
        if lim is not None and step != "limit":
            limit_key = ("limit", lim.tool)
            row["vs_limit"] = {
                "limit": lim.tool,
                "speed": pairs.ratio((step, tool), limit_key, invert=True),
                "cpu": pairs.ratio((step, tool), limit_key, "cpu"),
                "stored": pairs.ratio((step, tool), limit_key, "bytes_stored")
                if lim.bytes_stored else None}
        rows.append(row)
    order = {"full": 0, "incr": 1, "restore": 2, "verify": 3, "limit": 4}
    rows.sort(key=lambda r: (order.get(r["step"], 9), r["tool"]))
    return {"rows": rows, "targets": targets(cells, pairs, size)}


def targets(cells: dict[tuple[str, str], Sample], pairs: Pairs,
            size: int) -> list[dict[str, Any]]:
    """The issue's targets, each with what this run measured and whether it holds."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, better: str = "<=") -> None:
        if value is None:
            return
        ok = value <= limit if better == "<=" else value >= limit
        out.append({"target": name, "measured": round(value, 3), "limit": limit,
                    "holds": ok})

    limit_zstd, limit_sha = ("limit", "raw-sha256-zstd"), ("limit", "raw-sha256")
    add("full (san) wall / borg full", pairs.ratio(("full", "vbrd-san"), ("full", "borg")), 0.4)
    add("full (san) wall / restic full",
        pairs.ratio(("full", "vbrd-san"), ("full", "restic")), 0.3)
    add("full (san) speed / raw SHA-256+zstd limit",
        pairs.ratio(("full", "vbrd-san"), limit_zstd, invert=True), 0.7, ">=")
    add("full stored, 1 MiB blocks / borg",
        pairs.ratio(("full", "vbrd-san"), ("full", "borg"), "bytes_stored"), 1.05)
    add("full stored, 4 MiB blocks / borg",
        pairs.ratio(("full", "vbrd-san-4m"), ("full", "borg"), "bytes_stored"), 1.0)
    san_incr = cells.get(("incr", "vbrd-san"))
    if san_incr:
        add("incr (CBT) bytes read / disk", san_incr.bytes_read / size, 0.03)
    add("incr (CBT) wall / borg incr", pairs.ratio(("incr", "vbrd-san"), ("incr", "borg")), 0.1)
    add("incr (CBT) stored / restic incr",
        pairs.ratio(("incr", "vbrd-san"), ("incr", "restic"), "bytes_stored"), 1.0)
    add("incr without CBT wall / raw read+SHA-256",
        pairs.ratio(("incr", "vbrd-nocbt"), limit_sha), 1.0)
    add("restore wall / borg extract",
        pairs.ratio(("restore", "vbrd-san"), ("restore", "borg")), 0.5)
    vbrd_rss = [s.peak_rss for (step, tool), s in cells.items() if tool.startswith("vbrd")]
    if vbrd_rss:
        add("peak RSS of any vbrd process tree (MB)", max(vbrd_rss) / MB, 300)
    return out


def markdown(summary: dict[str, Any], machine: dict[str, Any], args: dict[str, Any]) -> str:
    size = args["image_bytes"]
    lines = [
        f"# vbrd against restic and borg — {size / GiB:g} GiB image, "
        f"{args['mutate']:.0%} change",
        "",
        f"Machine: {machine['cpu']} ({machine['cores']} cores), {machine['memory_gib']} GiB RAM, "
        f"{machine['kernel']}, work directory on {machine['work_fs']}; Python "
        f"{machine['python']}, {machine['restic']}, {machine['borg']}, {machine['zstd']}.",
        f"Rounds: {args['rounds']} (tool order alternating); each time, CPU, RSS and size is "
        f"the best round; each ratio is taken within a round (both sides measured minutes "
        f"apart), the median over the rounds. "
        f"Page cache warm. Wall and CPU time include process start-up; CPU and peak RSS are "
        f"those of each step's whole process tree (vbrd: the Manager and both data movers; "
        f"the vCenter simulator's CPU is in the JSON as sim_cpu). restic: repository v2, "
        f"compression auto, encrypted (it cannot be turned off); borg: `-e none`, "
        f"`--compression zstd,{LEVEL}`; vbrd: zstd {LEVEL}.",
        "",
        "| step | tool | wall s | MB/s of disk | CPU s | peak RSS MB | stored MB | read MB "
        "| wall ×borg | wall ×restic | stored ×borg | stored ×restic | speed ×raw limit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v: Any, digits: int = 2) -> str:
        return "" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    for row in summary["rows"]:
        vb, vr, vl = row.get("vs_borg", {}), row.get("vs_restic", {}), row.get("vs_limit", {})
        lines.append(
            f"| {row['step']} | {row['tool']} | {row['wall_s']:.2f} | {row['logical_MBps']:.0f} "
            f"| {row['cpu_s']:.2f} | {row['peak_rss_MB']:.0f} | {row['stored_MB']:.1f} "
            f"| {row['read_MB']:.0f} | {f(vb.get('wall'))} | {f(vr.get('wall'))} "
            f"| {f(vb.get('stored'))} | {f(vr.get('stored'))} "
            f"| {f(vl.get('speed'))}{' (' + vl['limit'] + ')' if vl else ''} |")
    by = {(r["step"], r["tool"]): r for r in summary["rows"]}
    pairs = [(step, by[(step, "vbrd-san")], by[(step, "vbrd-san-before")])
             for step in ("full", "incr", "restore", "verify")
             if (step, "vbrd-san") in by and (step, "vbrd-san-before") in by]
    if pairs:
        lines += ["", "## The data path before and after (same run)", "",
                  f"`vbrd-san-before` is this tree with the data path files of commit "
                  f"{args.get('before', BEFORE_COMMIT)[:10]}: "
                  f"{', '.join(f'`{n}`' for n in BEFORE_FILES)}.", "",
                  "| step | wall s before → after | ×  | CPU s before → after | × "
                  "| read MB before → after |", "|---|---|---:|---|---:|---|"]
        for step, after, before in pairs:
            lines.append(
                f"| {step} | {before['wall_s']:.2f} → {after['wall_s']:.2f} "
                f"| {after['wall_s'] / before['wall_s']:.2f} "
                f"| {before['cpu_s']:.2f} → {after['cpu_s']:.2f} "
                f"| {after['cpu_s'] / before['cpu_s']:.2f} "
                f"| {before['read_MB']:.0f} → {after['read_MB']:.0f} |")
    lines += ["", "## Targets", "", "| target | measured | limit | holds |", "|---|---:|---:|---|"]
    for t in summary["targets"]:
        lines.append(f"| {t['target']} | {t['measured']:.3f} | {t['limit']} "
                     f"| {'yes' if t['holds'] else '**no**'} |")
    lines.append("")
    return "\n".join(lines)


def profile_summary(raw: Path, top: int = 14) -> str:
    """py-spy's collapsed stacks as a table: per process, where its samples end (own time,
    waiting in C included) and the share of each."""
    own: dict[str, dict[str, int]] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        marks = [i for i, f in enumerate(frames) if f.startswith("process ")]
        if not marks or not count.isdigit():
            continue
        proc = frames[marks[-1]]
        name = ("source mover" if "mover source" in proc else "target mover"
                if "mover target" in proc else "Manager (steps.py backup)")
        leaf = frames[-1] if len(frames) > marks[-1] + 1 else "(native)"
        own.setdefault(name, {})
        own[name][leaf] = own[name].get(leaf, 0) + int(count)
    lines = [f"### {raw.stem}", ""]
    for name, leaves in sorted(own.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(leaves.values())
        lines += [f"{name}: {total} samples at 100 Hz (all threads, idle waits included)", "",
                  "| samples | share | where |", "|---:|---:|---|"]
        for leaf, n in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"| {n} | {n / total:.0%} | `{leaf}` |")
        lines.append("")
    return "\n".join(lines)


def machine_description(work: Path) -> dict[str, Any]:
    def out(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "missing"

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    fs = out(["df", "--output=fstype,source", str(work)]).splitlines()[-1].split()
    import zstandard

    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / GiB, 1),
        "kernel": f"Linux {platform.release()}", "work_fs": " ".join(fs),
        "python": platform.python_version(), "zstandard": zstandard.__version__,
        "restic": out(["restic", "version"]).split(" compiled")[0],
        "borg": out(["borg", "--version"]),
        "zstd": out(["zstd", "--version"]).split(",")[0].strip("* "),
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=4, help="image size in GiB (default 4)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mutate", type=float, default=0.02, help="changed share (default 0.02)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=HERE / "work",
                    help="images and scratch (default bench/work, ignored by git)")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="", help="result file name (default by size)")
    ap.add_argument("--vbrd-only", action="store_true", help="skip restic, borg, raw limits")
    ap.add_argument("--jobs", default=",".join([*VBRD_JOBS, *BEFORE_JOBS]),
                    help=f"vbrd variants to run (default all: "
                         f"{', '.join([*VBRD_JOBS, *BEFORE_JOBS])})")
    ap.add_argument("--before", default=BEFORE_COMMIT,
                    help="the commit whose data path files vbrd-san-before runs (default "
                         f"{BEFORE_COMMIT[:10]})")
    ap.add_argument("--rss-sizes", default="",
                    help="also run vbrd-san full+incr+restore on these sizes in GiB, e.g. 1,8")
    ap.add_argument("--profile", action="store_true",
                    help="also profile vbrd-san's full and incremental with py-spy (one more "
                         "round, not in the table)")
    a = ap.parse_args()

    for tool in ("restic", "borg", "zstd", "qemu-img", "cmp"):
        if not a.vbrd_only and shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is missing; bench/run installs it (Debian "
                             f"packages restic, borgbackup, zstd, qemu-utils)")
    global _spawner
    _spawner = Spawner()  # before this process grows
    a.work.mkdir(parents=True, exist_ok=True)
    jobs = [j for j in a.jobs.split(",") if j]
    unknown = set(jobs) - set(VBRD_JOBS) - set(BEFORE_JOBS)
    if unknown:
        raise SystemExit(f"bench: unknown vbrd variant(s) {', '.join(sorted(unknown))}")
    started = time.monotonic()
    global _before
    if set(jobs) & set(BEFORE_JOBS):
        _before = before_tree(a.work, a.before)
    base, mutated, changes_file = images(a.work, a.size, a.seed, a.mutate)
    changes = read_changes(changes_file)
    size = base.stat().st_size
    samples: list[Sample] = []
    for rnd in range(a.rounds):
        samples += one_round(rnd, base, mutated, changes, a.work, jobs,
                             not a.vbrd_only, not a.vbrd_only)
    summary = summarize(samples, size)
    a.results.mkdir(parents=True, exist_ok=True)
    name = a.name or f"bench-{a.size:g}gib"
    machine = machine_description(a.work)
    args = {"image_bytes": size, "mutate": a.mutate, "rounds": a.rounds, "seed": a.seed,
            "changed_bytes": sum(c.length for c in changes), "before": a.before,
            "seconds": round(time.monotonic() - started, 1)}
    rss_checks: list[dict[str, Any]] = []

    def write() -> str:
        doc = {"machine": machine, "args": args, **summary,
               "rss_checks": rss_checks, "samples": [asdict(s) for s in samples]}
        (a.results / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
        text = markdown(summary, machine, args)
        for check in rss_checks:
            peak = max(s["peak_rss"] for s in check["samples"])
            text += (f"\nRSS check, {check['size_gib']:g} GiB disk: peak RSS of the vbrd "
                     f"process trees {peak / MB:.0f} MB (" + ", ".join(
                         f"{s['step']} {s['peak_rss'] / MB:.0f}" for s in check["samples"])
                     + ")\n")
        (a.results / f"{name}.md").write_text(text)
        return text

    text = write()  # the table is safe before the extras run
    for extra in [float(x) for x in a.rss_sizes.split(",") if x]:
        b2, m2, c2 = images(a.work, extra, a.seed, a.mutate)
        got = one_round(0, b2, m2, read_changes(c2), a.work, ["vbrd-san"], False, False)
        rss_checks.append({"size_gib": extra, "samples": [asdict(s) for s in got]})
        text = write()
    if a.profile:
        prof_dir = a.results / f"{name}-profile"
        shutil.rmtree(prof_dir, ignore_errors=True)
        prof_dir.mkdir(parents=True)
        one_round(0, base, mutated, changes, a.work, ["vbrd-san"], False, False,
                  profile=prof_dir, with_restores=False)
        profiles = "\n".join(profile_summary(p) for p in sorted(prof_dir.glob("*.txt")))
        (prof_dir / "summary.md").write_text(profiles + "\n")
    print(text)
    log(f"bench finished in {time.monotonic() - started:.0f} s; results in "
        f"{a.results / name}.{{md,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
