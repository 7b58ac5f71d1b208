"""Back up the lab's VMs and restore them: the bytes that come back are the bytes that were.

These run the real Backup Manager against the lab's vCenter: snapshots with delta disks,
CBT from the disks' real allocation and change log, data mover processes, the repository.
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from tests.integration.backup_support import (
    disk_content_sha256,
    events_of,
    job,
    lab_config,
    restored_sha256,
    run_job,
    vbrd_snapshots,
    vm_entry,
)
from vbrd.lab import lab as labctl
from vbrd.models import Extent
from vbrd.repository import Repository

pytestmark = pytest.mark.lab

MiB = 1 << 20
PROTECTED = ["linux-vm", "windows-vm", "two-disk-vm", "off-vm"]


def repository(where: Path) -> Repository:
    return Repository.open(where / "repo")


async def test_full_backup_of_every_vm_restores_bit_identically(lab, tmp_path):
    sources = {(vm, d["key"]): disk_content_sha256(d["descriptor"])
               for vm in PROTECTED for d in vm_entry(lab, vm)["disks"]}
    config = lab_config(lab, tmp_path)

    status, events = await run_job(config, "lab-san")

    assert status == "success", [e for e in events if e["type"] == "log"]
    assert len(sources) == 5, "two-disk-vm brings two disks"
    repo = repository(tmp_path)
    for vm in PROTECTED:
        (point,) = repo.points(vm)
        for d in vm_entry(lab, vm)["disks"]:
            restored = restored_sha256(repo, point.point_id, d["key"], tmp_path)
            assert restored == sources[(vm, d["key"])], f"{vm} disk {d['key']}"
    assert vm_entry(lab, "windows-vm")["disks"][0]["format"] == "sparse"
    assert await vbrd_snapshots(config) == []
    # each VM: snapshot created before data transport, removed after it — by phase 6 of its
    # own session, not by the snapshot hunter afterwards
    for vm in PROTECTED:
        order = [e["type"] for e in events if e["vm"] == vm and e["type"] in (
            "snapshot.created", "disk.transferred", "snapshot.removed")]
        assert order[0] == "snapshot.created" and order[-1] == "snapshot.removed"
        (created,) = events_of(events, "snapshot.created", vm=vm)
        (removed,) = events_of(events, "snapshot.removed", vm=vm)
        assert removed["snapshot"] == created["snapshot"] and not removed["orphan"], removed
    assert repo.verify() == []


async def test_incremental_reads_only_what_cbt_says_changed(lab, tmp_path):
    vm = "linux-vm"
    (d,) = vm_entry(lab, vm)["disks"]
    config = lab_config(lab, tmp_path, job("linux-only", [vm], transport="san"))
    status, _ = await run_job(config, "linux-only")
    assert status == "success"
    before = disk_content_sha256(d["descriptor"])

    changed = labctl.write(lab.dir, vm, fraction=0.02, seed=4242)
    after = disk_content_sha256(d["descriptor"])
    assert after != before
    status, events = await run_job(config, "linux-only")

    assert status == "success"
    (transferred,) = events_of(events, "disk.transferred", vm=vm)
    assert transferred["incremental"] is True, transferred["reason"]
    block = repository(tmp_path).block_size
    touched = {b for e in changed
               for b in range(e.offset // block, (e.offset + e.length - 1) // block + 1)}
    assert sum(e.length for e in changed) <= transferred["bytes_read"] <= len(touched) * block
    assert transferred["bytes_read"] < d["capacity"] / 2
    repo = repository(tmp_path)
    first, second = repo.points(vm)
    assert restored_sha256(repo, first.point_id, d["key"], tmp_path) == before
    assert restored_sha256(repo, second.point_id, d["key"], tmp_path) == after
    assert second.parent == first.point_id


async def test_without_cbt_an_incremental_still_stores_only_changed_blocks(lab, tmp_path):
    vm = "two-disk-vm"
    config = lab_config(lab, tmp_path, job("no-cbt", [vm], transport="san", cbt=False))
    status, _ = await run_job(config, "no-cbt")
    assert status == "success"
    changed = labctl.write(lab.dir, vm, disk_key=2001, fraction=0.02, seed=77)
    expected = {x["key"]: disk_content_sha256(x["descriptor"])
                for x in vm_entry(lab, vm)["disks"]}

    status, events = await run_job(config, "no-cbt")

    assert status == "success"
    repo = repository(tmp_path)
    block = repo.block_size
    touched = {b for e in changed
               for b in range(e.offset // block, (e.offset + e.length - 1) // block + 1)}
    stored = {e["disk"]: e for e in events_of(events, "disk.transferred", vm=vm)}
    assert stored[2000]["bytes_stored"] == 0, "an unchanged disk stores nothing new"
    assert 0 < stored[2001]["bytes_stored"] <= len(touched) * block
    assert all("off" in e["reason"] for e in stored.values())
    latest = repo.points(vm)[-1]
    for key, sha in expected.items():
        assert restored_sha256(repo, latest.point_id, key, tmp_path) == sha


FAILING_PHASE_PLUGIN = """
from vbrd import hookimpl
from vbrd.errors import VbrdError

@hookimpl
def vbrd_before_phase(session_id, job, phase, vm):
    if phase == {phase!r} and vm == "off-vm":
        raise VbrdError("injected failure in phase " + phase)
"""


@pytest.mark.parametrize("phase", ["initialization", "snapshot", "data_transport",
                                   "snapshot_commit"])
async def test_no_snapshot_is_left_whichever_phase_fails(lab, tmp_path, phase):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    body = FAILING_PHASE_PLUGIN.replace('vm == "off-vm"', 'True') if phase == \
        "initialization" else FAILING_PHASE_PLUGIN
    (plugins / "inject.py").write_text(textwrap.dedent(body.format(phase=phase)))
    config = lab_config(lab, tmp_path, job("fails", ["off-vm"], transport="san"),
                        plugin_dir=plugins)

    status, events = await run_job(config, "fails")

    # a snapshot that could not be removed after the point was committed is a warning: the
    # point is whole, and the snapshot hunter removes what is left after the session
    assert status == ("warning" if phase == "snapshot_commit" else "failed")
    assert any(f"injected failure in phase {phase}" in (e.get("reason") or e.get("message") or "")
               for e in events)
    assert await vbrd_snapshots(config) == []
    if phase in ("snapshot", "data_transport", "snapshot_commit"):
        assert events_of(events, "phase.finished", name=phase, ok=False)


async def test_a_corrupt_block_is_named_by_verify_and_refused_by_restore(lab, tmp_path):
    config = lab_config(lab, tmp_path, job("off-only", ["off-vm"], transport="san"))
    status, _ = await run_job(config, "off-only")
    assert status == "success"
    repo = repository(tmp_path)
    (point,) = repo.points("off-vm")
    index = repo.disk_index(point.point_id, 2000)
    block_no, digest = next((n, dg) for n, dg in enumerate(index.digests) if dg is not None)
    block_file = next((tmp_path / "repo").rglob(digest.hex()))
    data = bytearray(block_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    block_file.write_bytes(bytes(data))

    problems = repo.verify(point.point_id)

    assert [(p.point, p.disk, p.offset) for p in problems] == [
        (point.point_id, 2000, block_no * repo.block_size)]
    with pytest.raises(Exception) as err:
        repo.restore_disk(point.point_id, 2000, tmp_path / "out.raw")
    assert point.point_id in str(err.value) and str(block_no * repo.block_size) in str(err.value)
    assert not (tmp_path / "out.raw").exists()


async def set_cbt(config: Path, vm_name: str, enabled: bool) -> None:
    from vbrd.config import load_config
    from vbrd.vsphere import VSphere

    settings = load_config(config)
    vsphere = VSphere(settings.vcenters["lab"])
    try:
        vms, _ = await vsphere.select_vms(settings.jobs["lab-san"])
        vm = next(v for v in vms if v.ref.name == vm_name)
        await vsphere.set_change_tracking(vm, enabled)
    finally:
        await vsphere.close()


async def cbt_enabled(config: Path, vm_name: str) -> bool:
    from vbrd.config import load_config
    from vbrd.vsphere import VSphere

    settings = load_config(config)
    vsphere = VSphere(settings.vcenters["lab"])
    try:
        vms, _ = await vsphere.select_vms(settings.jobs["lab-san"])
        return next(v for v in vms if v.ref.name == vm_name).cbt_enabled
    finally:
        await vsphere.close()


async def test_a_job_turns_cbt_on_and_says_so(lab, tmp_path):
    config = lab_config(lab, tmp_path, job("off-only", ["off-vm"], transport="san"))
    await set_cbt(config, "off-vm", False)
    try:
        status, events = await run_job(config, "off-only")
        assert status == "success"
        assert await cbt_enabled(config, "off-vm")
        logs = [e["message"] for e in events_of(events, "log", vm="off-vm")]
        assert any("changed block tracking enabled" in m for m in logs), logs
        (transferred,) = events_of(events, "disk.transferred", vm="off-vm")
        assert transferred["incremental"] is False
    finally:
        await set_cbt(config, "off-vm", True)


async def test_a_cbt_reset_falls_back_to_a_digest_compared_full_read(lab, tmp_path):
    vm = "off-vm"
    (d,) = vm_entry(lab, vm)["disks"]
    config = lab_config(lab, tmp_path, job("off-only", [vm], transport="san"))
    assert (await run_job(config, "off-only"))[0] == "success"
    await set_cbt(config, vm, False)
    await set_cbt(config, vm, True)
    labctl.write(lab.dir, vm, fraction=0.02, seed=99)
    expected = disk_content_sha256(d["descriptor"])

    status, events = await run_job(config, "off-only")

    assert status == "warning"
    (transferred,) = events_of(events, "disk.transferred", vm=vm)
    assert transferred["incremental"] is False
    assert "changeId" in transferred["reason"]
    assert transferred["bytes_stored"] < d["capacity"] * 0.2, "only changed blocks are new"
    warnings = [e["message"] for e in events_of(events, "log", level="warning")]
    assert any("reading the whole disk" in m for m in warnings)
    repo = repository(tmp_path)
    assert restored_sha256(repo, repo.points(vm)[-1].point_id, 2000, tmp_path) == expected


async def test_an_incremental_that_changed_nearly_everything_is_flagged(lab, tmp_path):
    vm = "off-vm"
    config = lab_config(lab, tmp_path, job("off-only", [vm], transport="san"))
    assert (await run_job(config, "off-only"))[0] == "success"
    labctl.write(lab.dir, vm, fraction=0.97, seed=5)

    status, events = await run_job(config, "off-only")

    assert status == "warning"
    warnings = [e["message"] for e in events_of(events, "log", level="warning")]
    assert any("nearly the whole disk" in m for m in warnings), warnings


async def test_retention_keeps_the_newest_points_and_frees_their_blocks(lab, tmp_path):
    vm = "off-vm"
    config = lab_config(lab, tmp_path, job("keep-one", [vm], transport="san",
                                           retention_points=1))
    assert (await run_job(config, "keep-one"))[0] == "success"
    labctl.write(lab.dir, vm, fraction=0.05, seed=11)
    status, events = await run_job(config, "keep-one")
    assert status == "success"
    repo = repository(tmp_path)
    (only,) = repo.points(vm)
    assert events_of(events, "point.committed", vm=vm)[0]["point_id"] == only.point_id
    assert any("retention removed 1" in e["message"] for e in events_of(events, "log"))
    assert repo.verify() == []
    named = {dg for dg in repo.disk_index(only.point_id, 2000).digests if dg is not None}
    assert repo.stats().blocks == len(named), "gc removed the blocks only old points named"
    (d,) = vm_entry(lab, vm)["disks"]
    assert restored_sha256(repo, only.point_id, 2000, tmp_path) == \
        disk_content_sha256(d["descriptor"])


@pytest.mark.slow
async def test_an_incremental_of_200_000_changed_areas_restores_bit_identically(lab, tmp_path):
    """A busy disk's CBT answer of 200 000 scattered areas (512 bytes changed in every KiB of
    200 MiB) goes to the data mover whole, and the point restores what the disk holds."""
    vm = "linux-vm"
    (d,) = vm_entry(lab, vm)["disks"]
    config = lab_config(lab, tmp_path, job("linux-only", [vm], transport="san"))
    assert (await run_job(config, "linux-only"))[0] == "success"
    areas = [Extent(n * 1024, 512) for n in range(200_000)]
    assert areas[-1].end <= d["capacity"]
    source = tmp_path / "written.raw"
    data = os.urandom(512 * len(areas))
    with open(source, "wb") as f:
        f.truncate(d["capacity"])
        for i, area in enumerate(areas):
            os.pwrite(f.fileno(), data[i * 512 : (i + 1) * 512], area.offset)
    labctl.write_extents(lab.dir, vm, d["key"], areas, source)
    expected = disk_content_sha256(d["descriptor"])

    status, events = await run_job(config, "linux-only")

    assert status == "success", [e["message"] for e in events_of(events, "log")][-5:]
    (transferred,) = events_of(events, "disk.transferred", vm=vm)
    assert transferred["incremental"] is True, transferred["reason"]
    assert transferred["bytes_read"] == 512 * len(areas)
    repo = repository(tmp_path)
    assert restored_sha256(repo, repo.points(vm)[-1].point_id, d["key"], tmp_path) == expected
