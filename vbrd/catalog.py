"""The catalog: sessions and their events in SQLite (the session log).

Writes happen on one writer thread fed by a queue, so recording an event costs the event loop
a queue put and the data path never waits for the disk. Readers flush first, so what was
published before a read is visible to it.
"""
from __future__ import annotations

import asyncio
import json
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vbrd.events import Event, SessionFinished, SessionStarted

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


class Catalog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="catalog-writer",
                                        daemon=True)
        self._writer.start()

    # writing ---------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        """Bus listener: queue the event for the writer thread."""
        body = json.dumps(event.to_dict(), default=str)
        if isinstance(event, SessionStarted):
            self._queue.put(lambda: self._db.execute(
                "INSERT OR REPLACE INTO sessions (id, job, trigger, started) VALUES (?,?,?,?)",
                (event.session_id, event.job, event.trigger, event.time)))
        self._queue.put(lambda: self._db.execute(
            "INSERT INTO events (session_id, type, body) VALUES (?,?,?)",
            (event.session_id, event.type, body)))
        if isinstance(event, SessionFinished):
            self._queue.put(lambda: self._db.execute(
                "UPDATE sessions SET status=?, reason=?, finished=? WHERE id=?",
                (event.status, event.reason, event.time, event.session_id)))

    def _write_loop(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                job()

    def flush_sync(self) -> None:
        done = threading.Event()
        self._queue.put(done.set)
        done.wait()

    async def flush(self) -> None:
        await asyncio.to_thread(self.flush_sync)

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join()
        self._db.close()

    def mark_interrupted(self) -> list[str]:
        """Sessions still 'running' from a daemon that died: mark them failed."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM sessions WHERE status='running'").fetchall()
            self._db.execute("UPDATE sessions SET status='failed', reason='the daemon stopped "
                             "before the session finished' WHERE status='running'")
        return [r[0] for r in rows]

    # reading ---------------------------------------------------------------------------

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        self.flush_sync()
        with self._lock:
            return self._db.execute(sql, args).fetchall()

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
