"""Shared fixtures. The lab's fixtures live in tests/lab_fixtures.py."""
from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

pytest_plugins = ["tests.lab_fixtures"]

IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    """Write a config file (with a vCenter password file beside it) and return its path."""

    def write(body: str, name: str = "vbrd.toml") -> Path:
        secrets = tmp_path / "secrets"
        secrets.mkdir(exist_ok=True)
        (secrets / "vcenter-password").write_text("s3cret-vc-pass\n")
        (tmp_path / "api-token").write_text("t0ken-for-tests\n")
        path = tmp_path / name
        path.write_text(textwrap.dedent(body))
        return path

    return write


MINIMAL_CONFIG = """
[daemon]
state_dir = "state"
api_listen = "127.0.0.1:0"
api_socket = "vbrd.sock"
token_file = "api-token"

[vcenters.lab]
url = "http://127.0.0.1:9/sdk"
user = "user"
password_file = "secrets/vcenter-password"

[proxies.local]
max_tasks = 2

[repositories.default]
path = "repo"

[jobs.nightly]
vcenter = "lab"
repository = "default"
vms = ["linux-vm"]
"""
