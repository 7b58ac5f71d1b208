"""The ``hotadd`` mode: the snapshot's disk read as a disk of the proxy's own VM.

The Manager has attached the disk before the data mover starts and names where it sits in
``ProxyContext.attached_disks`` (or why it did not attach it, in ``hotadd_refusals``); this
mode finds the block device (:mod:`.devices`) and reads it. A real block device is read raw
with large ``pread`` calls in worker threads: the guest's view of the attached disk is already
the whole snapshot chain flattened by ESXi. A device node that is a VMDK descriptor instead
(the lab's stand-in for a disk, having no kernel of its own) is read through the chain
reader, which gives the same bytes.

A freshly attached disk may take a moment to show up in the guest; ``open`` waits for it up
to :data:`DEVICE_WAIT` seconds and asks the SCSI hosts to rescan once meanwhile.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

from vbrd.errors import TransportError
from vbrd.models import AttachedDisk, DiskTask, Extent, ProbeResult, ProxyContext
from vbrd.protocols import DiskReader, probe_by_opening
from vbrd.vmdk import LocalFileSpace, VmdkChain
from vbrd.vmdk.reader import ThreadedChainReader

from .devices import ScsiDevice, find_disk, rescan

DEVICE_WAIT = 15.0
RESCAN_AFTER = 1.0
POLL = 0.1


class HotaddMode:
    """Virtual Appliance / HotAdd."""

    name = "hotadd"

    def __init__(self, device_wait: float = DEVICE_WAIT) -> None:
        self.device_wait = device_wait

    async def probe(self, task: DiskTask, context: ProxyContext) -> ProbeResult:
        """Usable when the Manager attached the disk to this proxy's VM and the proxy sees
        and opens it; otherwise the reason says which of these is missing."""
        return await probe_by_opening(self, task, context)

    async def open(self, task: DiskTask, context: ProxyContext) -> DiskReader:
        what = f"hotadd: {task.backing}"
        attached = attachment(task, context)
        root = Path(context.device_root or "/")
        device = await self._wait_for(root, attached, what, context.proxy_vm)
        try:
            reader = await asyncio.to_thread(open_device, device, root,
                                             task.capacity or None)
        except TransportError as exc:
            raise TransportError(f"{what} ({attached} on proxy VM {context.proxy_vm}): "
                                 f"{exc}") from exc
        if task.capacity and reader.size != task.capacity:
            await reader.close()
            raise TransportError(f"{what}: vSphere reports {task.capacity} bytes, the proxy's "
                                 f"/dev/{device.name} holds {reader.size}")
        return reader

    async def _wait_for(self, root: Path, attached: AttachedDisk, what: str,
                        proxy_vm: str) -> ScsiDevice:
        started = time.monotonic()
        rescanned = False
        while True:
            try:
                device = await asyncio.to_thread(find_disk, root, attached)
            except TransportError as exc:
                raise TransportError(f"{what}: {exc}") from exc
            if device is not None:
                return device
            waited = time.monotonic() - started
            if waited >= self.device_wait:
                raise TransportError(
                    f"{what}: proxy VM {proxy_vm} has it at {attached}, but no such SCSI disk "
                    f"shows under {root / 'sys/bus/scsi/devices'} (waited {waited:.1f} s)")
            if not rescanned and waited >= RESCAN_AFTER:
                rescanned = True
                await asyncio.to_thread(rescan, root)
            await asyncio.sleep(POLL)


def attachment(task: DiskTask, context: ProxyContext) -> AttachedDisk:
    """Where the Manager put the disk, or a :class:`TransportError` saying why it is not
    there."""
    what = f"hotadd: {task.backing}"
    refusal = context.hotadd_refusals.get(task.disk_key)
    if refusal:
        raise TransportError(f"{what}: {refusal}")
    if not context.proxy_vm:
        raise TransportError(f"{what}: proxy {context.proxy or 'this proxy'} is not a VM (its "
                             f"configuration names no `vm`), and hot-add attaches disks to the "
                             f"proxy's own VM")
    address = context.attached_disks.get(task.disk_key)
    if not address:
        raise TransportError(f"{what} is not attached to proxy VM {context.proxy_vm}")
    try:
        return AttachedDisk.parse(address)
    except ValueError as exc:
        raise TransportError(f"{what}: {exc}") from exc


#: Where the mover's kernel lists what is mounted and what swaps (the proxy's own view, not
#: beneath ``device_root``, which only says where the guest's SCSI devices show).
MOUNTINFO = Path("/proc/self/mountinfo")
SWAPS = Path("/proc/swaps")


def open_device(device: ScsiDevice, root: Path = Path("/"),
                capacity: int | None = None) -> DiskReader:
    """A reader of the device: raw when it is a block device, through the chain reader when
    it is a VMDK descriptor (the lab's stand-in); ``capacity`` names a file too short for
    the disk as such.

    A block device the proxy itself uses (it, or a partition of it, is mounted, swaps, or
    holds a device-mapper, RAID or LVM volume) is refused: a hot-added snapshot disk is never
    in use, while the proxy VM's own system disk always is, and whoever may ask a proxy to
    hot-add read an address must not get that disk (its keys, its agent's secret) that way."""
    try:
        info = os.stat(device.node)
    except OSError as exc:
        raise TransportError(f"{device.node}: {exc.strerror}") from exc
    if stat.S_ISBLK(info.st_mode):
        use = in_use(root, os.major(info.st_rdev), os.minor(info.st_rdev))
        if use:
            raise TransportError(f"/dev/{device.name} (SCSI {device.label}) is this proxy's own "
                                 f"disk, not a hot-added one: {use}")
        return BlockDeviceReader(str(device.node))
    if stat.S_ISREG(info.st_mode):
        chain = VmdkChain.open(os.path.realpath(device.node), LocalFileSpace(), capacity)
        return ThreadedChainReader(chain)
    raise TransportError(f"{device.node} is neither a block device nor a disk descriptor")


def in_use(root: Path, major: int, minor: int) -> str:
    """How the proxy uses block device ``major:minor`` or a partition of it ("" when not):
    mounted (``/proc/self/mountinfo``), swapping (``/proc/swaps``), or holding another device
    (``sys/dev/block/M:N/holders`` beneath ``root``)."""
    base = root / "sys/dev/block" / f"{major}:{minor}"
    numbers = {f"{major}:{minor}": base}
    with contextlib.suppress(OSError):
        for part in base.iterdir():
            if (part / "partition").is_file():
                with contextlib.suppress(OSError):
                    numbers[(part / "dev").read_text().strip()] = part
    for where in numbers.values():
        with contextlib.suppress(OSError):
            holders = sorted(h.name for h in (where / "holders").iterdir())
            if holders:
                return f"{where.name} holds {', '.join(holders)}"
    with contextlib.suppress(OSError):
        for line in MOUNTINFO.read_text().splitlines():
            fields = line.split()
            if len(fields) > 4 and fields[2] in numbers:
                return f"device {fields[2]} is mounted at {fields[4]}"
    with contextlib.suppress(OSError):
        for line in SWAPS.read_text().splitlines()[1:]:
            name = line.split()[0] if line.split() else ""
            with contextlib.suppress(OSError):
                rdev = os.stat(name).st_rdev
                if f"{os.major(rdev)}:{os.minor(rdev)}" in numbers:
                    return f"{name} is swap space"
    return ""


class BlockDeviceReader:
    """A block device read raw, ``pread`` by ``pread`` in worker threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise TransportError(f"{path}: cannot open: {exc.strerror}") from exc
        self.size = os.lseek(self._fd, 0, os.SEEK_END)

    async def extents(self) -> AsyncIterator[Extent]:
        """The whole device: a block device does not tell which areas its disk allocated
        (the data mover drops zero blocks, and CBT narrows an incremental's reads)."""
        if self.size:
            yield Extent(0, self.size)

    async def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TransportError(f"{self.path}: cannot read {length} bytes at {offset}: the "
                                 f"device holds {self.size} bytes")
        return await asyncio.to_thread(self._pread, offset, length)

    def _pread(self, offset: int, length: int) -> bytes:
        parts = []
        got = 0
        try:
            while got < length:
                part = os.pread(self._fd, length - got, offset + got)
                if not part:
                    raise TransportError(f"{self.path}: the device ended at {offset + got} "
                                         f"while {self.size} bytes were expected")
                parts.append(part)
                got += len(part)
        except OSError as exc:
            raise TransportError(f"{self.path}: read of {length} bytes at {offset} failed: "
                                 f"{exc.strerror}") from exc
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
