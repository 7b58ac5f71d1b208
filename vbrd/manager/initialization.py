"""Phase 1: connect to vCenter, resolve the job's VMs, plan one task per disk."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from vbrd.events import Phase, TaskPlanned
from vbrd.manager.context import SessionContext
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
    """Turn CBT on, then a snapshot create/remove (stun/unstun) so that it takes effect."""
    name = vm.ref.name
    await ctx.vsphere.set_change_tracking(vm, True)
    snap = await ctx.vsphere.create_snapshot(vm, f"vbrd-cbt-{ctx.session_id}",
                                             "vbrd: stun/unstun cycle to activate CBT",
                                             quiesce=False)
    await ctx.vsphere.remove_snapshot(snap, f"VM {name}")
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
