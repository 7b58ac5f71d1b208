"""Phase 5: move each disk's snapshot data into the repository; commit the restore point.

Per disk, Changed Block Tracking decides what is read: ``*`` (allocated areas) for a full,
the areas changed since the previous point's changeId for an incremental. When CBT cannot
answer (off, reset, changeId rejected) the whole disk is read and only blocks whose digest is
new are stored, and the reason is recorded. The restore point — and with it the changeIds —
becomes visible only once every disk's blocks are durable, and only when the snapshot they were
read from is still there (:func:`.snapshot.ensure_still_there`).

Each disk is a task for the resource scheduler (:mod:`vbrd.scheduler`): it waits for a slot
on a proxy that can read it and on the repository, then runs its pair of data movers there —
as children of this process for ``address = "local"``, through the agents otherwise
(:mod:`vbrd.transport.remote`), under the traffic rules' shares (:mod:`vbrd.transport.rules`).
The disks of a VM run side by side, as far as slots allow. A VM holds the slot of its first
disk from before its snapshot (:func:`first_slot`), so no VM sits snapshotted waiting for
a proxy. When a proxy fails under a task (its agent unreachable, its mover gone), the proxy
is taken out of rotation and the disk starts over on another candidate: the repository keeps
what was stored already (blocks are deduplicated), and the failed attempt's block map is
never used.
"""
from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Coroutine, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from vbrd.config import ProxySettings, RepositorySettings
from vbrd.errors import (
    ChangeTrackingError,
    RepositoryError,
    SessionStopped,
    VbrdError,
)
from vbrd.events import (
    DiskTransferred,
    Phase,
    PointCommitted,
    ResourceAssigned,
    ResourceReleased,
    ResourceWaiting,
    TransferProgress,
    TransportSelected,
)
from vbrd.manager import hotadd
from vbrd.manager.context import SessionContext
from vbrd.manager.initialization import excluded_disk
from vbrd.manager.snapshot import TakenSnapshot, ensure_still_there
from vbrd.models import DatastoreFile, DiskTask, Extent, ProxyContext
from vbrd.plugins import transport_mode_plugins
from vbrd.repository import Repository
from vbrd.scheduler import Lease, NoProxyAvailable, disk_candidates
from vbrd.transport.movers import (
    LOCAL_MOVERS,
    MoverHost,
    MoverLost,
    SourceSpec,
    TransferControl,
    TransferResult,
    TransferRules,
    TransferStalled,
    Watchdog,
    read_block_map,
    run_transfer,
)
from vbrd.transport.remote import AgentMovers
from vbrd.transport.spec import MAX_AREAS, TlsSettings, bounded_areas
from vbrd.vsphere import VirtualDisk, VmInfo

T = TypeVar("T")

#: An incremental whose changed areas cover more than this share of the disk earns a warning.
SUSPICIOUS_CHANGE_SHARE = 0.9


@dataclass
class DiskPlan:
    disk: VirtualDisk
    areas: list[Extent] | None
    incremental: bool
    reason: str
    #: the point ``areas`` are the changes since: the movers then read only those areas
    parent_point: str | None = None


async def _plan_disk(ctx: SessionContext, vm: VmInfo, taken: TakenSnapshot,
                     disk: VirtualDisk, parent: Any) -> DiskPlan:
    """Which areas to read, from CBT when it can answer."""
    name = vm.ref.name
    if not ctx.job.cbt:
        return DiskPlan(disk, None, False, "changed block tracking is off for this job")
    if not disk.change_id:
        why = ("changed block tracking is on for this job, but the disk's snapshot reports no "
               "change id, so CBT is not effective: the host does not track this disk's "
               "changes (CBT not supported there, or not active yet)")
        ctx.say("warning", f"VM {name}, {disk.label}: {why}; the whole disk is read and only "
                           f"blocks whose digest is new are stored", vm=name, disk=disk.key)
        return DiskPlan(disk, None, False, "the disk reports no change id (CBT not effective)")
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
        return DiskPlan(disk, _bounded(ctx, vm, disk, areas), True,
                        f"CBT since {previous.change_id}", parent.point_id)
    try:
        areas = await ctx.vsphere.query_changed_areas(vm, taken.obj, disk, "*")
    except ChangeTrackingError as e:
        return DiskPlan(disk, None, False, str(e))
    why = "first point of this disk" if previous is None else "previous point has no changeId"
    return DiskPlan(disk, _bounded(ctx, vm, disk, areas), False,
                    f"full ({why}): CBT allocated areas")


def _bounded(ctx: SessionContext, vm: VmInfo, disk: VirtualDisk,
             areas: list[Extent]) -> list[Extent]:
    """CBT's areas, merged, and no more than a data mover's task carries (:data:`MAX_AREAS`):
    beyond that the closest neighbours are read as one, which reads a little more."""
    bounded = bounded_areas(areas)
    if len(areas) > MAX_AREAS:
        exact = sum(a.length for a in bounded_areas(areas, len(areas)))
        more = sum(a.length for a in bounded) - exact
        if more:
            ctx.say("info", f"VM {vm.ref.name}, {disk.label}: CBT lists {len(areas)} areas, "
                            f"more than the {MAX_AREAS} of one transfer; the closest are read "
                            f"as one ({more} bytes more)", vm=vm.ref.name, disk=disk.key)
    return bounded


# --------------------------------------------------------------------------------------------
# slots


async def _unless_stopped(ctx: SessionContext, waiting: Awaitable[T]) -> T:
    """``waiting``, given up (and cancelled) when the session is asked to stop."""
    task = asyncio.ensure_future(waiting)
    stopping = asyncio.ensure_future(ctx.stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        raise SessionStopped(f"session {ctx.session_id} was asked to stop")
    return task.result()


async def acquire_slot(ctx: SessionContext, vm: str, disk: VirtualDisk,
                       failed: Mapping[str, str] | None = None) -> Lease:
    """Wait for a proxy and a repository slot for one disk (``failed``: the proxies this
    disk already failed on, and why); emits ``resource.waiting`` and ``resource.assigned``."""
    failed = failed or {}
    settings = ctx.config.repositories[ctx.job.repository]
    candidates, passed_over = disk_candidates(ctx.job, ctx.config.proxies, settings,
                                              disk.backing.datastore)
    candidates = [c for c in candidates if c.proxy not in failed]
    if not candidates:
        reasons = passed_over + [f"proxy {p} failed: {why}" for p, why in failed.items()]
        raise NoProxyAvailable(f"no proxy can read {disk.label} of VM {vm}: "
                               + ("; ".join(reasons) or "[proxies] is empty"))

    def waiting(reason: str) -> None:
        ctx.emit(ResourceWaiting, vm=vm, disk=disk.key, reason=reason)

    lease = await _unless_stopped(ctx, ctx.engine.scheduler.acquire(
        ctx.session_id, candidates, settings.name, label=f"{disk.label} of VM {vm}",
        on_wait=waiting))
    ctx.emit(ResourceAssigned, vm=vm, disk=disk.key, proxy=lease.proxy,
             repository=lease.repository, reason=lease.reason)
    return lease


def give_back(ctx: SessionContext, lease: Lease, vm: str, disk: int) -> None:
    """Release a slot (once) and say so."""
    if not lease.released:
        lease.release()
        ctx.emit(ResourceReleased, vm=vm, disk=disk, proxy=lease.proxy,
                 repository=lease.repository)


@dataclass
class HeldSlot:
    """The slot a VM takes before its snapshot, handed to its first disk's transfer."""

    disk: int
    lease: Lease | None

    def take(self, disk: int) -> Lease | None:
        if disk != self.disk:
            return None
        lease, self.lease = self.lease, None
        return lease


@contextlib.asynccontextmanager
async def first_slot(ctx: SessionContext, vm: VmInfo) -> AsyncIterator[HeldSlot | None]:
    """Wait for the slot of the VM's first disk; give it back at the end unless a transfer
    took it."""
    name = vm.ref.name
    disks = [d for d in vm.disks
             if not d.independent and not excluded_disk(ctx, name, d.key, d.label)]
    if not disks:
        yield None
        return
    held = HeldSlot(disks[0].key, await acquire_slot(ctx, name, disks[0]))
    try:
        yield held
    finally:
        if held.lease is not None:
            give_back(ctx, held.lease, name, held.disk)


async def _all_or_none(jobs: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``jobs`` side by side; the first failure stops the others (their movers and slots
    go with them) and is raised as itself."""
    tasks: list[asyncio.Task[T]] = []
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(job) for job in jobs]
    except BaseExceptionGroup as failed:
        leaves: list[BaseException] = []

        def walk(g: BaseExceptionGroup) -> None:
            for e in g.exceptions:
                walk(e) if isinstance(e, BaseExceptionGroup) else leaves.append(e)

        walk(failed)
        for kind in (SessionStopped, VbrdError, Exception, BaseException):
            for e in leaves:
                if isinstance(e, kind):
                    raise e from None
        raise
    return [t.result() for t in tasks]


#: VMs run side by side: the first two to find a new repository must not both create it.
_CREATING = threading.Lock()


def _open_repository(settings: RepositorySettings) -> Repository:
    """The job's repository; a backup of a local one may create it (``just_created``)."""
    if not settings.agent.remote:
        with _CREATING:
            return Repository.open_or_create(settings.path, block_size=settings.block_size,
                                             compression_level=settings.compression_level)
    try:
        return Repository.open(settings.path)
    except RepositoryError as e:
        raise RepositoryError(
            f"repository {settings.name} is stored by the agent at {settings.address}; the "
            f"backup server keeps its restore points through {settings.path}, which must be "
            f"the same repository (a shared mount): {e}") from e


async def run(ctx: SessionContext, vm: VmInfo, taken: TakenSnapshot,
              held: HeldSlot | None = None) -> str:
    """Back up every disk of the snapshot; returns the committed restore point's id.
    ``held`` is the VM's slot from :func:`first_slot`, for the disk it was taken for.

    Once the point is committed nothing here fails the VM: retention's trouble is a
    warning, and gc is not run here at all but asked of the repository's maintenance
    (:func:`maintain_repositories`, at the session's end)."""
    name = vm.ref.name
    settings: RepositorySettings = ctx.config.repositories[ctx.job.repository]
    async with ctx.phase(Phase.DATA_TRANSPORT, vm=name):
        repo = await asyncio.to_thread(_open_repository, settings)
        if repo.just_created:
            ctx.say("info", f"created the repository {settings.name} at {settings.path} "
                            f"(block size {repo.block_size} bytes): there was none yet")
        choice = await asyncio.to_thread(repo.choose_parent, name)
        if choice.warning:
            ctx.say("warning", f"VM {name}: {choice.warning}", vm=name)
        parent = choice.point
        metadata = await ctx.vsphere.vm_metadata(vm)
        metadata["vmx"] = await _vmx_text(ctx, metadata)
        disks = [d for d in taken.disks
                 if not d.independent and not excluded_disk(ctx, name, d.key, d.label)]
        plans = [await _plan_disk(ctx, vm, taken, d, parent) for d in disks]
        transfers = _DiskTransfers(ctx, vm, taken, settings, repo, held)
        # Held from the first block stored to the commit: gc (exclusive) cannot remove the
        # blocks the movers store before the point that names them is visible.
        hold = await asyncio.to_thread(repo.writing)
        try:
            with tempfile.TemporaryDirectory(prefix="vbrd-index-") as workdir:
                done = await _all_or_none([transfers.run(p, Path(workdir)) for p in plans])
                ctx.check_stop()
                # read from a snapshot removed underneath, the blocks are no image of the VM
                await ensure_still_there(ctx, taken)
                point_id = await asyncio.to_thread(
                    _commit_point, repo, ctx.session_id, name, metadata,
                    parent.point_id if parent else None, done)
        finally:
            hold.release()
        ctx.emit(PointCommitted, vm=name, point_id=point_id, repository=settings.name)
        try:
            removed = await asyncio.to_thread(repo.apply_retention, name,
                                              ctx.job.retention_points)
        except (RepositoryError, OSError) as e:
            ctx.say("warning", f"VM {name}: restore point {point_id} is committed, but "
                               f"retention could not delete old points ({e}); the next "
                               f"backup tries again", vm=name)
        else:
            if removed:
                ctx.say("info", f"VM {name}: retention removed {len(removed)} old restore "
                                f"point(s): {', '.join(removed)}", vm=name)
                ctx.engine.maintenance.request(settings.name)
        return point_id


async def maintain_repositories(ctx: SessionContext) -> None:
    """At a session's end: gc the repositories that asked for it and no writer holds now.
    What it did goes into the session's log; it never changes any VM's outcome."""
    for result in await ctx.engine.maintenance.run_wanted(ctx.engine.repository):
        name = result["repository"]
        if result.get("ran"):
            ctx.say("info", f"repository {name}: gc removed {result['blocks_removed']} "
                            f"unused blocks ({result['bytes_freed']} bytes)")
            if result.get("quarantined"):
                ctx.say("warning", f"repository {name}: gc found restore point(s) "
                                   f"{', '.join(result['quarantined'])} damaged and "
                                   f"quarantined them; their VMs' next backups are full")
        elif "error" in result:
            ctx.say("warning", f"repository {name}: gc failed ({result['error']}); it is "
                               f"tried again after the next session, or run `vbrctl gc`")
        else:
            ctx.say("info", f"repository {name}: gc left for later: {result['reason']}")


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
    """One VM's disks: each waits for its slot, runs its movers, moves on when a proxy fails."""

    def __init__(self, ctx: SessionContext, vm: VmInfo, taken: TakenSnapshot,
                 settings: RepositorySettings, repo: Repository,
                 held: HeldSlot | None) -> None:
        self.ctx, self.vm, self.taken, self.settings = ctx, vm, taken, settings
        self.held = held
        self.rules = TransferRules(block_size=repo.block_size,
                                   compression_level=repo.compression_level,
                                   bandwidth_limit=None)

    async def run(self, plan: DiskPlan, workdir: Path) -> tuple[DiskPlan, Any, Path]:
        ctx, name, disk = self.ctx, self.vm.ref.name, plan.disk
        index_out = workdir / f"{disk.key}.map"
        failed: dict[str, str] = {}
        stalled: set[str] = set()  # modes a transfer of this disk stalled in
        lease = self.held.take(disk.key) if self.held is not None else None
        while True:
            if lease is None:
                lease = await acquire_slot(ctx, name, disk, failed)
            try:
                result = await self._transfer(lease, plan, index_out, workdir, stalled)
                break
            except TransferStalled as e:
                if ctx.stop.is_set():
                    raise
                proxy = ctx.config.proxies[lease.proxy]
                if e.mode:
                    stalled.add(e.mode)
                left = [m for m in ctx.job.transport_order
                        if proxy.offers(m) and m not in stalled]
                if e.mode and left:
                    ctx.say("warning", f"VM {name}, {disk.label}: {e}; the disk starts over "
                                       f"on proxy {lease.proxy} without transport {e.mode}",
                            vm=name, disk=disk.key)
                    continue
                failed[lease.proxy] = str(e)
                stalled.clear()
                ctx.say("warning", f"VM {name}, {disk.label}: {e}; the disk starts over on "
                                   f"another proxy if one can take it", vm=name, disk=disk.key)
            except MoverLost as e:
                if e.role != "source" or ctx.stop.is_set():
                    raise
                failed[lease.proxy] = str(e)
                ctx.engine.scheduler.mark_down(lease.proxy, str(e))
                ctx.say("warning", f"VM {name}, {disk.label}: proxy {lease.proxy} failed "
                                   f"({e}); the disk starts over on another proxy", vm=name,
                        disk=disk.key)
            finally:
                give_back(ctx, lease, name, disk.key)
                lease = None
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

    async def _transfer(self, lease: Lease, plan: DiskPlan, index_out: Path,
                        workdir: Path, stalled: set[str]) -> TransferResult:
        """One attempt: the disk's movers on the lease's proxy and repository, with the
        proxy's modes of the job except those an attempt already stalled in."""
        ctx, name, disk = self.ctx, self.vm.ref.name, plan.disk
        proxy = ctx.config.proxies[lease.proxy]
        modes = [m for m in ctx.job.transport_order
                 if proxy.offers(m) and m not in stalled]
        repository, source_host, target_host, tls = await self._hosts(proxy, workdir)
        control = TransferControl()
        with ctx.engine.shaper.join(proxy, self.settings, control) as flow:
            if flow.limit is not None:
                ctx.say("info", f"VM {name}, {disk.label}: {flow.why}; this transfer starts "
                                f"at {flow.limit / 1e6:.1f} MB/s", vm=name, disk=disk.key)
            rules = replace(self.rules, tls=tls, bandwidth_limit=flow.limit)
            # hot-add: the proxy VM holds the snapshot's disk while the movers read it
            async with hotadd.attached_to_proxy(ctx, self.vm, [disk],
                                                self._proxy_context(proxy),
                                                modes) as proxy_ctx:
                task = DiskTask(
                    session_id=ctx.session_id, vm=self.vm.ref, disk_key=disk.key,
                    label=disk.label, capacity=disk.capacity, backing=disk.backing,
                    snapshot_moref=self.taken.moref, change_id=disk.change_id,
                    disk_uuid=disk.uuid, datacenter=proxy_ctx.datacenter)
                providers = transport_mode_plugins(ctx.engine.pm)
                spec = SourceSpec(task=task, modes=modes, proxy=proxy_ctx, areas=plan.areas,
                                  plugin_dirs=[str(p) for p in ctx.config.daemon.plugin_dirs],
                                  disabled_plugins=list(ctx.config.daemon.disabled_plugins),
                                  plugin_names=sorted({providers[m] for m in modes
                                                       if m in providers}))

                def progress(p: Any) -> None:
                    ctx.emit(TransferProgress, vm=name, disk=disk.key,
                             bytes_read=p.bytes_read, bytes_sent=p.bytes_sent,
                             bytes_done=p.bytes_done_of_total, bytes_total=p.total_bytes,
                             rate=p.rate_bps, bottleneck=p.bottleneck)

                return await run_transfer(spec, repository, rules, on_progress=progress,
                                          stop=ctx.stop, index_out=str(index_out),
                                          control=control, source_host=source_host,
                                          target_host=target_host,
                                          parent_point=plan.parent_point,
                                          watchdog=Watchdog(ctx.config.daemon.stall_timeout))

    def _proxy_context(self, proxy: ProxySettings) -> ProxyContext:
        vc = self.ctx.config.vcenters[self.ctx.job.vcenter]
        return ProxyContext(
            proxy=proxy.name, san_paths=dict(proxy.san_paths), proxy_vm=proxy.vm,
            vcenter_url=vc.url, vcenter_user=vc.user, vcenter_password=vc.password,
            verify_tls=vc.verify_tls, datacenter=vc.datacenter or "DC0")

    async def _hosts(self, proxy: ProxySettings, workdir: Path
                     ) -> tuple[str, MoverHost, MoverHost, TlsSettings | None]:
        """Where each side runs, how the repository side is named there, and TLS: on when
        the repository side runs on an agent's host, trusting only that agent's certificate."""
        agents = self.ctx.engine.agents
        repository = self.settings
        if not repository.agent.remote:
            return str(repository.path), LOCAL_MOVERS, LOCAL_MOVERS, None
        client = agents.get(f"repository {repository.name}", repository.agent)
        certificate = await client.certificate()
        target_host: MoverHost = AgentMovers(client)
        if proxy.agent.remote:
            source = agents.get(f"proxy {proxy.name}", proxy.agent)
            return repository.name, AgentMovers(source, certificate), target_host, TlsSettings()
        pinned = workdir / f"repository-{repository.name}.pem"
        pinned.write_text(certificate)
        return repository.name, LOCAL_MOVERS, target_host, TlsSettings(cafile=str(pinned))


def _commit_point(repo: Repository, session_id: str, vm: str, metadata: dict[str, Any],
                  parent: str | None, done: list[tuple[DiskPlan, Any, Path]]) -> str:
    with repo.begin_point(vm, session_id=session_id, metadata=metadata,
                          parent=parent) as writer:
        for plan, result, index_out in done:
            disk = plan.disk
            index = writer.add_disk(disk.key, label=disk.label, capacity=disk.capacity,
                                    inherit=plan.incremental)
            index.blocks_durable = result.blocks_durable
            for block_no, digest in read_block_map(str(index_out)):
                index.set_block(block_no, digest)
            index.change_id = disk.change_id
        return writer.commit().point_id
