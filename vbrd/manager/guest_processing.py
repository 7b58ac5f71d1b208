"""Phase 2: reach into the guest through its chain of processors and freeze it.

The chain per OS family is built from the loaded guest processors: those that serve the family,
lowest ``rank`` first (with the built-ins: Windows tries WinRM then VIX, Linux SSH then VIX),
or in the job's own ``guest.processors`` order. A processor that cannot reach the guest raises
``GuestUnreachable`` and the next one tries; every attempt is an event. The job decides what a
failure means: ``require`` fails the VM, ``try`` goes on crash-consistent with a warning.
Whatever happens after a freeze, the thaw runs (this module's context manager guarantees it), to
its end or its own deadline even when the session's task is cancelled meanwhile.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from vbrd.errors import GuestError, GuestUnreachable
from vbrd.events import GuestAttempt, GuestFrozen, GuestThawed, Phase
from vbrd.manager.cleanup import to_the_end
from vbrd.manager.context import SessionContext
from vbrd.plugins import guest_processors
from vbrd.protocols import GuestProcessor, GuestSession
from vbrd.vsphere import VmInfo


def chain_for(processors: Mapping[str, GuestProcessor], family: str,
              order: Sequence[str] = ()) -> list[str]:
    """The names of the processors to try, in turn, for a guest of ``family``.

    Without an ``order`` it is every loaded processor that serves the family, by rank and
    then name. A job's ``order`` names processors itself: those named are tried in that
    order, whether loaded or not (a missing one is an attempt that says so), but a
    processor that does not serve the family is left out.
    """
    if order:
        return [name for name in order
                if name not in processors or family in processors[name].families]
    serving = [p for p in processors.values() if family in p.families]
    return [p.name for p in sorted(serving, key=lambda p: (getattr(p, "rank", 50), p.name))]


#: How long a thaw may take before it is given up (with a warning) and cleanup goes on.
THAW_TIMEOUT = 60.0


@dataclass
class GuestState:
    """The guest's side of one VM's backup, as the later phases see it."""

    vm: VmInfo
    session: GuestSession | None = None
    frozen: bool = False
    quiesce: bool = False
    _thawing: asyncio.Future[None] | None = field(default=None, repr=False)

    @property
    def thawed(self) -> bool:
        return self._thawing is not None and self._thawing.done()

    async def thaw(self, ctx: SessionContext) -> None:
        """Post-thaw, once, if freeze ran. It runs to its end (or its deadline,
        :data:`THAW_TIMEOUT`) even when the session is cancelled meanwhile — a guest left
        frozen is worse than a stop that waits — and a second call waits for the first."""
        if not self.frozen or self.session is None:
            return
        if self._thawing is None:
            self._thawing = asyncio.ensure_future(self._thaw(ctx, self.session))
        await to_the_end(self._thawing)

    async def _thaw(self, ctx: SessionContext, session: GuestSession) -> None:
        name = self.vm.ref.name
        try:
            try:
                await asyncio.wait_for(session.thaw(), THAW_TIMEOUT)
            except TimeoutError:
                raise GuestError(f"post-thaw did not finish within {THAW_TIMEOUT:g} s; it "
                                 f"was given up") from None
        except GuestError as e:
            ctx.emit(GuestThawed, vm=name, processor=session.processor, ok=False,
                     reason=str(e))
            ctx.say("warning", f"VM {name}: post-thaw failed: {e}", vm=name)
        else:
            ctx.emit(GuestThawed, vm=name, processor=session.processor)


async def _connect(ctx: SessionContext, vm: VmInfo) -> GuestSession:
    available = guest_processors(ctx.engine.pm)
    chain = chain_for(available, vm.ref.guest_family, ctx.job.guest.processors)
    if not chain:
        raise GuestUnreachable(f"no loaded guest processor serves {vm.ref.guest_family} "
                               f"guests such as VM {vm.ref.name} (loaded: "
                               f"{', '.join(sorted(available)) or 'none'})")
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
