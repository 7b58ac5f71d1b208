"""The vSphere lab for tests: one lab per test session, in its own directory.

``lab`` is a dict of the lab's lab.json (docs/architecture.md, section 6) with two attributes
more: ``path`` (of lab.json) and ``dir``; ``si`` is a pyvmomi connection to the lab's vCenter,
for tests that act on it as an administrator would. Tests that change the lab (snapshots,
tools, CBT) put it back as they found it. When the lab cannot start, tests that need it are
skipped with the reason, except in CI (``CI=true``), where a missing lab is a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


class LabInfo(dict[str, Any]):
    """lab.json's content, and where it is."""

    path: Path
    dir: Path


def _unavailable(reason: str) -> None:
    message = f"the vSphere lab cannot start: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def lab() -> Iterator[LabInfo]:
    try:
        from vbrd.lab import lab as lab_module
    except ImportError as e:
        _unavailable(f"vbrd.lab cannot be imported ({e})")
    # Not below pytest's basetemp: its 0700 directories would lock the guests' accounts out.
    lab_dir = Path(tempfile.mkdtemp(prefix="vbrd-lab-"))
    lab_dir.chmod(0o755)
    try:
        path = lab_module.up(lab_dir)
    except Exception as e:  # noqa: BLE001 - every cause is reported, by name
        shutil.rmtree(lab_dir, ignore_errors=True)
        _unavailable(f"{type(e).__name__}: {e}")
    info = LabInfo(json.loads(path.read_text()))
    info.path = path
    info.dir = lab_dir
    try:
        yield info
    finally:
        lab_module.down(lab_dir)


@pytest.fixture(scope="module")
def si(lab: LabInfo) -> Iterator[Any]:
    from urllib.parse import urlparse

    from pyVim.connect import Disconnect, SmartConnect

    url = urlparse(lab["vcenter"]["url"])
    service = SmartConnect(host=url.hostname, port=url.port, user=lab["vcenter"]["user"],
                           pwd=lab["vcenter"]["password"], protocol="http")
    yield service
    Disconnect(service)
