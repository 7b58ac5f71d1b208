"""Phase 2: reach into the guest through its chain of processors and freeze it.

The chain per OS family follows DESIGN.md section 1: Windows tries WinRM then VIX, Linux
tries SSH then VIX. A processor that cannot reach the guest raises ``GuestUnreachable`` and
the next one tries; every attempt is an event. The job decides what a failure means:
``require`` fails the VM, ``try`` goes on crash-consistent with a warning. Whatever happens
after a freeze, the thaw runs (this module's context manager guarantees it).
"""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from vbrd.errors import GuestError, GuestUnreachable
from vbrd.events import GuestAttempt, GuestFrozen, GuestThawed, Phase
from vbrd.manager.context import SessionContext
from vbrd.plugins import guest_processors
from vbrd.protocols import GuestSession
from vbrd.vsphere import VmInfo

CHAINS = {"windows": ("winrm", "vix"), "linux": ("ssh", "vix"), "other": ("vix",)}


@dataclass
class GuestState:
    """The guest's side of one VM's backup, as the later phases see it."""

    vm: VmInfo
    session: GuestSession | None = None
    frozen: bool = False
    thawed: bool = False
    quiesce: bool = False

    async def thaw(self, ctx: SessionContext) -> None:
        """Post-thaw, once, if freeze ran."""
        if not self.frozen or self.thawed or self.session is None:
            return
        self.thawed = True
        name = self.vm.ref.name
        try:
            await self.session.thaw()
        except GuestError as e:
            ctx.emit(GuestThawed, vm=name, processor=self.session.processor, ok=False,
                     reason=str(e))
            ctx.say("warning", f"VM {name}: post-thaw failed: {e}", vm=name)
        else:
            ctx.emit(GuestThawed, vm=name, processor=self.session.processor)


async def _connect(ctx: SessionContext, vm: VmInfo) -> GuestSession:
    available = guest_processors(ctx.engine.pm)
    chain = [name for name in CHAINS.get(vm.ref.guest_family, CHAINS["other"])]
    reasons: list[str] = []
    for name in chain:
        processor = available.get(name)
        if processor is None:
            reason = f"no guest processor {name!r} is loaded"
            ctx.emit(GuestAttempt, vm=vm.ref.name, processor=name, outcome="unavailable",
                     reason=reason)
            reasons.append(reason)
            continue
        try:
            session = await processor.connect(vm.ref, ctx)
        except GuestUnreachable as e:
            ctx.emit(GuestAttempt, vm=vm.ref.name, processor=name, outcome="unreachable",
                     reason=str(e))
            ctx.say("info", f"VM {vm.ref.name}: {name} cannot reach the guest ({e}); "
                            f"trying the next way in", vm=vm.ref.name)
            reasons.append(f"{name}: {e}")
            continue
        except GuestError as e:
            # e.g. the machine at the reported address is not this VM: the chain stops here
            ctx.emit(GuestAttempt, vm=vm.ref.name, processor=name, outcome="failed",
                     reason=str(e))
            raise
        ctx.emit(GuestAttempt, vm=vm.ref.name, processor=name, outcome="connected")
        return session
    raise GuestUnreachable(f"no way into the guest of VM {vm.ref.name}: " + "; ".join(reasons))


@contextlib.asynccontextmanager
async def guest_session(ctx: SessionContext, vm: VmInfo) -> AsyncIterator[GuestState]:
    state = GuestState(vm)
    settings = ctx.job.guest
    success = False
    if not settings.enabled:
        yield state
        return
    name = vm.ref.name
    try:
        async with ctx.phase(Phase.GUEST_PROCESSING, vm=name):
            try:
                state.session = await _connect(ctx, vm)
                await state.session.prepare()
                ctx.check_stop()
                state.frozen = True
                await state.session.freeze()
                state.quiesce = True
                ctx.emit(GuestFrozen, vm=name, processor=state.session.processor)
            except GuestError as e:
                if settings.on_failure == "require":
                    raise
                ctx.say("warning", f"VM {name}: guest processing failed ({e}); going on "
                                   f"with a crash-consistent snapshot", vm=name)
                await state.thaw(ctx)
                state.quiesce = False
        yield state
        success = True
    finally:
        try:
            await state.thaw(ctx)
        finally:
            if state.session is not None:
                session, state.session = state.session, None
                try:
                    if state.frozen:
                        await session.after_backup(success)
                except GuestError as e:
                    ctx.say("warning", f"VM {name}: after-backup step failed: {e}", vm=name)
                finally:
                    await session.close()
