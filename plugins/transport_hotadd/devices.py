"""Finding a hot-added disk among the proxy's SCSI devices, as a Linux guest lists them.

Every SCSI device is a directory ``sys/bus/scsi/devices/H:C:T:L``: H is the guest's number
for the controller, T the disk's unit on it, L the LUN (0 for a virtual disk). A disk holds
its block device's name in ``block/<name>`` (``/dev/<name>``) and, when the VM has
``disk.EnableUUID = TRUE`` (which hot-add proxies should have), the virtual disk's UUID as its
``wwid`` (``naa.6000c29...``).

A disk is found by its UUID first. Without a WWID it is found by its address: target = the
unit vSphere gave it, LUN 0, on the SCSI host whose number is the controller's bus number,
which holds when the proxy VM's SCSI controllers are the guest's only SCSI hosts. Target 7 is
never a disk: it is the controller's own unit.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vbrd.errors import TransportError
from vbrd.models import AttachedDisk

SCSI_DEVICES = Path("sys/bus/scsi/devices")
SCSI_HOSTS = Path("sys/class/scsi_host")
CONTROLLER_UNIT = 7
_ADDRESS = re.compile(r"(\d+):(\d+):(\d+):(\d+)")


@dataclass(frozen=True, slots=True)
class ScsiDevice:
    """A SCSI disk of the proxy: its address, its block device, its WWID (may be empty)."""

    address: tuple[int, int, int, int]
    name: str
    node: Path
    wwid: str

    @property
    def label(self) -> str:
        return ":".join(map(str, self.address))


def _hex(text: str) -> str:
    text = text.strip().lower()
    for prefix in ("naa.", "t10.", "eui."):
        text = text.removeprefix(prefix)
    return re.sub(r"[^0-9a-f]", "", text)


def scsi_disks(root: Path) -> list[ScsiDevice]:
    """The disks the proxy's guest shows under ``root`` (``/`` on a real proxy)."""
    base = root / SCSI_DEVICES
    if not base.is_dir():
        raise TransportError(f"{base} does not exist: this proxy shows no SCSI devices "
                             f"(hot-add needs a Linux proxy VM)")
    disks = []
    for entry in sorted(base.iterdir()):
        match = _ADDRESS.fullmatch(entry.name)
        if match is None:
            continue
        address = (int(match[1]), int(match[2]), int(match[3]), int(match[4]))
        if address[2] == CONTROLLER_UNIT:
            continue
        try:
            names = [p.name for p in (entry / "block").iterdir()]
        except OSError:
            continue  # not a disk (a controller, an enclosure), or gone meanwhile
        if len(names) != 1:
            continue
        try:
            wwid = (entry / "wwid").read_text().strip()
        except OSError:
            wwid = ""
        disks.append(ScsiDevice(address, names[0], root / "dev" / names[0], wwid))
    return disks


def find_disk(root: Path, disk: AttachedDisk) -> ScsiDevice | None:
    """The proxy's device for ``disk``, or ``None`` while the guest does not show it."""
    devices = scsi_disks(root)
    uuid = _hex(disk.uuid)
    if uuid:
        same = [d for d in devices if d.wwid and _hex(d.wwid).endswith(uuid)]
        if len(same) > 1:
            raise TransportError(f"SCSI disks {', '.join(d.label for d in same)} of this proxy "
                                 f"all have UUID {disk.uuid}")
        if same:
            return same[0]
    for device in devices:
        if device.address != (disk.bus, 0, disk.unit, 0):
            continue
        # a WWID that is not the disk's belongs to another disk now at that address
        return device if not (uuid and device.wwid) else None
    return None


def rescan(root: Path) -> None:
    """Ask every SCSI host of the guest to look for new disks (best effort: needs root)."""
    hosts = root / SCSI_HOSTS
    if not hosts.is_dir():
        return
    for host in hosts.iterdir():
        try:
            (host / "scan").write_text("- - -")
        except OSError:
            pass
