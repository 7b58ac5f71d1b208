"""Restore points: their directory, what they say about themselves, and how one is written.

``points/<vm>/<point id>/`` holds ``metadata.json``, one ``disk-<key>.idx`` per disk and
``manifest.json`` (size and SHA-256 of the other files). A point is written in
``points/<vm>/.tmp-<point id>/`` and appears under its id by one rename, after every block
it names and every file in it are fsynced; readers never see half a point.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote

from vbrd.errors import NotFound, RepositoryError, UsageError
from vbrd.repository.blocks import DIGEST_SIZE, ZERO_DIGEST
from vbrd.repository.index import (
    MAX_INDEX_BLOCKS,
    DiskIndex,
    IndexFormatError,
    block_count,
    decode_index,
    digest_set,
    encode_index,
)
from vbrd.repository.store import (
    DIR_MODE,
    TMP_PREFIX,
    BlockDamaged,
    BlockStore,
    LockHold,
    fsync_dir,
    remove_tree,
    store_error,
    write_durable,
)

POINT_FORMAT_VERSION = 1
METADATA = "metadata.json"
MANIFEST = "manifest.json"
POINT_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")
DAMAGED_PREFIX = ".damaged-"
QUARANTINE_NOTE = "quarantine.json"
NEEDS_FULL = ".needs-full"
"""In a VM's directory: a point of this VM was quarantined, so its next backup is a full."""
MAX_POINT_FILE = 64 << 20
"""metadata.json and manifest.json are read whole; anything larger is damage, not a point."""
_VM_DIR_MAX = 200

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


# --- names ------------------------------------------------------------------------------


def vm_dir_name(vm: str) -> str:
    """A directory name for a VM name: percent-encoded, never hidden, never too long.

    vSphere VM names may hold '/', spaces and any Unicode. The directory only locates the
    VM's points; the name itself is read from each point's metadata.
    """
    if not vm:
        raise UsageError("a restore point needs a VM name")
    name = quote(vm, safe="")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > _VM_DIR_MAX:
        name = name[:180] + "~" + hashlib.sha256(vm.encode()).hexdigest()[:16]
    return name


def index_name(disk_key: int) -> str:
    return f"disk-{disk_key}.idx"


def vm_of_dir_name(name: str) -> str:
    """The VM name a directory stands for, as far as it can tell (a cut name stays cut)."""
    return unquote(name)


def new_point_id(now: datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)


def utc_iso(now: datetime) -> str:
    return now.isoformat(timespec="microseconds").replace("+00:00", "Z")


# --- what a point says about itself ------------------------------------------------------


@dataclass(frozen=True)
class DiskInfo:
    key: int
    label: str
    capacity: int
    change_id: str | None
    blocks: int = 0
    """Blocks that hold data (not zero)."""
    data_bytes: int = 0
    """Bytes of those blocks, uncompressed: what a restore writes."""
    changed_blocks: int = 0
    """Blocks whose entry differs from the parent's (all data blocks for a full)."""
    stored_bytes: int = 0
    """Compressed size of the distinct changed blocks: the point's increment on disk."""
    kind: str = ""
    """What was read: ``incremental`` (only the areas changed since the parent, the index
    started from the parent's) or ``full`` (the whole disk, even if few blocks were new).
    Empty in points written before this field existed."""


@dataclass(frozen=True)
class PointInfo:
    """A committed restore point as listings, the catalog and the API show it."""

    point_id: str
    vm: str
    created: str
    """UTC, ISO 8601: when the point was begun, i.e. close to the snapshot's time."""
    session_id: str
    parent: str | None
    block_size: int
    disks: tuple[DiskInfo, ...]
    metadata: dict[str, Any] = field(compare=False)
    """The VM's config, vmx, hardware and guest info, as the backup session gave them."""
    committed: str = ""
    sequence: int = 0
    """1, 2, 3, … per VM in commit order: what "newest" means (the clock may step back).
    0 for points written before sequences existed; they order by ``created``."""
    kind: str = ""
    """``incremental`` when some disk was read as its changes since ``parent``, ``full``
    when every disk was read whole. Empty in points written before this field existed."""
    data_bytes: int = 0
    changed_blocks: int = 0
    stored_bytes: int = 0
    """Compressed size of the distinct blocks the point changed against its parent.

    Blocks are shared across points and VMs, so this is the point's increment, not what
    deleting it would free (only gc can tell that)."""

    @property
    def order(self) -> tuple[int, str, str]:
        """Oldest to newest among one VM's points."""
        return (self.sequence, self.created, self.point_id)

    def disk(self, disk_key: int) -> DiskInfo:
        for disk in self.disks:
            if disk.key == disk_key:
                return disk
        raise NotFound(f"restore point {self.point_id} has no disk {disk_key}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> PointInfo:
        """Fields this version does not know are ignored: later v1 writers may add some."""
        disks = tuple(DiskInfo(**_known(DiskInfo, d)) for d in doc["disks"])
        return cls(disks=disks, **_known(cls, {k: v for k, v in doc.items() if k != "disks"}))


def _known(cls: type, doc: dict[str, Any]) -> dict[str, Any]:
    fields = cls.__dataclass_fields__  # type: ignore[attr-defined]
    return {k: v for k, v in doc.items() if k in fields}


def _file_entry(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class PointDir:
    """A committed point's directory, read and checked against its manifest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.point_id = path.name
        self._manifest: dict[str, dict[str, Any]] | None = None

    def manifest(self) -> dict[str, dict[str, Any]]:
        if self._manifest is None:
            try:
                doc = json.loads(_read_bounded(self.path / MANIFEST, MAX_POINT_FILE))
                files = doc["files"]
                if doc.get("version") != POINT_FORMAT_VERSION or not isinstance(files, dict):
                    raise ValueError(f"manifest version {doc.get('version')!r}")
            except FileNotFoundError:
                raise self.damaged("manifest.json is missing") from None
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise self.damaged(f"manifest.json is unreadable ({exc})") from exc
            self._manifest = files
        return self._manifest

    def damaged(self, reason: str) -> RepositoryError:
        return RepositoryError(f"restore point {self.point_id} ({self.path}) is damaged: {reason}")

    def read_checked(self, name: str) -> bytes:
        """A file of the point, only if it is the one the manifest recorded."""
        entry = self.manifest().get(name)
        if entry is None:
            raise self.damaged(f"{name} is not in the manifest")
        try:
            size = entry.get("size") if isinstance(entry, dict) else None
            data = _read_bounded(self.path / name, size if isinstance(size, int) else -1)
        except FileNotFoundError:
            raise self.damaged(f"{name} is missing") from None
        except OSError as exc:
            raise self.damaged(f"{name} cannot be read ({exc.strerror})") from exc
        if _file_entry(data) != entry:
            raise self.damaged(f"{name} does not match the manifest")
        return data

    def info(self) -> PointInfo:
        try:
            doc = json.loads(self.read_checked(METADATA))
            return PointInfo.from_dict(doc)
        except (ValueError, KeyError, TypeError) as exc:
            raise self.damaged(f"metadata.json is unreadable ({exc})") from exc

    def index_files(self) -> list[str]:
        """Index files the manifest names, or, when it is unreadable, those on disk."""
        try:
            names = list(self.manifest())
        except RepositoryError:
            names = [p.name for p in self.path.iterdir()]
        return sorted(n for n in names if n.startswith("disk-") and n.endswith(".idx"))

    def read_index(self, info: PointInfo, disk_key: int) -> DiskIndex:
        disk = info.disk(disk_key)
        data = self.read_checked(index_name(disk_key))
        try:
            capacity, block_size, entries = decode_index(data)
        except IndexFormatError as exc:
            raise self.damaged(f"{index_name(disk_key)}: {exc}") from exc
        if capacity != disk.capacity or block_size != info.block_size:
            raise self.damaged(
                f"{index_name(disk_key)} covers {capacity} bytes in blocks of {block_size}, "
                f"not {disk.capacity} in blocks of {info.block_size}"
            )
        return DiskIndex(
            point_id=info.point_id,
            disk_key=disk_key,
            label=disk.label,
            capacity=capacity,
            block_size=block_size,
            change_id=disk.change_id,
            entries=entries,
        )

    def referenced_digests(self) -> set[bytes]:
        """Every block any index file here names, checked or not: what gc must keep.

        Raises when an index cannot be decoded, because gc must then delete nothing.
        """
        found: set[bytes] = set()
        for name in self.index_files():
            found |= self.referenced_digests_of(name)
        return found

    def referenced_digests_of(self, name: str) -> set[bytes]:
        """The blocks one index file names; raises when it cannot be decoded."""
        try:
            _, _, entries = decode_index(_read_bounded(self.path / name, _MAX_INDEX_FILE))
        except (OSError, IndexFormatError) as exc:
            raise self.damaged(f"{name} cannot be read ({exc})") from exc
        return digest_set(entries)


_MAX_INDEX_FILE = 32 + MAX_INDEX_BLOCKS * DIGEST_SIZE + (1 << 20)


def _read_bounded(path: Path, size: int) -> bytes:
    """A file's bytes, refusing one longer than ``size`` (its recorded or largest size)
    before reading it: a damaged file cannot make a reader allocate without bound."""
    limit = size if size >= 0 else MAX_POINT_FILE
    with open(path, "rb") as f:
        length = os.fstat(f.fileno()).st_size
        if length > limit:
            raise OSError(0, f"{length} bytes, longer than the {limit} it may have")
        data = f.read(length + 1)
    if len(data) > limit:
        raise OSError(0, f"longer than the {limit} bytes it may have")
    return data


def read_quarantine_note(path: Path) -> dict[str, Any]:
    """What was recorded when a point was quarantined (empty when nothing readable)."""
    try:
        doc = json.loads(_read_bounded(path / QUARANTINE_NOTE, 1 << 20))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def sequence_of(path: Path) -> int:
    """A point directory's sequence, read without the manifest check (for numbering only:
    a damaged point still holds its number, so no later point reuses it)."""
    note = read_quarantine_note(path)
    if isinstance(note.get("sequence"), int):
        return int(note["sequence"])
    try:
        doc = json.loads(_read_bounded(path / METADATA, MAX_POINT_FILE))
        value = doc.get("sequence", 0) if isinstance(doc, dict) else 0
    except (OSError, ValueError):
        return 0
    return value if isinstance(value, int) else 0


@contextlib.contextmanager
def vm_dir_locked(vm_dir: Path) -> Iterator[None]:
    """flock on the VM's directory: commits of one VM take their sequence numbers in turn."""
    fd = os.open(vm_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- writing a point ---------------------------------------------------------------------


class DiskIndexWriter:
    """The block index of one disk of a point being written.

    ``set_block`` is called from the data path's worker threads: it is a slice assignment
    into one bytearray, safe under the GIL, and cheap enough to call per block. What
    changed is found at commit by comparing with the entries the disk started from.
    """

    def __init__(
        self,
        disk_key: int,
        label: str,
        capacity: int,
        block_size: int,
        base: bytes,
        inherited_from: str | None,
    ) -> None:
        self.disk_key = disk_key
        self.label = label
        self.capacity = capacity
        self.block_size = block_size
        self.block_count = len(base) // DIGEST_SIZE
        self.inherited_from = inherited_from
        self.change_id: str | None = None
        # set when whoever stored this disk's blocks made them all durable (a repository-side
        # data mover does before it reports): the commit then only checks they are there
        self.blocks_durable = False
        self._base = base
        self._entries = bytearray(base)
        self._closed = False

    def __len__(self) -> int:
        return self.block_count

    def _check(self, block_no: int) -> None:
        if self._closed:
            raise UsageError(f"disk {self.disk_key}: the restore point is already finished")
        if not 0 <= block_no < self.block_count:
            raise IndexError(
                f"disk {self.disk_key}: block {block_no} is outside the disk "
                f"({self.block_count} blocks of {self.block_size} bytes)"
            )

    def set_block(self, block_no: int, digest: bytes | None) -> None:
        """Block ``block_no`` holds the block ``digest`` (stored with put_block), or zeros."""
        self._check(block_no)
        at = block_no * DIGEST_SIZE
        if digest is None:
            self._entries[at : at + DIGEST_SIZE] = ZERO_DIGEST
        elif len(digest) != DIGEST_SIZE:
            raise ValueError(f"a block digest is {DIGEST_SIZE} bytes, not {len(digest)}")
        else:
            self._entries[at : at + DIGEST_SIZE] = digest

    def set_range_zero(self, first_block: int, count: int) -> None:
        """Blocks ``first_block .. first_block + count - 1`` are all zero (e.g. unallocated)."""
        if count <= 0:
            return
        self._check(first_block)
        self._check(first_block + count - 1)
        self._entries[first_block * DIGEST_SIZE : (first_block + count) * DIGEST_SIZE] = bytes(
            count * DIGEST_SIZE
        )

    def get(self, block_no: int) -> bytes | None:
        """The entry as it stands: inherited from the parent or set since."""
        self._check(block_no)
        entry = bytes(self._entries[block_no * DIGEST_SIZE : (block_no + 1) * DIGEST_SIZE])
        return None if entry == ZERO_DIGEST else entry

    def blocks_of(self, offset: int, length: int) -> range:
        """Block numbers that bytes ``[offset, offset + length)`` touch."""
        if length <= 0:
            return range(0)
        return range(offset // self.block_size, (offset + length - 1) // self.block_size + 1)

    def _scan(self) -> _DiskScan:
        entries, base, zero, size = bytes(self._entries), self._base, ZERO_DIGEST, DIGEST_SIZE
        scan = _DiskScan()
        for n, at in enumerate(range(0, len(entries), size)):
            entry = entries[at : at + size]
            if entry == zero:
                continue
            scan.blocks += 1
            if entry != base[at : at + size]:
                scan.changed_blocks += 1
                scan.changed.setdefault(entry, n)
        scan.data_bytes = scan.blocks * self.block_size
        if scan.blocks and entries[-size:] != zero:
            scan.data_bytes -= self.block_count * self.block_size - self.capacity
        return scan


@dataclass
class _DiskScan:
    """What a disk's finished index holds, found in one pass at commit."""

    blocks: int = 0
    data_bytes: int = 0
    changed_blocks: int = 0
    changed: dict[bytes, int] = field(default_factory=dict)
    """Distinct digests that differ from the parent's entry → first block naming each."""


class PointWriter:
    """A restore point being written; nothing of it is visible until :meth:`commit`.

    Holds the repository's shared lock from ``begin_point`` to commit or abort, so gc cannot
    remove a block between ``has_blocks`` saying it is there and the point naming it. As a
    context manager, leaving the block without commit — by an exception or not — aborts.
    """

    def __init__(
        self,
        *,
        store: BlockStore,
        vm: str,
        vm_dir: Path,
        session_id: str,
        metadata: dict[str, Any],
        parent: PointInfo | None,
        parent_dir: PointDir | None,
        lock: LockHold,
        next_sequence: Callable[[], int],
        clock: Clock = utc_now,
        on_commit: Callable[[PointInfo], None] | None = None,
    ) -> None:
        now = clock()
        self.point_id = new_point_id(now)
        self.vm = vm
        self.session_id = session_id
        self.parent = parent.point_id if parent else None
        self.created = utc_iso(now)
        self._store = store
        self._metadata = metadata
        self._parent = parent
        self._parent_dir = parent_dir
        self._lock = lock
        self._vm_dir = vm_dir
        self._staging = vm_dir / f"{TMP_PREFIX}{self.point_id}"
        self._final = vm_dir / self.point_id
        self._disks: dict[int, DiskIndexWriter] = {}
        self._finished = False
        self._next_sequence = next_sequence
        self._clock = clock
        self._on_commit = on_commit
        try:
            self._staging.mkdir(mode=DIR_MODE)
        except OSError as exc:
            raise store_error(vm_dir.parent.parent, f"cannot begin a restore point of VM {vm}",
                              exc) from exc

    def __enter__(self) -> PointWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._finished:
            self.abort()

    @property
    def disks(self) -> dict[int, DiskIndexWriter]:
        return dict(self._disks)

    def _check_open(self) -> None:
        if self._finished:
            raise UsageError(f"restore point {self.point_id} is already committed or aborted")

    def add_disk(
        self, disk_key: int, *, label: str, capacity: int, inherit: bool
    ) -> DiskIndexWriter:
        """Start the index of one disk; with ``inherit`` it begins as the parent's index.

        An incremental point sets only the changed blocks and is still complete on its own.
        A disk that grew keeps the parent's blocks and starts zero beyond them (what the
        guest wrote there since, change tracking reports as changed).
        """
        self._check_open()
        if disk_key in self._disks:
            raise UsageError(f"restore point {self.point_id} already has disk {disk_key}")
        if disk_key < 0 or capacity < 0:
            raise UsageError(f"disk {disk_key}: key and capacity must not be negative")
        block_size = self._store.block_size
        count = block_count(capacity, block_size)
        if count > MAX_INDEX_BLOCKS:
            raise UsageError(
                f"disk {disk_key} of VM {self.vm} needs {count} blocks of {block_size} bytes; "
                f"an index holds at most {MAX_INDEX_BLOCKS} (use a repository with larger "
                f"blocks)")
        inherited_from = None
        if inherit:
            if self._parent is None or self._parent_dir is None:
                raise UsageError(
                    f"disk {disk_key} of VM {self.vm}: cannot inherit, the point has no parent"
                )
            try:
                base = self._parent_dir.read_index(self._parent, disk_key)
            except NotFound:
                raise UsageError(
                    f"disk {disk_key} of VM {self.vm}: parent point {self._parent.point_id} "
                    f"has no such disk to inherit from"
                ) from None
            if capacity < base.capacity or (
                capacity > base.capacity and base.capacity % block_size
            ):
                # a shrunk disk, or a grown one whose old last block was short: some
                # inherited digest would describe a block of a different length
                raise UsageError(
                    f"disk {disk_key} of VM {self.vm} changed size from {base.capacity} to "
                    f"{capacity} bytes; back it up in full (inherit=False)"
                )
            entries = base.entries + bytes(count * DIGEST_SIZE - len(base.entries))
            inherited_from = self._parent.point_id
        else:
            entries = bytes(count * DIGEST_SIZE)
        writer = DiskIndexWriter(disk_key, label, capacity, block_size, entries, inherited_from)
        self._disks[disk_key] = writer
        return writer

    def commit(self) -> PointInfo:
        """Make the point durable and visible, in that order.

        1. fsync every block the point newly names (in parallel), and their directories;
        2. write and fsync the indexes, metadata.json and manifest.json, then the directory;
        3. rename ``.tmp-<id>`` to ``<id>`` and fsync the VM's directory.
        A crash before 3 leaves a ``.tmp-`` directory nobody lists; after 3 the point is whole.
        Blocks inherited unchanged from the parent are durable already: a committed point
        named them.
        """
        self._check_open()
        try:
            for disk in self._disks.values():
                disk._closed = True
            scans = {key: disk._scan() for key, disk in self._disks.items()}
            sizes = self._make_blocks_durable(scans)
            try:
                with vm_dir_locked(self._vm_dir):
                    info = self._write_files(scans, sizes, self._next_sequence())
                    os.rename(self._staging, self._final)
                    fsync_dir(self._vm_dir)
            except OSError as exc:
                raise store_error(self._vm_dir.parent.parent,
                                  f"cannot commit restore point {self.point_id} of VM "
                                  f"{self.vm}", exc) from exc
        except BaseException:
            self._finish(remove=True)
            raise
        self._finish(remove=False)
        if self._on_commit is not None:
            self._on_commit(info)
        return info

    def abort(self) -> None:
        """Drop the point. Blocks already stored stay until gc finds no point names them."""
        if not self._finished:
            self._finish(remove=True)

    def _finish(self, *, remove: bool) -> None:
        self._finished = True
        for disk in self._disks.values():
            disk._closed = True
        try:
            if remove:
                remove_tree(self._staging)
        finally:
            self._lock.release()

    def _make_blocks_durable(
        self, scans: dict[int, _DiskScan]
    ) -> dict[bytes, int]:
        changed: set[bytes] = set()
        for key, scan in scans.items():
            changed.update(scan.changed)
            if self._disks[key].blocks_durable:
                self._store.mark_durable(scan.changed)
        try:
            return self._store.make_durable(changed)
        except BlockDamaged as exc:
            where = ""
            for key, scan in scans.items():
                if exc.digest in scan.changed:
                    offset = scan.changed[exc.digest] * self._disks[key].block_size
                    where = f"disk {key}, offset {offset}: "
                    break
            raise RepositoryError(
                f"cannot commit restore point {self.point_id} of VM {self.vm}: {where}"
                f"block {exc.digest.hex()} was never stored (put_block)"
            ) from exc

    def _write_files(
        self, scans: dict[int, _DiskScan], sizes: dict[bytes, int], sequence: int
    ) -> PointInfo:
        files: dict[str, bytes] = {}
        disks = []
        for key in sorted(self._disks):
            disk = self._disks[key]
            scan = scans[key]
            files[index_name(key)] = encode_index(
                disk._entries, capacity=disk.capacity, block_size=disk.block_size
            )
            disks.append(
                DiskInfo(
                    key=key,
                    label=disk.label,
                    capacity=disk.capacity,
                    change_id=disk.change_id,
                    blocks=scan.blocks,
                    data_bytes=scan.data_bytes,
                    changed_blocks=scan.changed_blocks,
                    stored_bytes=sum(sizes[d] for d in scan.changed),
                    kind="incremental" if disk.inherited_from else "full",
                )
            )
        # a point whose every disk was read whole is a full, whatever it was begun with
        incremental = any(d.kind == "incremental" for d in disks)
        info = PointInfo(
            point_id=self.point_id,
            vm=self.vm,
            created=self.created,
            session_id=self.session_id,
            parent=self.parent if incremental else None,
            kind="incremental" if incremental else "full",
            block_size=self._store.block_size,
            disks=tuple(disks),
            metadata=self._metadata,
            committed=utc_iso(self._clock()),
            sequence=sequence,
            data_bytes=sum(d.data_bytes for d in disks),
            changed_blocks=sum(d.changed_blocks for d in disks),
            stored_bytes=sum(sizes.values()),
        )
        doc = {"version": POINT_FORMAT_VERSION, **info.to_dict()}
        files[METADATA] = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
        for name, data in files.items():
            write_durable(self._staging / name, data)
        manifest = {
            "version": POINT_FORMAT_VERSION,
            "point_id": self.point_id,
            "files": {name: _file_entry(data) for name, data in sorted(files.items())},
        }
        write_durable(self._staging / MANIFEST, json.dumps(manifest, indent=1).encode() + b"\n")
        fsync_dir(self._staging)
        return info
