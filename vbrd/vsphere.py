"""vCenter/ESXi access: pyvmomi behind one small asyncio-friendly module.

pyvmomi is blocking; every call here runs in a small thread pool so the event loop never
waits on SOAP. A session is reused, and logged in again when vCenter says it expired.
Tasks are waited for by reading ``info.state``/``info.error``/``info.result`` by property
path, which works with every vCenter (reading a whole ``TaskInfo`` trips pyvmomi's type
checks on some servers).
"""
from __future__ import annotations

import asyncio
import fnmatch
import logging
import posixpath
import ssl
import time
import urllib.request
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import quote, urlencode, urlparse

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from vbrd.config import JobSettings, VCenterSettings
from vbrd.errors import (
    ChangeTrackingError,
    NotFound,
    SnapshotError,
    SnapshotGone,
    VSphereError,
)
from vbrd.models import DatastoreFile, Extent, VmRef

log = logging.getLogger(__name__)

T = TypeVar("T")

#: every snapshot vbrd makes is named so (vbrd.manager.ownership has the whole mark)
SNAPSHOT_PREFIX = "vbrd-"
#: the proxy VM's extraConfig keys under which hot-added disks are tagged (``…scsi0:1``)
HOTADD_TAG_PREFIX = "vbrd.hotadd."
#: Hot-added disks are read-only for the proxy: its writes would go to a redo log that is
#: discarded on detach.
HOTADD_DISK_MODE = "independent_nonpersistent"
SCSI_UNITS = 16
SCSI_CONTROLLER_UNIT = 7  # a SCSI controller's own unit on its bus

_VM_PROPERTIES = [
    "name", "config.template", "config.uuid", "config.guestId", "config.changeTrackingEnabled",
    "runtime.powerState", "runtime.host", "resourcePool", "parent", "guest.guestFamily",
    "guest.guestId", "guest.ipAddress", "guest.net", "guest.toolsRunningStatus",
    "snapshot",
]


@dataclass(frozen=True)
class VirtualDisk:
    """A virtual disk as one configuration (the VM's current one or a snapshot's) sees it."""

    key: int
    label: str
    capacity: int
    backing: DatastoreFile
    change_id: str | None
    uuid: str
    controller_key: int
    unit_number: int | None
    independent: bool


@dataclass(frozen=True)
class SnapshotInfo:
    """One node of a VM's snapshot tree; ``created`` is the host's clock (timezone-aware)."""

    moref: str
    name: str
    description: str
    vm: str
    vm_moref: str
    created: datetime


@dataclass
class VmInfo:
    """What the Manager needs to know about a VM to plan and protect it."""

    ref: VmRef
    template: bool
    cbt_enabled: bool
    disks: list[VirtualDisk]
    folder_path: str
    cluster: str
    host: str
    resource_pool: str
    has_snapshots: bool
    obj: Any = field(repr=False, default=None)


class VSphere:
    """One vCenter connection, used from the event loop."""

    def __init__(self, settings: VCenterSettings, *, workers: int = 4) -> None:
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=workers,
                                            thread_name_prefix=f"vsphere-{settings.name}")
        self._si: Any = None
        self._login_lock = asyncio.Lock()

    # plumbing --------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _connect_blocking(self) -> Any:
        url = urlparse(self.settings.url)
        kwargs: dict[str, Any] = {
            "host": url.hostname, "user": self.settings.user,
            "pwd": self.settings.password.reveal(), "connectionPoolTimeout": -1,
        }
        if url.scheme == "http":
            kwargs.update(protocol="http", port=url.port or 80)
        else:
            kwargs.update(port=url.port or 443)
            if not self.settings.verify_tls:
                kwargs["disableSslCertValidation"] = True
            else:
                kwargs["sslContext"] = ssl.create_default_context()
        try:
            return SmartConnect(**kwargs)
        except vim.fault.InvalidLogin:
            raise VSphereError(f"vCenter {self.settings.name} ({self.settings.url}): login "
                               f"refused for user {self.settings.user!r}") from None
        except (OSError, ConnectionError) as e:
            raise VSphereError(f"vCenter {self.settings.name} ({self.settings.url}) is not "
                               f"reachable: {e}") from None
        except Exception as e:  # pyvmomi raises many shapes of connection errors
            raise VSphereError(f"vCenter {self.settings.name} ({self.settings.url}): cannot "
                               f"connect: {type(e).__name__}: {e}") from None

    async def connect(self) -> None:
        async with self._login_lock:
            if self._si is None:
                self._si = await self._run(self._connect_blocking)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking pyvmomi call; log in again once if the session expired."""
        await self.connect()
        try:
            return await self._run(fn, *args)
        except vim.fault.NotAuthenticated:
            log.info("vCenter %s session expired; logging in again", self.settings.name)
            async with self._login_lock:
                self._si = await self._run(self._connect_blocking)
            return await self._run(fn, *args)

    async def close(self) -> None:
        if self._si is not None:
            si, self._si = self._si, None
            try:
                await self._run(Disconnect, si)
            except Exception:  # a dead session is as good as a closed one
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def server_time(self) -> datetime:
        """vCenter's clock now (what the snapshot hunter dates its walk by)."""
        return await self.call(lambda: self._si.CurrentTime())

    @property
    def content(self) -> Any:
        return self._si.RetrieveContent()

    def _retrieve(self, objects: list[Any], obj_type: Any,
                  paths: list[str]) -> list[dict[str, Any]]:
        pc = self._si.content.propertyCollector
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=o) for o in objects],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=obj_type, pathSet=paths)])
        out = []
        for oc in pc.RetrieveContents([spec]):
            props = {p.name: p.val for p in oc.propSet}
            props["__obj"] = oc.obj
            out.append(props)
        return out

    async def wait_task(self, task: Any, what: str, timeout: float = 3600) -> Any:
        """Wait for a vSphere task by property path; raise VSphereError with its fault."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            rows = await self.call(self._retrieve, [task], vim.Task,
                                   ["info.state", "info.error", "info.result"])
            props = rows[0] if rows else {}
            state = props.get("info.state")
            if state == vim.TaskInfo.State.success:
                return props.get("info.result")
            if state == vim.TaskInfo.State.error:
                err = props.get("info.error")
                msg = getattr(err, "msg", None) or type(err).__name__
                raise VSphereError(f"{what}: {msg}")
            if time.monotonic() > deadline:
                raise VSphereError(f"{what}: no answer from vCenter in {timeout:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    # inventory -------------------------------------------------------------------------

    def _all_vms_blocking(self) -> list[dict[str, Any]]:
        content = self._si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder,
                                                       [vim.VirtualMachine], True)
        try:
            vms = list(view.view)
        finally:
            view.Destroy()
        return self._retrieve(vms, vim.VirtualMachine, _VM_PROPERTIES) if vms else []

    def _describe_blocking(self, props: dict[str, Any]) -> VmInfo:
        vm = props["__obj"]
        host = props.get("runtime.host")
        host_name, cluster = "", ""
        if host is not None:
            host_name = host.name
            parent = host.parent
            if isinstance(parent, vim.ClusterComputeResource):
                cluster = parent.name
        pool = props.get("resourcePool")
        family = (props.get("guest.guestFamily") or "").lower()
        guest_id = props.get("guest.guestId") or props.get("config.guestId") or ""
        family = ("windows" if "windows" in family or guest_id.startswith("win") else
                  "linux" if "linux" in family or _looks_linux(guest_id) else "other")
        ips: list[str] = []
        for nic in props.get("guest.net") or []:
            ips.extend(a for a in (nic.ipAddress or []) if a not in ips)
        if props.get("guest.ipAddress") and props["guest.ipAddress"] not in ips:
            ips.insert(0, props["guest.ipAddress"])
        ref = VmRef(
            name=props["name"], moref=vm._moId, guest_family=family, guest_id=guest_id,
            ip_addresses=tuple(ips),
            tools_running=props.get("guest.toolsRunningStatus") == "guestToolsRunning",
            host=host_name, power_state=str(props.get("runtime.powerState") or ""),
            uuid=str(props.get("config.uuid") or ""))
        return VmInfo(
            ref=ref, template=bool(props.get("config.template")),
            cbt_enabled=bool(props.get("config.changeTrackingEnabled")),
            disks=_disks(vm.config.hardware.device) if vm.config else [],
            folder_path=_folder_path(props.get("parent")), cluster=cluster, host=host_name,
            resource_pool=pool.name if pool is not None else "",
            has_snapshots=props.get("snapshot") is not None, obj=vm)

    async def select_vms(self, job: JobSettings) -> tuple[list[VmInfo], list[str]]:
        """Resolve a job's selection now (so new VMs are picked up); returns the VMs and
        the problems to report (unknown names, templates)."""
        rows = await self.call(self._all_vms_blocking)
        problems: list[str] = []
        if job.tags:
            problems.append(f"tag selection ({', '.join(job.tags)}) needs the vSphere "
                            f"Automation API, which this vCenter connection does not offer")
        by_name = {r["name"]: r for r in rows}
        chosen: dict[str, dict[str, Any]] = {}
        for name in job.vms:
            if name in by_name:
                chosen[name] = by_name[name]
            else:
                problems.append(f"VM {name!r} was not found in vCenter {self.settings.name}")
        wanted_containers = bool(job.folders or job.clusters or job.hosts or job.resource_pools)
        infos: dict[str, VmInfo] = {}
        if wanted_containers:
            for row in rows:
                info = await self.call(self._describe_blocking, row)
                if (any(info.folder_path == f.strip("/") or
                        info.folder_path.startswith(f.strip("/") + "/") for f in job.folders)
                        or info.cluster in job.clusters or info.host in job.hosts
                        or info.resource_pool in job.resource_pools):
                    chosen[info.ref.name] = row
                    infos[info.ref.name] = info
        result: list[VmInfo] = []
        for name, row in sorted(chosen.items()):
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in job.exclude):
                continue
            known = infos.get(name)
            info = known if known is not None else await self.call(self._describe_blocking, row)
            if info.template:
                problems.append(f"VM {name!r} is a template and cannot be snapshotted; "
                                f"skipped")
                continue
            result.append(info)
        return result, problems

    async def vm_metadata(self, vm: VmInfo) -> dict[str, Any]:
        """The VM's configuration as a plain dict, saved with every restore point."""

        def collect() -> dict[str, Any]:
            cfg = vm.obj.config
            hw = cfg.hardware
            return {
                "name": cfg.name, "uuid": cfg.uuid, "instance_uuid": cfg.instanceUuid,
                "guest_id": cfg.guestId, "guest_full_name": cfg.guestFullName,
                "version": cfg.version, "num_cpu": hw.numCPU, "memory_mb": hw.memoryMB,
                "vmx_path": cfg.files.vmPathName if cfg.files else "",
                "devices": [_device_summary(d) for d in hw.device],
                "guest": {"family": vm.ref.guest_family, "guest_id": vm.ref.guest_id,
                          "ip_addresses": list(vm.ref.ip_addresses),
                          "tools_running": vm.ref.tools_running},
                "host": vm.host, "cluster": vm.cluster, "folder": vm.folder_path,
                "resource_pool": vm.resource_pool, "power_state": vm.ref.power_state,
            }

        return await self.call(collect)

    async def read_datastore_file(self, file: DatastoreFile, datacenter: str,
                                  limit: int = 4 << 20) -> bytes:
        """A small datastore file (the .vmx, a descriptor) over the host's HTTP access."""

        def fetch() -> bytes:
            url = urlparse(self.settings.url)
            query = urlencode({"dcPath": datacenter, "dsName": file.datastore})
            address = f"{url.scheme}://{url.netloc}/folder/{quote(file.path)}?{query}"
            cookie = self._si._stub.cookie.split(";", 1)[0]
            context = None
            if url.scheme == "https":
                context = (ssl.create_default_context() if self.settings.verify_tls
                           else ssl._create_unverified_context())
            request = urllib.request.Request(address, headers={"Cookie": cookie})
            try:
                with urllib.request.urlopen(request, timeout=60, context=context) as answer:
                    return answer.read(limit)
            except OSError as e:
                raise VSphereError(f"cannot read {file} from vCenter "
                                   f"{self.settings.name}: {e}") from None

        return await self.call(fetch)

    async def refresh(self, vm: VmInfo) -> VmInfo:
        rows = await self.call(self._retrieve, [vm.obj], vim.VirtualMachine, _VM_PROPERTIES)
        if not rows:
            raise NotFound(f"VM {vm.ref.name!r} is gone from vCenter {self.settings.name}")
        return await self.call(self._describe_blocking, rows[0])

    # change tracking -------------------------------------------------------------------

    async def set_change_tracking(self, vm: VmInfo, enabled: bool) -> None:
        spec = vim.vm.ConfigSpec(changeTrackingEnabled=enabled)
        task = await self.call(vm.obj.ReconfigVM_Task, spec)
        await self.wait_task(task, f"VM {vm.ref.name}: {'enable' if enabled else 'disable'} "
                                   f"changed block tracking")

    async def query_changed_areas(self, vm: VmInfo, snapshot: Any, disk: VirtualDisk,
                                  change_id: str) -> list[Extent]:
        """All areas of the disk changed since ``change_id`` (``*``: all allocated areas),
        looping over startOffset because one answer covers only a slice of the disk."""
        areas: list[Extent] = []
        offset = 0
        while offset < disk.capacity:
            try:
                info = await self.call(vm.obj.QueryChangedDiskAreas, snapshot, disk.key,
                                       offset, change_id)
            except vim.fault.FileFault as e:
                raise ChangeTrackingError(
                    f"VM {vm.ref.name}, disk {disk.label}: vCenter rejected changeId "
                    f"{change_id!r} ({getattr(e, 'msg', None) or 'FileFault'}); change tracking "
                    f"was reset") from None
            except vmodl.MethodFault as e:
                raise ChangeTrackingError(
                    f"VM {vm.ref.name}, disk {disk.label}: changed areas unavailable: "
                    f"{getattr(e, 'msg', None) or type(e).__name__}") from None
            for area in info.changedArea or []:
                areas.append(Extent(int(area.start), int(area.length)))
            covered = int(info.startOffset) + int(info.length)
            if covered <= offset:
                raise ChangeTrackingError(
                    f"VM {vm.ref.name}, disk {disk.label}: QueryChangedDiskAreas made no "
                    f"progress at offset {offset}")
            offset = covered
        return areas

    # snapshots -------------------------------------------------------------------------

    async def create_snapshot(self, vm: VmInfo, name: str, description: str, *,
                              quiesce: bool) -> Any:
        what = f"VM {vm.ref.name}: create snapshot {name}"
        try:
            task = await self.call(vm.obj.CreateSnapshot_Task, name, description, False,
                                   quiesce)
            snapshot = await self.wait_task(task, what)
        except vmodl.MethodFault as e:
            raise SnapshotError(f"{what}: {getattr(e, 'msg', '') or type(e).__name__}") \
                from None
        except VSphereError as e:
            raise SnapshotError(str(e)) from None
        if snapshot is None:
            raise SnapshotError(f"VM {vm.ref.name}: vCenter created snapshot {name} but did "
                                f"not name it")
        return snapshot

    async def remove_snapshot(self, snapshot: Any, what: str) -> None:
        """Remove (consolidate) a snapshot; :class:`SnapshotGone` when vCenter no longer has
        it (someone else removed it)."""
        try:
            task = await self.call(snapshot.RemoveSnapshot_Task, False)
            await self.wait_task(task, f"{what}: remove snapshot")
        except vmodl.fault.ManagedObjectNotFound:
            raise SnapshotGone(f"{what}: vCenter has no snapshot {snapshot._moId} any "
                               f"more") from None
        except vmodl.MethodFault as e:
            raise SnapshotError(f"{what}: remove snapshot: "
                                f"{getattr(e, 'msg', '') or type(e).__name__}") from None
        except VSphereError as e:
            raise SnapshotError(str(e)) from None

    async def snapshot_disks(self, snapshot: Any) -> list[VirtualDisk]:
        """The disks as the snapshot captured them: the point-in-time backings."""

        def read() -> list[VirtualDisk]:
            rows = self._retrieve([snapshot], vim.vm.Snapshot, ["config.hardware.device"])
            return _disks(rows[0].get("config.hardware.device") or []) if rows else []

        return await self.call(read)

    async def snapshots(self) -> list[SnapshotInfo]:
        """Every snapshot of every VM (for the snapshot hunter)."""

        def walk() -> list[SnapshotInfo]:
            return [snap for row in self._all_vms_blocking() for snap in _snapshot_tree(row)]

        return await self.call(walk)

    async def snapshot_info(self, vm: VmInfo, moref: str) -> SnapshotInfo | None:
        """The VM's snapshot ``moref`` as vCenter lists it now, or ``None`` when it is gone."""

        def find() -> SnapshotInfo | None:
            rows = self._retrieve([vm.obj], vim.VirtualMachine, ["name", "snapshot"])
            return next((snap for row in rows for snap in _snapshot_tree(row)
                         if snap.moref == moref), None)

        return await self.call(find)

    def snapshot_by_moref(self, moref: str) -> Any:
        return vim.vm.Snapshot(moref, self._si._stub)

    # hot-add ---------------------------------------------------------------------------
    # A proxy VM reads other VMs' snapshot disks by having them attached as more SCSI disks,
    # read-only (independent non-persistent: nothing the proxy does reaches the file), and
    # detached again without deleting the file.

    async def _vim(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`call`, with vSphere's faults as :class:`VSphereError` naming ``what``."""
        try:
            return await self.call(fn, *args)
        except vmodl.MethodFault as e:
            raise VSphereError(f"{what}: {getattr(e, 'msg', '') or type(e).__name__}") from None

    async def proxy_vm(self, name: str) -> ProxyVm:
        """The VM a proxy runs in: its host, the datastores that host sees, its disks."""
        return await self._vim(f"proxy VM {name}", self._proxy_vm_blocking, name)

    def _proxy_vm_blocking(self, name: str) -> ProxyVm:
        content = self._si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder,
                                                       [vim.VirtualMachine], True)
        try:
            vms = list(view.view)
        finally:
            view.Destroy()
        rows = self._retrieve(vms, vim.VirtualMachine, ["name"]) if vms else []
        found = [row["__obj"] for row in rows if row.get("name") == name]
        if not found:
            raise NotFound(f"VM {name!r} was not found in vCenter {self.settings.name}")
        vm = found[0]
        props = self._retrieve([vm], vim.VirtualMachine, [
            "runtime.host", "runtime.powerState", "config.files.vmPathName",
            "config.hardware.device"])[0]
        host_name, datastores = "", ()
        host = props.get("runtime.host")
        if host is not None:
            host_props = self._retrieve([host], vim.HostSystem, ["name", "datastore"])[0]
            host_name = host_props.get("name", "")
            mounted = list(host_props.get("datastore") or [])
            names = self._retrieve(mounted, vim.Datastore, ["name"]) if mounted else []
            datastores = tuple(sorted(row["name"] for row in names))
        vmx = props.get("config.files.vmPathName") or ""
        return ProxyVm(
            name=name, moref=vm._moId, host=host_name,
            power_state=str(props.get("runtime.powerState") or ""), datastores=datastores,
            directory=posixpath.dirname(DatastoreFile.parse(vmx).path) if vmx else "",
            disks=_scsi_disks(props.get("config.hardware.device") or []), obj=vm)

    def _scsi_disks_blocking(self, vm: Any) -> list[ScsiDisk]:
        rows = self._retrieve([vm], vim.VirtualMachine, ["config.hardware.device"])
        return _scsi_disks(rows[0].get("config.hardware.device") or []) if rows else []

    async def attach_disks(self, vm: ProxyVm, disks: Sequence[tuple[DatastoreFile, int]], *,
                           mode: str = HOTADD_DISK_MODE,
                           tags: Sequence[str] = ()) -> list[ScsiDisk]:
        """Attach existing disk files (with their capacities) to ``vm`` in one reconfigure,
        each on a free unit of its SCSI controllers — never unit 7, the controller's own —
        and, in the same reconfigure, tag each (``tags``, in the order of ``disks``) in the
        VM's extraConfig under ``vbrd.hotadd.scsiBUS:UNIT``. Returns the new disks in the
        order given."""
        what = f"VM {vm.name}: attach {', '.join(str(file) for file, _ in disks)}"
        if tags and len(tags) != len(disks):
            raise ValueError(f"{what}: {len(tags)} tags for {len(disks)} disks")
        spec, slots = await self._vim(what, self._attach_spec, vm, list(disks), mode,
                                      list(tags))
        task = await self._vim(what, vm.obj.ReconfigVM_Task, spec)
        await self.wait_task(task, what)
        current = {(d.controller_key, d.unit): d
                   for d in await self._vim(what, self._scsi_disks_blocking, vm.obj)}
        attached = []
        for (file, _), slot in zip(disks, slots, strict=True):
            disk = current.get(slot)
            if disk is None or disk.file != file:
                raise VSphereError(f"{what}: vCenter reported success but lists no disk "
                                   f"{file} on controller {slot[0]}, unit {slot[1]}")
            attached.append(disk)
        return attached

    def _attach_spec(self, vm: ProxyVm, disks: list[tuple[DatastoreFile, int]], mode: str,
                     tags: list[str]) -> tuple[Any, list[tuple[int, int]]]:
        devices = list(vm.obj.config.hardware.device)
        controllers = sorted((d for d in devices
                              if isinstance(d, vim.vm.device.VirtualSCSIController)),
                             key=lambda c: c.busNumber)
        if not controllers:
            raise VSphereError(f"VM {vm.name} has no SCSI controller to attach disks to")
        taken = {(d.controllerKey, d.unitNumber) for d in devices if d.unitNumber is not None}
        free = [(c.key, unit) for c in controllers for unit in range(SCSI_UNITS)
                if unit not in (SCSI_CONTROLLER_UNIT, c.scsiCtlrUnitNumber)
                and (c.key, unit) not in taken]
        if len(free) < len(disks):
            raise VSphereError(f"VM {vm.name}: its SCSI controllers have {len(free)} free "
                               f"unit(s); {len(disks)} disk(s) were to be attached")
        buses = {c.key: c.busNumber for c in controllers}
        changes, extra = [], []
        for i, ((file, capacity), (controller, unit)) in enumerate(
                zip(disks, free[:len(disks)], strict=True)):
            if tags:
                extra.append(vim.option.OptionValue(
                    key=hotadd_tag_key(buses[controller], unit), value=tags[i]))
            backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=str(file),
                                                                    diskMode=mode)
            device = vim.vm.device.VirtualDisk(
                key=-100 - i, controllerKey=controller, unitNumber=unit, backing=backing,
                capacityInKB=capacity // 1024, capacityInBytes=capacity)
            changes.append(vim.vm.device.VirtualDeviceSpec(
                operation=vim.vm.device.VirtualDeviceSpec.Operation.add, device=device))
        return vim.vm.ConfigSpec(deviceChange=changes, extraConfig=extra), free[:len(disks)]

    async def detach_disks(self, vm: ProxyVm, keys: Collection[int], *,
                           untag: Collection[str] = ()) -> None:
        """Remove disks from ``vm`` by device key in one reconfigure; their files stay (no
        destroy). Keys the VM no longer has are skipped. The same reconfigure clears the
        hot-add tags of the addresses in ``untag`` (``scsiBUS:UNIT``)."""
        what = f"VM {vm.name}: detach disk(s) {sorted(keys)}"
        spec = await self._vim(what, self._detach_spec, vm.obj, set(keys), sorted(untag))
        if spec is None:
            return
        task = await self._vim(what, vm.obj.ReconfigVM_Task, spec)
        await self.wait_task(task, what)

    def _detach_spec(self, vm: Any, keys: set[int], untag: list[str]) -> Any:
        changes = [vim.vm.device.VirtualDeviceSpec(
            operation=vim.vm.device.VirtualDeviceSpec.Operation.remove, device=d)
            for d in vm.config.hardware.device
            if isinstance(d, vim.vm.device.VirtualDisk) and d.key in keys]
        # vSphere removes an extraConfig key that is set to the empty string
        extra = [vim.option.OptionValue(key=f"{HOTADD_TAG_PREFIX}{address}", value="")
                 for address in untag]
        if not changes and not extra:
            return None
        return vim.vm.ConfigSpec(deviceChange=changes, extraConfig=extra)

    async def hotadd_tags(self, vm: ProxyVm) -> dict[str, str]:
        """The VM's hot-add tags by disk address (``scsiBUS:UNIT``)."""

        def read() -> dict[str, str]:
            rows = self._retrieve([vm.obj], vim.VirtualMachine, ["config.extraConfig"])
            options = (rows[0].get("config.extraConfig") or []) if rows else []
            return {str(o.key)[len(HOTADD_TAG_PREFIX):].lower(): str(o.value) for o in options
                    if str(o.key).lower().startswith(HOTADD_TAG_PREFIX) and o.value}

        return await self._vim(f"VM {vm.name}: read its hot-add tags", read)

    async def foreign_disks(self, vm: ProxyVm) -> list[ScsiDisk]:
        """The VM's disks whose files are not its own — not in a folder named like the VM's
        own folder on any datastore — i.e. other VMs' disks attached to it."""
        current = await self._vim(f"VM {vm.name}", self._scsi_disks_blocking, vm.obj)
        return [d for d in current if posixpath.dirname(d.file.path) != vm.directory]


def hotadd_tag_key(bus: int, unit: int) -> str:
    """The extraConfig key of the hot-add tag of the disk at ``scsiBUS:UNIT``."""
    return f"{HOTADD_TAG_PREFIX}scsi{bus}:{unit}"


def _snapshot_tree(row: dict[str, Any]) -> list[SnapshotInfo]:
    """The snapshots of one VM's ``name``/``snapshot`` properties, as a flat list."""
    out: list[SnapshotInfo] = []
    tree = row.get("snapshot")
    stack = list(tree.rootSnapshotList) if tree else []
    while stack:
        node = stack.pop()
        out.append(SnapshotInfo(node.snapshot._moId, node.name, node.description or "",
                                row["name"], row["__obj"]._moId, node.createTime))
        stack.extend(node.childSnapshotList or [])
    return out


def _looks_linux(guest_id: str) -> bool:
    return any(k in guest_id.lower() for k in (
        "linux", "debian", "ubuntu", "rhel", "centos", "sles", "suse", "oracle", "rocky",
        "alma", "fedora", "photon", "coreos", "amazonlinux"))


def _device_summary(device: Any) -> dict[str, Any]:
    summary: dict[str, Any] = {"key": device.key, "type": type(device).__name__,
               "label": device.deviceInfo.label if device.deviceInfo else ""}
    if isinstance(device, vim.vm.device.VirtualDisk):
        backing: Any = device.backing
        summary.update(capacity=_capacity(device), file=backing.fileName)
    return summary


def _capacity(device: Any) -> int:
    cap = getattr(device, "capacityInBytes", None)
    return int(cap) if cap else int(device.capacityInKB) * 1024


def _disks(devices: Any) -> list[VirtualDisk]:
    disks = []
    for d in devices:
        if not isinstance(d, vim.vm.device.VirtualDisk):
            continue
        backing: Any = d.backing
        mode = getattr(backing, "diskMode", "") or ""
        disks.append(VirtualDisk(
            key=d.key, label=d.deviceInfo.label if d.deviceInfo else f"disk {d.key}",
            capacity=_capacity(d), backing=DatastoreFile.parse(backing.fileName),
            change_id=getattr(backing, "changeId", None) or None,
            uuid=getattr(backing, "uuid", "") or "", controller_key=d.controllerKey or 0,
            unit_number=d.unitNumber, independent=mode.startswith("independent")))
    return disks


def _folder_path(folder: Any) -> str:
    parts: list[str] = []
    while folder is not None and isinstance(folder, vim.Folder):
        parent = folder.parent
        if parent is None or isinstance(parent, vim.Datacenter):
            break
        parts.append(folder.name)
        folder = parent
    return "/".join(reversed(parts))


# --------------------------------------------------------------------------------------------
# hot-add

@dataclass(frozen=True)
class ScsiDisk:
    """A virtual disk on one of a VM's SCSI controllers (``bus`` is the controller's)."""

    key: int
    file: DatastoreFile
    controller_key: int
    bus: int
    unit: int
    uuid: str
    mode: str
    capacity: int

    @property
    def address(self) -> str:
        """``scsiBUS:UNIT``, as the .vmx names the disk's place."""
        return f"scsi{self.bus}:{self.unit}"


@dataclass
class ProxyVm:
    """The VM a proxy runs in, as hot-add needs to know it."""

    name: str
    moref: str
    host: str
    power_state: str
    datastores: tuple[str, ...]
    directory: str  # the folder of its .vmx; its own disks live in folders of this name
    disks: list[ScsiDisk]
    obj: Any = field(repr=False, default=None)


def _scsi_disks(devices: Any) -> list[ScsiDisk]:
    buses = {d.key: d.busNumber for d in devices
             if isinstance(d, vim.vm.device.VirtualSCSIController)}
    disks = []
    for d in devices:
        if not isinstance(d, vim.vm.device.VirtualDisk) or d.controllerKey not in buses:
            continue
        name = getattr(d.backing, "fileName", "") or ""
        if not name.startswith("["):
            continue  # not a file on a datastore (a raw device mapping's LUN)
        disks.append(ScsiDisk(
            key=d.key, file=DatastoreFile.parse(name), controller_key=d.controllerKey,
            bus=buses[d.controllerKey], unit=d.unitNumber if d.unitNumber is not None else -1,
            uuid=getattr(d.backing, "uuid", "") or "",
            mode=getattr(d.backing, "diskMode", "") or "", capacity=_capacity(d)))
    return disks
