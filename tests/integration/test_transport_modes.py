"""Transport modes through the real Manager against the lab: hot-add, ``auto`` and fallback.

A hot-add backup attaches the snapshot's disks to the lab's proxy VM (``vbrd-proxy``), whose
guest the lab shows under its ``proxy-root`` (sys/bus/scsi, dev), reads them there, and
detaches them. The lab's ESXi refuses to consolidate a snapshot while its file is attached
to another VM, as ESXi does, so a detach that came too late fails the snapshot removal. Each
test reads the proxy VM's devices through pyvmomi afterwards and leaves the lab as it found
it: no disk on the proxy, no snapshot.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

from tests.integration.backup_support import (
    PROXY_VM,
    disk_content_sha256,
    events_of,
    find_vm,
    installation_id,
    job,
    lab_config,
    proxy_guest_disks,
    proxy_hotadd_tags,
    restored_sha256,
    run_job,
    vbrd_snapshots,
    vm_entry,
    wait,
)
from vbrd.config import load_config
from vbrd.engine import Engine
from vbrd.lab import lab as labctl
from vbrd.models import DatastoreFile
from vbrd.repository import Repository
from vbrd.vsphere import VSphere

pytestmark = pytest.mark.lab

MiB = 1 << 20
FAIL_AT = 32 * MiB

# A drop-in that stands in for the built-in hotadd (disabled in its config): the real mode,
# whose reads break once they reach FAIL_AT, as when the proxy loses the device mid-disk.
FLAKY_HOTADD = f"""
from plugins.transport_hotadd import vbrd_validate_plugin_config  # the table is still its own
from plugins.transport_hotadd.mode import HotaddMode
from vbrd import hookimpl
from vbrd.errors import TransportError


class Breaking:
    def __init__(self, reader):
        self.reader, self.size = reader, reader.size

    def extents(self):
        return self.reader.extents()

    async def read(self, offset, length):
        if offset + length > {FAIL_AT}:
            raise TransportError("the proxy lost the hot-added device")
        return await self.reader.read(offset, length)

    async def close(self):
        await self.reader.close()


class FlakyHotadd(HotaddMode):
    async def open(self, task, context):
        return Breaking(await super().open(task, context))


@hookimpl
def vbrd_transport_modes():
    return [FlakyHotadd()]
"""

# A drop-in that kills the daemon the moment a disk is hot-added: a crash mid-backup.
CRASH_AFTER_ATTACH = """
import os, signal
from vbrd import hookimpl

@hookimpl
def vbrd_event(event):
    if event.type == "hotadd.attached":
        os.kill(os.getpid(), signal.SIGKILL)
"""


# A third party's mode, dropped in: selected by its name alone (it reads as san does).
MIRROR_MODE = """
from plugins.transport_san.mode import SanMode
from vbrd import hookimpl


class Mirror(SanMode):
    name = "mirror"


@hookimpl
def vbrd_transport_modes():
    return [Mirror()]
"""


# ---- helpers --------------------------------------------------------------------------------


def current_file(si: Any, vm: str, key: int = 2000) -> str:
    return next(d.backing.fileName for d in find_vm(si, vm).config.hardware.device
                if isinstance(d, vim.vm.device.VirtualDisk) and d.key == key)


def local_path(lab: dict[str, Any], file: str) -> Path:
    where = DatastoreFile.parse(file)
    root = next(d["dir"] for d in lab["datastores"] if d["name"] == where.datastore)
    return Path(root) / where.path


def edited(config: Path, *, san_paths: bool = True, proxy_vm: bool = True,
           disabled: tuple[str, ...] = ()) -> Path:
    """The config without the proxy's path map and/or its VM, or with plugins disabled."""
    text = config.read_text()
    if not san_paths:
        text = re.sub(r"(?ms)^\[proxies\.local\.san_paths\]\n.*?\n\n", "", text)
    if not proxy_vm:
        text = re.sub(r'(?m)^vm = "vbrd-proxy"\n', "", text)
    if disabled:
        text = text.replace("[daemon]\n", f"[daemon]\ndisabled_plugins = {list(disabled)!r}\n"
                            .replace("'", '"'), 1)
    config.write_text(text)
    assert load_config(config)
    return config


async def restored_sha(where: Path, vm: str, key: int) -> str:
    """The newest point of ``vm`` restored, hashed."""
    repo = Repository.open(where / "repo")
    return restored_sha256(repo, repo.points(vm)[-1].point_id, key, where)


def modes_used(events: list[dict[str, Any]], vm: str) -> dict[int, str]:
    return {e["disk"]: e["mode"] for e in events_of(events, "transport.selected", vm=vm)}


def skipped(events: list[dict[str, Any]], vm: str) -> dict[str, str]:
    (selected,) = events_of(events, "transport.selected", vm=vm)
    return {mode: why for mode, why in selected["skipped"]}


def assert_attached_then_detached_before_the_snapshot_went(events: list[dict[str, Any]],
                                                           vm: str, keys: set[int]) -> None:
    kinds = [(e["type"], e.get("disk")) for e in events if e["vm"] == vm]
    for key in keys:
        attached = kinds.index(("hotadd.attached", key))
        detached = kinds.index(("hotadd.detached", key))
        assert attached < detached < kinds.index(("snapshot.removed", None)), kinds
    assert all(e["ok"] for e in events_of(events, "hotadd.detached", vm=vm))


@pytest.fixture
def flaky_hotadd(tmp_path: Path) -> Path:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "flaky_hotadd.py").write_text(textwrap.dedent(FLAKY_HOTADD))
    return plugins


# ---- the lab's hot-add ----------------------------------------------------------------------


async def test_the_lab_shows_a_hot_added_disk_in_the_proxy_and_locks_its_snapshot(
    lab: dict[str, Any], si: Any
) -> None:
    vm = find_vm(si, "off-vm")
    snap = wait(si, vm.CreateSnapshot_Task("hold", "hot-add test", False, False))
    config = load_config(lab["vbrd_config"])
    vsphere = VSphere(config.vcenters["lab"])
    root = Path(lab["proxy_root"])
    try:
        (pit,) = await vsphere.snapshot_disks(snap)
        proxy = await vsphere.proxy_vm(PROXY_VM)
        (attached,) = await vsphere.attach_disks(proxy, [(pit.backing, pit.capacity)])
        try:
            assert (attached.bus, attached.mode) == (0, "independent_nonpersistent")
            assert attached.unit not in (0, 7) and attached.uuid == pit.uuid
            device = root / "sys/bus/scsi/devices" / f"0:0:{attached.unit}:0"
            wwid = (device / "wwid").read_text().strip()
            assert wwid == "naa." + pit.uuid.replace("-", "").lower()
            (name,) = [p.name for p in (device / "block").iterdir()]
            assert (root / "dev" / name).resolve() == local_path(lab, str(pit.backing))
            with pytest.raises(RuntimeError, match="FileLocked"):
                wait(si, snap.RemoveSnapshot_Task(False))
        finally:
            await vsphere.detach_disks(proxy, [attached.key])
        assert not device.exists() and not (root / "dev" / name).exists()
        assert local_path(lab, str(pit.backing)).exists(), "a detach keeps the file"
    finally:
        wait(si, snap.RemoveSnapshot_Task(False))
        await vsphere.close()
    assert proxy_guest_disks(si) == []


# ---- hot-add backups ------------------------------------------------------------------------


async def test_hotadd_backs_up_flat_sparse_and_multi_disk_vms_bit_identically(
    lab: dict[str, Any], si: Any, tmp_path: Path
) -> None:
    vms = ["linux-vm", "windows-vm", "two-disk-vm"]
    sources = {(vm, d["key"]): disk_content_sha256(d["descriptor"])
               for vm in vms for d in vm_entry(lab, vm)["disks"]}
    assert {vm_entry(lab, vm)["disks"][0]["format"] for vm in vms} == {"flat", "sparse"}
    config = lab_config(lab, tmp_path, job("hot", vms, transport="hotadd"))

    status, events = await run_job(config, "hot")

    assert status == "success", events_of(events, "log")
    for (vm, key), sha in sources.items():
        assert modes_used(events, vm)[key] == "hotadd"
        assert await restored_sha(tmp_path, vm, key) == sha, (vm, key)
    for vm in vms:
        keys = {d["key"] for d in vm_entry(lab, vm)["disks"]}
        assert_attached_then_detached_before_the_snapshot_went(events, vm, keys)
    held: set[str] = set()  # units taken at each moment, in the order of events
    for e in events:
        unit = e.get("device", "").split(" ")[0]
        if e["type"] == "hotadd.attached":
            assert unit not in held and unit not in ("scsi0:0", "scsi0:7"), (unit, held)
            held.add(unit)
        elif e["type"] == "hotadd.detached":
            held.discard(unit)
    assert len(events_of(events, "hotadd.attached", vm="two-disk-vm")) == 2
    assert proxy_guest_disks(si) == []
    assert proxy_hotadd_tags(si) == {}, "each tag goes with its disk"
    assert await vbrd_snapshots(config) == []


@pytest.mark.parametrize("mode", ["hotadd", "san", "nbd"])
async def test_a_disk_with_a_user_snapshot_backs_up_as_its_chain_reads(
    lab: dict[str, Any], si: Any, tmp_path: Path, mode: str
) -> None:
    vm = find_vm(si, "linux-vm")
    user_snapshot = wait(si, vm.CreateSnapshot_Task("before-upgrade", "an admin's own",
                                                    False, False))
    try:
        delta = current_file(si, "linux-vm")
        assert re.search(r"-\d{6}\.vmdk$", delta), delta
        labctl.write(lab.dir, "linux-vm", fraction=0.03, seed=5150)
        expected = disk_content_sha256(local_path(lab, delta))
        config = lab_config(lab, tmp_path, job("chain", ["linux-vm"], transport=mode))

        status, events = await run_job(config, "chain")

        assert status == "success", events_of(events, "log")
        assert modes_used(events, "linux-vm") == {2000: mode}
        assert await restored_sha(tmp_path, "linux-vm", 2000) == expected
        if mode == "hotadd":
            (attached,) = events_of(events, "hotadd.attached", vm="linux-vm")
            assert attached["file"] == delta, "the proxy reads the user snapshot's delta"
    finally:
        wait(si, user_snapshot.RemoveSnapshot_Task(False))
    assert not re.search(r"-\d{6}\.vmdk$", current_file(si, "linux-vm"))
    assert proxy_guest_disks(si) == []
    assert await vbrd_snapshots(config) == []


# ---- auto -------------------------------------------------------------------------------------


async def test_auto_reads_through_san_when_the_proxy_maps_the_datastore(
    lab: dict[str, Any], si: Any, tmp_path: Path
) -> None:
    config = lab_config(lab, tmp_path, job("auto", ["off-vm"], transport="auto"))

    status, events = await run_job(config, "auto")

    assert status == "success"
    assert modes_used(events, "off-vm") == {2000: "san"}
    assert events_of(events, "hotadd.attached") == [], "no disk is attached that is not read"


async def test_auto_hot_adds_when_the_proxy_has_no_path_to_the_datastore(
    lab: dict[str, Any], si: Any, tmp_path: Path
) -> None:
    (d,) = vm_entry(lab, "off-vm")["disks"]
    config = edited(lab_config(lab, tmp_path, job("auto", ["off-vm"], transport="auto")),
                    san_paths=False)

    status, events = await run_job(config, "auto")

    assert status == "success"
    assert modes_used(events, "off-vm") == {2000: "hotadd"}
    assert "datastore nfs-ds is not mapped" in skipped(events, "off-vm")["san"]
    assert any(e["message"].startswith("VM off-vm, Hard disk 1: transport san not used")
               for e in events_of(events, "log"))
    assert_attached_then_detached_before_the_snapshot_went(events, "off-vm", {2000})
    assert await restored_sha(tmp_path, "off-vm", 2000) == disk_content_sha256(d["descriptor"])
    assert proxy_guest_disks(si) == []


async def test_auto_reads_over_the_network_when_the_proxy_is_no_vm_either(
    lab: dict[str, Any], si: Any, tmp_path: Path
) -> None:
    (d,) = vm_entry(lab, "off-vm")["disks"]
    config = edited(lab_config(lab, tmp_path, job("auto", ["off-vm"], transport="auto")),
                    san_paths=False, proxy_vm=False)

    status, events = await run_job(config, "auto")

    assert status == "success"
    assert modes_used(events, "off-vm") == {2000: "nbd"}
    reasons = skipped(events, "off-vm")
    assert "not mapped" in reasons["san"] and "proxy local is not a VM" in reasons["hotadd"]
    assert events_of(events, "hotadd.attached") == []
    assert await restored_sha(tmp_path, "off-vm", 2000) == disk_content_sha256(d["descriptor"])


async def test_a_mode_failing_mid_disk_hands_over_without_rereading_and_restores_identically(
    lab: dict[str, Any], si: Any, tmp_path: Path, flaky_hotadd: Path
) -> None:
    (d,) = vm_entry(lab, "linux-vm")["disks"]
    config = edited(lab_config(lab, tmp_path, job("auto", ["linux-vm"], transport="auto"),
                               plugin_dir=flaky_hotadd),
                    san_paths=False, disabled=("transport_hotadd",))

    status, events = await run_job(config, "auto")

    assert status == "success", events_of(events, "log")
    assert modes_used(events, "linux-vm") == {2000: "hotadd→nbd"}
    reasons = skipped(events, "linux-vm")
    assert "the proxy lost the hot-added device" in reasons["hotadd"]
    (transferred,) = events_of(events, "disk.transferred", vm="linux-vm")
    block = Repository.open(tmp_path / "repo").block_size
    assert transferred["bytes_read"] <= d["capacity"] + block, "nothing read twice"
    assert await restored_sha(tmp_path, "linux-vm", 2000) == disk_content_sha256(
        d["descriptor"])
    assert_attached_then_detached_before_the_snapshot_went(events, "linux-vm", {2000})
    assert proxy_guest_disks(si) == []


# ---- pinned modes, failure, stop, crash -------------------------------------------------------


@pytest.mark.parametrize("mode, reason", [
    ("hotadd", "proxy local is not a VM"),
    ("san", "datastore nfs-ds is not mapped on proxy local"),
])
async def test_a_pinned_mode_that_cannot_be_used_fails_with_its_probes_reason(
    lab: dict[str, Any], si: Any, tmp_path: Path, mode: str, reason: str
) -> None:
    config = edited(lab_config(lab, tmp_path, job("pinned", ["off-vm"], transport=mode)),
                    san_paths=False, proxy_vm=False)

    status, events = await run_job(config, "pinned")

    assert status == "failed"
    (finished,) = events_of(events, "vm.finished", vm="off-vm")
    assert f"transport mode {mode}: " in finished["reason"] and reason in finished["reason"]
    assert "nbd" not in finished["reason"], "a pinned mode has no fallback"
    assert await vbrd_snapshots(config) == []


async def test_hot_added_disks_are_detached_when_reading_fails(
    lab: dict[str, Any], si: Any, tmp_path: Path, flaky_hotadd: Path
) -> None:
    config = edited(lab_config(lab, tmp_path, job("pinned", ["linux-vm"], transport="hotadd"),
                               plugin_dir=flaky_hotadd),
                    disabled=("transport_hotadd",))

    status, events = await run_job(config, "pinned")

    assert status == "failed"
    (finished,) = events_of(events, "vm.finished", vm="linux-vm")
    assert "the proxy lost the hot-added device" in finished["reason"]
    assert_attached_then_detached_before_the_snapshot_went(events, "linux-vm", {2000})
    assert proxy_guest_disks(si) == []
    assert proxy_hotadd_tags(si) == {}
    assert await vbrd_snapshots(config) == []


async def test_hot_added_disks_are_detached_when_the_session_is_stopped(
    lab: dict[str, Any], si: Any, tmp_path: Path
) -> None:
    config = lab_config(lab, tmp_path, job("pinned", ["linux-vm"], transport="hotadd"))
    engine = Engine(load_config(config))
    try:
        session = await engine.start_job("pinned", trigger="cli")
        stop = engine.sessions[session].stop
        engine.bus.subscribe(lambda e: stop.set() if e.type == "hotadd.attached" else None)
        status = await engine.wait_session(session)
        events = engine.catalog.events(session)
    finally:
        engine.close()

    assert status == "stopped"
    assert_attached_then_detached_before_the_snapshot_went(events, "linux-vm", {2000})
    assert proxy_guest_disks(si) == []
    assert await vbrd_snapshots(config) == []


def test_disks_left_attached_by_a_killed_daemon_are_detached_at_the_next_start(
    lab: dict[str, Any], si: Any, tmp_path: Path
) -> None:
    crash = tmp_path / "crash"
    crash.mkdir()
    (crash / "crash_after_attach.py").write_text(textwrap.dedent(CRASH_AFTER_ATTACH))
    jobs = job("pinned", ["off-vm"], transport="hotadd")
    config = lab_config(lab, tmp_path, jobs, plugin_dir=crash)

    first = start_daemon(config)
    vbrctl(config, "start", "pinned")
    assert first.wait(timeout=60) == -signal.SIGKILL
    left = proxy_guest_disks(si)
    assert len(left) == 1 and left[0].startswith("[nfs-ds] off-vm/")
    (tag,) = proxy_hotadd_tags(si).values()
    assert tag.startswith(f"installation={installation_id(config)}; session=") \
        and tag.endswith(f"; file={left[0]}"), "the leftover carries this installation's tag"
    assert len(asyncio.run(vbrd_snapshots(config))) == 1

    config = lab_config(lab, tmp_path, jobs)  # the same daemon, without the crash
    again = start_daemon(config)
    try:
        deadline = time.monotonic() + 60
        while (proxy_guest_disks(si) or asyncio.run(vbrd_snapshots(config))) \
                and time.monotonic() < deadline:
            time.sleep(0.3)
        assert proxy_guest_disks(si) == [], "the leftover disk is detached"
        assert proxy_hotadd_tags(si) == {}
        assert asyncio.run(vbrd_snapshots(config)) == [], "so the hunter can remove the snapshot"
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=120) == 0


def start_daemon(config: Path) -> subprocess.Popen[str]:
    # its temporary directories stay with the test: a killed daemon cannot remove them
    proc = subprocess.Popen([sys.executable, "-m", "vbrd.cli.vbrd", "run", "--config",
                             str(config)], stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "TMPDIR": str(config.parent)})
    deadline = time.monotonic() + 30
    while vbrctl(config, "jobs", check=False).returncode != 0:
        assert proc.poll() is None, "the daemon exited at start"
        assert time.monotonic() < deadline, "the daemon did not answer within 30 s"
        time.sleep(0.2)
    return proc


def vbrctl(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "vbrd.cli.vbrctl", "--socket",
                           str(config.parent / "vbrd.sock"), "--json", *args],
                          capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr
        json.loads(done.stdout)
    return done


# ---- modes from plugins -------------------------------------------------------------------


async def test_a_dropin_mode_named_by_a_job_backs_up_and_restores_bit_identically(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "mirror.py").write_text(textwrap.dedent(MIRROR_MODE))
    config = lab_config(lab, tmp_path, job("mirrored", ["off-vm"], transport="mirror"),
                        plugin_dir=plugins)

    status, events = await run_job(config, "mirrored")

    assert status == "success", events_of(events, "vm.finished")
    assert modes_used(events, "off-vm") == {2000: "mirror"}
    d = vm_entry(lab, "off-vm")["disks"][0]
    assert await restored_sha(tmp_path, "off-vm", 2000) == disk_content_sha256(d["descriptor"])


def test_a_misspelt_mode_is_refused_at_start_naming_the_loaded_modes(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    config = lab_config(lab, tmp_path, job("typo", ["off-vm"], transport="hotad"))
    done = subprocess.run([sys.executable, "-m", "vbrd.cli.vbrd", "run", "--config",
                           str(config)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "jobs.typo.transport: no loaded plugin provides the transport mode 'hotad'" \
        in done.stderr
    for mode, plugin in [("hotadd", "transport_hotadd"), ("nbd", "transport_nbd"),
                         ("san", "transport_san")]:
        assert f"{mode} (plugin {plugin})" in done.stderr
