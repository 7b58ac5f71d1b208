"""The state directory's lock: one daemon per ``daemon.state_dir``.

Two daemons on one state directory would both write its catalog and both mark the other's
running sessions as interrupted. The first daemon takes an exclusive ``flock`` on
``vbrd.lock`` in the directory and writes its pid there; a second one finds the lock taken
and is refused with a :class:`~vbrd.errors.StateError` that names the file and the holder.
The kernel drops the lock when its holder exits, however it exits, so a daemon killed with
SIGKILL leaves nothing that blocks the next start (the stale pid in the file is overwritten).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from vbrd.errors import StateError

log = logging.getLogger(__name__)

LOCK_NAME = "vbrd.lock"
_HOLDER_MAX = 200  # the holder line is ours, but the file is on disk: read a bounded amount


class StateDirLock:
    """An exclusive lock on a state directory, held until :meth:`release`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> StateDirLock:
        path = state_dir / LOCK_NAME
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StateError(f"cannot use the state directory {state_dir}: cannot open its "
                             f"lock file {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise StateError(f"another vbrd ({holder}) holds the state directory {state_dir} "
                             f"(lock file {path}); stop it first, or give this daemon its own "
                             f"daemon.state_dir") from None
        except OSError as e:
            os.close(fd)
            raise StateError(f"cannot lock the state directory {state_dir} (lock file "
                             f"{path}): {e.strerror}") from None
        started = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}, started {started}\n".encode(), 0)
        except OSError as e:
            # the lock is what matters; the pid only helps the next one's message
            log.warning("state directory lock %s is held, but its holder line could not be "
                        "written: %s", path, e.strerror)
        return cls(path, fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the only descriptor drops the flock


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, _HOLDER_MAX, 0).decode(errors="replace")
    except OSError:
        text = ""
    line = text.splitlines()[0].strip() if text.strip() else ""
    return line or "its pid is not recorded"
