"""etc/vbrd.toml is the config people start from: it must run against the lab as shipped."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.integration.backup_support import run_job
from vbrd.config import load_config
from vbrd.lab import lab as labctl

pytestmark = pytest.mark.lab

SHIPPED = Path(__file__).resolve().parents[2] / "etc" / "vbrd.toml"


def test_the_shipped_config_names_the_default_lab():
    text = SHIPPED.read_text()
    assert f"127.0.0.1:{labctl.DEFAULT_VCENTER_PORT}/sdk" in text
    assert f'api_listen = "127.0.0.1:{labctl.DEFAULT_API_PORT}"' in text
    assert str(labctl.DEFAULT_DIR) in text


async def test_the_shipped_config_backs_up_the_lab(lab, tmp_path):
    text = SHIPPED.read_text().replace(str(labctl.DEFAULT_DIR), str(lab.dir))
    text = re.sub(r"http://127\.0\.0\.1:\d+/sdk", lab["vcenter"]["url"], text)
    text = text.replace(f"127.0.0.1:{labctl.DEFAULT_API_PORT}", "127.0.0.1:0")
    text = text.replace(f'"{lab.dir}/state"', f'"{tmp_path}/state"')
    text = text.replace(f'"{lab.dir}/repo"', f'"{tmp_path}/repo"')
    config = tmp_path / "vbrd.toml"
    config.write_text(text)
    settings = load_config(config)
    assert settings.jobs["lab-auto"].schedule is not None

    status, events = await run_job(config, "lab-auto")

    assert status == "success", [e for e in events if e["type"] == "log"]
    assert {e["vm"] for e in events if e["type"] == "point.committed"} == {
        "linux-vm", "windows-vm", "two-disk-vm", "off-vm"}
