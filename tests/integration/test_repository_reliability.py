"""The repository through the real Backup Manager: what an administrator relies on after
many backups, damage, trouble in gc, CBT that never answers, and a full file system."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.backup_support import (
    disk_content_sha256,
    events_of,
    job,
    lab_config,
    restored_sha256,
    run_job,
    vm_entry,
)
from tests.integration.test_backup_restore import set_cbt
from vbrd.config import load_config
from vbrd.engine import Engine
from vbrd.lab import lab as labctl
from vbrd.repository import Repository, block_digest

pytestmark = pytest.mark.lab


def repository(where: Path) -> Repository:
    return Repository.open(where / "repo")


def warnings_of(events: list[dict[str, Any]]) -> list[str]:
    return [e["message"] for e in events_of(events, "log", level="warning")]


# --- item: three points of one VM, each restores the disk as it was -----------------------


async def test_three_points_of_one_vm_each_restore_the_disk_as_it_was(lab, tmp_path):
    """A third point must build on the second, not the first: only a third point of one VM
    through the Manager shows an incremental that inherits from the wrong parent."""
    vm = "off-vm"
    (d,) = vm_entry(lab, vm)["disks"]
    config = lab_config(lab, tmp_path, job("off-only", [vm], transport="san"))
    expected = []
    for run, seed in enumerate((None, 301, 302)):
        if seed is not None:
            labctl.write(lab.dir, vm, fraction=0.03, seed=seed)
        expected.append(disk_content_sha256(d["descriptor"]))
        status, events = await run_job(config, "off-only")
        assert status == "success", warnings_of(events)
        created = [e for e in events_of(events, "log") if "created the repository" in e["message"]]
        assert len(created) == (1 if run == 0 else 0), "the first backup says it created it"
        if run:
            (transferred,) = events_of(events, "disk.transferred", vm=vm)
            assert transferred["incremental"] is True, transferred["reason"]

    assert len(set(expected)) == 3, "each run changed the disk"
    repo = repository(tmp_path)
    points = repo.points(vm)
    assert len(points) == 3
    for point, sha in zip(points, expected, strict=True):
        assert restored_sha256(repo, point.point_id, d["key"], tmp_path) == sha, point.point_id
    assert [p.sequence for p in points] == [1, 2, 3]
    assert [p.kind for p in points] == ["full", "incremental", "incremental"]
    assert [p.parent for p in points] == [None, points[0].point_id, points[1].point_id]


# --- item: gc is the repository's maintenance and never fails a VM -------------------------------


def retired_point(repo: Repository) -> Any:
    """A point of a VM no job backs up any more, holding one block only it names."""
    block = os.urandom(repo.block_size)
    digest = block_digest(block)
    with repo.begin_point("retired-vm", session_id="s-old", metadata={},
                          parent=None) as point:
        repo.put_block(digest, repo.codec.compress(block))
        point.add_disk(2000, label="Hard disk 1", capacity=len(block),
                       inherit=False).set_block(0, digest)
        return point.commit()


@pytest.fixture
def no_gc_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where gc would wait for writers inside a backup, give up at once (the old 60 s)."""
    from vbrd.manager import data_transport

    if hasattr(data_transport, "GC_LOCK_TIMEOUT"):
        monkeypatch.setattr(data_transport, "GC_LOCK_TIMEOUT", 0.5)


async def test_gc_trouble_never_fails_a_vm_whose_point_was_committed(lab, tmp_path, no_gc_wait):
    vms = ["off-vm", "linux-vm"]
    config = lab_config(lab, tmp_path, job("two", vms, transport="san", retention_points=1))
    assert (await run_job(config, "two"))[0] == "success"

    # another writer (a restore, another daemon's backup) holds the repository meanwhile
    for seed, vm in enumerate(vms):
        labctl.write(lab.dir, vm, fraction=0.02, seed=400 + seed)
    with repository(tmp_path).writing():
        status, events = await run_job(config, "two")
    assert status == "success", [e.get("reason") for e in events_of(events, "vm.finished")]
    assert {e["vm"]: e["status"] for e in events_of(events, "vm.finished")} == {
        vm: "success" for vm in vms}
    assert any("gc left for later" in e["message"] for e in events_of(events, "log"))

    # a point gc cannot read (of a VM no longer backed up): it is quarantined, gc goes on,
    # no VM fails because of it
    repo = repository(tmp_path)
    broken = retired_point(repo)
    index = tmp_path / "repo" / "points" / "retired-vm" / broken.point_id / "disk-2000.idx"
    index.chmod(0o600)
    index.write_bytes(b"junk")
    for seed, vm in enumerate(vms):
        labctl.write(lab.dir, vm, fraction=0.02, seed=410 + seed)
    status, events = await run_job(config, "two")

    assert {e["vm"]: e["status"] for e in events_of(events, "vm.finished")} == {
        vm: "success" for vm in vms}, [e.get("reason") for e in events_of(events, "vm.finished")]
    assert [p.point_id for p in repo.damaged_points()] == [broken.point_id]
    assert any("quarantined" in m for m in warnings_of(events))
    named = set()
    for vm in vms:
        (only,) = repo.points(vm)
        for disk in only.disks:
            named |= {dg for dg in repo.disk_index(only.point_id, disk.key).digests if dg}
    assert repo.stats().blocks == len(named), "gc removed the blocks no readable index names"
    assert repo.verify() == []


async def test_gc_on_demand_through_the_engine_and_point_delete(lab, tmp_path):
    vm = "off-vm"
    config = lab_config(lab, tmp_path, job("off-only", [vm], transport="san"))
    assert (await run_job(config, "off-only"))[0] == "success"
    labctl.write(lab.dir, vm, fraction=0.05, seed=420)
    assert (await run_job(config, "off-only"))[0] == "success"
    engine = Engine(load_config(config))
    try:
        first, second = (p["point_id"] for p in engine.restore_points(vm))
        engine.delete_point(first)
        (result,) = await engine.gc("default")
    finally:
        engine.close()
    assert result["ran"] and result["blocks_removed"] > 0
    repo = repository(tmp_path)
    assert [p.point_id for p in repo.points(vm)] == [second]
    assert repo.verify() == []
    (d,) = vm_entry(lab, vm)["disks"]
    assert restored_sha256(repo, second, 2000, tmp_path) == disk_content_sha256(d["descriptor"])


# --- item: a damaged point is never a parent; the next backup is a full, saying why ----------


async def test_after_verify_finds_damage_the_next_backup_is_a_full_and_says_why(lab, tmp_path):
    vm = "off-vm"
    (d,) = vm_entry(lab, vm)["disks"]
    config = lab_config(lab, tmp_path, job("off-only", [vm], transport="san"))
    assert (await run_job(config, "off-only"))[0] == "success"
    repo = repository(tmp_path)
    (point,) = repo.points(vm)
    digest = next(dg for dg in repo.disk_index(point.point_id, 2000).digests if dg)
    block_file = tmp_path / "repo" / "blocks" / digest.hex()[:2] / digest.hex()
    block_file.chmod(0o600)
    block_file.write_bytes(b"")
    assert repo.verify() != []
    labctl.write(lab.dir, vm, fraction=0.02, seed=430)
    expected = disk_content_sha256(d["descriptor"])

    status, events = await run_job(config, "off-only")

    assert status == "warning"
    assert any(point.point_id in m and "in full" in m for m in warnings_of(events))
    (transferred,) = events_of(events, "disk.transferred", vm=vm)
    assert transferred["incremental"] is False
    (latest,) = repo.points(vm)
    assert (latest.kind, latest.parent) == ("full", None)
    assert restored_sha256(repo, latest.point_id, 2000, tmp_path) == expected
    assert repo.verify() == []
    assert [x.point_id for x in repo.damaged_points(vm)] == [point.point_id]


# --- item: CBT on, but the host never gives a change id ------------------------------------------


def set_lab_tracking(lab: Any, vm: str, enabled: bool) -> None:
    """Make the lab's host track (or not) the VM's disks while the VM's CBT setting stays
    on: like the stock simulator, a snapshot's disks then carry no change id."""
    for d in vm_entry(lab, vm)["disks"]:
        base = Path(lab.dir) / "cbt" / vm / str(d["key"])
        with open(base.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = json.loads(base.with_suffix(".json").read_text())
            state["enabled"] = enabled
            base.with_suffix(".json").write_text(json.dumps(state))


async def test_cbt_that_never_gives_a_change_id_is_named_once_per_disk(lab, tmp_path):
    vm = "two-disk-vm"
    config = lab_config(lab, tmp_path, job("two-disk", [vm], transport="san", cbt=True))
    set_lab_tracking(lab, vm, False)
    try:
        runs = []
        for seed in (440, 441):
            labctl.write(lab.dir, vm, disk_key=2001, fraction=0.02, seed=seed)
            runs.append(await run_job(config, "two-disk"))
        expected = {x["key"]: disk_content_sha256(x["descriptor"])
                    for x in vm_entry(lab, vm)["disks"]}
    finally:
        # a new tracking epoch: no change id from while the lab did not track is trusted
        await set_cbt(config, vm, False)
        await set_cbt(config, vm, True)

    for status, events in runs:
        assert status == "warning"
        not_effective = [m for m in warnings_of(events) if "CBT is not effective" in m]
        assert sorted(m.split(",")[1].split(":")[0].strip() for m in not_effective) == [
            "Hard disk 1", "Hard disk 2"], "once per disk"
        for transferred in events_of(events, "disk.transferred", vm=vm):
            assert transferred["incremental"] is False
    repo = repository(tmp_path)
    first, second = repo.points(vm)
    stored = [sum(e["bytes_stored"] for e in events_of(events, "disk.transferred"))
              for _, events in runs]
    assert stored[1] < stored[0] / 2, "the second full read stored only the new blocks"
    assert (second.kind, second.parent) == ("full", None), "a full read is not an incremental"
    assert {d.kind for d in second.disks} == {"full"}
    for key, sha in expected.items():
        assert restored_sha256(repo, second.point_id, key, tmp_path) == sha


# --- item: the repository's file system fills up mid-backup -------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs where the lab config puts the repository."""
    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("a size-limited tmpfs needs root (the CI runs the tests as root)")
        pytest.skip("mounting a size-limited tmpfs needs root")
    where = tmp_path / "repo"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(where)],
                   check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


async def test_a_full_repository_file_system_fails_clearly_and_the_next_run_succeeds(
        lab, tmp_path, small_tmpfs):
    vm = "off-vm"
    (d,) = vm_entry(lab, vm)["disks"]
    expected = disk_content_sha256(d["descriptor"])
    config = lab_config(lab, tmp_path, job("off-only", [vm], transport="san"))

    status, events = await run_job(config, "off-only")

    assert status == "failed"
    (finished,) = events_of(events, "vm.finished", vm=vm)
    assert "file system is full" in finished["reason"], finished["reason"]
    assert str(small_tmpfs) in finished["reason"]
    repo = repository(tmp_path)
    assert repo.points() == [] and repo.damaged_points() == []
    assert not [p for p in (small_tmpfs / "points").rglob("*") if p.name.startswith(".tmp-")]

    subprocess.run(["mount", "-o", "remount,size=256m", str(small_tmpfs)], check=True,
                   capture_output=True)
    status, events = await run_job(config, "off-only")

    assert status == "success", warnings_of(events)
    (point,) = repo.points(vm)
    assert restored_sha256(repo, point.point_id, 2000, tmp_path) == expected
    assert repo.verify() == []
