"""The Backup Manager: one session of one job, phase by phase.

The backup protocol, written down once (docs/architecture.md, section 1):

1. **initialization** (:mod:`.initialization`) — connect to vCenter, resolve the job's VMs
   (so new VMs are picked up), gather their metadata, plan one task per disk.
   Events: ``phase.*``, ``task.planned``, ``log``.
   Then, for each VM — the VMs side by side, each as soon as the resource scheduler gives it
   the slot of its first disk (``resource.waiting``, ``resource.assigned``; see
   :func:`.data_transport.first_slot`):
2. **guest_processing** (:mod:`.guest_processing`) — walk the guest processor chain of the
   VM's OS family, run pre-freeze. Events: ``guest.attempt``, ``guest.frozen``.
3. **snapshot** (:mod:`.snapshot`) — vbrd's own snapshot (quiesced when asked), marked so
   the snapshot hunter can recognise it. Events: ``snapshot.created``.
4. **guest_release** (:mod:`.guest_release`) — post-thaw; runs whenever freeze ran.
   Events: ``guest.thawed``.
5. **data_transport** (:mod:`.data_transport`) — per disk, a pair of data movers reads the
   snapshot's changed or allocated areas and stores blocks; the restore point is committed
   once every disk is durable, and only if the snapshot is still the one phase 3 made. For
   hot-add the snapshot's disks are attached to the proxy VM around the transfers and always
   detached before phase 6 (:mod:`.hotadd`). Events:
   ``resource.*``, ``hotadd.attached``, ``transport.selected``, ``transfer.progress``,
   ``disk.transferred``, ``hotadd.detached``, ``point.committed``.
6. **snapshot_commit** (:mod:`.snapshot_commit`) — remove the snapshot, whatever failed
   before; a removal that fails is a warning naming the snapshot left. Events:
   ``snapshot.removed``.

After the VMs, what this installation left in vCenter and no running session owns is
cleaned up: hot-added disks (:func:`.hotadd.detach_leftovers`), then snapshots (the snapshot
hunter, :func:`.snapshot_commit.hunt`); then the vCenter session is closed. Everything vbrd
makes in vCenter carries this installation's mark (:mod:`.ownership`), and nothing without it
is touched.

Cleanup lives in async context managers (thaw, snapshot removal, detach), so no failure and
no stop request can skip it; the work that must not be cut short runs to its end even when
the session's task is cancelled after ``daemon.stop_timeout`` (:mod:`.cleanup`).
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from vbrd.errors import SessionStopped, VbrdError
from vbrd.events import Phase, SessionFinished, SessionStarted, VmFinished
from vbrd.manager import (
    data_transport,
    guest_processing,
    guest_release,
    hotadd,
    initialization,
    snapshot,
    snapshot_commit,
)
from vbrd.manager.cleanup import to_the_end
from vbrd.manager.context import SessionContext
from vbrd.vsphere import VSphere

if TYPE_CHECKING:
    from vbrd.config import JobSettings
    from vbrd.engine import Engine
    from vbrd.vsphere import VmInfo

log = logging.getLogger(__name__)


class BackupManager:
    def __init__(self, engine: Engine, job: JobSettings, session_id: str, *,
                 trigger: str, stop: asyncio.Event) -> None:
        self.engine, self.job, self.session_id = engine, job, session_id
        self.trigger = trigger
        config = engine.config
        self.ctx = SessionContext(engine=engine, config=config, job=job, session_id=session_id,
                                  stop=stop, vsphere=VSphere(config.vcenters[job.vcenter]))

    def announce(self) -> None:
        """Publish ``session.started`` before the session's task runs, so that the session
        is in the catalog as soon as its id is handed out."""
        self.ctx.emit(SessionStarted, job=self.job.name, trigger=self.trigger)

    async def run(self) -> str:
        """Run the session; returns its status: success, warning, failed or stopped."""
        ctx = self.ctx
        status, reason = "failed", ""
        try:
            plan = await initialization.run(ctx)
            # Each VM ends by itself (a stop request reaches every one of them), so none is
            # cancelled in the middle of its phases because another one failed.
            outcomes = await asyncio.gather(*(self._protect(vm) for vm in plan.vms),
                                            return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                    raise outcome
            for outcome in outcomes:
                if isinstance(outcome, Exception):
                    raise outcome
            results = [r for r in outcomes if isinstance(r, str)]
            failed = [r for r in results if r == "failed"]
            if plan.problems and not plan.vms:
                status, reason = "failed", "; ".join(plan.problems)
            elif failed:
                status = "failed"
                reason = f"{len(failed)} of {len(results)} VMs failed"
            elif ctx.warnings or plan.problems:
                status = "warning"
            else:
                status = "success"
        except SessionStopped as e:
            status, reason = "stopped", str(e)
        except VbrdError as e:
            status, reason = "failed", str(e)
            ctx.say("error", str(e))
        except Exception as e:
            status, reason = "failed", f"internal error: {type(e).__name__}: {e}"
            log.exception("session %s failed", self.session_id)
            ctx.say("error", reason)
        finally:
            if ctx.stop.is_set() and status != "success":
                status, reason = "stopped", "stopped on request"
            if not ctx.stop.is_set():
                await data_transport.maintain_repositories(ctx)
            try:
                await self._leftovers()
            finally:
                # only now: every VM's snapshot work ran to its end before this point
                await to_the_end(asyncio.ensure_future(ctx.vsphere.close()))
                ctx.emit(SessionFinished, job=self.job.name, status=status, reason=reason)
        return status

    async def _leftovers(self) -> None:
        """What this installation left in vCenter and no running session owns: hot-added
        disks first (ESXi cannot remove a snapshot whose disk is attached), then snapshots."""
        ctx = self.ctx
        try:
            await hotadd.detach_leftovers(ctx.engine, ctx.vsphere, ctx.session_id)
        except Exception as e:
            ctx.say("warning", f"detaching leftover hot-added disks: {e}")
        try:
            await snapshot_commit.hunt(ctx)
        except Exception as e:
            ctx.say("warning", f"snapshot hunter: {e}")

    async def _protect(self, vm: VmInfo) -> str:
        """Phases 2–6 for one VM. Returns success, warning or failed."""
        ctx = self.ctx
        name = vm.ref.name
        warnings_before = ctx.vm_warnings[name]
        point_id = ""
        try:
            ctx.check_stop()
            async with data_transport.first_slot(ctx, vm) as held:
                async with guest_processing.guest_session(ctx, vm) as guest:
                    async with snapshot.vm_snapshot(ctx, vm, quiesce=guest.quiesce) as snap:
                        await guest_release.run(ctx, vm, guest)
                        point_id = await data_transport.run(ctx, vm, snap, held)
            status = "warning" if ctx.vm_warnings[name] > warnings_before else "success"
            ctx.emit(VmFinished, vm=name, status=status, point_id=point_id)
            return status
        except SessionStopped:
            ctx.emit(VmFinished, vm=name, status="failed", reason="session stopped")
            raise
        except VbrdError as e:
            if ctx.stop.is_set():
                ctx.emit(VmFinished, vm=name, status="failed", reason="session stopped")
                raise SessionStopped(f"session {self.session_id} was asked to stop") from e
            ctx.say("error", f"VM {name}: {e}", vm=name)
            ctx.emit(VmFinished, vm=name, status="failed", reason=str(e))
            return "failed"
        except Exception as e:
            log.exception("VM %s failed", name)
            reason = f"internal error: {type(e).__name__}: {e}"
            ctx.say("error", f"VM {name}: {reason}", vm=name)
            ctx.emit(VmFinished, vm=name, status="failed", reason=reason)
            return "failed"


__all__ = ["BackupManager", "Phase"]
