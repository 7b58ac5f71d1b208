"""The session catalog under faults: it may be slow or failing, but it never takes a session,
the API or the daemon down with it, and it catches up once the fault is gone."""
from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import MINIMAL_CONFIG
from vbrd.catalog import Catalog
from vbrd.errors import CatalogUnavailable, StateError
from vbrd.events import SessionFinished, SessionLog, SessionStarted, TransferProgress
from vbrd.statedir import StateDirLock

MiB = 1 << 20


@contextmanager
def held_exclusively(path: Path) -> Iterator[None]:
    """Another program holding ``BEGIN EXCLUSIVE`` on the catalog (sqlite3's shell, a backup
    tool) until the block ends."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        time.sleep(0.02)


def progress(session: str, done: int, total: int = 100 * MiB) -> TransferProgress:
    return TransferProgress(session_id=session, vm="vm", disk=2000, bytes_read=done,
                            bytes_sent=done, bytes_done=done, bytes_total=total, rate=1.0)


def test_the_writer_survives_a_lock_held_past_its_busy_timeout(tmp_path):
    path = tmp_path / "catalog.sqlite"
    catalog = Catalog(path, busy_timeout=0.1, read_timeout=0.5)
    with held_exclusively(path):
        catalog.record(SessionStarted(session_id="s", job="nightly", trigger="api"))
        for i in range(20):
            catalog.record(SessionLog(session_id="s", level="info", message=f"line {i}"))
        wait_until(lambda: catalog.health().problem)
        health = catalog.health()
        assert "cannot write the session catalog" in health.problem
        assert str(path) in health.problem and "locked" in health.problem
        assert health.pending == 21 and not health.ok

        started = time.monotonic()
        with pytest.raises(CatalogUnavailable, match="21 event.s. not yet written"):
            catalog.session("s")
        assert time.monotonic() - started < 10, "a read waits a bounded time"

    catalog.record(SessionFinished(session_id="s", job="nightly", status="success"))
    wait_until(lambda: catalog.health().ok and catalog.health().pending == 0)
    events = catalog.events("s")
    assert [e["type"] for e in events] == ["session.started"] + ["log"] * 20 + [
        "session.finished"], "nothing was lost while the catalog was locked"
    record = catalog.session("s")
    assert record is not None and record.status == "success"
    catalog.close()


def test_a_full_buffer_drops_progress_first_and_says_how_much(tmp_path):
    path = tmp_path / "catalog.sqlite"
    catalog = Catalog(path, busy_timeout=0.05, max_pending=30, progress_interval=0)
    with held_exclusively(path):
        catalog.record(SessionStarted(session_id="s", job="nightly", trigger="api"))
        for i in range(40):
            catalog.record(progress("s", i * MiB))
            catalog.record(SessionLog(session_id="s", level="info", message=f"line {i}"))
        health = catalog.health()
        assert health.pending == 29 and health.dropped > 0  # 30 writes: one is the session row
    wait_until(lambda: catalog.health().pending == 0)
    kinds = [e["type"] for e in catalog.events("s")]
    assert kinds[0] == "session.started"
    # the progress events made room for log lines until none was left; then the newest
    # lines were dropped too (the session's own row is never dropped)
    assert kinds.count("log") == 28 and "transfer.progress" not in kinds
    assert catalog.health().dropped == 40 + 12
    catalog.close()


def test_progress_is_stored_once_per_interval_per_disk_and_at_the_end(tmp_path):
    now = [0.0]
    catalog = Catalog(tmp_path / "c.sqlite", progress_interval=10.0, clock=lambda: now[0])
    catalog.record(SessionStarted(session_id="s", job="j", trigger="api"))
    for second in range(60):
        now[0] = float(second)
        for _ in range(4):  # four a second, as the data path publishes them
            catalog.record(progress("s", second * MiB))
    catalog.record(progress("s", 100 * MiB))
    stored = [e["bytes_done"] // MiB for e in catalog.events("s")
              if e["type"] == "transfer.progress"]
    assert stored == [0, 10, 20, 30, 40, 50, 100]
    catalog.close()


def test_close_is_bounded_when_the_catalog_cannot_be_written(tmp_path, caplog):
    path = tmp_path / "catalog.sqlite"
    catalog = Catalog(path, busy_timeout=0.05, close_timeout=0.5)
    with held_exclusively(path):
        catalog.record(SessionLog(session_id="s", level="info", message="never written"))
        started = time.monotonic()
        catalog.close()
        assert time.monotonic() - started < 10
    assert "1 event(s) lost" in caplog.text


def test_a_damaged_catalog_is_a_state_error_naming_the_file(tmp_path):
    path = tmp_path / "catalog.sqlite"
    path.write_bytes(b"this is not an SQLite database, but a torn file" * 100)
    with pytest.raises(StateError, match=f"session catalog {path} is damaged.*move it aside"):
        Catalog(path)


def test_the_daemon_refuses_a_damaged_catalog_with_exit_code_3(write_config, tmp_path):
    config = write_config(MINIMAL_CONFIG)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "catalog.sqlite").write_bytes(b"\x00garbage" * 512)
    done = subprocess.run([sys.executable, "-m", "vbrd.cli.vbrd", "run", "--config",
                           str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert "catalog.sqlite is damaged" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_second_daemon_on_one_state_directory_is_refused(write_config, tmp_path):
    config = write_config(MINIMAL_CONFIG)
    first = subprocess.Popen([sys.executable, "-m", "vbrd.cli.vbrd", "run", "--config",
                              str(config)], stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (tmp_path / "vbrd.sock").exists(), timeout=60)
        second = subprocess.run([sys.executable, "-m", "vbrd.cli.vbrd", "run", "--config",
                                 str(config)], capture_output=True, text=True, timeout=60)
        assert second.returncode == 3
        assert f"another vbrd (pid {first.pid}" in second.stderr
        assert str(tmp_path / "state") in second.stderr
        assert first.poll() is None, "the first daemon runs on"
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0


def test_the_state_directory_lock_is_free_again_after_its_holder_exits(tmp_path):
    lock = StateDirLock.acquire(tmp_path)
    with pytest.raises(StateError, match=f"pid {os.getpid()}"):
        StateDirLock.acquire(tmp_path)
    lock.release()
    StateDirLock.acquire(tmp_path).release()


async def test_api_reads_of_a_locked_catalog_answer_503_and_the_loop_stays_free(
        write_config, tmp_path):
    from aiohttp.test_utils import TestClient, TestServer

    from vbrd.api.server import make_app
    from vbrd.config import load_config
    from vbrd.engine import Engine

    engine = Engine(load_config(write_config(MINIMAL_CONFIG)))
    engine.catalog.read_timeout = 0.5
    engine.catalog._db.execute("PRAGMA busy_timeout=50")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    client = TestClient(TestServer(make_app(engine, tmp_path / "api-token")),
                        headers={"Authorization": "Bearer t0ken-for-tests"})
    await client.start_server()
    beat = asyncio.create_task(ticker())
    try:
        with held_exclusively(engine.config.daemon.catalog_path):
            engine.catalog.record(SessionLog(session_id="s", level="info", message="x"))
            await asyncio.to_thread(wait_until, lambda: engine.catalog.health().problem)
            before = ticks
            for method, url in [("GET", "/api/v1/sessions"), ("GET", "/api/v1/jobs"),
                                ("POST", "/api/v1/sessions/no-such/stop"),
                                ("GET", "/api/v1/sessions/no-such")]:
                async with client.request(method, url) as response:
                    body = await response.json()
                    assert response.status == 503, (url, body)
                    assert "not yet written" in body["error"]["message"], body
            assert ticks - before >= 20, "the event loop ran on while the reads waited"
            async with client.get("/api/v1/health") as response:
                health = await response.json()
            assert health["status"] == "degraded"
            assert "locked" in health["problems"][0]
        await asyncio.to_thread(wait_until, lambda: engine.catalog.health().pending == 0)
        async with client.get("/api/v1/health") as response:
            assert (await response.json())["status"] == "ok"
    finally:
        beat.cancel()
        await client.close()
        engine.close()


needs_root = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                reason="mounting a size-limited tmpfs needs root")


@needs_root
def test_a_full_state_directory_is_reported_and_the_catalog_catches_up(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(state)], check=True)
    try:
        catalog = Catalog(state / "catalog.sqlite", read_timeout=1.0)
        catalog.record(SessionStarted(session_id="s", job="nightly", trigger="api"))
        filler = state / "filler"
        with filler.open("wb") as f, pytest.raises(OSError):
            while True:
                f.write(b"\xff" * 65536)
                f.flush()
        line = "x" * 4000
        for i in range(200):
            catalog.record(SessionLog(session_id="s", level="info", message=f"{i} {line}"))
        wait_until(lambda: "full" in catalog.health().problem)
        with pytest.raises(CatalogUnavailable, match="disk is full"):
            catalog.events("s")
        filler.unlink()
        wait_until(lambda: catalog.health().pending == 0)
        assert len(catalog.events("s")) == 201 and catalog.health().ok
        catalog.close()
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_the_writer_thread_outlives_an_unexpected_error(tmp_path, monkeypatch):
    catalog = Catalog(tmp_path / "c.sqlite", read_timeout=2.0)
    real = catalog._commit
    failures = iter([RuntimeError("an unexpected fault")])

    def flaky(batch):
        for failure in failures:
            raise failure
        real(batch)

    monkeypatch.setattr(catalog, "_commit", flaky)
    catalog.record(SessionLog(session_id="s", level="info", message="kept"))
    assert [e["message"] for e in catalog.events("s")] == ["kept"]
    assert catalog._writer.is_alive() and threading.active_count() >= 2
    catalog.close()
