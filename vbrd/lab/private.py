"""The lab's private directories and files: made so that no other local user can plant, read
or redirect what the lab writes (it usually runs as root).

- :func:`default_dir` is a per-user location nobody else can create: ``/run/vbrd-lab`` for
  root, ``$XDG_RUNTIME_DIR/vbrd-lab`` (or ``~/.local/state/vbrd-lab``) for anyone else;
- :func:`claim_dir` makes a directory 0700, or accepts an existing one only when this user
  owns it and no one else can write to it or to a directory above it (sticky ones aside, as
  ``/tmp``), so a directory another user prepared is refused by name;
- :func:`write_private` never follows a symbolic link and never writes into a file someone
  else opened: it creates a new file (``O_CREAT | O_EXCL | O_NOFOLLOW``) and renames it into
  place, which replaces a link planted at the name instead of writing through it;
- :func:`grant_search` lets one more account (a lab guest's) traverse a private directory,
  through a POSIX ACL entry for that account alone where the file system keeps ACLs, else
  with the search bit for others (never read or write).
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import struct
from pathlib import Path

from vbrd.errors import VbrdError

NAME = "vbrd-lab"
ROOT_DIR = Path("/run") / NAME


class PrivateDirError(VbrdError):
    """A lab directory or file cannot be made private, or is not this user's."""


def default_dir() -> Path:
    """This user's lab directory when none is given (see the module docstring)."""
    if os.geteuid() == 0:
        return ROOT_DIR
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime:
        with contextlib.suppress(OSError):
            st = os.lstat(runtime)
            if (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
                    and not st.st_mode & 0o077):
                return Path(runtime) / NAME
    return Path.home() / ".local" / "state" / NAME


def claim_dir(path: Path) -> Path:
    """Make ``path`` (mode 0700) or take it over if this user may; return it, absolute.

    Refused, naming the directory: a symbolic link, something that is not a directory, a
    directory of another user or one others may write to, or one below a directory that
    another user could replace it in (writable by group or others without the sticky bit,
    or owned by someone else than this user or root).
    """
    path = Path(os.path.abspath(path))
    _check_ancestors(path.parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    me = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        raise PrivateDirError(f"{path} is a symbolic link; the lab's directory must be a real "
                              f"directory of its own")
    if not stat.S_ISDIR(st.st_mode):
        raise PrivateDirError(f"{path} exists and is not a directory")
    if st.st_uid != me:
        raise PrivateDirError(f"{path} belongs to {_owner(st.st_uid)}, not to "
                              f"{_owner(me)}, who runs the lab; refusing to use it (give a "
                              f"directory of your own, or none for the default)")
    if st.st_mode & 0o022:
        raise PrivateDirError(f"{path} is writable by others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}), so anything in it may have "
                              f"been planted; give a directory only you can write to")
    os.chmod(path, 0o700)
    return path


def _check_ancestors(directory: Path) -> None:
    me = os.geteuid()
    for d in [directory, *directory.parents]:
        try:
            st = os.stat(d)
        except FileNotFoundError:
            continue  # made below, by this user
        if st.st_uid not in (0, me):
            raise PrivateDirError(f"{d} belongs to {_owner(st.st_uid)}: a lab directory "
                                  f"below it could be swapped by that user")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise PrivateDirError(f"{d} is writable by others (mode "
                                  f"{stat.S_IMODE(st.st_mode):04o}): a lab directory below "
                                  f"it could be swapped")
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)


def _owner(uid: int) -> str:
    import pwd

    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def write_private(path: Path, data: str | bytes, mode: int = 0o600) -> Path:
    """Write ``data`` as a new file at ``path`` with ``mode``, replacing what is there.

    The file is created under a fresh name in the same directory with ``O_CREAT | O_EXCL |
    O_NOFOLLOW`` and renamed over ``path``: a symbolic link planted at ``path`` is replaced,
    never followed, and no one who had the old file open sees the new contents. The
    directory itself is opened with ``O_NOFOLLOW``.
    """
    path = Path(path)
    blob = data.encode() if isinstance(data, str) else data
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        draft = f".{path.name}.{secrets.token_hex(6)}.new"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode,
                     dir_fd=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(blob)
            os.rename(draft, path.name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(draft, dir_fd=directory)
            raise
    finally:
        os.close(directory)
    return path


def read_private(path: Path, limit: int = 1 << 20) -> str:
    """A small file the lab wrote, read without following a symbolic link at its name."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


# ---- letting a guest account through -------------------------------------------------------

_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF
_SEARCH = 1


def grant_search(directory: Path, uid: int) -> None:
    """Let ``uid`` traverse ``directory`` (not list it, not write to it).

    A named-user ACL entry where the file system keeps POSIX ACLs; elsewhere the search bit
    for others, which lets anyone traverse but still not list or change the directory.
    """
    st = os.stat(directory)
    if st.st_uid == uid:
        return
    try:
        entries = _read_acl(directory, st.st_mode)
        perms = entries.get((_USER, uid), 0) | _SEARCH
        entries[(_USER, uid)] = perms
        named = [p for (tag, _), p in entries.items() if tag in (_USER, _GROUP)]
        entries[(_MASK, _NO_ID)] = entries.get((_GROUP_OBJ, _NO_ID), 0) | _or(named)
        blob = struct.pack("<I", _ACL_VERSION) + b"".join(
            struct.pack("<HHI", tag, perm, ident)
            for (tag, ident), perm in sorted(entries.items()))
        os.setxattr(directory, _ACL_XATTR, blob, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.chmod(directory, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def _or(perms: list[int]) -> int:
    out = 0
    for p in perms:
        out |= p
    return out


def _read_acl(directory: Path, mode: int) -> dict[tuple[int, int], int]:
    try:
        blob = os.getxattr(directory, _ACL_XATTR, follow_symlinks=False)
    except OSError as e:
        if e.errno != errno.ENODATA:
            raise
        return {(_USER_OBJ, _NO_ID): (mode >> 6) & 7, (_GROUP_OBJ, _NO_ID): (mode >> 3) & 7,
                (_OTHER, _NO_ID): mode & 7}
    (version,) = struct.unpack_from("<I", blob)
    if version != _ACL_VERSION or (len(blob) - 4) % 8:
        raise OSError(errno.EINVAL, f"unexpected ACL on {directory}")
    entries = {}
    for offset in range(4, len(blob), 8):
        tag, perm, ident = struct.unpack_from("<HHI", blob, offset)
        entries[(tag, ident)] = perm
    return entries
