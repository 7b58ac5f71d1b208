"""The repository: a directory of deduplicated zstd blocks and the restore points naming them.

Format v1, described for people in docs/repository-format.md::

    config                      what this is: format version, block size, compression
    lock                        flock: shared for writers/readers, exclusive for gc
    blocks/<hh>/<digest hex>    one zstd frame per block, named by the SHA-256 of its data
    points/<vm>/<point id>/     metadata.json, disk-<key>.idx, manifest.json
    tmp/                        block files being written

Everything here blocks on file I/O; asyncio callers run it in an executor.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vbrd.errors import CorruptBlockError, NotFound, RepositoryError, UsageError
from vbrd.repository.blocks import DIGEST_SIZE, BlockCodec, frame_size
from vbrd.repository.index import DiskIndex
from vbrd.repository.points import (
    DAMAGED_PREFIX,
    NEEDS_FULL,
    POINT_ID_RE,
    QUARANTINE_NOTE,
    Clock,
    PointDir,
    PointInfo,
    PointWriter,
    read_quarantine_note,
    sequence_of,
    utc_iso,
    utc_now,
    vm_dir_locked,
    vm_dir_name,
    vm_of_dir_name,
)
from vbrd.repository.store import (
    DIR_MODE,
    DIRECT_IO_ALIGNMENT,
    FILE_MODE,
    TMP_PREFIX,
    AlignedBuffers,
    BlockDamaged,
    BlockStore,
    LockHold,
    RepoLock,
    fsync_dir,
    open_direct,
    remove_tree,
    replace_durable,
    start_writeback,
)

log = logging.getLogger(__name__)

CONFIG_FORMAT = "vbrd-repository"
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 64 << 20


# --- results ----------------------------------------------------------------------------


# A restore writes the image with O_DIRECT, so a thread spends much of its time waiting for
# the disk: two per core keep both the CPU and the disk busy.
RESTORE_THREADS = 4


@dataclass(frozen=True)
class VerifyProblem:
    """Something verify found wrong; ``disk``/``offset`` are None when the whole point is."""

    point: str
    disk: int | None
    offset: int | None
    reason: str

    def __str__(self) -> str:
        where = f"restore point {self.point}"
        if self.disk is not None:
            where += f", disk {self.disk}"
        if self.offset is not None:
            where += f", offset {self.offset}"
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class RestoreStats:
    point_id: str
    disk_key: int
    capacity: int
    blocks: int
    """Blocks with data, read, checked and written."""
    zero_blocks: int
    """Blocks left as holes in the image."""
    bytes_written: int
    seconds: float


@dataclass(frozen=True)
class GcStats:
    blocks_removed: int
    bytes_freed: int
    blocks_kept: int
    bytes_kept: int
    stale_removed: int
    """Temp files and ``.tmp-`` point directories left behind by interrupted writers."""
    quarantined: list[str] = field(default_factory=list)
    """Points gc found with an index it cannot read, now listed as damaged."""


@dataclass(frozen=True)
class DamagedPoint:
    """A quarantined point: listed as damaged, never restored or built upon."""

    point_id: str
    vm: str
    reason: str
    quarantined: str
    info: PointInfo | None
    """What the point said about itself, when that could still be read."""

    def to_dict(self) -> dict[str, Any]:
        return {"point_id": self.point_id, "vm": self.vm, "reason": self.reason,
                "quarantined": self.quarantined, "damaged": True,
                **({"created": self.info.created, "sequence": self.info.sequence}
                   if self.info else {})}


@dataclass(frozen=True)
class ParentChoice:
    """The point the next backup of a VM builds on, or why it must be a full."""

    point: PointInfo | None
    warning: str | None = None
    """Set when a damaged point rules out an incremental: the backup says so."""


@dataclass(frozen=True)
class RepoStats:
    blocks: int
    stored_bytes: int
    points: int


@dataclass(frozen=True)
class RepoConfig:
    """The ``config`` file: read first, and the only file whose format never changes."""

    version: int
    repo_id: str
    created: str
    block_size: int
    compression_level: int

    def to_json(self) -> bytes:
        doc = {
            "format": CONFIG_FORMAT,
            "version": self.version,
            "id": self.repo_id,
            "created": self.created,
            "block_size": self.block_size,
            "digest": "sha256",
            "compression": {"algorithm": "zstd", "level": self.compression_level},
        }
        return json.dumps(doc, indent=1).encode() + b"\n"

    @classmethod
    def parse(cls, path: Path, raw: bytes) -> RepoConfig:
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != CONFIG_FORMAT:
                raise ValueError
        except ValueError:
            raise RepositoryError(
                f"{path.parent}: not a vbrd repository ({path.name} is not a vbrd config)"
            ) from None
        version = doc.get("version")
        if version != Repository.FORMAT_VERSION:
            raise RepositoryError(
                f"{path.parent}: repository format version {version!r} is not supported "
                f"(this vbrd reads version {Repository.FORMAT_VERSION})"
            )
        try:
            compression = doc["compression"]
            if doc["digest"] != "sha256" or compression["algorithm"] != "zstd":
                raise RepositoryError(
                    f"{path.parent}: digest {doc['digest']!r} / compression "
                    f"{compression['algorithm']!r} is not supported (sha256 / zstd)"
                )
            config = cls(
                version=version,
                repo_id=str(doc["id"]),
                created=str(doc["created"]),
                block_size=int(doc["block_size"]),
                compression_level=int(compression["level"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RepositoryError(f"{path}: config is incomplete ({exc!r})") from exc
        _check_block_size(config.block_size, path.parent)
        return config


def _readable_digests(path: Path) -> set[bytes]:
    """The blocks a quarantined point's decodable indexes name (gc keeps them)."""
    found: set[bytes] = set()
    pd = PointDir(path)
    for name in pd.index_files():
        try:
            found |= PointDir(path).referenced_digests_of(name)
        except RepositoryError:
            continue
    return found


def _check_block_size(block_size: int, where: Path) -> None:
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size % MIN_BLOCK_SIZE:
        raise RepositoryError(
            f"{where}: block size {block_size} must be a multiple of {MIN_BLOCK_SIZE} "
            f"between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE} bytes"
        )


# --- the repository -----------------------------------------------------------------------


class Repository:
    """One repository on a local (or locally mounted) file system.

    Thread-safe: the data path calls ``has_blocks``/``put_block`` from worker threads while
    the session's task writes the point. Several processes may write at once; gc waits for
    them all (see :class:`~vbrd.repository.store.RepoLock`).
    """

    FORMAT_VERSION = 1

    def __init__(self, path: Path, config: RepoConfig, *, clock: Clock | None = None) -> None:
        self.path = path
        self.config = config
        self.clock: Clock = clock or utc_now
        self.just_created = False
        """Whether :meth:`open_or_create` made this repository (the caller says so)."""
        self.block_size = config.block_size
        self.compression_level = config.compression_level
        self.codec = BlockCodec(config.compression_level)
        self._store = BlockStore(path, self.codec, config.block_size)
        self._lock = RepoLock(path / "lock")
        self._points_dir = path / "points"

    def __repr__(self) -> str:
        return f"Repository({str(self.path)!r}, block_size={self.block_size})"

    # --- creating and opening ------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], *, block_size: int = 1 << 20,
        compression_level: int = 3, clock: Clock | None = None,
    ) -> Repository:
        """Make an empty repository at ``path`` (a new or empty directory)."""
        root = Path(path)
        _check_block_size(block_size, root)
        try:
            BlockCodec(compression_level)
        except ValueError as exc:
            raise RepositoryError(f"{root}: {exc}") from None
        if (root / "config").exists():
            raise RepositoryError(f"{root}: is already a repository")
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise RepositoryError(f"{root}: exists and is not an empty directory")
        config = RepoConfig(
            version=cls.FORMAT_VERSION,
            repo_id=secrets.token_hex(16),
            created=utc_iso((clock or utc_now)()),
            block_size=block_size,
            compression_level=compression_level,
        )
        try:
            root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            blocks = root / "blocks"
            blocks.mkdir(mode=DIR_MODE)
            for i in range(256):
                (blocks / f"{i:02x}").mkdir(mode=DIR_MODE)
            (root / "points").mkdir(mode=DIR_MODE)
            (root / "tmp").mkdir(mode=DIR_MODE)
            (root / "quarantine").mkdir(mode=DIR_MODE)
            os.close(os.open(root / "lock", os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
            fsync_dir(blocks)
            # the config comes last: a directory with a config is a whole repository
            replace_durable(root / "config", config.to_json())
            fsync_dir(root.parent)
        except OSError as exc:
            raise RepositoryError(f"{root}: cannot create the repository: {exc}") from exc
        log.info("created repository %s (block size %d)", root, block_size)
        return cls(root, config, clock=clock)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, clock: Clock | None = None) -> Repository:
        """An existing repository; never creates anything (a mistyped or unmounted path is
        an error that names it)."""
        root = Path(path)
        if not root.exists():
            raise RepositoryError(f"repository {root}: does not exist")
        if not root.is_dir():
            raise RepositoryError(f"repository {root}: is not a directory")
        config_path = root / "config"
        try:
            raw = config_path.read_bytes()
        except FileNotFoundError:
            raise RepositoryError(f"{root}: not a vbrd repository (no config file)") from None
        except OSError as exc:
            raise RepositoryError(f"{root}: cannot read the config: {exc.strerror}") from exc
        config = RepoConfig.parse(config_path, raw)
        for part in ("blocks", "points", "tmp", "lock"):
            if not (root / part).exists():
                raise RepositoryError(f"repository {root} is damaged: {part} is missing")
        return cls(root, config, clock=clock)

    @classmethod
    def open_or_create(
        cls, path: str | os.PathLike[str], *, block_size: int = 1 << 20,
        compression_level: int = 3, clock: Clock | None = None,
    ) -> Repository:
        """Open the repository at ``path``, creating it if there is none yet; for the writers
        allowed to create one (a backup, ``vbrd repo init``), which say so when
        ``just_created`` is set. Read paths use :meth:`open`.

        The block size and level apply only when creating; an existing repository keeps its
        own (a different block size would defeat dedup against what is stored).
        """
        root = Path(path)
        if (root / "config").exists():
            return cls.open(root, clock=clock)
        repo = cls.create(root, block_size=block_size, compression_level=compression_level,
                          clock=clock)
        repo.just_created = True
        return repo

    # --- blocks ----------------------------------------------------------------------------

    def has_blocks(self, digests: list[bytes]) -> list[bool]:
        """Which blocks are stored. Stable only while a point writer or ``writing()`` is open."""
        return self._store.has(digests)

    def put_block(self, digest: bytes, compressed: bytes | bytearray | memoryview) -> int:
        """Store a block (a zstd frame from ``codec.compress``) under its data's digest.

        Returns the bytes written, 0 when the repository already had it. Not fsynced here:
        the point that names the block makes it durable at commit. Call it while a point
        writer (or ``writing()``) holds the lock, so gc cannot remove it before a point
        names it.
        """
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"a block digest is {DIGEST_SIZE} bytes, not {len(digest)}")
        try:
            size = frame_size(compressed)
        except ValueError as exc:
            raise RepositoryError(f"block {bytes(digest).hex()}: {exc}") from exc
        if size > self.block_size:
            raise RepositoryError(
                f"block {bytes(digest).hex()} holds {size} bytes, more than the repository's "
                f"block size ({self.block_size})"
            )
        return self._store.put(bytes(digest), compressed)

    def read_block(self, digest: bytes, expected_size: int | None = None) -> bytes:
        """A block's data, decompressed and digest-checked; BlockDamaged if it is not."""
        return self._store.read(bytes(digest), expected_size)

    def make_blocks_durable(self, digests: Iterable[bytes]) -> None:
        """fsync these blocks unless known durable; BlockDamaged for one that is missing.

        What a repository-side data mover does before it reports a disk done, so that the
        commit of the point (in the Manager's process) need not fsync them again.
        """
        self._store.make_durable(digests)

    def writing(self) -> LockHold:
        """Hold the shared lock while storing blocks outside a point writer.

        For a process that only stores blocks another process's point will name: while it
        is held, gc (which needs the exclusive lock) cannot remove them. Use as
        ``with repo.writing(): ...``.
        """
        hold = self._lock.shared()
        self._store.sync_generation(hold.generation())
        return hold

    # --- writing points --------------------------------------------------------------------

    def begin_point(
        self, vm: str, *, session_id: str, metadata: dict[str, Any], parent: str | None
    ) -> PointWriter:
        """Start a restore point of ``vm``; ``parent`` is the point an incremental builds on."""
        vm_dir = self._points_dir / vm_dir_name(vm)
        try:
            metadata = json.loads(json.dumps(metadata))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"metadata of VM {vm} cannot be stored as JSON: {exc}") from exc
        parent_info = parent_dir = None
        if parent is not None:
            parent_dir = self._find_point_dir(parent)
            parent_info = parent_dir.info()
            if parent_info.vm != vm:
                raise UsageError(
                    f"restore point {parent} belongs to VM {parent_info.vm}, not {vm}: "
                    f"it cannot be the parent"
                )
        lock = self._writer_lock()
        try:
            self._store.sync_generation(lock.generation())
            if not vm_dir.is_dir():
                vm_dir.mkdir(mode=DIR_MODE, exist_ok=True)
                fsync_dir(self._points_dir)
            return PointWriter(
                store=self._store,
                vm=vm,
                vm_dir=vm_dir,
                session_id=session_id,
                metadata=metadata,
                parent=parent_info,
                parent_dir=parent_dir,
                lock=lock,
                next_sequence=lambda: self._next_sequence(vm_dir),
                clock=self.clock,
                on_commit=self._committed,
            )
        except BaseException:
            lock.release()
            raise

    def _writer_lock(self) -> LockHold:
        """The shared lock; when no one else holds it, first clean what crashed writers left."""
        hold = self._lock.try_exclusive()
        if hold is None:
            return self._lock.shared()
        try:
            self._clean_stale()
            RepoLock.downgrade(hold)
        except BaseException:
            hold.release()
            raise
        return hold

    def _next_sequence(self, vm_dir: Path) -> int:
        """One more than any point of the VM has, damaged ones included (called with the VM's
        directory locked, so two commits never take the same number)."""
        found = [sequence_of(entry) for entry in vm_dir.iterdir()
                 if POINT_ID_RE.match(entry.name.removeprefix(DAMAGED_PREFIX))]
        return max(found, default=0) + 1

    def _committed(self, info: PointInfo) -> None:
        """After a full point: the VM no longer needs one because of a quarantined point."""
        if info.parent is None:
            marker = self._points_dir / vm_dir_name(info.vm) / NEEDS_FULL
            try:
                marker.unlink()
            except FileNotFoundError:
                return
            except OSError as exc:
                log.warning("%s: cannot remove %s: %s", self.path, marker, exc)

    def _clean_stale(self) -> int:
        removed = self._store.clean_tmp()
        for vm_dir in self._vm_dirs():
            for entry in vm_dir.iterdir():
                if entry.name.startswith(TMP_PREFIX):
                    if entry.is_dir() and not entry.is_symlink():
                        remove_tree(entry)
                    else:
                        entry.unlink(missing_ok=True)
                    removed += 1
        if removed:
            log.info("%s: removed %d leftovers of interrupted writes", self.path, removed)
        return removed

    # --- reading points --------------------------------------------------------------------

    def _vm_dirs(self) -> list[Path]:
        return sorted(
            p for p in self._points_dir.iterdir() if not p.name.startswith(".") and p.is_dir()
        )

    def _point_dirs(self, vm: str | None = None) -> Iterator[PointDir]:
        vm_dirs = [self._points_dir / vm_dir_name(vm)] if vm is not None else self._vm_dirs()
        for vm_dir in vm_dirs:
            if not vm_dir.is_dir():
                continue
            for entry in sorted(vm_dir.iterdir()):
                if POINT_ID_RE.match(entry.name) and entry.is_dir():
                    yield PointDir(entry)

    def _find_point_dir(self, point_id: str) -> PointDir:
        if POINT_ID_RE.match(point_id):
            for vm_dir in self._vm_dirs():
                candidate = vm_dir / point_id
                if candidate.is_dir():
                    return PointDir(candidate)
                damaged = vm_dir / f"{DAMAGED_PREFIX}{point_id}"
                if damaged.is_dir():
                    reason = read_quarantine_note(damaged).get("reason", "reason unknown")
                    raise RepositoryError(
                        f"restore point {point_id} in repository {self.path} is damaged and "
                        f"quarantined ({reason}); it cannot be used")
        raise NotFound(f"no restore point {point_id} in repository {self.path}")

    def _damaged_dirs(self, vm: str | None = None) -> Iterator[Path]:
        vm_dirs = [self._points_dir / vm_dir_name(vm)] if vm is not None else self._vm_dirs()
        for vm_dir in vm_dirs:
            if not vm_dir.is_dir():
                continue
            for entry in sorted(vm_dir.iterdir()):
                if (entry.name.startswith(DAMAGED_PREFIX) and entry.is_dir()
                        and POINT_ID_RE.match(entry.name.removeprefix(DAMAGED_PREFIX))):
                    yield entry

    def points(self, vm: str | None = None) -> list[PointInfo]:
        """Committed points that are not damaged, oldest first: one VM's in the order they
        were committed (their sequence), all VMs' by ``created``. A point that cannot be
        read is left out; verify, gc and the next backup of its VM quarantine it."""
        found = []
        for pd in self._point_dirs(vm):
            try:
                info = pd.info()
            except RepositoryError as exc:
                log.warning("%s", exc)
                continue
            if vm is None or info.vm == vm:
                found.append(info)
        if vm is None:
            return sorted(found, key=lambda p: (p.created, p.point_id))
        return sorted(found, key=lambda p: p.order)

    def damaged_points(self, vm: str | None = None) -> list[DamagedPoint]:
        """Quarantined points, with the reason each was taken out of use."""
        found = []
        for path in self._damaged_dirs(vm):
            note = read_quarantine_note(path)
            point_id = path.name.removeprefix(DAMAGED_PREFIX)
            info: PointInfo | None
            try:
                info = PointDir(path).info()
            except RepositoryError:
                info = None
            name = info.vm if info else str(note.get("vm") or vm_of_dir_name(path.parent.name))
            if vm is not None and name != vm:
                continue
            found.append(DamagedPoint(point_id, name, str(note.get("reason", "unknown")),
                                      str(note.get("quarantined", "")), info))
        return sorted(found, key=lambda d: d.point_id)

    def point(self, point_id: str) -> PointInfo:
        return self._find_point_dir(point_id).info()

    def latest_point(self, vm: str) -> PointInfo | None:
        """The VM's newest good point (by sequence, not by the clock)."""
        found = self.points(vm)
        return found[-1] if found else None

    def choose_parent(self, vm: str) -> ParentChoice:
        """The point the next backup of ``vm`` builds on: its newest, unless a point of the
        VM was found damaged since its last full — then none, and the reason.

        A point of the VM that cannot be read is quarantined here, so the choice (and every
        later one) does not depend on which file happens to be readable.
        """
        for pd in self._point_dirs(vm):
            try:
                pd.info()
            except RepositoryError as exc:
                self.quarantine_point(pd.path, str(exc))
        newest = self.latest_point(vm)
        if newest is not None:
            # an incremental starts from its parent's indexes: they must be whole
            pd = self._find_point_dir(newest.point_id)
            try:
                for disk in newest.disks:
                    pd.read_index(newest, disk.key)
            except RepositoryError as exc:
                self.quarantine_point(pd.path, str(exc))
        marker = self._points_dir / vm_dir_name(vm) / NEEDS_FULL
        try:
            reason = json.loads(marker.read_bytes()).get("reason", "")
        except FileNotFoundError:
            return ParentChoice(self.latest_point(vm))
        except (OSError, ValueError, AttributeError):
            reason = "a restore point was found damaged"
        return ParentChoice(None, f"{reason}; this backup reads every disk in full")

    def quarantine_point(self, path: Path, reason: str, *, vm: str | None = None) -> str:
        """Take a committed point out of use: ``points/<vm>/.damaged-<id>`` with a note of
        why, and make the VM's next backup a full. Returns the point's id."""
        with self._lock.shared():
            return self._quarantine(path, reason, vm=vm)

    def _quarantine(self, path: Path, reason: str, *, vm: str | None = None) -> str:
        """:meth:`quarantine_point` for a caller that holds the lock (shared or exclusive)."""
        point_id = path.name
        vm_dir = path.parent
        doomed = vm_dir / f"{DAMAGED_PREFIX}{point_id}"
        with vm_dir_locked(vm_dir):
            try:
                name = vm or PointDir(path).info().vm
            except RepositoryError:
                name = vm_of_dir_name(vm_dir.name)
            sequence = sequence_of(path)
            try:
                os.rename(path, doomed)
            except FileNotFoundError:
                return point_id  # someone else quarantined or deleted it meanwhile
            note = {"version": 1, "point_id": point_id, "vm": name, "reason": reason,
                    "quarantined": utc_iso(self.clock()), "sequence": sequence}
            replace_durable(doomed / QUARANTINE_NOTE, json.dumps(note, indent=1).encode())
            why = f"restore point {point_id} was found damaged ({reason})"
            replace_durable(vm_dir / NEEDS_FULL, json.dumps({"reason": why}).encode())
            fsync_dir(vm_dir)
        log.warning("%s: restore point %s of VM %s is damaged and quarantined: %s",
                    self.path, point_id, name, reason)
        return point_id

    def disk_index(self, point_id: str, disk_key: int) -> DiskIndex:
        pd = self._find_point_dir(point_id)
        return pd.read_index(pd.info(), disk_key)

    # --- restore and verify ----------------------------------------------------------------

    def restore_disk(
        self,
        point_id: str,
        disk_key: int,
        dest: str | os.PathLike[str],
        *,
        threads: int = RESTORE_THREADS,
    ) -> RestoreStats:
        """Write the disk as a raw image of exactly its capacity, zero blocks as holes.

        Every block is checked against its digest before it is written; the first damaged
        one raises CorruptBlockError and the image is not left behind. The image is built
        beside ``dest`` and renamed into place when complete.
        """
        dest = Path(dest)
        started = time.monotonic()
        with self._lock.shared():
            pd = self._find_point_dir(point_id)
            index = pd.read_index(pd.info(), disk_key)
            if dest.is_dir():
                raise UsageError(f"{dest} is a directory; a restore writes a raw image file")
            partial = dest.with_name(f".{dest.name}.partial-{secrets.token_hex(4)}")
            try:
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise UsageError(f"cannot create the image {dest}: {exc.strerror}") from exc
            done = False
            direct_fd = open_direct(partial)
            try:
                os.ftruncate(fd, index.capacity)
                blocks, written = self._restore_blocks(index, fd, max(1, threads), direct_fd)
                os.fsync(fd)
                os.replace(partial, dest)
                fsync_dir(dest.parent)
                done = True
            finally:
                if direct_fd is not None:
                    os.close(direct_fd)
                os.close(fd)
                if not done:
                    partial.unlink(missing_ok=True)
        return RestoreStats(
            point_id=point_id,
            disk_key=disk_key,
            capacity=index.capacity,
            blocks=blocks,
            zero_blocks=index.block_count - blocks,
            bytes_written=written,
            seconds=time.monotonic() - started,
        )

    def _restore_blocks(self, index: DiskIndex, fd: int, threads: int,
                        direct_fd: int | None) -> tuple[int, int]:
        """Write every stored block of the disk at its offset.

        Through ``direct_fd`` (O_DIRECT) where offset and length are aligned, which is every
        block but perhaps the last: an image of many GiB put through the page cache would
        cost a memory copy per byte and push everything else out of the cache.
        """
        store = self._store
        scratch = AlignedBuffers()

        def restore(block_no: int, digest: bytes) -> int:
            offset = block_no * index.block_size
            try:
                data = store.read(digest, index.block_length(block_no))
            except BlockDamaged as exc:
                raise CorruptBlockError(
                    index.point_id, str(index.disk_key), offset, exc.reason
                ) from exc
            length = len(data)
            if (direct_fd is not None and offset % DIRECT_IO_ALIGNMENT == 0
                    and length % DIRECT_IO_ALIGNMENT == 0):
                aligned = scratch.get(length)
                aligned[:] = data
                try:
                    if os.pwrite(direct_fd, aligned, offset) == length:
                        return length
                except OSError as exc:  # refused after all: the ordinary write below
                    if exc.errno != errno.EINVAL:
                        raise
            view = memoryview(data)
            start = offset
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
            # the disk writes while we decompress; the final fsync finds little left to do
            start_writeback(fd, start, length)
            return length

        blocks = written = 0
        window: deque[Future[int]] = deque()
        with ThreadPoolExecutor(threads, thread_name_prefix="vbrd-restore") as pool:
            try:
                for block_no, digest in index.nonzero():
                    if len(window) >= threads * 4:
                        written += window.popleft().result()
                        blocks += 1
                    window.append(pool.submit(restore, block_no, digest))
                while window:
                    written += window.popleft().result()
                    blocks += 1
            except BaseException:
                for future in window:
                    future.cancel()
                raise
        return blocks, written

    def verify(self, point_id: str | None = None, *, threads: int = 2) -> list[VerifyProblem]:
        """Re-read every block the point(s) name and check it; an empty list means all good.

        Each distinct block is read once however many points name it; a bad one is
        reported at every place that uses it, so the report says what cannot be restored.
        What is found damaged is quarantined: a bad block file moves to
        ``quarantine/blocks/`` (the next backup that has the block stores it again), and
        every point with a problem — or naming a bad block, checked or not — is listed as
        damaged from then on and never used as a parent.
        """
        if point_id is not None:
            damaged = self._locate(point_id)
            if damaged.name.startswith(DAMAGED_PREFIX):
                reason = read_quarantine_note(damaged).get("reason", "reason unknown")
                return [VerifyProblem(point_id, None, None,
                                      f"damaged and quarantined: {reason}")]
        with self._lock.shared():
            dirs = [self._find_point_dir(point_id)] if point_id else list(self._point_dirs())
            checked: dict[bytes, tuple[str | None, int]] = {}
            problems: list[VerifyProblem] = []
            with ThreadPoolExecutor(max(1, threads), thread_name_prefix="vbrd-verify") as pool:
                for pd in dirs:
                    problems += self._verify_point(pd, checked, pool)
            bad_blocks = {d for d, (reason, _) in checked.items() if reason is not None}
            self._quarantine_damage(problems, bad_blocks)
        return problems

    def _quarantine_damage(self, problems: list[VerifyProblem], bad_blocks: set[bytes]) -> None:
        for digest in bad_blocks:
            if self._store.quarantine(digest) is not None:
                log.warning("%s: block %s is damaged; moved to quarantine/blocks", self.path,
                            digest.hex())
        reasons: dict[str, str] = {}
        for problem in problems:
            reasons.setdefault(problem.point, str(problem))
        if bad_blocks:
            # points verify did not look at may name the same blocks: none of them may be
            # built upon as if those blocks were there
            for pd in self._point_dirs():
                if pd.point_id in reasons:
                    continue
                try:
                    if pd.referenced_digests() & bad_blocks:
                        reasons[pd.point_id] = "names a damaged block (found by verify)"
                except RepositoryError as exc:
                    reasons[pd.point_id] = str(exc)
        for pd in list(self._point_dirs()):
            if pd.point_id in reasons:
                self._quarantine(pd.path, reasons[pd.point_id])

    def _verify_point(
        self,
        pd: PointDir,
        checked: dict[bytes, tuple[str | None, int]],
        pool: ThreadPoolExecutor,
    ) -> list[VerifyProblem]:
        store = self._store

        def check(digest: bytes) -> tuple[str | None, int]:
            try:
                return None, len(store.read(digest))
            except BlockDamaged as exc:
                return exc.reason, -1

        try:
            info = pd.info()
        except RepositoryError as exc:
            return [VerifyProblem(pd.point_id, None, None, str(exc))]
        problems = []
        for disk in info.disks:
            try:
                index = pd.read_index(info, disk.key)
            except RepositoryError as exc:
                problems.append(VerifyProblem(pd.point_id, disk.key, None, str(exc)))
                continue
            todo = list(index.unique_digests() - checked.keys())
            for digest, result in zip(todo, pool.map(check, todo), strict=True):
                checked[digest] = result
            for block_no, digest in index.nonzero():
                reason, length = checked[digest]
                if reason is None and length != index.block_length(block_no):
                    reason = (
                        f"block {digest.hex()} holds {length} bytes where the disk has "
                        f"{index.block_length(block_no)}"
                    )
                if reason is not None:
                    offset = block_no * index.block_size
                    problems.append(VerifyProblem(pd.point_id, disk.key, offset, reason))
        return problems

    # --- retention and gc ------------------------------------------------------------------

    def delete_point(self, point_id: str) -> None:
        """Remove one point, damaged (quarantined) or not. Its blocks stay until gc."""
        path = self._locate(point_id)
        with self._lock.shared():
            doomed = path.with_name(f"{TMP_PREFIX}deleted-{point_id}")
            try:
                os.rename(path, doomed)
            except FileNotFoundError:
                raise NotFound(f"no restore point {point_id} in repository {self.path}") from None
            fsync_dir(path.parent)
            remove_tree(doomed)
        log.info("%s: deleted restore point %s", self.path, point_id)

    def contains(self, point_id: str) -> bool:
        """Whether the point is here, good or quarantined."""
        try:
            self._locate(point_id)
        except NotFound:
            return False
        return True

    def _locate(self, point_id: str) -> Path:
        """A point's directory, good or quarantined."""
        if POINT_ID_RE.match(point_id):
            for vm_dir in self._vm_dirs():
                for name in (point_id, f"{DAMAGED_PREFIX}{point_id}"):
                    if (vm_dir / name).is_dir():
                        return vm_dir / name
        raise NotFound(f"no restore point {point_id} in repository {self.path}")

    def apply_retention(self, vm: str, keep: int) -> list[str]:
        """Delete ``vm``'s oldest good points beyond the newest ``keep``; returns their ids.

        Oldest and newest by the VM's sequence (commit order), never by the clock, so the
        point just committed is never the one deleted. Damaged points are left for the
        administrator (``vbrctl point delete``), listed as damaged.
        """
        if keep < 1:
            raise UsageError(f"retention must keep at least one restore point, not {keep}")
        doomed = [p.point_id for p in self.points(vm)[:-keep]]
        for point_id in doomed:
            self.delete_point(point_id)
        return doomed

    def gc(self, *, timeout: float | None = None) -> GcStats:
        """Remove every block no point names, and leftovers of crashed writers.

        Waits for the exclusive lock (no point being written); RepositoryError after
        ``timeout`` seconds. A point with an index that cannot be decoded is quarantined
        (it cannot be restored anyway) and gc goes on: the blocks of every index it can
        read — quarantined points' too — are kept.
        """
        with self._lock.exclusive(timeout) as hold:
            return self._gc(hold)

    def try_gc(self) -> GcStats | None:
        """gc now if no writer or reader holds the repository; None (nothing done) if one
        does — the repository's maintenance runs it again when it is free."""
        hold = self._lock.try_exclusive()
        if hold is None:
            return None
        with hold:
            return self._gc(hold)

    def _gc(self, hold: LockHold) -> GcStats:
        stale = self._clean_stale()
        referenced: set[bytes] = set()
        quarantined: list[str] = []
        for pd in list(self._point_dirs()):
            try:
                referenced |= pd.referenced_digests()
            except RepositoryError as exc:
                quarantined.append(self._quarantine(pd.path, str(exc)))
        for path in self._damaged_dirs():
            referenced |= _readable_digests(path)
        self._store.sync_generation(hold.bump_generation())
        removed = freed = kept = kept_bytes = 0
        for block in self._store.iter_blocks():
            if block.digest in referenced:
                kept += 1
                kept_bytes += block.size
            else:
                self._store.remove(block)
                removed += 1
                freed += block.size
        self._store.mark_durable(referenced)
        log.info("%s: gc removed %d blocks (%d bytes)", self.path, removed, freed)
        return GcStats(
            blocks_removed=removed,
            bytes_freed=freed,
            blocks_kept=kept,
            bytes_kept=kept_bytes,
            stale_removed=stale,
            quarantined=quarantined,
        )

    def stats(self) -> RepoStats:
        blocks = size = 0
        for block in self._store.iter_blocks():
            blocks += 1
            size += block.size
        return RepoStats(blocks=blocks, stored_bytes=size, points=len(self.points()))
