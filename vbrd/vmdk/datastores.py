"""Datastore files as a proxy sees them, every name confined beneath its datastore's directory.

A disk chain is named by files that the datastore's owner (anyone who can write a VM's folder)
controls: the leaf descriptor vSphere names, and then whatever that descriptor names as its
extents and its parent. Opening those names as given would let a planted descriptor whose
extent is ``../../etc/passwd`` (or ``/etc/passwd``, or a symbolic link in the VM's folder
pointing there) read the proxy's own files into a backup. :class:`DatastoreFileSpace`
resolves every name through the proxy's map of datastore → directory and refuses what lies
outside it:

- a relative name resolves beside the descriptor that names it and must stay inside that
  descriptor's datastore (``..`` past the datastore's directory is refused);
- an absolute name is either ESXi's ``/vmfs/volumes/<datastore>/<path>`` (mapped to where the
  proxy sees that datastore; an unmapped datastore is named) or a path inside one of the
  mapped directories; anything else is refused;
- the file is opened beneath its datastore's directory with ``openat2(RESOLVE_BENEATH)``, so a
  symbolic link inside the export may point elsewhere inside it, but never out of it (nor be
  absolute). Where the kernel lacks ``openat2`` (Linux before 5.6), the resolved real path is
  checked instead, which a concurrent rename could race.

Only regular files are opened (a planted FIFO would otherwise block the reader forever).
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import posixpath
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from vbrd.errors import TransportError
from vbrd.vmdk.sources import LocalFile

VMFS_VOLUMES = "/vmfs/volumes/"

# openat2(2): its number is the same on every architecture with the generic syscall table
_SYS_OPENAT2 = 437
_OPENAT2_MACHINES = frozenset({"x86_64", "aarch64", "arm64", "riscv64", "ppc64le", "s390x"})
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_RETRIES = 8  # EAGAIN: a rename raced the lookup of ".."


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class Escapes(OSError):
    """The name resolves outside the directory it must stay in."""


_openat2_usable = platform.system() == "Linux" and platform.machine() in _OPENAT2_MACHINES


def _openat2(dirfd: int, relative: str, flags: int) -> int | None:
    """``openat2(dirfd, relative, flags, RESOLVE_BENEATH)``; ``None`` when the kernel has no
    openat2. :class:`Escapes` when the name leaves ``dirfd``."""
    global _openat2_usable
    if not _openat2_usable:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    how = _OpenHow(flags, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    for _ in range(_RETRIES):
        fd = libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd),
                          ctypes.c_char_p(os.fsencode(relative)), ctypes.byref(how),
                          ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EINTR):
            continue
        if err == errno.ENOSYS:
            _openat2_usable = False  # an old kernel, or a seccomp filter that hides it
            return None
        if err in (errno.EXDEV, errno.ELOOP):
            raise Escapes(err, os.strerror(err), relative)
        raise OSError(err, os.strerror(err), relative)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), relative)


def open_beneath(root: str, relative: str) -> int:
    """A read-only descriptor of ``root/relative``, resolved without leaving ``root``.

    :class:`Escapes` when ``relative`` or a symbolic link on its way leads out of ``root``;
    ``OSError`` as ``open`` raises it otherwise."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    dirfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _openat2(dirfd, relative, flags)
    finally:
        os.close(dirfd)
    if fd is not None:
        return fd
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, relative))
    if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
        raise Escapes(errno.EXDEV, os.strerror(errno.EXDEV), relative)
    return os.open(real, flags | os.O_NOFOLLOW)


@dataclass(frozen=True, slots=True)
class _Place:
    datastore: str
    root: str
    relative: str


class DatastoreFileSpace:
    """The :class:`vbrd.vmdk.sources.FileSpace` of the san mode: names resolve to files of
    mapped datastores, and nothing outside them opens (see the module docstring).

    ``roots`` maps a datastore's name (or its UUID, as ESXi paths may name it) to the
    directory where this proxy sees it; ``proxy`` names the proxy in errors."""

    def __init__(self, roots: Mapping[str, str], proxy: str = "") -> None:
        self._roots = {ds: posixpath.normpath(root) for ds, root in roots.items()}
        self._proxy = proxy or "this proxy"
        self._places: dict[str, _Place] = {}

    def locate(self, datastore: str, path: str) -> str:
        """The location of ``[datastore] path`` (a descriptor vSphere names)."""
        root = self._root(datastore)
        relative = posixpath.normpath(path.replace("\\", "/").lstrip("/"))
        if _leaves(relative):
            raise TransportError(f"[{datastore}] {path} lies outside datastore {datastore} "
                                 f"({root})")
        return self._place(datastore, root, relative)

    def resolve(self, base: str, name: str) -> str:
        """Where ``name``, found in the descriptor at ``base``, is; refused outside the
        mapped datastores."""
        here = self._places[base]
        name = name.replace("\\", "/")
        if name.startswith(VMFS_VOLUMES):
            datastore, _, rest = name[len(VMFS_VOLUMES):].partition("/")
            root = self._root(datastore, f"{base} names {name}, but ")
            relative = posixpath.normpath(rest)
            if not rest or _leaves(relative):
                raise self._outside(base, name, datastore, root)
            return self._place(datastore, root, relative)
        if posixpath.isabs(name):
            path = posixpath.normpath(name)
            for datastore, root in self._roots.items():
                if path.startswith(root.rstrip("/") + "/"):
                    return self._place(datastore, root, posixpath.relpath(path, root))
            raise self._outside(base, name, here.datastore, here.root)
        relative = posixpath.normpath(posixpath.join(posixpath.dirname(here.relative), name))
        if _leaves(relative):
            raise self._outside(base, name, here.datastore, here.root)
        return self._place(here.datastore, here.root, relative)

    def open(self, location: str) -> LocalFile:
        place = self._places.get(location)
        if place is None:
            raise TransportError(f"{location}: not a file this chain's datastores name")
        try:
            fd = open_beneath(place.root, place.relative)
        except Escapes:
            raise TransportError(f"{location} leads outside datastore {place.datastore} "
                                 f"({place.root}) through a symbolic link; refusing to open "
                                 f"it") from None
        except OSError as exc:
            raise TransportError(f"{location}: cannot open: {exc.strerror}") from exc
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise TransportError(f"{location}: not a regular file")
        return LocalFile(location, fd=fd)

    def _root(self, datastore: str, context: str = "") -> str:
        root = self._roots.get(datastore)
        if root is None:
            known = ", ".join(sorted(self._roots)) or "none"
            raise TransportError(f"{context}datastore {datastore} is not mapped on proxy "
                                 f"{self._proxy} (its san_paths map: {known})")
        return root

    def _place(self, datastore: str, root: str, relative: str) -> str:
        location = posixpath.join(root, relative)
        self._places[location] = _Place(datastore, root, relative)
        return location

    @staticmethod
    def _outside(base: str, name: str, datastore: str, root: str) -> TransportError:
        return TransportError(f'{base} names "{name}", which lies outside datastore '
                              f"{datastore} ({root}); refusing to open it")


def _leaves(relative: str) -> bool:
    """Whether a normalised relative path climbs out of its directory."""
    return relative == ".." or relative.startswith("../")


__all__ = ["DatastoreFileSpace", "Escapes", "open_beneath"]
