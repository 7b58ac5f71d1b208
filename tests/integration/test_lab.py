"""The lab's simulated vCenter, as vbrd will meet it through pyvmomi.

What is checked is what vSphere would do: the inventory and guest identity vCenter reports,
snapshots that freeze the disks' files and consolidate on removal, datastore HTTP access with
ranges, changed block tracking that answers from the disks' real allocation and from what the
lab's disk writer changed, and the Guest Operations API. The last test starts and stops a lab
of its own and checks that nothing is left behind.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlparse

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from vbrd.lab import disks
from vbrd.lab import lab as labctl
from vbrd.models import Extent

pytestmark = pytest.mark.lab

MiB = 1 << 20


# ---- helpers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def si(lab: dict[str, Any]) -> Iterator[vim.ServiceInstance]:
    url = urlparse(lab["vcenter"]["url"])
    service = SmartConnect(host=url.hostname, port=url.port, user=lab["vcenter"]["user"],
                           pwd=lab["vcenter"]["password"], protocol="http")
    yield service
    Disconnect(service)


def objects(si: vim.ServiceInstance, kind: type) -> dict[str, Any]:
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
    try:
        return {o.name: o for o in view.view}
    finally:
        view.Destroy()


def vm_entry(lab: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in lab["vms"] if v["name"] == name)


def wait(si: vim.ServiceInstance, task: vim.Task) -> Any:
    """A task's result, read by property path (pyVim's WaitForTask rejects some results)."""
    pc = si.RetrieveContent().propertyCollector
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=task)],
        propSet=[vmodl.query.PropertyCollector.PropertySpec(
            type=vim.Task, pathSet=["info.state", "info.result", "info.error"])])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        props = {p.name: p.val for p in pc.RetrieveContents([spec])[0].propSet}
        if props["info.state"] == "success":
            return props.get("info.result")
        if props["info.state"] == "error":
            raise AssertionError(f"task failed: {props['info.error']}")
        time.sleep(0.05)
    raise AssertionError("task did not finish within 60 s")


def disk(devices: list[Any], key: int = 2000) -> vim.vm.device.VirtualDisk:
    return next(d for d in devices if isinstance(d, vim.vm.device.VirtualDisk) and d.key == key)


def snapshot(si: vim.ServiceInstance, vm: vim.VirtualMachine, name: str) -> vim.vm.Snapshot:
    return wait(si, vm.CreateSnapshot_Task(name=name, description="vbrd test",
                                           memory=False, quiesce=False))


def remove(si: vim.ServiceInstance, snap: vim.vm.Snapshot) -> None:
    wait(si, snap.RemoveSnapshot_Task(removeChildren=False))


def query_all(vm: vim.VirtualMachine, snap: vim.vm.Snapshot | None, change_id: str,
              key: int = 2000) -> tuple[list[Extent], int]:
    """Every area QueryChangedDiskAreas reports, looping over startOffset; and the call count."""
    capacity = disk(vm.config.hardware.device, key).capacityInBytes
    offset, calls, areas = 0, 0, []
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=offset,
                                        changeId=change_id)
        calls += 1
        assert info.startOffset == offset
        assert info.length > 0
        found = [Extent(a.start, a.length) for a in info.changedArea or []]
        assert all(offset <= a.offset and a.end <= offset + info.length for a in found), \
            "areas stay inside the span the call reports"
        areas += found
        offset = info.startOffset + info.length
    return areas, calls


def merged(extents: list[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for e in sorted(extents, key=lambda e: e.offset):
        if out and e.offset <= out[-1].end:
            last = out.pop()
            out.append(Extent(last.offset, max(last.end, e.end) - last.offset))
        else:
            out.append(e)
    return out


def data_areas(path: Path) -> list[Extent]:
    """Where a file really holds data, by SEEK_DATA/SEEK_HOLE."""
    areas = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, offset = os.fstat(fd).st_size, 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            areas.append(Extent(start, end - start))
            offset = end
    finally:
        os.close(fd)
    return areas


def read_at(path: Path, extent: Extent) -> bytes:
    with open(path, "rb") as f:
        f.seek(extent.offset)
        return f.read(extent.length)


def raw_image(descriptor: Path, out: Path) -> Path:
    """The disk content a VMDK (and its backing chain) shows, as a raw file."""
    subprocess.run(["qemu-img", "convert", "-U", "-f", "vmdk", "-O", "raw", str(descriptor),
                    str(out)], check=True)
    return out


def guest_auth(lab: dict[str, Any], name: str) -> vim.vm.guest.NamePasswordAuthentication:
    vix = vm_entry(lab, name)["vix"]
    return vim.vm.guest.NamePasswordAuthentication(
        username=vix["user"], password=Path(vix["password_file"]).read_text().strip())


def run_in_guest(si: vim.ServiceInstance, vm: vim.VirtualMachine, auth: Any, program: str,
                 arguments: str) -> int:
    pm = si.RetrieveContent().guestOperationsManager.processManager
    spec = vim.vm.guest.ProcessManager.ProgramSpec(programPath=program, arguments=arguments)
    pid = pm.StartProgramInGuest(vm, auth, spec)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (proc,) = pm.ListProcessesInGuest(vm, auth, [pid])
        if proc.endTime is not None:
            return int(proc.exitCode)
        time.sleep(0.05)
    raise AssertionError(f"guest program {program} still runs after 30 s")


def fetch_from_guest(si: vim.ServiceInstance, vm: vim.VirtualMachine, auth: Any,
                     path: str) -> bytes:
    fm = si.RetrieveContent().guestOperationsManager.fileManager
    info = fm.InitiateFileTransferFromGuest(vm, auth, path)
    with urllib.request.urlopen(info.url, timeout=10) as response:
        data: bytes = response.read()
    assert len(data) == info.size
    return data


def upload_to_guest(si: vim.ServiceInstance, vm: vim.VirtualMachine, auth: Any, path: str,
                    data: bytes) -> None:
    fm = si.RetrieveContent().guestOperationsManager.fileManager
    url = fm.InitiateFileTransferToGuest(vm, auth, path, vim.vm.guest.FileManager.FileAttributes(),
                                         len(data), True)
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method="PUT"), timeout=10):
        pass


# ---- inventory ------------------------------------------------------------------------------


def test_inventory_has_the_contracted_hosts_datastores_and_vms(lab: dict[str, Any], si: Any):
    hosts = objects(si, vim.HostSystem)
    assert len(hosts) == 2
    assert {h.parent.name for h in hosts.values()} == {lab["vcenter"]["cluster"]}

    datastores = objects(si, vim.Datastore)
    assert set(datastores) == {"san-ds", "nfs-ds"}
    assert datastores["san-ds"].summary.type == "VMFS"
    assert datastores["nfs-ds"].summary.type == "NFS"
    for ds in lab["datastores"]:
        assert Path(ds["dir"]).is_dir()
        assert len(datastores[ds["name"]].host) == 2, "both hosts mount every datastore"

    vms = objects(si, vim.VirtualMachine)
    assert set(vms) == {"linux-vm", "windows-vm", "two-disk-vm", "off-vm", "vbrd-proxy"}
    for entry in lab["vms"]:
        vm = vms[entry["name"]]
        assert vm._moId == entry["moref"]
        assert vm.runtime.powerState == entry["power_state"]
        for d in entry["disks"]:
            device = disk(vm.config.hardware.device, d["key"])
            assert device.backing.fileName == d["file"]
            assert device.capacityInBytes == d["capacity"]
            assert Path(d["descriptor"]).exists()
            assert all(Path(e).exists() for e in d["extents"])


def test_vms_report_guest_identity_as_vmware_tools_would(lab: dict[str, Any], si: Any):
    vms = objects(si, vim.VirtualMachine)
    linux, windows = vms["linux-vm"], vms["windows-vm"]
    linux_entry, windows_entry = vm_entry(lab, "linux-vm"), vm_entry(lab, "windows-vm")

    assert linux.guest.guestId == "debian11_64Guest"
    assert linux.guest.guestFamily == "linuxGuest"
    assert linux.guest.toolsRunningStatus == "guestToolsRunning"
    assert windows.guest.guestId == "windows2019srv_64Guest"
    assert windows.guest.guestFamily == "windowsGuest"
    assert windows.summary.guest.toolsRunningStatus == "guestToolsRunning"
    if linux_entry["guest"] is not None:
        assert linux.guest.ipAddress == linux_entry["guest"]["host"]
        assert linux.guest.net[0].ipAddress == [linux_entry["guest"]["host"]]
    if windows_entry["guest"] is not None:
        assert windows.guest.ipAddress == windows_entry["guest"]["host"]

    off = vms["off-vm"]
    assert off.runtime.powerState == "poweredOff"
    assert off.guest.toolsRunningStatus == "guestToolsNotRunning"
    assert not off.guest.ipAddress


def test_two_disk_vm_has_a_disk_on_each_datastore_and_windows_vm_a_sparse_disk(
        lab: dict[str, Any]):
    two = vm_entry(lab, "two-disk-vm")
    assert {d["datastore"] for d in two["disks"]} == {"san-ds", "nfs-ds"}
    windows_disk = vm_entry(lab, "windows-vm")["disks"][0]
    assert windows_disk["format"] == "sparse"
    assert disks.is_sparse(Path(windows_disk["descriptor"]))
    assert vm_entry(lab, "linux-vm")["disks"][0]["format"] == "flat"


def test_lab_config_is_a_valid_vbrd_config_with_the_lab_jobs(lab: dict[str, Any]):
    config_module = pytest.importorskip("vbrd.config")
    config = config_module.load_config(Path(lab["vbrd_config"]))
    assert {"lab-san", "lab-hotadd", "lab-nbd", "lab-auto", "lab-guest"} <= set(config.jobs)
    assert Path(lab["token_file"]).read_text().strip()
    assert lab["api_url"].startswith("http://127.0.0.1:")
    assert Path(lab["api_socket"]).parent == Path(lab["dir"])


# ---- snapshots ------------------------------------------------------------------------------


def test_snapshot_freezes_the_disk_in_a_delta_and_removal_consolidates(
        lab: dict[str, Any], si: Any):
    vm = objects(si, vim.VirtualMachine)["linux-vm"]
    entry = vm_entry(lab, "linux-vm")
    base = entry["disks"][0]
    extent_file = Path(base["extents"][0])

    snap = snapshot(si, vm, "vbrd-test-delta")
    try:
        current = disk(vm.config.hardware.device).backing
        frozen = disk(snap.config.hardware.device).backing
        assert frozen.fileName == base["file"], "the snapshot keeps the point-in-time disk"
        assert current.fileName != base["file"]
        assert current.parent.fileName == base["file"]
        delta = Path(base["descriptor"]).parent / current.fileName.split("/")[-1]
        assert delta.exists() and disks.is_sparse(delta)

        before = extent_file.read_bytes()
        written = labctl.write(lab["dir"], "linux-vm", fraction=0.01, seed=101)
        assert extent_file.read_bytes() == before, "writes after a snapshot go to the delta"
    finally:
        remove(si, snap)

    assert not delta.exists()
    assert disk(vm.config.hardware.device).backing.fileName == base["file"]
    assert disk(vm.config.hardware.device).backing.parent is None
    for e, data in zip(written, disks.extent_data(written, 101), strict=True):
        assert read_at(extent_file, e) == data, "a write made after the snapshot survives removal"


def test_removing_a_backup_snapshot_above_a_user_snapshot_commits_only_its_delta(
        lab: dict[str, Any], si: Any, tmp_path: Path):
    vm = objects(si, vim.VirtualMachine)["windows-vm"]
    base = vm_entry(lab, "windows-vm")["disks"][0]
    folder = Path(base["descriptor"]).parent
    base_before = raw_image(Path(base["descriptor"]), tmp_path / "base-before.raw").read_bytes()

    user = snapshot(si, vm, "user snapshot")
    try:
        delta1 = folder / disk(vm.config.hardware.device).backing.fileName.split("/")[-1]
        labctl.write(lab["dir"], "windows-vm", fraction=0.01, seed=201)
        backup = snapshot(si, vm, "vbrd backup")
        frozen = disk(backup.config.hardware.device).backing
        assert (frozen.fileName, frozen.parent.fileName) == (
            f"[san-ds] windows-vm/{delta1.name}", base["file"])
        delta2 = folder / disk(vm.config.hardware.device).backing.fileName.split("/")[-1]
        second = labctl.write(lab["dir"], "windows-vm", fraction=0.01, seed=202)
        remove(si, backup)

        backing = disk(vm.config.hardware.device).backing
        assert backing.fileName.endswith(delta1.name)
        assert backing.parent.fileName == base["file"]
        assert delta1.exists() and not delta2.exists()
        assert raw_image(Path(base["descriptor"]), tmp_path / "base.raw").read_bytes() == \
            base_before, "the base disk stays frozen while the user snapshot exists"
        chain = raw_image(delta1, tmp_path / "chain.raw")
        for e, data in zip(second, disks.extent_data(second, 202), strict=True):
            assert read_at(chain, e) == data, "the backup's delta was committed into delta1"
    finally:
        remove(si, user)
    assert disk(vm.config.hardware.device).backing.fileName == base["file"]
    assert not delta1.exists()
    assert raw_image(Path(base["descriptor"]), tmp_path / "after.raw").read_bytes() == \
        chain.read_bytes()


# ---- datastore access ----------------------------------------------------------------------


@pytest.mark.parametrize("vm_name", ["linux-vm", "off-vm"])
def test_datastore_file_read_by_http_range_equals_the_file(lab: dict[str, Any], vm_name: str):
    d = vm_entry(lab, vm_name)["disks"][0]
    extent = Path(d["extents"][0])
    folder_path = extent.relative_to(next(
        ds["dir"] for ds in lab["datastores"] if ds["name"] == d["datastore"])).as_posix()
    base = lab["vcenter"]["url"].removesuffix("/sdk")
    url = f"{base}/folder/{folder_path}?" + urlencode({"dcPath": "DC0", "dsName": d["datastore"]})
    start, length = 3 * MiB + 4096, 2 * MiB + 123
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-{start + length - 1}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 206
        body = response.read()
    assert body == read_at(extent, Extent(start, length))


# ---- changed block tracking -----------------------------------------------------------------


def test_query_changed_disk_areas_star_reports_the_allocated_areas_in_slices(
        lab: dict[str, Any], si: Any):
    vm = objects(si, vim.VirtualMachine)["linux-vm"]
    extent_file = Path(vm_entry(lab, "linux-vm")["disks"][0]["extents"][0])
    snap = snapshot(si, vm, "vbrd-test-star")
    try:
        areas, calls = query_all(vm, snap, "*")
    finally:
        remove(si, snap)
    assert calls > 1, "one call covers only a slice of the disk"
    assert merged(areas) == merged(data_areas(extent_file))


def test_changed_areas_since_the_previous_snapshot_are_exactly_what_the_guest_wrote(
        lab: dict[str, Any], si: Any, tmp_path: Path):
    vm = objects(si, vim.VirtualMachine)["linux-vm"]
    extent_file = Path(vm_entry(lab, "linux-vm")["disks"][0]["extents"][0])

    first = snapshot(si, vm, "vbrd-test-full")
    previous = disk(first.config.hardware.device).backing.changeId
    before = tmp_path / "before.raw"
    subprocess.run(["cp", "--sparse=always", str(extent_file), str(before)], check=True)
    remove(si, first)

    written = labctl.write(lab["dir"], "linux-vm", fraction=0.02, seed=301)
    second = snapshot(si, vm, "vbrd-test-incremental")
    try:
        changed, _ = query_all(vm, second, previous)
    finally:
        remove(si, second)

    assert merged(changed) == merged(written)
    total = sum(e.length for e in written)
    capacity = vm_entry(lab, "linux-vm")["disks"][0]["capacity"]
    assert abs(total - 0.02 * capacity) <= 4096
    with open(before, "rb") as old, open(extent_file, "rb") as new:
        position = 0
        for e in [*merged(changed), Extent(capacity, 0)]:
            while position < e.offset:
                n = min(8 * MiB, e.offset - position)
                assert old.read(n) == new.read(n), f"bytes at {position} changed unreported"
                position += n
            if e.length:
                assert old.read(e.length) != new.read(e.length), f"{e} reported, not changed"
                position = e.end


def test_unknown_change_id_is_a_file_fault(lab: dict[str, Any], si: Any):
    vm = objects(si, vim.VirtualMachine)["linux-vm"]
    snap = snapshot(si, vm, "vbrd-test-unknown")
    try:
        with pytest.raises(vim.fault.FileFault) as caught:
            vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=2000, startOffset=0,
                                     changeId=f"{uuid.uuid4()}/1")
        assert "changeId" in caught.value.msg
        current = disk(snap.config.hardware.device).backing.changeId
        epoch, seq = current.rsplit("/", 1)
        with pytest.raises(vim.fault.FileFault):
            vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=2000, startOffset=0,
                                     changeId=f"{epoch}/{int(seq) + 5}")
    finally:
        remove(si, snap)


def test_switching_cbt_off_and_on_makes_old_change_ids_stale(lab: dict[str, Any], si: Any):
    vm = objects(si, vim.VirtualMachine)["off-vm"]
    old = disk(vm.config.hardware.device).backing.changeId
    try:
        wait(si, vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=False)))
        assert vm.config.changeTrackingEnabled is False
        assert not disk(vm.config.hardware.device).backing.changeId
        with pytest.raises(vim.fault.FileFault) as caught:
            vm.QueryChangedDiskAreas(deviceKey=2000, startOffset=0, changeId="*")
        assert "not enabled" in caught.value.msg
    finally:
        wait(si, vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    assert vm.config.changeTrackingEnabled is True
    new = disk(vm.config.hardware.device).backing.changeId
    assert new and new.split("/")[0] != old.split("/")[0]
    with pytest.raises(vim.fault.FileFault) as caught:
        vm.QueryChangedDiskAreas(deviceKey=2000, startOffset=0, changeId=old)
    assert "stale" in caught.value.msg
    areas, _ = query_all(vm, None, new)
    assert areas == []


# ---- guest operations -----------------------------------------------------------------------


def test_start_program_in_linux_guest_and_fetch_its_output(lab: dict[str, Any], si: Any):
    vm = objects(si, vim.VirtualMachine)["linux-vm"]
    auth = guest_auth(lab, "linux-vm")
    fm = si.RetrieveContent().guestOperationsManager.fileManager
    folder = fm.CreateTemporaryDirectoryInGuest(vm, auth, "vbrd-", "", None)
    upload_to_guest(si, vm, auth, f"{folder}/probe.sh",
                    b'#!/bin/sh\necho "probe $1 uid=$(id -u)"\nexit 3\n')
    code = run_in_guest(si, vm, auth, "/bin/sh", f"{folder}/probe.sh ok > {folder}/out.txt 2>&1")
    assert code == 3
    output = fetch_from_guest(si, vm, auth, f"{folder}/out.txt").decode()
    assert output.startswith("probe ok uid=")
    assert output.strip() != "probe ok uid=0", "guest operations never elevate"
    fm.DeleteDirectoryInGuest(vm, auth, folder, True)


def test_start_program_in_windows_guest_runs_the_lab_stand_in(lab: dict[str, Any], si: Any):
    vm = objects(si, vim.VirtualMachine)["windows-vm"]
    auth = guest_auth(lab, "windows-vm")
    fm = si.RetrieveContent().guestOperationsManager.fileManager
    folder = fm.CreateTemporaryDirectoryInGuest(vm, auth, "vbrd-", "", None)
    assert folder.startswith("C:\\")
    upload_to_guest(si, vm, auth, f"{folder}\\probe.ps1",
                    b'Write-Output "ignored by the lab"\r\n#lab: echo "probe $1"\r\n')
    code = run_in_guest(si, vm, auth, r"C:\Windows\System32\cmd.exe",
                        f'/c powershell.exe -NoProfile -ExecutionPolicy Bypass -File '
                        f'"{folder}\\probe.ps1" win > "{folder}\\out.txt" 2>&1')
    assert code == 0
    assert fetch_from_guest(si, vm, auth, f"{folder}\\out.txt") == b"probe win\n"


def test_guest_operations_check_credentials_and_tools(lab: dict[str, Any], si: Any):
    vms = objects(si, vim.VirtualMachine)
    auth = guest_auth(lab, "linux-vm")
    with pytest.raises(vim.fault.InvalidGuestLogin):
        run_in_guest(si, vms["linux-vm"],
                     vim.vm.guest.NamePasswordAuthentication(username="vbrdguest",
                                                             password="wrong"), "/bin/true", "")
    labctl.set_tools_running(lab["dir"], "linux-vm", False)
    try:
        assert vms["linux-vm"].guest.toolsRunningStatus == "guestToolsNotRunning"
        with pytest.raises(vim.fault.GuestOperationsUnavailable):
            run_in_guest(si, vms["linux-vm"], auth, "/bin/true", "")
    finally:
        labctl.set_tools_running(lab["dir"], "linux-vm", True)
    assert run_in_guest(si, vms["linux-vm"], auth, "/bin/true", "") == 0


# ---- lab lifecycle --------------------------------------------------------------------------


def _descendants(pids: set[int]) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
    found = set(pids)
    changed = True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if parent in found and pid not in found:
                found.add(pid)
                changed = True
    return found


def test_lab_up_and_down_through_the_cli_leave_nothing_behind(tmp_path: Path):
    lab_dir = Path(f"/tmp/vbrd-lab-cli-{uuid.uuid4().hex[:8]}")
    before = set(Path("/tmp").glob("govcsim-*"))
    cli = [sys.executable, "-m", "vbrd.lab.cli", "lab"]
    started = subprocess.run([*cli, "up", "--dir", str(lab_dir)], capture_output=True, text=True,
                             timeout=180)
    try:
        assert started.returncode == 0, started.stderr
        path = Path(started.stdout.strip())
        assert path == lab_dir / "lab.json"
        info = json.loads(path.read_text())
        processes = _descendants(set(info["pids"].values()))
        assert all(Path(f"/proc/{pid}").exists() for pid in info["pids"].values())

        written = subprocess.run([*cli, "write", "--dir", str(lab_dir), "two-disk-vm", "--disk",
                                  "2001", "--fraction", "0.01", "--seed", "5", "--json"],
                                 capture_output=True, text=True, timeout=60)
        assert written.returncode == 0, written.stderr
        assert [Extent(o, n) for o, n in json.loads(written.stdout)] == \
            disks.random_extents(96 * MiB, 0.01, 5)
    finally:
        stopped = subprocess.run([*cli, "down", "--dir", str(lab_dir)], capture_output=True,
                                 text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert not lab_dir.exists()
    alive = [pid for pid in processes if Path(f"/proc/{pid}").exists()
             and "Z" not in (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])]
    assert alive == []
    assert set(Path("/tmp").glob("govcsim-*")) <= before
