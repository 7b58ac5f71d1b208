"""A stand-in for :class:`vbrd.vsphere.VSphere` that records what it was asked.

It answers the calls the Backup Manager makes (inventory, snapshots, hot-add) from plain
Python state, can be made slow or refusing call by call, and keeps a clock of its own that
moves one second per snapshot, so that ordering and cancellation can be checked exactly.
The real thing is exercised against the lab in tests/integration.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from vbrd.config import VCenterSettings
from vbrd.errors import NotFound, SnapshotError, SnapshotGone, VSphereError
from vbrd.models import DatastoreFile, Secret, VmRef
from vbrd.vsphere import ProxyVm, ScsiDisk, SnapshotInfo, VirtualDisk, VmInfo

MiB = 1 << 20
T0 = datetime(2024, 5, 1, 2, 0, tzinfo=UTC)


@dataclass
class FakeSnapshotRef:
    """What pyvmomi hands out for a snapshot: a handle with its moref."""

    _moId: str


def vdisk(key: int, file: str, capacity: int = 4 * MiB) -> VirtualDisk:
    return VirtualDisk(key=key, label=f"Hard disk {key - 1999}", capacity=capacity,
                       backing=DatastoreFile.parse(file), change_id=None, uuid="",
                       controller_key=1000, unit_number=key - 2000, independent=False)


def vm_info(name: str = "db01", moref: str = "vm-7", disks: Sequence[VirtualDisk] = (),
            **ref: Any) -> VmInfo:
    return VmInfo(ref=VmRef(name, moref, **ref), template=False, cbt_enabled=True,
                  disks=list(disks), folder_path="", cluster="", host="esx-01",
                  resource_pool="", has_snapshots=False)


def proxy_vm(**fields: Any) -> ProxyVm:
    values: dict[str, Any] = dict(name="backup-proxy", moref="vm-900", host="esx-01",
                                  power_state="poweredOn", datastores=("DS1", "DS2"),
                                  directory="backup-proxy", disks=[])
    values.update(fields)
    return ProxyVm(**values)


@dataclass
class FakeVCenter:
    """One vCenter: VMs, their snapshots, a proxy VM and the disks attached to it."""

    proxy: ProxyVm | None = None
    vms: list[VmInfo] = field(default_factory=list)
    snaps: dict[str, SnapshotInfo] = field(default_factory=dict)
    #: the proxy VM's foreign disks by device key, and its ``vbrd.hotadd.*`` tags by address
    attached: dict[int, ScsiDisk] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    now: datetime = T0
    log: list[tuple[str, Any]] = field(default_factory=list)
    attach_delay: float = 0.0
    detach_delay: float = 0.0
    detach_refusals: int = 0
    create_delay: float = 0.0
    remove_delay: float = 0.0
    #: morefs vCenter refuses to remove (as it does a snapshot whose disk is locked)
    refuse_removal: set[str] = field(default_factory=set)
    #: called in the middle of :meth:`snapshots` (the slow walk of every VM)
    during_walk: Callable[[], None] | None = None
    #: awaited once a snapshot exists, before vCenter answers the create call
    on_created: Callable[[SnapshotInfo], Awaitable[None]] | None = None
    settings: VCenterSettings = field(default_factory=lambda: VCenterSettings(
        "lab", "http://127.0.0.1:9/sdk", "user", Secret("p")))
    _ids: int = 0
    _busy: int = 0

    @contextlib.contextmanager
    def _working(self) -> Iterator[None]:
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    async def settled(self, timeout: float = 30.0) -> None:
        """Wait until no call is in progress (a call nobody waits for any more included)."""
        deadline = time.monotonic() + timeout
        while self._busy:
            assert time.monotonic() < deadline, "vCenter calls still running"
            await asyncio.sleep(0.01)

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.log]

    # inventory ------------------------------------------------------------------------

    async def connect(self) -> None:
        self.log.append(("connect", None))

    async def close(self) -> None:
        self.log.append(("closed", None))

    async def select_vms(self, job: Any) -> tuple[list[VmInfo], list[str]]:
        return [vm for vm in self.vms if vm.ref.name in job.vms], []

    async def refresh(self, vm: VmInfo) -> VmInfo:
        return vm

    async def set_change_tracking(self, vm: VmInfo, enabled: bool) -> None:
        self.log.append(("change tracking", (vm.ref.name, enabled)))
        vm.cbt_enabled = enabled

    async def vm_metadata(self, vm: VmInfo) -> dict[str, Any]:
        return {"name": vm.ref.name, "vmx_path": ""}

    # snapshots ------------------------------------------------------------------------

    async def server_time(self) -> datetime:
        return self.now

    def tick(self, seconds: float = 1.0) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now

    def add_snapshot(self, name: str, description: str, vm: str = "db01",
                     created: datetime | None = None) -> SnapshotInfo:
        """A snapshot that exists in vCenter (made by anyone)."""
        self._ids += 1
        snap = SnapshotInfo(f"snapshot-{self._ids}", name, description, vm,
                            self._vm_moref(vm), created or self.tick())
        self.snaps[snap.moref] = snap
        return snap

    def _vm_moref(self, name: str) -> str:
        return next((v.ref.moref for v in self.vms if v.ref.name == name), f"vm-{name}")

    async def create_snapshot(self, vm: VmInfo, name: str, description: str, *,
                              quiesce: bool) -> FakeSnapshotRef:
        with self._working():
            self.log.append(("create started", name))
            await asyncio.sleep(self.create_delay)
            snap = self.add_snapshot(name, description, vm.ref.name)
            self.log.append(("created", snap.moref))
            if self.on_created is not None:
                await self.on_created(snap)
            return FakeSnapshotRef(snap.moref)

    async def snapshot_info(self, vm: VmInfo, moref: str) -> SnapshotInfo | None:
        snap = self.snaps.get(moref)
        return snap if snap is not None and snap.vm == vm.ref.name else None

    async def snapshot_disks(self, snapshot: FakeSnapshotRef) -> list[VirtualDisk]:
        snap = self.snaps[snapshot._moId]
        return next((list(v.disks) for v in self.vms if v.ref.name == snap.vm), [])

    async def remove_snapshot(self, snapshot: FakeSnapshotRef, what: str) -> None:
        moref = snapshot._moId
        with self._working():
            self.log.append(("remove started", moref))
            await asyncio.sleep(self.remove_delay)
            if moref not in self.snaps:
                raise SnapshotGone(f"{what}: remove snapshot: vCenter has no snapshot {moref}")
            if moref in self.refuse_removal:
                self.log.append(("remove refused", moref))
                raise SnapshotError(f"{what}: remove snapshot: FileLocked")
            del self.snaps[moref]
            self.log.append(("removed", moref))

    async def snapshots(self) -> list[SnapshotInfo]:
        self.log.append(("walk", None))
        if self.during_walk is not None:
            self.during_walk()
        await asyncio.sleep(0)
        return list(self.snaps.values())

    def snapshot_by_moref(self, moref: str) -> FakeSnapshotRef:
        return FakeSnapshotRef(moref)

    def removed(self) -> list[str]:
        return [moref for kind, moref in self.log if kind == "removed"]

    # hot-add --------------------------------------------------------------------------

    async def proxy_vm(self, name: str) -> ProxyVm:
        if self.proxy is None or name != self.proxy.name:
            raise NotFound(f"VM {name!r} was not found in vCenter lab")
        return self.proxy

    async def attach_disks(self, vm: ProxyVm, disks: Sequence[tuple[DatastoreFile, int]], *,
                           tags: Sequence[str] = ()) -> list[ScsiDisk]:
        self.log.append(("attach started", [str(f) for f, _ in disks]))
        await asyncio.sleep(self.attach_delay)
        made = []
        units = [u for u in range(1, 16) if u != 7
                 and u not in {d.unit for d in self.attached.values()}]
        for i, (file, capacity) in enumerate(disks):
            disk = ScsiDisk(key=2099 + units[i], file=file, controller_key=1000, bus=0,
                            unit=units[i], uuid=f"6000c29{i}-0000-0000-0000-000000000000",
                            mode="independent_nonpersistent", capacity=capacity)
            self.attached[disk.key] = disk
            if tags:
                self.tags[disk.address] = tags[i]
            made.append(disk)
        self.log.append(("attached", [d.key for d in made]))
        return made

    def attach_leftover(self, file: str, tag: str | None = None, *,
                        mode: str = "independent_nonpersistent") -> ScsiDisk:
        """A disk on the proxy VM that someone attached earlier (``tag``: its mark)."""
        unit = min({u for u in range(1, 16) if u != 7}
                   - {d.unit for d in self.attached.values()})
        disk = ScsiDisk(key=2099 + unit, file=DatastoreFile.parse(file), controller_key=1000,
                        bus=0, unit=unit, uuid="", mode=mode, capacity=MiB)
        self.attached[disk.key] = disk
        if tag is not None:
            self.tags[disk.address] = tag
        return disk

    async def detach_disks(self, vm: ProxyVm, keys: Collection[int], *,
                           untag: Collection[str] = ()) -> None:
        await asyncio.sleep(self.detach_delay)
        if self.detach_refusals:
            self.detach_refusals -= 1
            self.log.append(("detach refused", sorted(keys)))
            raise VSphereError("vCenter is busy")
        for key in keys:
            self.attached.pop(key, None)
        for address in untag:
            self.tags.pop(address, None)
        self.log.append(("detached", sorted(keys)))

    async def foreign_disks(self, vm: ProxyVm) -> list[ScsiDisk]:
        return list(self.attached.values())

    async def hotadd_tags(self, vm: ProxyVm) -> dict[str, str]:
        return dict(self.tags)


__all__ = ["FakeSnapshotRef", "FakeVCenter", "MiB", "T0", "proxy_vm", "vdisk", "vm_info"]
