"""Phase 6: remove (consolidate) vbrd's snapshot; and the snapshot hunter.

Removal runs whatever failed before it. The hunter removes snapshots that vbrd made and no
running session owns — left by a killed daemon or a vCenter that timed out — at daemon start
and after every session.
"""
from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from vbrd.errors import VSphereError
from vbrd.events import Phase, SessionLog, SnapshotRemoved
from vbrd.manager.context import SessionContext
from vbrd.vsphere import SNAPSHOT_PREFIX, VSphere

if TYPE_CHECKING:
    from vbrd.engine import Engine
    from vbrd.manager.snapshot import TakenSnapshot

log = logging.getLogger(__name__)

_SESSION_IN_DESCRIPTION = re.compile(r"session=(\S+?);")


async def run(ctx: SessionContext, taken: TakenSnapshot) -> None:
    name = taken.vm.ref.name
    async with ctx.phase(Phase.SNAPSHOT_COMMIT, vm=name):
        await ctx.vsphere.remove_snapshot(taken.obj, f"VM {name}")
        ctx.emit(SnapshotRemoved, vm=name, snapshot=taken.moref)


async def hunt_with(engine: Engine, vsphere: VSphere, session_id: str) -> list[str]:
    """Remove vbrd snapshots whose session is not running; returns what was removed."""
    removed = []
    running = set(engine.sessions) - {session_id}
    for snap in await vsphere.snapshots():
        if not snap.name.startswith(SNAPSHOT_PREFIX):
            continue
        m = _SESSION_IN_DESCRIPTION.search(snap.description + ";")
        owner = m.group(1) if m else snap.name[len(SNAPSHOT_PREFIX):]
        if owner in running:
            continue
        what = f"VM {snap.vm}: snapshot {snap.name} left by session {owner}"
        try:
            await vsphere.remove_snapshot(vsphere.snapshot_by_moref(snap.moref), what)
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
