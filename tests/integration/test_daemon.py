"""The daemon as systemd runs it: signals, crashes, and what the next start cleans up."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.backup_support import job, lab_config, vbrd_snapshots
from vbrd.repository import Repository

pytestmark = pytest.mark.lab

OBSERVER = """
import json, os
from vbrd import hookimpl

@hookimpl
def vbrd_event(event):
    with open(os.environ["VBRD_TEST_EVENTS"], "a") as f:
        f.write(json.dumps(event.to_dict(), default=str) + "\\n")
"""


class Daemon:
    def __init__(self, config: Path, events: Path) -> None:
        self.config, self.events = config, events
        env = {**os.environ, "VBRD_TEST_EVENTS": str(events)}
        self.proc = subprocess.Popen([sys.executable, "-m", "vbrd.cli.vbrd", "run", "--config",
                                      str(config)], env=env, stderr=subprocess.PIPE, text=True)
        self.socket = config.parent / "vbrd.sock"
        deadline = time.monotonic() + 30
        while not self.vbrctl("jobs").returncode == 0:
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "the daemon did not answer within 30 s"
            time.sleep(0.2)

    def vbrctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vbrd.cli.vbrctl", "--socket",
                               str(self.socket), *args], capture_output=True, text=True,
                              timeout=120)

    def start(self, job_name: str) -> str:
        proc = self.vbrctl("--json", "start", job_name)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["session_id"]

    def seen(self) -> list[dict[str, Any]]:
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines()
                if line.strip()]

    def wait_for(self, kind: str, timeout: float = 60, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.seen():
                if e["type"] == kind and all(e.get(k) == v for k, v in match.items()):
                    return e
            time.sleep(0.05)
        raise AssertionError(f"no {kind} event within {timeout} s")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


@pytest.fixture
def daemon_setup(lab, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "observer.py").write_text(textwrap.dedent(OBSERVER))
    config = lab_config(lab, tmp_path, job("linux-only", ["linux-vm"], transport="san"),
                        plugin_dir=plugins)
    return config, tmp_path / "events.jsonl"


def test_sigterm_lets_a_running_session_clean_up_before_exit(daemon_setup):
    config, events = daemon_setup
    daemon = Daemon(config, events)
    try:
        session = daemon.start("linux-only")
        daemon.wait_for("snapshot.created", session_id=session)
        code = daemon.stop()
    finally:
        daemon.stop()
    assert code == 0
    seen = [e for e in daemon.seen() if e["session_id"] == session]
    kinds = [e["type"] for e in seen]
    assert "snapshot.removed" in kinds, kinds
    assert kinds[-1] == "session.finished"
    assert kinds.index("snapshot.removed") < kinds.index("session.finished")
    assert seen[-1]["status"] in ("stopped", "success")
    assert asyncio.run(vbrd_snapshots(config)) == []


@pytest.mark.parametrize("delay", [0.0, 0.6, 1.5])
def test_kill_9_mid_backup_leaves_a_consistent_repository_and_no_snapshot(daemon_setup,
                                                                          delay):
    config, events = daemon_setup
    daemon = Daemon(config, events)
    try:
        first = daemon.start("linux-only")
        daemon.wait_for("session.finished", session_id=first, timeout=120)
        second = daemon.start("linux-only")
        daemon.wait_for("snapshot.created", session_id=second)
        time.sleep(delay)
        daemon.proc.kill()
        daemon.proc.wait()
    finally:
        daemon.stop()
    repo = Repository.open(config.parent / "repo")
    points = repo.points("linux-vm")
    assert 1 <= len(points) <= 2, "no half point is listed"
    assert repo.verify() == []

    again = Daemon(config, events)
    try:
        deadline = time.monotonic() + 30
        while asyncio.run(vbrd_snapshots(config)) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert asyncio.run(vbrd_snapshots(config)) == [], "the hunter removes the leftover"
        third = again.start("linux-only")
        finished = again.wait_for("session.finished", session_id=third, timeout=120)
        assert finished["status"] == "success", finished
        sessions = json.loads(again.vbrctl("--json", "sessions").stdout)
    finally:
        assert again.stop() == 0
    # the killed session is not left "running": failed, or success if it had just finished
    (killed,) = [s for s in sessions if s["id"] == second]
    assert killed["status"] in ("failed", "success")
    assert len(Repository.open(config.parent / "repo").points("linux-vm")) == len(points) + 1
