"""The code base stays lint-clean and typed, checked by the same tools CI runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_ruff_finds_nothing():
    proc = run("ruff", "check", "vbrd", "plugins", "tests", "bench")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_finds_nothing():
    proc = run("mypy", "vbrd", "plugins")
    assert proc.returncode == 0, proc.stdout + proc.stderr
