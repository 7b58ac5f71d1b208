"""Phase 3: vbrd's own VM snapshot, and its removal (phase 6) whatever happens in between.

The snapshot is named ``vbrd-<session id>`` and described with the session and job, so that
the snapshot hunter can tell vbrd's snapshots from the administrators' own.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from vbrd.events import Phase, SnapshotCreated
from vbrd.manager import snapshot_commit
from vbrd.manager.context import SessionContext
from vbrd.vsphere import SNAPSHOT_DESCRIPTION, SNAPSHOT_PREFIX, VirtualDisk, VmInfo


@dataclass
class TakenSnapshot:
    vm: VmInfo
    obj: Any
    moref: str
    name: str
    disks: list[VirtualDisk] = field(default_factory=list)


@contextlib.asynccontextmanager
async def vm_snapshot(ctx: SessionContext, vm: VmInfo, *,
                      quiesce: bool) -> AsyncIterator[TakenSnapshot]:
    name = f"{SNAPSHOT_PREFIX}{ctx.session_id}"
    description = SNAPSHOT_DESCRIPTION.format(session=ctx.session_id, job=ctx.job.name)
    taken: TakenSnapshot | None = None
    try:
        async with ctx.phase(Phase.SNAPSHOT, vm=vm.ref.name):
            ctx.check_stop()
            # Shielded: a snapshot vCenter creates after we stopped waiting would be orphaned.
            obj = await asyncio.shield(
                ctx.vsphere.create_snapshot(vm, name, description, quiesce=quiesce))
            taken = TakenSnapshot(vm, obj, obj._moId, name)
            ctx.emit(SnapshotCreated, vm=vm.ref.name, snapshot=taken.moref, name=name,
                     quiesced=quiesce)
            taken.disks = await ctx.vsphere.snapshot_disks(obj)
        yield taken
    finally:
        if taken is not None:
            await asyncio.shield(snapshot_commit.run(ctx, taken))
