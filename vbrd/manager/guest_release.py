"""Phase 4: release the guest right after the snapshot (post-thaw, I/O resumes)."""
from __future__ import annotations

from vbrd.events import Phase
from vbrd.manager.context import SessionContext
from vbrd.manager.guest_processing import GuestState
from vbrd.vsphere import VmInfo


async def run(ctx: SessionContext, vm: VmInfo, guest: GuestState) -> None:
    if not guest.frozen:
        return
    async with ctx.phase(Phase.GUEST_RELEASE, vm=vm.ref.name):
        await guest.thaw(ctx)
