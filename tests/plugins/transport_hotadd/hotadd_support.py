"""A proxy VM's guest, and a Manager that attaches disks to it, without vSphere.

:class:`ProxyGuest` writes the SCSI devices a Linux guest shows (``sys/bus/scsi/devices/
H:C:T:L`` with ``wwid`` and ``block/sdX``, and ``dev/sdX``) under a root directory, as the
lab's simulator does for its proxy VM (``vbrd/lab/sim/hotadd.go``): a device node is a
symlink to a disk descriptor, or to any file or block device a test chooses.

:class:`AttachingMode` puts the ``hotadd`` mode behind what the Manager does before a data
mover starts (:mod:`vbrd.manager.hotadd`): it attaches the task's disk to the guest when the
datastore is one the proxy's host sees and the file exists, and otherwise hands the mode the
reason, as the Manager would. The transport contract suite runs ``hotadd`` through it.
"""
from __future__ import annotations

import itertools
import shutil
import uuid as uuids
from dataclasses import replace
from pathlib import Path

from vbrd.models import AttachedDisk, DiskTask, ProbeResult, ProxyContext
from vbrd.protocols import DiskReader, TransportMode

DEVICES = Path("sys/bus/scsi/devices")


def disk_name(index: int) -> str:
    name = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        name = chr(ord("a") + rest) + name
    return "sd" + name


class ProxyGuest:
    """The SCSI disks of a proxy VM's Linux guest, under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / DEVICES).mkdir(parents=True, exist_ok=True)
        (root / "dev").mkdir(parents=True, exist_ok=True)
        self._names: dict[str, str] = {}

    def add(self, target: Path, host: int, unit: int, uuid: str = "", *, lun: int = 0) -> str:
        """Show ``target`` as the disk at ``host:0:unit:lun``; returns its device name."""
        address = f"{host}:0:{unit}:{lun}"
        name = next(disk_name(i) for i in itertools.count()
                    if disk_name(i) not in self._names.values())
        (self.root / "dev" / name).symlink_to(target)
        device = self.root / DEVICES / address
        (device / "block" / name).mkdir(parents=True)
        (device / "vendor").write_text("VMware  \n")
        (device / "model").write_text("Virtual disk    \n")
        if uuid:
            (device / "wwid").write_text("naa." + uuid.replace("-", "").lower() + "\n")
        self._names[address] = name
        return name

    def remove(self, host: int, unit: int, lun: int = 0) -> None:
        address = f"{host}:0:{unit}:{lun}"
        name = self._names.pop(address)
        shutil.rmtree(self.root / DEVICES / address)
        (self.root / "dev" / name).unlink()


class AttachingMode:
    """``hotadd`` with the Manager's attach in front (see the module docstring)."""

    name = "hotadd"

    def __init__(self, mode: TransportMode, guest: ProxyGuest,
                 datastores: dict[str, Path]) -> None:
        self.mode, self.guest, self.datastores = mode, guest, datastores
        self._attached: dict[str, AttachedDisk] = {}
        self._units = itertools.count(1)

    def context(self, task: DiskTask) -> ProxyContext:
        base = ProxyContext(proxy="proxy-1", proxy_vm="backup-proxy",
                            device_root=str(self.guest.root))
        where = task.backing
        if where.datastore not in self.datastores:
            return replace(base, hotadd_refusals={task.disk_key: (
                f"host esx-01 of proxy VM backup-proxy does not see datastore "
                f"{where.datastore} (it sees {', '.join(sorted(self.datastores))})")})
        file = self.datastores[where.datastore] / where.path
        if not file.is_file():
            return replace(base, hotadd_refusals={task.disk_key: (
                f"attaching it to proxy VM backup-proxy failed: File {where} was not found")})
        key = str(where)
        if key not in self._attached:
            unit = next(self._units)
            unit += unit >= 7  # never the controller's own unit
            disk_uuid = str(uuids.uuid4())
            self.guest.add(file, 0, unit, disk_uuid)
            self._attached[key] = AttachedDisk(0, unit, disk_uuid)
        return replace(base, attached_disks={task.disk_key: str(self._attached[key])})

    async def probe(self, task: DiskTask, context: object) -> ProbeResult:
        return await self.mode.probe(task, self.context(task))

    async def open(self, task: DiskTask, context: object) -> DiskReader:
        return await self.mode.open(task, self.context(task))
