"""Helpers for tests that back up the lab's VMs through the real Manager."""
from __future__ import annotations

import hashlib
import re
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pyVmomi import vim, vmodl

from vbrd.config import load_config
from vbrd.engine import Engine
from vbrd.events import Event
from vbrd.installation import load_or_create
from vbrd.models import DatastoreFile
from vbrd.repository import Repository
from vbrd.vsphere import HOTADD_TAG_PREFIX, SNAPSHOT_PREFIX, VSphere

PROXY_VM = "vbrd-proxy"


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


async def run_job(config: Path, name: str, *, on_event: Callable[[Event], None] | None = None
                  ) -> tuple[str, list[dict[str, Any]]]:
    """Run one session of a job in-process; returns its status and its events.

    ``on_event`` sees every event as it is published, on the event loop, before the session
    goes on: a test acts there at an exact moment of the backup."""
    engine = Engine(load_config(config))
    if on_event is not None:
        engine.bus.subscribe(on_event)
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


def installation_id(config: Path) -> str:
    """The id of the installation whose state directory ``config`` names."""
    return load_or_create(load_config(config).daemon.state_dir)


# ---- the lab's vCenter through pyvmomi (the ``si`` fixture), as an administrator sees it ----


def find_vm(si: Any, name: str) -> Any:
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine],
                                                   True)
    try:
        return next(vm for vm in view.view if vm.name == name)
    finally:
        view.Destroy()


def wait(si: Any, task: Any) -> Any:
    """By property path (the simulator's snapshot tasks defeat pyVim's WaitForTask)."""
    collector = vmodl.query.PropertyCollector
    spec = collector.FilterSpec(
        objectSet=[collector.ObjectSpec(obj=task)],
        propSet=[collector.PropertySpec(type=vim.Task,
                                        pathSet=["info.state", "info.result", "info.error"])])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        props = {p.name: p.val for o in si.content.propertyCollector.RetrieveContents([spec])
                 for p in o.propSet}
        if props["info.state"] == "success":
            return props.get("info.result")
        if props["info.state"] == "error":
            raise RuntimeError(f"vCenter task failed: {props.get('info.error')}")
        time.sleep(0.05)
    raise AssertionError("vCenter task did not finish in 60 s")


def snapshot_tree(si: Any, vm: str) -> Iterator[Any]:
    """Every snapshot of a VM (``vim.vm.SnapshotTree`` nodes: name, description, snapshot)."""
    info = find_vm(si, vm).snapshot
    nodes = list(info.rootSnapshotList) if info is not None else []
    while nodes:
        node = nodes.pop(0)
        yield node
        nodes.extend(node.childSnapshotList or [])


def proxy_guest_disks(si: Any) -> list[str]:
    """The files of the disks on the proxy VM that are not its own, read through pyvmomi."""
    return [d.backing.fileName for d in find_vm(si, PROXY_VM).config.hardware.device
            if isinstance(d, vim.vm.device.VirtualDisk)
            and not DatastoreFile.parse(d.backing.fileName).path.startswith(f"{PROXY_VM}/")]


def proxy_hotadd_tags(si: Any) -> dict[str, str]:
    """The proxy VM's ``vbrd.hotadd.*`` extraConfig entries, read through pyvmomi."""
    return {o.key: o.value for o in find_vm(si, PROXY_VM).config.extraConfig or []
            if o.key.startswith(HOTADD_TAG_PREFIX)}


def events_of(events: list[dict[str, Any]], kind: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind
            and all(e.get(k) == v for k, v in match.items())]
