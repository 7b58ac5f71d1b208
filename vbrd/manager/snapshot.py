"""Phase 3: vbrd's own VM snapshot, and its removal (phase 6) whatever happens in between.

The snapshot carries this installation's mark (:mod:`.ownership`): it is named
``vbrd-<session id>`` and described with the installation, the session and the job, so that
the snapshot hunter can tell it from the administrators' snapshots and from another
installation's. Its creation and its removal run to their end even when the session's task is
cancelled meanwhile (:mod:`.cleanup`): a snapshot whose creation completed under cancellation
is still removed.

Before a restore point is committed, :func:`ensure_still_there` checks that the snapshot the
disks were read from is still the one this phase made (moref and create time): a snapshot
removed underneath the reads leaves no consistent image to commit.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from vbrd.errors import SnapshotGone
from vbrd.events import Phase, SnapshotCreated
from vbrd.manager import snapshot_commit
from vbrd.manager.cleanup import to_the_end
from vbrd.manager.context import SessionContext
from vbrd.manager.ownership import Purpose, SnapshotMark
from vbrd.vsphere import VirtualDisk, VmInfo


@dataclass
class TakenSnapshot:
    vm: VmInfo
    obj: Any
    moref: str
    name: str
    #: when vCenter says it was taken (``None``: vCenter did not list it right after)
    created: datetime | None = None
    disks: list[VirtualDisk] = field(default_factory=list)
    #: why there is nothing left to remove (it was found removed or replaced underneath)
    gone: str = ""


def mark(ctx: SessionContext, purpose: Purpose) -> SnapshotMark:
    """The mark of a snapshot this session makes."""
    return SnapshotMark(purpose, ctx.engine.installation_id, ctx.session_id, ctx.job.name)


@contextlib.asynccontextmanager
async def vm_snapshot(ctx: SessionContext, vm: VmInfo, *,
                      quiesce: bool) -> AsyncIterator[TakenSnapshot]:
    marked = mark(ctx, "backup")
    name = vm.ref.name
    creating: asyncio.Future[Any] | None = None
    taken: TakenSnapshot | None = None
    try:
        async with ctx.phase(Phase.SNAPSHOT, vm=name):
            ctx.check_stop()
            creating = asyncio.ensure_future(ctx.vsphere.create_snapshot(
                vm, marked.name, marked.description, quiesce=quiesce))
            obj = await to_the_end(creating)
            taken = TakenSnapshot(vm, obj, obj._moId, marked.name)
            ctx.emit(SnapshotCreated, vm=name, snapshot=taken.moref, name=marked.name,
                     quiesced=quiesce)
            listed = await ctx.vsphere.snapshot_info(vm, taken.moref)
            taken.created = listed.created if listed is not None else None
            taken.disks = await ctx.vsphere.snapshot_disks(obj)
        yield taken
    finally:
        if taken is None and creating is not None and creating.done() \
                and not creating.cancelled() and creating.exception() is None:
            # created while the session was being cancelled: removed all the same
            obj = creating.result()
            taken = TakenSnapshot(vm, obj, obj._moId, marked.name)
            ctx.emit(SnapshotCreated, vm=name, snapshot=taken.moref, name=marked.name,
                     quiesced=quiesce)
        if taken is not None:
            await to_the_end(asyncio.ensure_future(snapshot_commit.run(ctx, taken)))


async def ensure_still_there(ctx: SessionContext, taken: TakenSnapshot) -> None:
    """Raise :class:`SnapshotGone` unless the snapshot is still the one phase 3 made: its
    moref is listed, with the create time listed right after phase 3 made it (when vCenter
    did not list it then, the moref alone is what can be checked)."""
    name = taken.vm.ref.name
    listed = await ctx.vsphere.snapshot_info(taken.vm, taken.moref)
    if listed is not None and (taken.created is None or listed.created == taken.created):
        return
    what = "was removed" if listed is None else "was replaced by another snapshot"
    taken.gone = f"snapshot {taken.name} ({taken.moref}) {what} while its disks were read"
    raise SnapshotGone(
        f"VM {name}: {taken.gone}, by someone other than this session (an administrator, "
        f"another backup product); what was read is no consistent image of the VM, so no "
        f"restore point was committed")
