"""This installation's id: what vbrd writes on everything it leaves in vCenter.

Two vbrd installations may manage the same vCenter (a DR server, a test install). Each marks
its snapshots and the disks it hot-adds with its own id (docs/snapshots.md), so that one never
removes what the other is using. The id is random, made once, and kept in the daemon's state
directory as ``installation-id`` (32 lowercase hex digits and a newline, mode 0600).

A missing file is created on first start, atomically: a temporary file is written and
synced, then linked into place without replacing one that a concurrent start put there first.
A file that exists but does not hold an id is an error, never silently replaced: a new id
would orphan every snapshot and disk the old one still marks.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from pathlib import Path

from vbrd.errors import StateError

ID_FILE = "installation-id"
_ID = re.compile(r"[0-9a-f]{32}")
_MAX_FILE = 64  # an id and its newline, with room to say that a longer file is not one


def is_installation_id(text: str) -> bool:
    return _ID.fullmatch(text) is not None


def load_or_create(state_dir: Path) -> str:
    """The id kept in ``state_dir``; made (and kept) there when there is none yet."""
    path = state_dir / ID_FILE
    found = _read(path)
    if found is not None:
        return found
    state_dir.mkdir(parents=True, exist_ok=True)
    new = secrets.token_hex(16)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=f".{ID_FILE}-")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another start made one first: that one is the id
        else:
            _sync_directory(state_dir)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    found = _read(path)
    if found is None:
        raise StateError(f"{path} vanished while it was being created")
    return found


def _read(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"{path}: cannot be read ({e.strerror}); it holds this "
                         f"installation's id") from None
    with os.fdopen(fd, "rb") as f:
        raw = f.read(_MAX_FILE + 1)
    text = raw.decode("ascii", "replace")
    text = text[:-1] if text.endswith("\n") else text
    if len(raw) > _MAX_FILE or not is_installation_id(text):
        raise StateError(
            f"{path} does not hold an installation id (32 lowercase hex digits): it is "
            f"damaged. vbrd marks its snapshots and hot-added disks in vCenter with this id; "
            f"restore the file from a backup of the state directory, or, when no snapshot or "
            f"hot-added disk of this installation is left in vCenter, remove it and a new id "
            f"is made at the next start")
    return text


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["ID_FILE", "is_installation_id", "load_or_create"]
