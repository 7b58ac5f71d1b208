"""Phase 3's snapshot is checked before a point is committed from it.

Blocks read from a snapshot that someone removed, or replaced by another under the same
moref, while the disks were read are no consistent image of the VM. vCenter is a stand-in
(:class:`FakeVCenter`); the whole path through the lab is in
tests/integration/test_snapshot_safety.py.
"""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from tests.unit.fake_vcenter import FakeSnapshotRef, FakeVCenter, vm_info
from vbrd.errors import SnapshotGone
from vbrd.manager.snapshot import TakenSnapshot, ensure_still_there


@pytest.mark.parametrize("change, what", [
    ("removed", "was removed"),
    ("replaced", "was replaced by another snapshot"),
])
async def test_a_point_is_committed_only_from_the_snapshot_phase_3_made(change, what):
    vcenter = FakeVCenter(vms=[vm_info()])
    vm = vcenter.vms[0]
    snap = vcenter.add_snapshot("vbrd-S-1", "vbrd backup snapshot", vm="db01")
    taken = TakenSnapshot(vm, FakeSnapshotRef(snap.moref), snap.moref, snap.name,
                          created=snap.created)
    ctx: object = SimpleNamespace(vsphere=vcenter)

    await ensure_still_there(ctx, taken)  # type: ignore[arg-type]  # the one phase 3 made
    assert taken.gone == ""

    if change == "removed":
        del vcenter.snaps[snap.moref]
    else:
        vcenter.snaps[snap.moref] = replace(snap, created=vcenter.tick())
    with pytest.raises(SnapshotGone) as raised:
        await ensure_still_there(ctx, taken)  # type: ignore[arg-type]

    assert f"VM db01: snapshot vbrd-S-1 ({snap.moref}) {what} while its disks were read" \
        in str(raised.value)
    assert "no restore point was committed" in str(raised.value)
    assert what in taken.gone, "phase 6 knows there is nothing of its own to remove"


async def test_a_snapshot_whose_create_time_was_not_listed_is_checked_by_its_moref():
    vcenter = FakeVCenter(vms=[vm_info()])
    vm = vcenter.vms[0]
    snap = vcenter.add_snapshot("vbrd-S-1", "vbrd backup snapshot", vm="db01")
    taken = TakenSnapshot(vm, FakeSnapshotRef(snap.moref), snap.moref, snap.name, created=None)
    ctx: object = SimpleNamespace(vsphere=vcenter)

    await ensure_still_there(ctx, taken)  # type: ignore[arg-type]
    assert taken.gone == "", "phase 6 still removes it"

    del vcenter.snaps[snap.moref]
    with pytest.raises(SnapshotGone, match="was removed while its disks were read"):
        await ensure_still_there(ctx, taken)  # type: ignore[arg-type]
