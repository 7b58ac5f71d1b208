"""The catalog: sessions and their events in SQLite (the session log).

Writes happen on one writer thread, so recording an event costs the event loop an append to
an in-memory buffer and the data path never waits for the disk. Readers flush first, so what
was published before a read is visible to it.

The catalog is a record of what happened, not the backup itself (restore points live in the
repositories), so its failures must never take a session or the daemon down with them:

- The writer survives every SQLite error (a lock held by another program for longer than the
  busy timeout, a full disk, an I/O error): it keeps the events in a bounded buffer, retries
  with a growing pause, and reports the problem through :meth:`Catalog.health` until a write
  succeeds again. Nothing is lost while the buffer has room; past ``max_pending`` events,
  progress events are dropped first, and the count of dropped events is reported.
- Every wait on the writer is bounded: a read whose flush does not finish within
  ``read_timeout`` raises :class:`~vbrd.errors.CatalogUnavailable` (503 over the API), and
  :meth:`Catalog.close` gives the writer ``close_timeout`` to write what is pending.
- Progress events (``transfer.progress``, several a second per disk) are thinned: one per
  disk every ``progress_interval`` seconds and the last one are stored; live followers get
  every one from the bus.
- A catalog that cannot be opened (damaged, not a database, unreadable) is a
  :class:`~vbrd.errors.StateError` naming the file, which the daemon reports with its exit
  code instead of a traceback.
"""
from __future__ import annotations

import collections
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vbrd.errors import CatalogUnavailable, StateError
from vbrd.events import Event, SessionFinished, SessionStarted, TransferProgress

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    trigger TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'running',
    reason TEXT NOT NULL DEFAULT '',
    started TEXT NOT NULL,
    finished TEXT
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_session ON events (session_id, seq);
"""

BATCH = 2000  # writes per transaction: one fsync carries many events
RETRY_FIRST = 0.1  # seconds before the first retry of a failed write, doubled up to
RETRY_MAX = 5.0


@dataclass(frozen=True)
class SessionRecord:
    id: str
    job: str
    trigger: str
    status: str
    reason: str
    started: str
    finished: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CatalogHealth:
    """What the writer last saw: ``problem`` is empty while writes succeed."""

    problem: str
    pending: int
    dropped: int

    @property
    def ok(self) -> bool:
        return not self.problem and not self.dropped


@dataclass(frozen=True, slots=True)
class _Write:
    sql: str
    args: tuple[Any, ...]
    droppable: bool  # a progress event: the first to go when the buffer is full

    @property
    def is_event(self) -> bool:
        return self.sql.startswith("INSERT INTO events")


class Catalog:
    def __init__(self, path: Path, *, busy_timeout: float = 5.0, read_timeout: float = 10.0,
                 close_timeout: float = 10.0, max_pending: int = 100_000,
                 progress_interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.read_timeout = read_timeout
        self.close_timeout = close_timeout
        self.max_pending = max_pending
        self.progress_interval = progress_interval
        self._clock = clock
        self._db = _open(path, busy_timeout)
        self._reader = _open(path, busy_timeout, create=False)
        self._read_lock = threading.Lock()
        # the buffer and the writer's bookkeeping, under one condition
        self._changed = threading.Condition()
        self._pending: collections.deque[_Write] = collections.deque()
        self._queued = 0  # writes ever accepted into the buffer
        self._written = 0  # of those, committed (or dropped: nothing will write them)
        self._dropped = 0
        self._problem = ""
        self._closing = False
        self._last_progress: dict[tuple[str, str, str], float] = {}
        self._writer = threading.Thread(target=self._write_loop, name="catalog-writer",
                                        daemon=True)
        self._writer.start()

    # writing ---------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        """Bus listener: buffer the event for the writer thread (never blocks)."""
        if isinstance(event, TransferProgress) and not self._keep_progress(event):
            return
        body = json.dumps(event.to_dict(), default=str)
        writes = []
        if isinstance(event, SessionStarted):
            writes.append(_Write(
                "INSERT OR REPLACE INTO sessions (id, job, trigger, started) VALUES (?,?,?,?)",
                (event.session_id, event.job, event.trigger, event.time), False))
        writes.append(_Write("INSERT INTO events (session_id, type, body) VALUES (?,?,?)",
                             (event.session_id, event.type, body),
                             isinstance(event, TransferProgress)))
        if isinstance(event, SessionFinished):
            writes.append(_Write(
                "UPDATE sessions SET status=?, reason=?, finished=? WHERE id=?",
                (event.status, event.reason, event.time, event.session_id), False))
            self._forget_progress(event.session_id)
        with self._changed:
            for write in writes:
                self._append(write)
            self._changed.notify_all()

    def _keep_progress(self, event: TransferProgress) -> bool:
        key = (event.session_id, event.vm, str(event.disk))
        now = self._clock()
        last = self._last_progress.get(key)
        if (last is not None and now - last < self.progress_interval
                and event.bytes_done < event.bytes_total):
            return False
        self._last_progress[key] = now
        return True

    def _forget_progress(self, session_id: str) -> None:
        for key in [k for k in self._last_progress if k[0] == session_id]:
            del self._last_progress[key]

    def _append(self, write: _Write) -> None:
        """Buffer one write; the buffer holds at most ``max_pending``. Condition held."""
        if len(self._pending) >= self.max_pending:
            if write.droppable:
                self._dropped += 1
                return
            victim = next((w for w in self._pending if w.droppable), None)
            if victim is not None:
                self._pending.remove(victim)
            elif not write.sql.startswith(("INSERT OR REPLACE INTO sessions", "UPDATE")):
                # a full buffer of events that cannot be written: keep the session rows
                # (few, and what every listing shows) and count what is lost
                self._dropped += 1
                return
            else:
                victim = self._pending.popleft()
            self._dropped += 1
            self._written += 1  # the victim's place: it will never be written
        self._pending.append(write)
        self._queued += 1

    def _write_loop(self) -> None:
        pause = RETRY_FIRST
        while True:
            with self._changed:
                while not self._pending and not self._closing:
                    self._changed.wait()
                if not self._pending:
                    return
                batch = [self._pending[i] for i in range(min(BATCH, len(self._pending)))]
            try:
                self._commit(batch)
            except Exception as e:  # noqa: BLE001 - the writer must outlive every error
                with self._changed:
                    if not self._problem:
                        log.error("cannot write the session catalog %s: %s; keeping %d "
                                  "event(s) in memory and retrying", self.path, e,
                                  self._pending_events())
                    self._problem = f"cannot write the session catalog {self.path}: {e}"
                    self._changed.wait(pause)  # close() may cut the pause short
                pause = min(RETRY_MAX, pause * 2)
                continue
            pause = RETRY_FIRST
            with self._changed:
                for write in batch:
                    if self._pending and self._pending[0] is write:
                        self._pending.popleft()
                        self._written += 1
                if self._problem:
                    log.warning("the session catalog %s is written again", self.path)
                    self._problem = ""
                self._changed.notify_all()

    def _commit(self, batch: list[_Write]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for write in batch:
                db.execute(write.sql, write.args)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise

    def flush_sync(self, timeout: float | None = None) -> None:
        """Wait until everything recorded so far is written, at most ``timeout`` seconds
        (default ``read_timeout``); raises :class:`CatalogUnavailable` past it."""
        limit = self.read_timeout if timeout is None else timeout
        with self._changed:
            target = self._queued
            if not self._changed.wait_for(lambda: self._written >= target, timeout=limit):
                raise CatalogUnavailable(
                    f"the session catalog has {self._pending_events()} event(s) not yet written "
                    f"after {limit:.0f} s: {self._problem or 'its writer is slow'}")

    async def flush(self) -> None:
        import asyncio

        await asyncio.to_thread(self.flush_sync)

    def health(self) -> CatalogHealth:
        with self._changed:
            return CatalogHealth(self._problem, self._pending_events(), self._dropped)

    def _pending_events(self) -> int:
        return sum(1 for w in self._pending if w.is_event)

    def close(self) -> None:
        """Write what is pending (at most ``close_timeout`` seconds), then close.

        Events the writer could not write by then are lost and logged as such; the daemon
        must be able to exit even when its catalog's disk has failed."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._writer.join(self.close_timeout)
        if self._writer.is_alive():
            log.error("the session catalog %s could not be written before the daemon "
                      "stopped: %d event(s) lost (%s)", self.path, self._pending_events(),
                      self._problem or "its writer is slow")
            return  # the writer thread still uses the connection; it dies with the process
        self._db.close()
        with self._read_lock:
            self._reader.close()

    def mark_interrupted(self) -> list[str]:
        """Sessions still 'running' from a daemon that died: mark them failed."""
        try:
            with self._read_lock:
                rows = self._reader.execute(
                    "SELECT id FROM sessions WHERE status='running'").fetchall()
        except sqlite3.Error as e:
            raise StateError(f"cannot read the session catalog {self.path}: {e}") from None
        with self._changed:
            for (session_id,) in rows:
                self._append(_Write(
                    "UPDATE sessions SET status='failed', reason='the daemon stopped before "
                    "the session finished' WHERE id=? AND status='running'",
                    (session_id,), False))
            self._changed.notify_all()
        return [r[0] for r in rows]

    # reading ---------------------------------------------------------------------------

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        self.flush_sync()
        try:
            with self._read_lock:
                return self._reader.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise CatalogUnavailable(f"cannot read the session catalog {self.path}: "
                                     f"{e}") from None

    def sessions(self, job: str | None = None, limit: int = 100) -> list[SessionRecord]:
        sql = "SELECT id, job, trigger, status, reason, started, finished FROM sessions"
        args: tuple[Any, ...] = ()
        if job:
            sql += " WHERE job=?"
            args = (job,)
        rows = self._query(sql + " ORDER BY started DESC LIMIT ?", (*args, limit))
        return [SessionRecord(*r) for r in rows]

    def session(self, session_id: str) -> SessionRecord | None:
        rows = self._query("SELECT id, job, trigger, status, reason, started, finished "
                           "FROM sessions WHERE id=?", (session_id,))
        return SessionRecord(*rows[0]) if rows else None

    def events(self, session_id: str, after: int = 0) -> list[dict[str, Any]]:
        """The session's events in the order they were published, each with its ``seq``."""
        rows = self._query("SELECT seq, body FROM events WHERE session_id=? AND seq>? "
                           "ORDER BY seq", (session_id, after))
        return [{"seq": seq, **json.loads(body)} for seq, body in rows]


def _open(path: Path, busy_timeout: float, *, create: bool = True) -> sqlite3.Connection:
    """A connection to the catalog, its schema in place; a catalog that cannot be used is a
    :class:`StateError` that names the file."""
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=busy_timeout, check_same_thread=False,
                             isolation_level=None)
    except (OSError, sqlite3.Error) as e:
        raise StateError(f"cannot open the session catalog {path}: {e}") from None
    try:
        if create:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
        db.execute("SELECT count(*) FROM sessions WHERE 0").fetchall()
    except sqlite3.DatabaseError as e:
        db.close()
        if "locked" in str(e) or "busy" in str(e):
            raise StateError(f"the session catalog {path} is locked by another program "
                             f"({e}); close it and start again") from None
        raise StateError(f"the session catalog {path} is damaged ({e}); move it aside to "
                         f"start with an empty session history (the restore points, which "
                         f"live in the repositories, are not affected)") from None
    return db
