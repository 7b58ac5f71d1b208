"""etc/vbrd.toml is the config people start from: a production template (nothing of it in a
world-writable place) that, with its places mapped to a lab's, backs up the lab."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.integration.backup_support import run_job
from vbrd.config import load_config

pytestmark = pytest.mark.lab

SHIPPED = Path(__file__).resolve().parents[2] / "etc" / "vbrd.toml"


def lab_paths(lab: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    """Where the production template keeps things -> where they are for this test's lab."""
    return {
        "/var/lib/vbrd/state": f"{tmp_path}/state",
        "/var/lib/vbrd/repo": f"{tmp_path}/repo",
        "/run/vbrd/vbrd.sock": f"{tmp_path}/vbrd.sock",
        "/etc/vbrd/api-token": f"{lab.dir}/api-token",
        "/etc/vbrd/secrets/": f"{lab.dir}/secrets/",
        "/mnt/datastores/": f"{lab.dir}/datastores/",
        "https://vcenter.example.com/sdk": lab["vcenter"]["url"],
        "verify_tls = true": "verify_tls = false",
        "backup@vsphere.local": lab["vcenter"]["user"],
        "127.0.0.1:8470": "127.0.0.1:0",
    }


def test_the_shipped_config_is_a_production_template_pointing_nowhere_under_tmp():
    text = SHIPPED.read_text()
    assert "/tmp" not in text
    assert 'state_dir = "/var/lib/vbrd/state"' in text
    assert 'api_socket = "/run/vbrd/vbrd.sock"' in text
    assert 'token_file = "/etc/vbrd/api-token"' in text
    assert re.findall(r'password_file = "([^"]+)"', text) and all(
        p.startswith("/etc/vbrd/") for p in re.findall(r'password_file = "([^"]+)"', text))


async def test_the_shipped_config_backs_up_the_lab(lab, tmp_path):
    """The template, with its places mapped to a lab's, runs the README's nightly job."""
    text = SHIPPED.read_text()
    for production, here in lab_paths(lab, tmp_path).items():
        assert production in text, production
        text = text.replace(production, here)
    config = tmp_path / "vbrd.toml"
    config.write_text(text)
    settings = load_config(config)
    assert settings.jobs["nightly"].schedule is not None

    status, events = await run_job(config, "nightly")

    assert status == "success", [e for e in events if e["type"] == "log"]
    assert {e["vm"] for e in events if e["type"] == "point.committed"} == {
        "linux-vm", "windows-vm", "two-disk-vm", "off-vm"}
