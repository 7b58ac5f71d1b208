"""Block files, the repository lock and the small durable-write helpers.

Block files are write-once and named by content, so a block is never modified, only created
(temp file + link) or removed by gc. Writes are not fsynced one by one: the point that
names a block fsyncs it at commit (:meth:`BlockStore.make_durable`), in parallel, once for
all its new blocks, because a per-block fsync would cap the write path at the disk's flush
rate. Once fsynced a block file is made read-only: that mode is how a later writer knows the
file is whole without reading it. A block file that is still writable may be what a power
loss left of an unsynced write (empty, torn), so a writer that finds one checks it before it
deduplicates against it.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import logging
import mmap
import os
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vbrd.errors import RepositoryError
from vbrd.repository.blocks import DIGEST_SIZE, BlockCodec, block_digest, frame_size

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DURABLE_MODE = 0o400
"""A block file's mode once it is fsynced: read-only says "whole and on disk"."""
DIR_MODE = 0o700
TMP_PREFIX = ".tmp-"
_FSYNC_THREADS = 16


class BlockDamaged(RepositoryError):
    """A stored block is missing or does not hold the data its digest names."""

    def __init__(self, digest: bytes, reason: str) -> None:
        self.digest, self.reason = digest, reason
        super().__init__(f"block {digest.hex()}: {reason}")


def store_error(root: Path, what: str, exc: OSError) -> RepositoryError:
    """A write that failed, saying plainly when the cause is a full file system."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return RepositoryError(f"{root}: {what}: the repository's file system is full "
                               f"({exc.strerror}); free space there and run the backup again")
    return RepositoryError(f"{root}: {what}: {exc}")


def _link_once(tmp: str, final: str) -> bool:
    """Give the temp file its final name unless a file has it already; whether it did.

    A link, not a rename: a rename over a block another writer already made durable would
    swap in an unsynced copy under a name that writer trusts. On a file system without
    hard links it falls back to a rename.
    """
    try:
        os.link(tmp, final)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        os.rename(tmp, final)
        return True
    os.unlink(tmp)
    return True


# --- small durable-write helpers -------------------------------------------------------

_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> object | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Have the kernel start writing this range to disk now, without waiting for it.

    Data written without it sits in the page cache until the fsync at commit, which then
    waits for all of it at once: with it the disk works while the data path does, and the
    commit's fsync finds little left to do. Linux only; elsewhere a no-op.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # type: ignore[operator]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


DIRECT_IO_ALIGNMENT = 4096  # buffer, offset and length; covers 512 and 4096 byte sectors
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class AlignedBuffers(threading.local):
    """One page-aligned scratch buffer per thread for O_DIRECT writes, grown as needed."""

    def __init__(self) -> None:
        self.buffer: mmap.mmap | None = None

    def get(self, size: int) -> memoryview:
        if self.buffer is None or len(self.buffer) < size:
            if self.buffer is not None:
                self.buffer.close()
            self.buffer = mmap.mmap(-1, max(size, 1 << 20))
        return memoryview(self.buffer)[:size]


def open_direct(path: str | os.PathLike[str]) -> int | None:
    """``path`` (it must exist) opened for O_DIRECT writes; None where that is refused."""
    if not _O_DIRECT:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | _O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise


def write_durable(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) holding ``data``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durable(path: Path, data: bytes) -> None:
    """Atomically make ``path`` hold ``data``: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    write_durable(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- the lock ---------------------------------------------------------------------------


class LockHold:
    """A held flock on the repository's lock file; release() is idempotent."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise RepositoryError("the repository lock was already released")
        return self._fd

    def generation(self) -> int:
        """gc's counter, kept in the lock file: it tells writers their block cache is stale."""
        raw = os.pread(self.fd, 32, 0).strip()
        return int(raw) if raw.isdigit() else 0

    def bump_generation(self) -> int:
        value = self.generation() + 1
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, b"%d\n" % value, 0)
        return value

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor drops the flock

    def __enter__(self) -> LockHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RepoLock:
    """flock on ``<repo>/lock``: shared for writers and readers, exclusive for gc.

    flock (not fcntl's POSIX record locks) so that each open of the file is its own lock
    owner: two writers in one process hold two shared locks, and closing one descriptor does
    not silently drop the other's lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _open(self, *, write: bool = True) -> int:
        """The lock file; read-only is enough for a shared lock (a read-only mount)."""
        error: OSError | None = None
        for mode in (os.O_RDWR,) if write else (os.O_RDWR, os.O_RDONLY):
            try:
                return os.open(self.path, mode | os.O_CLOEXEC)
            except FileNotFoundError:
                raise RepositoryError(f"{self.path}: lock file is missing") from None
            except OSError as exc:
                error = exc
        assert error is not None
        raise RepositoryError(f"{self.path}: cannot open the lock: {error.strerror}") from error

    def shared(self) -> LockHold:
        fd = self._open(write=False)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return LockHold(fd)

    def try_exclusive(self) -> LockHold | None:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return LockHold(fd)

    def exclusive(self, timeout: float | None = None) -> LockHold:
        """Wait for every writer to finish; RepositoryError after ``timeout`` seconds."""
        fd = self._open()
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return LockHold(fd)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return LockHold(fd)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise RepositoryError(
                        f"{self.path.parent}: repository is in use by a writer; "
                        f"gave up waiting after {timeout:g} s"
                    ) from None
                time.sleep(0.05)

    @staticmethod
    def downgrade(hold: LockHold) -> None:
        fcntl.flock(hold.fd, fcntl.LOCK_SH)


# --- block files ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredBlock:
    digest: bytes
    path: Path
    size: int


class BlockStore:
    """``blocks/<first byte hex>/<digest hex>``: one zstd frame per block.

    Caches make ``has``/``put`` cheap without scanning directories: ``_present`` holds
    digests seen on disk (a miss costs one stat), ``_durable`` those known to be fsynced.
    gc is the only thing that
    removes blocks; it bumps the lock file's generation, and a writer that sees a new
    generation when it takes the lock drops the caches.
    """

    def __init__(self, root: Path, codec: BlockCodec, block_size: int) -> None:
        self.root = root
        self.blocks_dir = root / "blocks"
        self.tmp_dir = root / "tmp"
        self._blocks_prefix = f"{self.blocks_dir}/"
        self._tmp_prefix = f"{self.tmp_dir}/"
        self.codec = codec
        self.block_size = block_size
        self._mutex = threading.Lock()
        self._present: set[bytes] = set()
        self._durable: set[bytes] = set()
        self._generation: int | None = None
        self._tmp_names = itertools.count()
        # zstd stores an incompressible block raw: a frame is at most a little longer
        self._max_frame = block_size + block_size // 128 + 4096

    def path(self, digest: bytes) -> str:
        """The block file's path, as a str: pathlib costs more than the stat it feeds."""
        h = digest.hex()
        return f"{self._blocks_prefix}{h[:2]}/{h}"

    # the caches

    def sync_generation(self, generation: int) -> None:
        """Forget what we knew about blocks if gc ran since we last looked."""
        with self._mutex:
            if self._generation != generation:
                if self._generation is not None:
                    log.debug("gc ran (generation %d): dropping the block caches", generation)
                self._present.clear()
                self._durable.clear()
                self._generation = generation

    def mark_durable(self, digests: Iterable[bytes]) -> None:
        """Blocks a committed point names: fsynced by whoever committed that point."""
        with self._mutex:
            self._durable.update(digests)

    # the data path

    def has(self, digests: list[bytes]) -> list[bool]:
        """Which blocks are stored whole; a damaged file found on the way is removed."""
        present = self._present
        out = []
        for digest in digests:
            out.append(digest in present or self._probe(digest))
        return out

    def _probe(self, digest: bytes) -> bool:
        """Whether the block file on disk can be deduplicated against.

        A read-only file was fsynced before it was made read-only: it is whole. A writable
        one may be the remains of an unsynced write after a power loss, so it is read and
        checked (length, frame header, digest); a bad one is removed, to be stored again.
        """
        path = self.path(digest)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        if not st.st_mode & 0o222:
            with self._mutex:
                self._present.add(digest)
                self._durable.add(digest)
            return True
        try:
            self.read(digest)
        except BlockDamaged as exc:
            log.warning("%s: block %s is damaged (%s), probably by a crash before it was "
                        "synced; it is stored again", self.root, digest.hex(), exc.reason)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return False
        with self._mutex:
            self._present.add(digest)
        return True

    def put(self, digest: bytes, compressed: bytes | bytearray | memoryview) -> int:
        if digest in self._present or self._probe(digest):
            return 0
        final = self.path(digest)
        tmp = f"{self._tmp_prefix}{digest.hex()}.{os.getpid()}.{next(self._tmp_names)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            try:
                write_all(fd, compressed)
                start_writeback(fd)
            finally:
                os.close(fd)
            if not _link_once(tmp, final):
                # another writer stored it meanwhile: keep a good copy, replace a bad one
                if self._probe(digest):
                    os.unlink(tmp)
                    return 0
                os.replace(tmp, final)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise store_error(self.root, f"cannot store block {digest.hex()}", exc) from exc
        size = len(memoryview(compressed))
        with self._mutex:
            self._present.add(digest)
        return size

    def read(self, digest: bytes, expected_size: int | None = None) -> bytes:
        """The block's bytes, decompressed and checked against its digest.

        Never decompresses more than ``expected_size`` (or, without one, the block size):
        the length the frame's header claims is checked first, and a file longer than any
        frame of a block can be is not read whole.
        """
        limit = expected_size if expected_size is not None else self.block_size
        try:
            with open(self.path(digest), "rb") as f:
                compressed = f.read(self._max_frame + 1)
        except FileNotFoundError:
            raise BlockDamaged(digest, "block file is missing") from None
        except OSError as exc:
            raise BlockDamaged(digest, f"cannot read the block file: {exc.strerror}") from exc
        if not compressed:
            raise BlockDamaged(digest, "block file is empty")
        if len(compressed) > self._max_frame:
            raise BlockDamaged(digest, "block file is larger than any frame of one block")
        try:
            declared = frame_size(compressed)
            if declared > limit:
                raise ValueError(f"frame holds {declared} bytes, more than a block ({limit})")
            data = self.codec.decompress(compressed, expected_size if expected_size is not None
                                         else declared)
        except ValueError as exc:
            raise BlockDamaged(digest, str(exc)) from exc
        if block_digest(data) != digest:
            raise BlockDamaged(digest, "content does not match its digest")
        return data

    def quarantine(self, digest: bytes) -> Path | None:
        """Move a damaged block file to ``quarantine/blocks/``, so the next writer that
        needs the block stores it again; returns where it went (None: it was not there)."""
        where = self.root / "quarantine" / "blocks"
        where.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        dest = where / digest.hex()
        try:
            os.replace(self.path(digest), dest)
        except FileNotFoundError:
            return None
        with self._mutex:
            self._present.discard(digest)
            self._durable.discard(digest)
        return dest

    def make_durable(self, digests: Iterable[bytes]) -> dict[bytes, int]:
        """fsync every given block not known to be durable, then their directories.

        Includes blocks another process wrote and we only found present: their writer may
        not have synced them yet. Returns every given block's stored size; BlockDamaged for
        the first one that is not in the repository at all.
        """
        todo = set(digests)
        with self._mutex:
            unsynced = [d for d in todo if d not in self._durable]

        def sync(digest: bytes) -> tuple[bytes, int]:
            try:
                fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return digest, -1
            try:
                os.fsync(fd)
                return digest, os.fstat(fd).st_size
            finally:
                os.close(fd)

        def size(digest: bytes) -> tuple[bytes, int]:
            try:
                return digest, os.stat(self.path(digest)).st_size
            except FileNotFoundError:
                return digest, -1

        sizes: dict[bytes, int] = {}
        if not todo:
            return sizes
        with ThreadPoolExecutor(min(_FSYNC_THREADS, len(todo))) as pool:
            sizes.update(pool.map(sync, unsynced))
            sizes.update(pool.map(size, todo.difference(sizes)))
            missing = [d for d, n in sizes.items() if n < 0]
            if missing:
                raise BlockDamaged(missing[0], "named by the point but not in the repository")
            list(pool.map(fsync_dir, {Path(self.path(d)).parent for d in unsynced}))
            # only now, with data and name on disk: read-only tells later writers "whole"
            list(pool.map(self._mark_whole, unsynced))
        with self._mutex:
            self._durable.update(unsynced)
        return sizes

    def _mark_whole(self, digest: bytes) -> None:
        with contextlib.suppress(OSError):  # unmarked, it is checked once more: no harm
            os.chmod(self.path(digest), DURABLE_MODE)

    # listing and removal (gc, stats)

    def iter_blocks(self) -> Iterator[StoredBlock]:
        for fanout in sorted(self.blocks_dir.iterdir()):
            if not fanout.is_dir():
                continue
            with os.scandir(fanout) as entries:
                for entry in entries:
                    name = entry.name
                    if len(name) != DIGEST_SIZE * 2:
                        continue
                    try:
                        digest = bytes.fromhex(name)
                        size = entry.stat().st_size
                    except (ValueError, FileNotFoundError):
                        continue
                    yield StoredBlock(digest, Path(entry.path), size)

    def remove(self, block: StoredBlock) -> None:
        try:
            os.unlink(block.path)
        except FileNotFoundError:
            pass
        with self._mutex:
            self._present.discard(block.digest)
            self._durable.discard(block.digest)

    def clean_tmp(self) -> int:
        """Remove temp files of writes that never finished. Only under the exclusive lock."""
        removed = 0
        with os.scandir(self.tmp_dir) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        remove_tree(Path(entry.path))
                    else:
                        os.unlink(entry.path)
                    removed += 1
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
        return removed
