"""Virtual Appliance / HotAdd (mode ``hotadd``): the proxy runs in a VM, the Manager attaches
the snapshot's disks to that VM read-only (:mod:`vbrd.manager.hotadd`), and the proxy reads
them as its own SCSI disks, found under ``/sys/bus/scsi/devices`` by the disk's UUID or its
SCSI address. Faster than ``nbd`` and needs no storage path of its own, only a proxy VM on a
host that sees the datastore.

Where the proxy's ``sys/`` and ``dev/`` are is set in ``[plugins.transport_hotadd]``::

    [plugins.transport_hotadd]
    device_root = "/"      # the default; the lab points it at the tree its simulator keeps
"""
from __future__ import annotations

from typing import Any

from vbrd import hookimpl
from vbrd.protocols import TransportMode

from .mode import HotaddMode

PLUGIN_TABLE = "transport_hotadd"
SETTINGS = ("device_root",)


@hookimpl
def vbrd_transport_modes() -> list[TransportMode]:
    return [HotaddMode()]


@hookimpl
def vbrd_validate_plugin_config(name: str, table: dict[str, Any]) -> list[str] | None:
    if name != PLUGIN_TABLE:
        return None
    problems = [f"unknown key {key!r} (known: {', '.join(SETTINGS)})"
                for key in table if key not in SETTINGS]
    root = table.get("device_root", "/")
    if not isinstance(root, str) or not root.startswith("/"):
        problems.append(f"device_root must be an absolute path, not {root!r}")
    return problems
