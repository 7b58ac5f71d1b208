"""Phase 1: connect to vCenter, resolve the job's VMs, plan one task per disk."""
from __future__ import annotations

import asyncio
import fnmatch
from dataclasses import dataclass, field

from vbrd.errors import SnapshotError
from vbrd.events import Phase, TaskPlanned
from vbrd.manager.cleanup import to_the_end
from vbrd.manager.context import SessionContext
from vbrd.manager.snapshot import mark as snapshot_mark
from vbrd.vsphere import VmInfo


@dataclass
class Plan:
    vms: list[VmInfo] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def excluded_disk(ctx: SessionContext, vm: str, key: int, label: str) -> bool:
    """``exclude_disks`` entries are ``VM:KEY`` or ``VM:LABEL`` (name patterns allowed)."""
    for rule in ctx.job.exclude_disks:
        pattern, _, which = rule.rpartition(":")
        if fnmatch.fnmatchcase(vm, pattern or "*") and which in (str(key), label):
            return True
    return False


async def enable_change_tracking(ctx: SessionContext, vm: VmInfo) -> VmInfo:
    """Turn CBT on, then a snapshot create/remove (stun/unstun) so that it takes effect.

    The snapshot carries this session's mark like the backup snapshot, and its creation and
    removal run to their end under cancellation; one that cannot be removed is a warning, and
    the snapshot hunter removes it after the session."""
    name = vm.ref.name
    await ctx.vsphere.set_change_tracking(vm, True)
    marked = snapshot_mark(ctx, "cbt")
    creating = asyncio.ensure_future(ctx.vsphere.create_snapshot(
        vm, marked.name, marked.description, quiesce=False))
    try:
        await to_the_end(creating)
    finally:
        if creating.done() and not creating.cancelled() and creating.exception() is None:
            removing = asyncio.ensure_future(ctx.vsphere.remove_snapshot(
                creating.result(), f"VM {name}: CBT activation"))
            try:
                await to_the_end(removing)
            except SnapshotError as e:
                ctx.say("warning", f"VM {name}: snapshot {marked.name} is left: {e}; the "
                                   f"snapshot hunter removes it after this session", vm=name)
    ctx.say("info", f"VM {name}: changed block tracking enabled (with a snapshot "
                    f"create/remove cycle so that it takes effect); this point is a full",
            vm=name)
    return await ctx.vsphere.refresh(vm)


async def run(ctx: SessionContext) -> Plan:
    async with ctx.phase(Phase.INITIALIZATION):
        await ctx.vsphere.connect()
        vms, problems = await ctx.vsphere.select_vms(ctx.job)
        for problem in problems:
            ctx.say("warning", problem)
        plan = Plan(problems=problems)
        for vm in vms:
            disks = [d for d in vm.disks
                     if not d.independent and not excluded_disk(ctx, vm.ref.name, d.key, d.label)]
            for d in vm.disks:
                if d.independent:
                    ctx.say("warning", f"VM {vm.ref.name}: {d.label} is an independent disk; "
                                       f"snapshots do not cover it, so it is not backed up",
                            vm=vm.ref.name, disk=d.key)
            if not disks:
                ctx.say("warning", f"VM {vm.ref.name} has no disk to back up", vm=vm.ref.name)
                continue
            if ctx.job.cbt and not vm.cbt_enabled:
                vm = await enable_change_tracking(ctx, vm)
            for d in disks:
                ctx.emit(TaskPlanned, vm=vm.ref.name, disk=d.key, label=d.label,
                         capacity=d.capacity)
            plan.vms.append(vm)
        if not plan.vms and not problems:
            ctx.say("warning", f"job {ctx.job.name} selected no VMs")
        return plan
