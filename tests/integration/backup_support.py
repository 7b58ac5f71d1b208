"""Helpers for tests that back up the lab's VMs through the real Manager."""
from __future__ import annotations

import hashlib
import re
import subprocess
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from vbrd.config import load_config
from vbrd.engine import Engine
from vbrd.repository import Repository
from vbrd.vsphere import SNAPSHOT_PREFIX, VSphere


def lab_config(lab: dict[str, Any], where: Path, extra: str = "", *,
               plugin_dir: Path | None = None) -> Path:
    """The lab's vbrd config with its own state and repository under ``where``, plus
    ``extra`` TOML (more jobs)."""
    text = Path(lab["vbrd_config"]).read_text()
    text = re.sub(r'(?m)^state_dir = ".*"$', f'state_dir = "{where / "state"}"', text)
    text = re.sub(r'(?m)^path = ".*/repo"$', f'path = "{where / "repo"}"', text)
    text = re.sub(r'(?m)^api_socket = ".*"$', f'api_socket = "{where / "vbrd.sock"}"', text)
    text = re.sub(r'(?m)^api_listen = ".*"$', 'api_listen = "127.0.0.1:0"', text)
    if plugin_dir is not None:
        text = text.replace("[daemon]\n", f'[daemon]\nplugin_dirs = ["{plugin_dir}"]\n', 1)
    path = where / "vbrd.toml"
    path.write_text(text + "\n" + textwrap.dedent(extra))
    return path


def job(name: str, vms: list[str], **settings: Any) -> str:
    lines = [f"[jobs.{name}]", 'vcenter = "lab"', 'repository = "default"',
             f"vms = {vms!r}".replace("'", '"')]
    for key, value in settings.items():
        lines.append(f"{key} = " + (f'"{value}"' if isinstance(value, str)
                                   else str(value).lower() if isinstance(value, bool)
                                   else str(value)))
    return "\n".join(lines) + "\n"


async def run_job(config: Path, name: str) -> tuple[str, list[dict[str, Any]]]:
    """Run one session of a job in-process; returns its status and its events."""
    engine = Engine(load_config(config))
    try:
        session = await engine.start_job(name, trigger="cli")
        status = await engine.wait_session(session)
        return status, engine.catalog.events(session)
    finally:
        engine.close()


def vm_entry(lab: dict[str, Any], name: str) -> dict[str, Any]:
    """One VM's entry of lab.json."""
    return next(v for v in lab["vms"] if v["name"] == name)


def restored_sha256(repo: Repository, point_id: str, key: int, where: Path) -> str:
    """SHA-256 of a disk restored from a point (the image is removed afterwards)."""
    out = where / f"restored-{point_id}-{key}.raw"
    repo.restore_disk(point_id, key, out)
    try:
        return file_sha256(out)
    finally:
        out.unlink()


def disk_content_sha256(descriptor: str | Path) -> str:
    """SHA-256 of a VMDK's guest-visible content, read by qemu-img (not by vbrd)."""
    with tempfile.TemporaryDirectory(prefix="vbrd-src-") as tmp:
        raw = Path(tmp) / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", str(descriptor),
                        str(raw)], check=True, capture_output=True)
        return file_sha256(raw)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


async def vbrd_snapshots(config: Path) -> list[str]:
    """Names of vbrd's snapshots that exist in the lab's vCenter right now."""
    vsphere = VSphere(load_config(config).vcenters["lab"])
    try:
        return [s.name for s in await vsphere.snapshots() if s.name.startswith(SNAPSHOT_PREFIX)]
    finally:
        await vsphere.close()


def events_of(events: list[dict[str, Any]], kind: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind
            and all(e.get(k) == v for k, v in match.items())]
