"""Hot-add, the Manager's side: attach a VM's snapshot disks to the proxy VM before its data
movers start, and detach them afterwards — always.

The proxy's data mover reads attached disks as its own (``plugins/transport_hotadd``); what
needs vCenter happens here, around one VM's data transport:

1. Decide per disk whether hot-add may be used: the job's modes include ``hotadd``; the proxy
   names its VM, which exists, runs, is not the VM being backed up, and sits on a host that
   sees the disk's datastore; and — when ``san`` comes first and the proxy is this machine —
   ``san``, probed here, cannot read the disk (no disk is attached that will not be read). A
   disk left out carries the reason to the data mover (``ProxyContext.hotadd_refusals``),
   whose ``hotadd`` probe reports it, so a job pinned to ``hotadd`` fails with it and ``auto``
   logs it as the reason the mode was skipped.
2. Attach the disks in one reconfigure, read-only (independent non-persistent), each on a free
   unit of the proxy VM's SCSI controllers, each tagged with this installation's mark
   (:mod:`.ownership`: installation, session, file) in the same reconfigure, and name their
   places in ``ProxyContext.attached_disks``. Events: ``hotadd.attached``.
3. Detach them (and clear their tags) once the transfers are over, succeeded, failed or
   stopped, and before the snapshot is removed: ESXi cannot consolidate a snapshot whose file
   another VM holds. The attach and the detach run to their end even when the session's task
   is cancelled meanwhile. Events: ``hotadd.detached``.

A daemon killed in between, or a detach vCenter kept refusing, leaves disks attached;
:func:`detach_leftovers` finds them after every session and at daemon start — before the
snapshot hunter runs — and detaches them: only disks that carry this installation's tag for
the very file attached there, of a session that is not running. An administrator's disk, or
another installation's, is never touched.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from vbrd.errors import NotFound, VSphereError
from vbrd.events import DiskAttached, DiskDetached, SessionLog
from vbrd.manager.cleanup import to_the_end
from vbrd.manager.context import SessionContext
from vbrd.manager.ownership import DiskMark, read_disk_mark
from vbrd.models import AttachedDisk, DiskTask, ProxyContext
from vbrd.plugins import transport_modes
from vbrd.vsphere import HOTADD_DISK_MODE, ProxyVm, ScsiDisk, VirtualDisk, VmInfo, VSphere

if TYPE_CHECKING:
    from vbrd.config import Config
    from vbrd.engine import Engine

log = logging.getLogger(__name__)

MODE = "hotadd"
PLUGIN_TABLE = "transport_hotadd"
DETACH_ATTEMPTS = 3
DETACH_RETRY_DELAY = 1.0


@dataclass
class _ProxyVmState:
    """One proxy VM, as the sessions of one engine share it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    in_use: set[str] = field(default_factory=set)  # files attached by running sessions


_STATES: weakref.WeakKeyDictionary[Engine, dict[tuple[str, str], _ProxyVmState]] = (
    weakref.WeakKeyDictionary())


def _state(engine: Engine, vcenter: str, proxy_vm: str) -> _ProxyVmState:
    return _STATES.setdefault(engine, {}).setdefault((vcenter, proxy_vm), _ProxyVmState())


def device_root(config: Config) -> str:
    """Where the proxy's ``sys/`` and ``dev/`` are (``[plugins.transport_hotadd]``)."""
    return str(config.plugins.get(PLUGIN_TABLE, {}).get("device_root", ""))


@dataclass
class _Plan:
    proxy_vm: ProxyVm | None
    wanted: list[VirtualDisk]
    refusals: dict[int, str]
    san_reasons: list[str] = field(default_factory=list)


@dataclass
class _Attachment:
    proxy_vm: ProxyVm
    disks: list[tuple[VirtualDisk, ScsiDisk]]


@contextlib.asynccontextmanager
async def attached_to_proxy(ctx: SessionContext, vm: VmInfo, disks: Sequence[VirtualDisk],
                            proxy: ProxyContext,
                            modes: Sequence[str]) -> AsyncIterator[ProxyContext]:
    """Attach the disks hot-add may read to the proxy VM; yields the proxy context that says
    where they are (and why the others are not); detaches them on the way out."""
    if MODE not in modes or not disks:
        yield proxy
        return
    proxy = replace(proxy, device_root=device_root(ctx.config))
    plan = await _plan(ctx, vm, disks, proxy, modes)
    attaching: asyncio.Future[_Attachment] | None = None
    try:
        attached: dict[int, str] = {}
        if plan.wanted and plan.proxy_vm is not None:
            # to the end: an attach or detach vCenter carries out while nobody waits would
            # leave a disk attached, or let the snapshot removal overtake it
            attaching = asyncio.ensure_future(_attach(ctx, vm, plan.proxy_vm, plan))
            try:
                attachment = await to_the_end(attaching)
            except VSphereError as e:
                reason = f"attaching it to proxy VM {plan.proxy_vm.name} failed: {e}"
                plan.refusals.update({d.key: reason for d in plan.wanted})
                ctx.say("warning", f"VM {vm.ref.name}: {reason}", vm=vm.ref.name)
            else:
                attached = {disk.key: str(_address(disk, device))
                            for disk, device in attachment.disks}
        yield replace(proxy, attached_disks=attached, hotadd_refusals=dict(plan.refusals))
    finally:
        if attaching is not None and attaching.done() and not attaching.cancelled() \
                and attaching.exception() is None:
            await to_the_end(asyncio.ensure_future(_detach(ctx, vm, attaching.result())))


def _address(disk: VirtualDisk, device: ScsiDisk) -> AttachedDisk:
    return AttachedDisk(device.bus, device.unit, device.uuid or disk.uuid)


async def _plan(ctx: SessionContext, vm: VmInfo, disks: Sequence[VirtualDisk],
                proxy: ProxyContext, modes: Sequence[str]) -> _Plan:
    def refuse_all(reason: str) -> _Plan:
        return _Plan(None, [], {d.key: reason for d in disks})

    name = proxy.proxy_vm
    if not name:
        return refuse_all(f"proxy {proxy.proxy} is not a VM (its [proxies.{proxy.proxy}] table "
                          f"names no `vm`), and hot-add attaches disks to the proxy's own VM")
    try:
        proxy_vm = await ctx.vsphere.proxy_vm(name)
    except NotFound:
        return refuse_all(f"proxy VM {name} was not found in vCenter {ctx.vsphere.settings.name}")
    except VSphereError as e:
        return refuse_all(f"proxy VM {name} cannot be inspected: {e}")
    if proxy_vm.moref == vm.ref.moref:
        return refuse_all(f"VM {vm.ref.name} is the proxy VM itself; its own disks cannot be "
                          f"hot-added to it")
    if proxy_vm.power_state != "poweredOn":
        return refuse_all(f"proxy VM {name} is {proxy_vm.power_state or 'not running'}; "
                          f"hot-added disks reach only a running guest")
    settings = ctx.config.proxies.get(proxy.proxy)
    san_first = ("san" in modes and list(modes).index("san") < list(modes).index(MODE)
                 and settings is not None and settings.address == "local")
    plan = _Plan(proxy_vm, [], {})
    for disk in disks:
        datastore = disk.backing.datastore
        if datastore not in proxy_vm.datastores:
            plan.refusals[disk.key] = (
                f"host {proxy_vm.host or '(none)'} of proxy VM {name} does not see datastore "
                f"{datastore} (it sees {', '.join(proxy_vm.datastores) or 'none'})")
            continue
        if san_first:
            why_not = await _san_cannot_read(ctx, vm, disk, proxy)
            if why_not is None:
                plan.refusals[disk.key] = ("not attached: the san mode could read this disk "
                                           "when the data transport began")
                continue
            plan.san_reasons.append(f"{disk.label}: {why_not}")
        plan.wanted.append(disk)
    return plan


async def _san_cannot_read(ctx: SessionContext, vm: VmInfo, disk: VirtualDisk,
                           proxy: ProxyContext) -> str | None:
    """Why ``san`` cannot read the disk from this machine, or ``None`` when it can."""
    san = transport_modes(ctx.engine.pm).get("san")
    if san is None:
        return "no loaded plugin provides the san mode"
    task = DiskTask(session_id=ctx.session_id, vm=vm.ref, disk_key=disk.key, label=disk.label,
                    capacity=disk.capacity, backing=disk.backing, change_id=disk.change_id,
                    disk_uuid=disk.uuid, datacenter=proxy.datacenter)
    try:
        probe = await san.probe(task, proxy)
    except Exception as e:  # a plugin's bug must not keep hot-add from being tried
        return f"its probe failed: {type(e).__name__}: {e}"
    return None if probe.usable else (probe.reason or "not usable")


async def _attach(ctx: SessionContext, vm: VmInfo, proxy_vm: ProxyVm,
                  plan: _Plan) -> _Attachment:
    name = vm.ref.name
    state = _state(ctx.engine, ctx.vsphere.settings.name, proxy_vm.name)
    files = {str(d.backing) for d in plan.wanted}
    why = f" (san cannot read them: {'; '.join(plan.san_reasons)})" if plan.san_reasons else ""
    ctx.say("info", f"VM {name}: hot-adding {len(plan.wanted)} disk(s) to proxy VM "
                    f"{proxy_vm.name}{why}", vm=name)
    tags = [DiskMark(ctx.engine.installation_id, ctx.session_id, str(d.backing)).tag
            for d in plan.wanted]
    async with state.lock:  # two sessions must not pick the same free SCSI unit
        state.in_use |= files
        try:
            devices = await ctx.vsphere.attach_disks(
                proxy_vm, [(d.backing, d.capacity) for d in plan.wanted], tags=tags)
        except BaseException:
            state.in_use -= files
            raise
    attachment = _Attachment(proxy_vm, list(zip(plan.wanted, devices, strict=True)))
    for disk, device in attachment.disks:
        address = _address(disk, device)
        ctx.emit(DiskAttached, vm=name, disk=disk.key, proxy_vm=proxy_vm.name,
                 device=str(address), file=str(disk.backing))
        ctx.say("info", f"VM {name}, {disk.label}: {disk.backing} attached to proxy VM "
                        f"{proxy_vm.name} at {address}", vm=name, disk=disk.key)
    return attachment


async def _detach(ctx: SessionContext, vm: VmInfo, attachment: _Attachment) -> None:
    """Detach, retrying a refusing vCenter a few times; a failure is reported, not raised
    (the snapshot removal that follows fails on its own, and the next daemon start detaches
    what is left)."""
    name, proxy_vm = vm.ref.name, attachment.proxy_vm
    state = _state(ctx.engine, ctx.vsphere.settings.name, proxy_vm.name)
    error: VSphereError | None = None
    for attempt in range(DETACH_ATTEMPTS):
        try:
            await ctx.vsphere.detach_disks(proxy_vm, [d.key for _, d in attachment.disks],
                                           untag=[d.address for _, d in attachment.disks])
            error = None
            break
        except VSphereError as e:
            error = e
            log.warning("%s: detaching from proxy VM %s failed (attempt %d of %d): %s",
                        ctx.session_id, proxy_vm.name, attempt + 1, DETACH_ATTEMPTS, e)
            if attempt + 1 < DETACH_ATTEMPTS:
                await asyncio.sleep(DETACH_RETRY_DELAY * (attempt + 1))
    state.in_use -= {str(disk.backing) for disk, _ in attachment.disks}
    for disk, device in attachment.disks:
        ctx.emit(DiskDetached, vm=name, disk=disk.key, proxy_vm=proxy_vm.name,
                 device=str(_address(disk, device)), file=str(disk.backing), ok=error is None,
                 reason="" if error is None else str(error))
    files = ", ".join(str(disk.backing) for disk, _ in attachment.disks)
    if error is None:
        ctx.say("info", f"VM {name}: {files} detached from proxy VM {proxy_vm.name}", vm=name)
    else:
        ctx.say("error", f"VM {name}: {files} could not be detached from proxy VM "
                         f"{proxy_vm.name} ({error}); the snapshot cannot be removed while "
                         f"they are attached; they are detached again after this session "
                         f"and at the next daemon start",
                vm=name)


async def detach_leftovers(engine: Engine, vsphere: VSphere, session_id: str) -> list[str]:
    """Detach the disks this installation left attached to this vCenter's proxy VMs
    (``session_id`` is the one asking: its own VMs are done); returns their files.

    A disk is taken only when it is an independent non-persistent disk from another VM's
    folder (what :func:`attached_to_proxy` attaches), its tag says this installation attached
    this very file there, and its session is not running (asked right before the detach).
    Tags of this installation whose disk is gone are cleared with them."""
    detached: list[str] = []
    for name in sorted({p.vm for p in engine.config.proxies.values() if p.vm}):
        try:
            proxy_vm = await vsphere.proxy_vm(name)
        except NotFound:
            continue  # a proxy VM of another vCenter
        state = _state(engine, vsphere.settings.name, name)
        async with state.lock:  # no session attaches meanwhile (and reuses a stale tag's unit)
            tags = await vsphere.hotadd_tags(proxy_vm)
            disks = await vsphere.foreign_disks(proxy_vm)
            ours = {address: mark for address, tag in tags.items()
                    if (mark := read_disk_mark(tag)) is not None
                    and mark.installation == engine.installation_id}
            leftovers = [d for d in disks if _left_over(engine, session_id, state, d,
                                                        ours.get(d.address))]
            present = {d.address: str(d.file) for d in disks}
            stale = [address for address, mark in ours.items()
                     if present.get(address) != mark.file]
            if not leftovers and not stale:
                continue
            files = ", ".join(str(d.file) for d in leftovers)
            try:
                await vsphere.detach_disks(proxy_vm, [d.key for d in leftovers],
                                           untag=[d.address for d in leftovers] + stale)
            except VSphereError as e:
                engine.bus.publish(SessionLog(
                    session_id=session_id, level="warning",
                    message=f"proxy VM {name}: {files or 'stale hot-add tags'}, left by an "
                            f"earlier run, cannot be detached: {e}"))
                continue
        for disk in leftovers:
            engine.bus.publish(DiskDetached(
                session_id=session_id, proxy_vm=name, device=str(AttachedDisk(
                    disk.bus, disk.unit, disk.uuid)), file=str(disk.file), orphan=True))
        if leftovers:
            engine.bus.publish(SessionLog(
                session_id=session_id, level="info",
                message=f"proxy VM {name}: {files}, left attached by an earlier run, was "
                        f"detached"))
        detached.extend(str(d.file) for d in leftovers)
    return detached


def _left_over(engine: Engine, session_id: str, state: _ProxyVmState, disk: ScsiDisk,
               mark: DiskMark | None) -> bool:
    """Whether ``disk`` is this installation's, attached by a session that is over."""
    return (mark is not None and mark.file == str(disk.file)
            and disk.mode == HOTADD_DISK_MODE and str(disk.file) not in state.in_use
            and (mark.session == session_id or mark.session not in engine.sessions))


__all__ = ["attached_to_proxy", "detach_leftovers", "device_root"]
