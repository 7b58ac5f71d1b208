"""The lab's virtual disks: real VMDK files with real data, made from a fixed seed.

A disk is made as a raw image: an ext4 file system (``mkfs.ext4 -d``) filled from a generated
directory of files, then, after the file system, 1 MiB-aligned regions of text-like,
compressible, random, repeated (dedup) and zero data. ``qemu-img convert`` turns it into a
monolithicFlat VMDK (descriptor + ``-flat.vmdk`` extent, holes kept) or a monolithicSparse
one (hosted sparse format, grains of 64 KiB). The same seed and size give the same bytes.

:func:`write_extents` changes a disk as a running guest would: straight into a flat extent,
or through ``qemu-io`` into a sparse file (a snapshot delta included).
"""
from __future__ import annotations

import functools
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vbrd.errors import VbrdError
from vbrd.models import Extent

MiB = 1 << 20
KiB = 1 << 10
BLOCK = 4 * KiB
SPARSE_MAGIC = b"KDMV"
FAKE_TIME = "1700000000"  # mkfs.ext4 timestamps, for reproducible images

WORDS = (
    "backup restore snapshot volume block extent change tracking guest proxy repository "
    "datastore cluster host virtual machine disk file system journal inode directory the a "
    "of and to in is that for it as with was on be by at this from or which an are have "
    "vmware vsphere linux windows kernel service daemon network storage replica retention"
).split()


class DiskError(VbrdError):
    """A lab disk cannot be made or written."""


@dataclass(frozen=True, slots=True)
class DiskImage:
    """A VMDK the lab made: its descriptor, its data files and its format."""

    descriptor: Path
    extents: tuple[Path, ...]
    capacity: int
    format: str  # "flat" | "sparse"


def make_disk(descriptor: Path, capacity: int, seed: int, fmt: str, *,
              work_dir: Path, filesystem: bool = True) -> DiskImage:
    """Make ``descriptor`` (and its extent) with ``capacity`` bytes of seeded content."""
    if fmt not in ("flat", "sparse"):
        raise DiskError(f"unknown disk format {fmt!r}: expected flat or sparse")
    if capacity % MiB or capacity < 16 * MiB:
        raise DiskError(f"disk {descriptor.name}: capacity {capacity} must be a multiple of "
                        f"1 MiB and at least 16 MiB")
    descriptor.parent.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix=f"{descriptor.stem}-", dir=work_dir) as tmp:
        raw = Path(tmp) / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(capacity)
        fs_end = 0
        if filesystem:
            fs_end = (capacity // 2) // MiB * MiB
            tree = Path(tmp) / "tree"
            _populate_tree(tree, rng, budget=int(fs_end * 0.35))
            _mkfs(raw, tree, fs_end, rng)
        _fill_regions(raw, fs_end, capacity, rng)
        subformat = "monolithicFlat" if fmt == "flat" else "monolithicSparse"
        _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk",
              "-o", f"subformat={subformat},adapter_type=lsilogic", str(raw), str(descriptor)],
             f"convert {descriptor.name} to VMDK")
    return describe(descriptor, capacity)


def import_raw(descriptor: Path, image: Path) -> DiskImage:
    """Make ``descriptor`` a monolithicFlat VMDK holding a copy of the raw ``image``.

    qemu-img writes the descriptor (and an empty extent, all holes); the extent is then
    replaced by a copy of the image that keeps its holes, shares its blocks where the file
    system can (reflink), and is as fast as the page cache otherwise.
    """
    capacity = image.stat().st_size
    descriptor.parent.mkdir(parents=True, exist_ok=True)
    _run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
          "subformat=monolithicFlat,adapter_type=lsilogic", str(descriptor), str(capacity)],
         f"create {descriptor.name}")
    extent = flat_extent(descriptor)
    _run(["cp", "--sparse=always", "--reflink=auto", str(image), str(extent)],
         f"copy {image} into {extent.name}")
    return describe(descriptor, capacity)


def read_extents(image: Path, extents: Sequence[Extent]) -> list[bytes]:
    """The bytes of ``image`` at ``extents``: what a guest wrote there, to replay it."""
    fd = os.open(image, os.O_RDONLY)
    try:
        out = []
        for e in extents:
            data = os.pread(fd, e.length, e.offset)
            if len(data) != e.length:
                raise DiskError(f"{image} ends before {e.offset + e.length} "
                                f"({e.length} bytes at {e.offset} asked)")
            out.append(data)
        return out
    finally:
        os.close(fd)


def describe(descriptor: Path, capacity: int) -> DiskImage:
    """What kind of VMDK ``descriptor`` is and which files hold its data."""
    if is_sparse(descriptor):
        return DiskImage(descriptor, (descriptor,), capacity, "sparse")
    extent = flat_extent(descriptor)
    return DiskImage(descriptor, (extent,), capacity, "flat")


def is_sparse(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == SPARSE_MAGIC


def flat_extent(descriptor: Path) -> Path:
    """The raw extent a monolithicFlat descriptor names."""
    extents = []
    for line in descriptor.read_text(errors="replace").splitlines():
        parts = line.split('"')
        if line.startswith(("RW ", "RDONLY ")) and len(parts) >= 3 and " FLAT " in parts[0]:
            extents.append(descriptor.parent / parts[1])
    if len(extents) != 1:
        raise DiskError(f"{descriptor} is not a single-extent monolithicFlat VMDK")
    return extents[0]


# ---- content --------------------------------------------------------------------------------


def _text(rng: random.Random, size: int) -> bytes:
    """Prose-like text: random slices of a fixed corpus, so no two blocks are equal."""
    corpus = _corpus()
    out = bytearray()
    while len(out) < size:
        start = rng.randrange(len(corpus) - 16 * KiB)
        out += corpus[start:start + rng.randint(KiB, 16 * KiB)]
    return bytes(out[:size])


@functools.cache
def _corpus() -> bytes:
    rng = random.Random(0xC0FFEE)
    lines = []
    total = 0
    while total < 256 * KiB:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        lines.append(line.capitalize() + ".\n")
        total += len(lines[-1])
    return "".join(lines).encode()


def _compressible(rng: random.Random, size: int) -> bytes:
    base = rng.randrange(1 << 30)
    record = 64
    rows = [f"{base + i:016d}|status=ok|{'=' * 34}\n".encode() for i in range(size // record + 1)]
    return b"".join(rows)[:size]


def _populate_tree(root: Path, rng: random.Random, budget: int) -> None:
    """A small but real-looking file tree of about ``budget`` bytes."""
    for sub in ("etc", "docs", "data", "logs", "home/user"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "etc/hostname").write_text(f"lab-{rng.randrange(1 << 16):04x}\n")
    (root / "etc/os-release").write_text('NAME="Debian GNU/Linux"\nVERSION_ID="11"\n')
    used = 0
    n = 0
    binaries: list[Path] = []
    while used < budget:
        kind = rng.choices(("text", "bin", "log", "dup", "zero"), (4, 3, 2, 1, 1))[0]
        size = rng.choice((4, 16, 64, 200, 512, 1024)) * KiB
        if kind == "text":
            path, data = root / f"docs/note-{n:04d}.txt", _text(rng, size)
        elif kind == "bin":
            path, data = root / f"data/blob-{n:04d}.bin", rng.randbytes(size)
            binaries.append(path)
        elif kind == "log":
            path, data = root / f"logs/app-{n:04d}.log", _compressible(rng, size)
        elif kind == "dup" and binaries:
            source = rng.choice(binaries)
            path, data = root / f"home/user/copy-{n:04d}-{source.name}", source.read_bytes()
        else:
            path, data = root / f"data/zero-{n:04d}.img", bytes(size)
        path.write_bytes(data)
        used += len(data)
        n += 1
    for path in sorted(root.rglob("*")):
        os.utime(path, (int(FAKE_TIME), int(FAKE_TIME)))


def _mkfs(raw: Path, tree: Path, size: int, rng: random.Random) -> None:
    uuid = (f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-4{rng.getrandbits(12):03x}-"
            f"8{rng.getrandbits(12):03x}-{rng.getrandbits(48):012x}")
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=FAKE_TIME)
    _run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "vbrd-lab", "-U", uuid,
          "-E", f"root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1,nodiscard,"
                f"hash_seed={uuid}",
          "-d", str(tree), str(raw), f"{size // KiB}k"], "make the ext4 file system", env=env)


def _fill_regions(raw: Path, start: int, end: int, rng: random.Random) -> None:
    """Mixed 1 MiB-aligned regions after the file system; zero regions stay holes."""
    fd = os.open(raw, os.O_WRONLY)
    try:
        randoms: list[bytes] = []
        offset = start
        while offset < end:
            size = min(rng.choice((1, 1, 2)) * MiB, end - offset)
            kind = rng.choices(("text", "compressible", "random", "zero", "dup"),
                               (25, 20, 25, 20, 10))[0]
            if kind == "text":
                data = _text(rng, size)
            elif kind == "compressible":
                data = _compressible(rng, size)
            elif kind == "random" or (kind == "dup" and not randoms):
                data = rng.randbytes(size)
                randoms.append(data)
            elif kind == "dup":
                data = rng.choice(randoms)[:size]
            else:
                data = b""
            if data:
                os.pwrite(fd, data, offset)
            offset += size
    finally:
        os.close(fd)


# ---- writes ---------------------------------------------------------------------------------


def random_extents(capacity: int, fraction: float, seed: int) -> list[Extent]:
    """4 KiB-aligned extents covering ``fraction`` of the disk, the same for the same seed."""
    if not 0 < fraction <= 1:
        raise DiskError(f"fraction {fraction} must be in (0, 1]")
    blocks = capacity // BLOCK
    target = max(1, round(blocks * fraction))
    rng = random.Random(seed)
    used = bytearray(blocks)
    count = 0
    while count < target:
        length = rng.choice((1, 2, 4, 8, 16, 32, 64))
        first = rng.randrange(0, blocks - length + 1)
        for b in range(first, first + length):
            if count >= target:
                break
            if not used[b]:
                used[b] = 1
                count += 1
    extents: list[Extent] = []
    b = 0
    while b < blocks:
        if used[b]:
            start = b
            while b < blocks and used[b]:
                b += 1
            extents.append(Extent(start * BLOCK, (b - start) * BLOCK))
        else:
            b += 1
    return extents


def extent_data(extents: Sequence[Extent], seed: int) -> list[bytes]:
    """The bytes a seeded write puts into each extent."""
    rng = random.Random(seed ^ 0x5EED5EED)
    return [rng.randbytes(e.length) for e in extents]


def write_extents(leaf: Path, extents: Sequence[Extent], data: Sequence[bytes]) -> None:
    """Write ``data`` at ``extents`` into the VMDK ``leaf`` (the disk's current writable file)."""
    if is_sparse(leaf):
        _write_sparse(leaf, extents, data)
        return
    extent = flat_extent(leaf)
    fd = os.open(extent, os.O_WRONLY)
    try:
        for e, chunk in zip(extents, data, strict=True):
            os.pwrite(fd, chunk, e.offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_sparse(leaf: Path, extents: Sequence[Extent], data: Sequence[bytes]) -> None:
    with tempfile.TemporaryDirectory(prefix="vbrd-lab-write-") as tmp:
        commands: list[str] = []
        for i, (e, chunk) in enumerate(zip(extents, data, strict=True)):
            source = Path(tmp) / f"{i}.bin"
            source.write_bytes(chunk)
            commands += ["-c", f"write -q -s {source} {e.offset} {e.length}"]
        # qemu-io takes every command of one invocation from argv; keep argv reasonably short.
        step = 400
        for i in range(0, len(commands), step):
            _run(["qemu-io", "-f", "vmdk", *commands[i:i + step], str(leaf)],
                 f"write into {leaf.name}")


def _run(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    if shutil.which(argv[0]) is None:
        raise DiskError(f"cannot {what}: {argv[0]} is missing (Debian packages qemu-utils, "
                        f"e2fsprogs)")
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    if result.returncode != 0 or "failed" in result.stderr or "error" in result.stderr.lower():
        raise DiskError(f"cannot {what}: {argv[0]} exited {result.returncode}: "
                        f"{result.stderr.strip()}")
