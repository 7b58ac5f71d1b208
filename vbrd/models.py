"""Plain data passed between the Manager, the plugins and the data movers.

These are values, not handles: a :class:`DiskTask` can be pickled to a data mover process
and describes everything a transport mode needs to find the snapshot's bytes of one disk.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Extent:
    """A byte range of a disk: ``[offset, offset + length)``."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class DatastoreFile:
    """A file on a datastore, as vSphere names it (``[LocalDS_0] vm/disk1.vmdk``)."""

    datastore: str
    path: str

    @classmethod
    def parse(cls, name: str) -> DatastoreFile:
        if not name.startswith("["):
            raise ValueError(f"not a datastore path: {name!r}")
        ds, _, rest = name[1:].partition("]")
        return cls(ds, rest.strip())

    def __str__(self) -> str:
        return f"[{self.datastore}] {self.path}"


@dataclass(frozen=True, slots=True)
class VmRef:
    """A protected VM as the Manager resolved it at the start of a session."""

    name: str
    moref: str
    guest_family: str = "other"  # "windows" | "linux" | "other"
    guest_id: str = ""
    ip_addresses: tuple[str, ...] = ()
    tools_running: bool = False
    host: str = ""
    power_state: str = "poweredOn"
    uuid: str = ""  # the BIOS UUID (config.uuid): what the guest shows as its SMBIOS UUID


@dataclass(frozen=True, slots=True)
class DiskTask:
    """One task of a session: one disk of one VM, read from one snapshot.

    ``backing`` is the disk's descriptor *as the snapshot sees it* (the point-in-time chain),
    never the VM's current (writable) delta.
    """

    session_id: str
    vm: VmRef
    disk_key: int
    label: str
    capacity: int
    backing: DatastoreFile
    snapshot_moref: str = ""
    change_id: str | None = None
    disk_uuid: str = ""
    datacenter: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Whether a transport mode can read a disk from a proxy, and if not, why."""

    usable: bool
    reason: str = ""

    @classmethod
    def ok(cls) -> ProbeResult:
        return cls(True)

    @classmethod
    def no(cls, reason: str) -> ProbeResult:
        return cls(False, reason)


@dataclass(frozen=True, slots=True)
class Secret:
    """A credential value that never shows in reprs, logs or events."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def reveal(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class AttachedDisk:
    """Where a disk the Manager hot-added to the proxy VM shows up inside the proxy.

    ``bus`` is the number of the proxy VM's SCSI controller, ``unit`` the disk's unit on it
    (never 7, the controller's own), ``uuid`` the virtual disk's UUID, which a Linux guest
    shows as the device's WWID when the proxy VM has ``disk.EnableUUID``. ``str()`` gives
    the form :attr:`ProxyContext.attached_disks` carries: ``scsi0:1 6000c29a-...``.
    """

    bus: int
    unit: int
    uuid: str = ""

    def __str__(self) -> str:
        return f"scsi{self.bus}:{self.unit} {self.uuid}".rstrip()

    @classmethod
    def parse(cls, text: str) -> AttachedDisk:
        address, _, uuid = text.strip().partition(" ")
        bus, sep, unit = address.removeprefix("scsi").partition(":")
        if not address.startswith("scsi") or not sep or not bus.isdigit() or not unit.isdigit():
            raise ValueError(f"not a hot-added disk's address: {text!r}")
        return cls(int(bus), int(unit), uuid.strip())


@dataclass(frozen=True, slots=True)
class ProxyContext:
    """What a transport mode needs to know about the proxy it runs on.

    Built by the Manager, shipped to the proxy's data mover, handed to ``probe``/``open``.
    For hot-add, ``attached_disks`` maps a disk key to where the disk sits on the proxy VM
    (``str`` of :class:`AttachedDisk`), ``hotadd_refusals`` a disk key to why the Manager did
    not attach it, and ``device_root`` is the directory under which the proxy's ``sys/`` and
    ``dev/`` are found (empty: ``/``; the lab keeps a stand-in tree of its own).
    """

    proxy: str
    san_paths: dict[str, str] = field(default_factory=dict)
    proxy_vm: str = ""
    vcenter_url: str = ""
    vcenter_user: str = ""
    vcenter_password: Secret = Secret("")
    verify_tls: bool = True
    datacenter: str = "DC0"
    attached_disks: dict[int, str] = field(default_factory=dict)
    hotadd_refusals: dict[int, str] = field(default_factory=dict)
    device_root: str = ""
