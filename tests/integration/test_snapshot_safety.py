"""vbrd's snapshots in the lab's vCenter, as an administrator sees them: a point is committed
only from a snapshot that is still there, a snapshot left after a committed point is a
warning that names it, and the hunter removes vbrd's leftovers and nothing else.

The administrator's side (snapshots made or removed by hand) goes through pyvmomi (``si``).
"""
from __future__ import annotations

import textwrap
from typing import Any

import pytest

from tests.integration.backup_support import (
    disk_content_sha256,
    events_of,
    find_vm,
    installation_id,
    job,
    lab_config,
    restored_sha256,
    run_job,
    snapshot_tree,
    vbrd_snapshots,
    vm_entry,
    wait,
)
from vbrd.events import Event
from vbrd.repository import Repository

pytestmark = pytest.mark.lab

VM = "off-vm"
OTHER_INSTALLATION = "0123456789abcdef0123456789abcdef"

FAILING_REMOVAL_PLUGIN = """
from vbrd import hookimpl
from vbrd.errors import SnapshotError

@hookimpl
def vbrd_before_phase(session_id, job, phase, vm):
    if phase == "snapshot_commit":
        raise SnapshotError("remove snapshot: the disk is locked by another host")
"""


def remove_vbrd_snapshots_by_hand(si: Any, vm: str) -> list[str]:
    """What an administrator does who sees a ``vbrd-…`` snapshot and removes it."""
    removed = []
    for node in snapshot_tree(si, vm):
        if node.name.startswith("vbrd-"):
            wait(si, node.snapshot.RemoveSnapshot_Task(removeChildren=False))
            removed.append(node.name)
    return removed


async def test_a_point_read_from_a_snapshot_removed_underneath_is_not_committed(
        lab, tmp_path, si):
    config = lab_config(lab, tmp_path, job("off-only", [VM], transport="san", cbt=False))
    removed_by_hand: list[str] = []

    def an_administrator_removes_it(event: Event) -> None:
        # every disk is read and durable; the point is not committed yet
        if event.type == "disk.transferred" and event.vm == VM:
            removed_by_hand.extend(remove_vbrd_snapshots_by_hand(si, VM))

    status, events = await run_job(config, "off-only", on_event=an_administrator_removes_it)

    (created,) = events_of(events, "snapshot.created", vm=VM)
    assert removed_by_hand == [created["name"]]
    assert status == "failed"
    (finished,) = events_of(events, "vm.finished", vm=VM)
    assert finished["status"] == "failed" and not finished["point_id"]
    assert f"snapshot {created['name']} ({created['snapshot']}) was removed while its disks " \
           f"were read" in finished["reason"]
    assert "no restore point was committed" in finished["reason"]
    assert events_of(events, "point.committed") == []
    assert Repository.open(tmp_path / "repo").points(VM) == []
    assert await vbrd_snapshots(config) == []


async def test_a_snapshot_removed_by_hand_after_the_commit_is_a_warning_and_the_point_stays(
        lab, tmp_path, si):
    config = lab_config(lab, tmp_path, job("off-only", [VM], transport="san"))

    def an_administrator_removes_it(event: Event) -> None:
        if event.type == "point.committed" and event.vm == VM:
            remove_vbrd_snapshots_by_hand(si, VM)

    status, events = await run_job(config, "off-only", on_event=an_administrator_removes_it)

    assert status == "warning"
    (created,) = events_of(events, "snapshot.created", vm=VM)
    (finished,) = events_of(events, "vm.finished", vm=VM)
    assert finished["status"] == "warning" and finished["point_id"]
    warnings = [e["message"] for e in events_of(events, "log", vm=VM, level="warning")]
    assert any(f"snapshot {created['name']} ({created['snapshot']}) was removed by someone "
               f"other than this session" in m for m in warnings), warnings
    repo = Repository.open(tmp_path / "repo")
    assert [p.point_id for p in repo.points(VM)] == [finished["point_id"]]
    assert repo.verify() == []
    assert events_of(events, "snapshot.removed", vm=VM) == []
    assert await vbrd_snapshots(config) == []


async def test_a_committed_point_whose_snapshot_removal_failed_is_a_warning_naming_it(
        lab, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "locked.py").write_text(textwrap.dedent(FAILING_REMOVAL_PLUGIN))
    config = lab_config(lab, tmp_path, job("off-only", [VM], transport="san"),
                        plugin_dir=plugins)
    (disk,) = vm_entry(lab, VM)["disks"]
    expected = disk_content_sha256(disk["descriptor"])

    status, events = await run_job(config, "off-only")

    assert status == "warning"
    (created,) = events_of(events, "snapshot.created", vm=VM)
    (finished,) = events_of(events, "vm.finished", vm=VM)
    assert finished["status"] == "warning" and finished["point_id"]
    warnings = [e["message"] for e in events_of(events, "log", vm=VM, level="warning")]
    assert any(f"snapshot {created['name']} ({created['snapshot']}) is left" in m
               and "the disk is locked by another host" in m for m in warnings), warnings
    # the point is whole and usable
    repo = Repository.open(tmp_path / "repo")
    (point,) = repo.points(VM)
    assert point.point_id == finished["point_id"]
    assert repo.verify() == []
    assert restored_sha256(repo, point.point_id, disk["key"], tmp_path) == expected
    # and the snapshot hunter removed what phase 6 left, after the VM
    (removed,) = events_of(events, "snapshot.removed", vm=VM)
    assert removed["snapshot"] == created["snapshot"] and removed["orphan"]
    assert await vbrd_snapshots(config) == []


async def test_the_hunter_removes_only_this_installations_leftovers(lab, tmp_path, si):
    config = lab_config(lab, tmp_path, job("off-only", [VM], transport="san"))
    me = installation_id(config)
    other = "windows-vm"  # not in the job: the hunter walks every VM's snapshots
    vm = find_vm(si, other)

    def make(name: str, description: str) -> Any:
        return wait(si, vm.CreateSnapshot_Task(name=name, description=description,
                                               memory=False, quiesce=False))

    kept = {
        "vbrd-before-upgrade": "the administrator's own, before the kernel upgrade",
        "vbrd-S-dr": f"vbrd backup snapshot; installation={OTHER_INSTALLATION}; session=S-dr; "
                     f"job=nightly",
        "vbrd-cbt-S-dr": f"vbrd CBT activation snapshot; installation={OTHER_INSTALLATION}; "
                         f"session=S-dr; job=nightly",
    }
    left = {
        "vbrd-S-killed": f"vbrd backup snapshot; installation={me}; session=S-killed; "
                         f"job=off-only",
        "vbrd-cbt-S-killed": f"vbrd CBT activation snapshot; installation={me}; "
                             f"session=S-killed; job=off-only",
    }
    made = [make(name, description) for name, description in {**kept, **left}.items()]
    try:
        status, events = await run_job(config, "off-only")

        assert status == "success"
        assert sorted(n.name for n in snapshot_tree(si, other)) == sorted(kept)
        orphans = [e for e in events_of(events, "snapshot.removed", vm=other) if e["orphan"]]
        assert len(orphans) == len(left)
    finally:
        for node in snapshot_tree(si, other):
            if node.snapshot in made:
                wait(si, node.snapshot.RemoveSnapshot_Task(removeChildren=False))
    assert await vbrd_snapshots(config) == []
