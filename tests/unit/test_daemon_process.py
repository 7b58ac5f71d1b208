"""The daemon as a process: systemd notifications, SIGHUP reload, SIGTERM exit."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MINIMAL_CONFIG


def vbrctl(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vbrd.cli.vbrctl", "--socket", str(sock),
                           "--json", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    yield path, sock
    sock.close()


def test_notify_reload_and_stop(write_config, tmp_path, notify_socket):
    config = write_config(MINIMAL_CONFIG)
    path, sock = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": str(path)}
    proc = subprocess.Popen([sys.executable, "-m", "vbrd.cli.vbrd", "run", "--config",
                             str(config)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert b"READY=1" in sock.recv(4096)
        sock_path = tmp_path / "vbrd.sock"
        assert [j["name"] for j in json.loads(vbrctl(sock_path, "jobs").stdout)] == ["nightly"]

        config.write_text(config.read_text() + '\n[jobs.weekly]\nvcenter = "lab"\n'
                          'repository = "default"\nvms = ["windows-vm"]\n')
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            names = [j["name"] for j in json.loads(vbrctl(sock_path, "jobs").stdout)]
            if "weekly" in names:
                break
            time.sleep(0.2)
        assert names == ["nightly", "weekly"]

        config.write_text(config.read_text() + "\n[jobs.broken]\nvcenter = 3\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        names = [j["name"] for j in json.loads(vbrctl(sock_path, "jobs").stdout)]
        assert names == ["nightly", "weekly"], "a broken config is refused, the old one kept"

        proc.send_signal(signal.SIGTERM)
        assert b"STOPPING=1" in sock.recv(4096)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.stderr.read() if proc.stderr else ""
    assert "reload refused" in stderr and "jobs.broken.vcenter" in stderr
    assert "s3cret-vc-pass" not in stderr
    assert not (tmp_path / "vbrd.sock").exists()
