"""Phase 6: remove (consolidate) vbrd's snapshot; and the snapshot hunter.

Removal runs whatever failed before it. A removal that fails is a warning, not the VM's
failure: the restore point, when there is one, was committed from the snapshot before and is
whole; the snapshot left is named, and the hunter removes it.

The hunter removes the snapshots this installation made and no running session owns — left
by a killed daemon, a failed removal or a vCenter that timed out — after every session and at
daemon start. It recognises them by their mark (:mod:`.ownership`) and nothing else.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vbrd.errors import SnapshotGone, VbrdError, VSphereError
from vbrd.events import Phase, SessionLog, SnapshotRemoved
from vbrd.manager.context import SessionContext
from vbrd.manager.ownership import read_snapshot_mark
from vbrd.vsphere import VSphere

if TYPE_CHECKING:
    from vbrd.engine import Engine
    from vbrd.manager.snapshot import TakenSnapshot

log = logging.getLogger(__name__)

async def run(ctx: SessionContext, taken: TakenSnapshot) -> None:
    """Remove the session's snapshot of one VM; a failure is reported as a warning."""
    name = taken.vm.ref.name
    if taken.gone:
        ctx.say("info", f"VM {name}: {taken.gone}; there is nothing to remove", vm=name)
        return
    try:
        async with ctx.phase(Phase.SNAPSHOT_COMMIT, vm=name):
            await ctx.vsphere.remove_snapshot(taken.obj, f"VM {name}")
            ctx.emit(SnapshotRemoved, vm=name, snapshot=taken.moref)
    except SnapshotGone as e:
        ctx.say("warning", f"VM {name}: snapshot {taken.name} ({taken.moref}) was removed by "
                           f"someone other than this session ({e})", vm=name)
    except VbrdError as e:
        ctx.say("warning", f"VM {name}: snapshot {taken.name} ({taken.moref}) is left: "
                           f"removing it failed ({e}); the snapshot hunter removes it after "
                           f"this session or at the next daemon start", vm=name)


async def hunt_with(engine: Engine, vsphere: VSphere, session_id: str) -> list[str]:
    """Remove this installation's snapshots that no running session owns (``session_id`` is
    the one hunting: its own VMs are done); returns the morefs removed.

    Only a snapshot whose name and description carry this installation's mark, exactly, is
    considered (:mod:`.ownership`). Walking every VM's snapshots takes long and sessions start
    meanwhile, so a snapshot made after the hunt began is left for a later hunt, and whether
    its session is running is asked right before its removal, not once before the walk.
    """
    began = await vsphere.server_time()
    removed = []
    for snap in await vsphere.snapshots():
        mark = read_snapshot_mark(snap.name, snap.description)
        if mark is None or mark.installation != engine.installation_id:
            continue
        if snap.created >= began:
            continue
        if mark.session != session_id and mark.session in engine.sessions:
            continue
        what = f"VM {snap.vm}: snapshot {snap.name} left by session {mark.session}"
        try:
            await vsphere.remove_snapshot(vsphere.snapshot_by_moref(snap.moref), what)
        except SnapshotGone:
            continue  # removed meanwhile (by its own session, most likely)
        except VSphereError as e:
            engine.bus.publish(SessionLog(session_id=session_id, level="warning", vm=snap.vm,
                                          message=f"{what}: cannot remove it: {e}"))
            continue
        engine.bus.publish(SessionLog(session_id=session_id, level="info", vm=snap.vm,
                                      message=f"{what} was removed"))
        engine.bus.publish(SnapshotRemoved(session_id=session_id, vm=snap.vm,
                                           snapshot=snap.moref, orphan=True))
        removed.append(snap.moref)
    return removed


async def hunt(ctx: SessionContext) -> list[str]:
    return await hunt_with(ctx.engine, ctx.vsphere, ctx.session_id)


__all__ = ["run", "hunt", "hunt_with", "Phase"]
