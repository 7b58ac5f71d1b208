"""Phase 5: move each disk's snapshot data into the repository; commit the restore point.

Per disk, Changed Block Tracking decides what is read: ``*`` (allocated areas) for a full,
the areas changed since the previous point's changeId for an incremental. When CBT cannot
answer (off, reset, changeId rejected) the whole disk is read and only blocks whose digest is
new are stored, and the reason is recorded. The restore point — and with it the changeIds —
becomes visible only once every disk's blocks are durable.
"""
from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vbrd.config import RepositorySettings
from vbrd.errors import ChangeTrackingError, TransportError, VbrdError
from vbrd.events import (
    DiskTransferred,
    Phase,
    PointCommitted,
    ResourceAssigned,
    ResourceReleased,
    TransferProgress,
    TransportSelected,
)
from vbrd.manager.context import SessionContext
from vbrd.manager.initialization import excluded_disk
from vbrd.manager.snapshot import TakenSnapshot
from vbrd.models import DatastoreFile, DiskTask, Extent, ProxyContext
from vbrd.repository import Repository
from vbrd.transport.movers import SourceSpec, TransferRules, read_block_map, run_transfer
from vbrd.vsphere import VirtualDisk, VmInfo

#: An incremental whose changed areas cover more than this share of the disk earns a warning.
SUSPICIOUS_CHANGE_SHARE = 0.9
#: How long gc after retention waits for other sessions' writers before leaving it for later.
GC_LOCK_TIMEOUT = 60.0


@dataclass
class DiskPlan:
    disk: VirtualDisk
    areas: list[Extent] | None
    incremental: bool
    reason: str


async def _plan_disk(ctx: SessionContext, vm: VmInfo, taken: TakenSnapshot,
                     disk: VirtualDisk, parent: Any) -> DiskPlan:
    """Which areas to read, from CBT when it can answer."""
    name = vm.ref.name
    if not ctx.job.cbt:
        return DiskPlan(disk, None, False, "changed block tracking is off for this job")
    if not disk.change_id:
        return DiskPlan(disk, None, False, "the disk reports no changeId (CBT not active)")
    previous = None
    if parent is not None:
        previous = next((d for d in parent.disks if d.key == disk.key), None)
    if previous is not None and previous.change_id and previous.capacity == disk.capacity:
        try:
            areas = await ctx.vsphere.query_changed_areas(vm, taken.obj, disk,
                                                          previous.change_id)
        except ChangeTrackingError as e:
            ctx.say("warning", f"VM {name}, {disk.label}: {e}; reading the whole disk and "
                               f"storing only blocks whose digest changed", vm=name,
                    disk=disk.key)
            return DiskPlan(disk, None, False, str(e))
        changed = sum(a.length for a in areas)
        if disk.capacity and changed > SUSPICIOUS_CHANGE_SHARE * disk.capacity:
            ctx.say("warning", f"VM {name}, {disk.label}: CBT reports {changed} of "
                               f"{disk.capacity} bytes changed since the last point — "
                               f"nearly the whole disk; was the disk rewritten or CBT reset?",
                    vm=name, disk=disk.key)
        return DiskPlan(disk, areas, True, f"CBT since {previous.change_id}")
    try:
        areas = await ctx.vsphere.query_changed_areas(vm, taken.obj, disk, "*")
    except ChangeTrackingError as e:
        return DiskPlan(disk, None, False, str(e))
    why = "first point of this disk" if previous is None else "previous point has no changeId"
    return DiskPlan(disk, areas, False, f"full ({why}): CBT allocated areas")


def _proxy_context(ctx: SessionContext) -> tuple[str, ProxyContext, list[str]]:
    """The proxy for this job's tasks and the transport modes to try, in order."""
    proxies = [ctx.config.proxies[p] for p in ctx.job.proxies] or list(
        ctx.config.proxies.values())
    if not proxies:
        raise TransportError("no proxy is configured ([proxies] is empty)")
    proxy = proxies[0]
    modes = [m for m in ctx.job.transport_order if m in proxy.transport_modes]
    if not modes:
        raise TransportError(f"proxy {proxy.name} offers {', '.join(proxy.transport_modes)}, "
                             f"but job {ctx.job.name} asks for {ctx.job.transport}")
    vc = ctx.config.vcenters[ctx.job.vcenter]
    return proxy.name, ProxyContext(
        proxy=proxy.name, san_paths=dict(proxy.san_paths), proxy_vm=proxy.vm,
        vcenter_url=vc.url, vcenter_user=vc.user, vcenter_password=vc.password,
        verify_tls=vc.verify_tls, datacenter=vc.datacenter or "DC0"), modes


async def run(ctx: SessionContext, vm: VmInfo, taken: TakenSnapshot) -> str:
    """Back up every disk of the snapshot; returns the committed restore point's id."""
    name = vm.ref.name
    settings: RepositorySettings = ctx.config.repositories[ctx.job.repository]
    async with ctx.phase(Phase.DATA_TRANSPORT, vm=name):
        repo = await asyncio.to_thread(
            Repository.open_or_create, settings.path, block_size=settings.block_size,
            compression_level=settings.compression_level)
        parent = await asyncio.to_thread(repo.latest_point, name)
        metadata = await ctx.vsphere.vm_metadata(vm)
        metadata["vmx"] = await _vmx_text(ctx, metadata)
        disks = [d for d in taken.disks
                 if not d.independent and not excluded_disk(ctx, name, d.key, d.label)]
        plans = [await _plan_disk(ctx, vm, taken, d, parent) for d in disks]
        transfers = _DiskTransfers(ctx, vm, taken, settings, repo)
        # Held from the first block stored to the commit: gc (exclusive) cannot remove the
        # blocks the movers store before the point that names them is visible.
        hold = await asyncio.to_thread(repo.writing)
        try:
            with tempfile.TemporaryDirectory(prefix="vbrd-index-") as workdir:
                done = await asyncio.gather(*(transfers.run(p, Path(workdir)) for p in plans))
                ctx.check_stop()
                point_id = await asyncio.to_thread(
                    _commit_point, repo, ctx.session_id, name, metadata,
                    parent.point_id if parent else None, done)
        finally:
            hold.release()
        ctx.emit(PointCommitted, vm=name, point_id=point_id, repository=settings.name)
        removed = await asyncio.to_thread(repo.apply_retention, name,
                                          ctx.job.retention_points)
        if removed:
            ctx.say("info", f"VM {name}: retention removed {len(removed)} old restore "
                            f"point(s): {', '.join(removed)}", vm=name)
            await asyncio.to_thread(repo.gc, timeout=GC_LOCK_TIMEOUT)
        return point_id


async def _vmx_text(ctx: SessionContext, metadata: dict[str, Any]) -> str:
    """The VM's .vmx, saved with the point so a restore can rebuild the VM as it was."""
    path = metadata.get("vmx_path") or ""
    if not path:
        return ""
    vc = ctx.config.vcenters[ctx.job.vcenter]
    try:
        raw = await ctx.vsphere.read_datastore_file(DatastoreFile.parse(path),
                                                    vc.datacenter or "DC0")
    except (VbrdError, ValueError) as e:
        ctx.say("warning", f"VM {metadata.get('name')}: the .vmx was not saved with the "
                           f"point: {e}", vm=str(metadata.get("name") or ""))
        return ""
    return raw.decode("utf-8", "replace")


class _DiskTransfers:
    """Runs one disk's pair of data movers at a time per free slot."""

    def __init__(self, ctx: SessionContext, vm: VmInfo, taken: TakenSnapshot,
                 settings: RepositorySettings, repo: Repository) -> None:
        self.ctx, self.vm, self.taken, self.settings = ctx, vm, taken, settings
        self.proxy_name, self.proxy_ctx, self.modes = _proxy_context(ctx)
        proxy = ctx.config.proxies[self.proxy_name]
        self.slots = asyncio.Semaphore(min(proxy.max_tasks, settings.max_tasks))
        self.rules = TransferRules(block_size=repo.block_size,
                                   compression_level=repo.compression_level,
                                   bandwidth_limit=None)

    async def run(self, plan: DiskPlan, workdir: Path) -> tuple[DiskPlan, Any, Path]:
        ctx, name, disk = self.ctx, self.vm.ref.name, plan.disk
        index_out = workdir / f"{disk.key}.map"
        task = DiskTask(
            session_id=ctx.session_id, vm=self.vm.ref, disk_key=disk.key, label=disk.label,
            capacity=disk.capacity, backing=disk.backing, snapshot_moref=self.taken.moref,
            change_id=disk.change_id, disk_uuid=disk.uuid,
            datacenter=self.proxy_ctx.datacenter)
        spec = SourceSpec(task=task, modes=self.modes, proxy=self.proxy_ctx, areas=plan.areas,
                          plugin_dirs=[str(p) for p in ctx.config.daemon.plugin_dirs])

        def progress(p: Any) -> None:
            ctx.emit(TransferProgress, vm=name, disk=disk.key, bytes_read=p.bytes_read,
                     bytes_sent=p.bytes_sent, bytes_done=p.bytes_done_of_total,
                     bytes_total=p.total_bytes, rate=p.rate_bps, bottleneck=p.bottleneck)

        async with self.slots:
            ctx.emit(ResourceAssigned, vm=name, disk=disk.key, proxy=self.proxy_name,
                     repository=self.settings.name)
            try:
                result = await run_transfer(spec, str(self.settings.path), self.rules,
                                            on_progress=progress, stop=ctx.stop,
                                            index_out=str(index_out))
            finally:
                ctx.emit(ResourceReleased, vm=name, disk=disk.key, proxy=self.proxy_name,
                         repository=self.settings.name)
        mode = result.mode if isinstance(result.mode, str) else "→".join(result.mode)
        ctx.emit(TransportSelected, vm=name, disk=disk.key, mode=mode,
                 skipped=tuple(tuple(f) for f in result.fallbacks))
        for failed_mode, why in result.fallbacks:
            ctx.say("info", f"VM {name}, {disk.label}: transport {failed_mode} not used: "
                            f"{why}", vm=name, disk=disk.key)
        ctx.emit(DiskTransferred, vm=name, disk=disk.key, mode=mode,
                 bytes_read=result.bytes_read, bytes_sent=result.bytes_sent,
                 bytes_stored=result.bytes_stored, blocks_total=result.blocks_total,
                 incremental=plan.incremental, reason=plan.reason)
        return plan, result, index_out


def _commit_point(repo: Repository, session_id: str, vm: str, metadata: dict[str, Any],
                  parent: str | None, done: list[tuple[DiskPlan, Any, Path]]) -> str:
    with repo.begin_point(vm, session_id=session_id, metadata=metadata,
                          parent=parent) as writer:
        for plan, _result, index_out in done:
            disk = plan.disk
            index = writer.add_disk(disk.key, label=disk.label, capacity=disk.capacity,
                                    inherit=plan.incremental)
            for block_no, digest in read_block_map(str(index_out)):
                index.set_block(block_no, digest)
            index.change_id = disk.change_id
        return writer.commit().point_id
