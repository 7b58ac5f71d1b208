"""The hotadd mode: finding the attached disk among the proxy's SCSI devices, and reading it.

What every mode must do is in tests/plugins/test_transport_contract.py; here is what is
particular to reading disks the proxy VM holds: which device is the task's disk, what the
probe says when it is not there, and a real block device read raw.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from plugins.transport_hotadd import mode as mode_module
from plugins.transport_hotadd import vbrd_validate_plugin_config
from plugins.transport_hotadd.mode import BlockDeviceReader, HotaddMode
from tests.plugins.transport_hotadd.hotadd_support import ProxyGuest
from tests.vmdk_support import convert, make_raw
from vbrd.errors import TransportError
from vbrd.models import AttachedDisk, DatastoreFile, DiskTask, Extent, ProxyContext, VmRef
from vbrd.plugins import make_plugin_manager, transport_modes

MiB = 1 << 20
UUID = "6000C298-1d6c-4a2b-9e11-5f0a2b3c4d5e"
OTHER_UUID = "6000C291-aaaa-bbbb-cccc-ddddeeeeffff"


def task_for(capacity: int = 0, key: int = 2000) -> DiskTask:
    return DiskTask(session_id="session-1", vm=VmRef("db01", "vm-7"), disk_key=key,
                    label="Hard disk 1", capacity=capacity,
                    backing=DatastoreFile("DS1", "db01/db01.vmdk"), disk_uuid=UUID)


def context(guest: ProxyGuest, **fields: object) -> ProxyContext:
    return ProxyContext(proxy="proxy-1", proxy_vm="backup-proxy",
                        device_root=str(guest.root), **fields)  # type: ignore[arg-type]


@pytest.fixture
def guest(tmp_path: Path) -> ProxyGuest:
    return ProxyGuest(tmp_path / "proxy")


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, bytes]:
    """A 4 MiB flat disk with data at its start, middle and end, and its bytes."""
    writes = [(0, b"boot" * 128), (2 * MiB + 7, b"\xa5" * 70_000), (4 * MiB - 5, b"tail!")]
    raw = make_raw(tmp_path / "db01.raw", 4 * MiB, writes)
    descriptor = convert(raw, tmp_path / "db01.vmdk")
    return descriptor, raw.read_bytes()


async def read_all(mode: HotaddMode, task: DiskTask, ctx: ProxyContext) -> bytes:
    reader = await mode.open(task, ctx)
    try:
        return await reader.read(0, reader.size)
    finally:
        await reader.close()


async def test_the_disk_is_found_by_its_uuid_wherever_the_guest_numbered_its_controller(
    guest: ProxyGuest, disk: tuple[Path, bytes]
) -> None:
    descriptor, content = disk
    other = make_raw(descriptor.parent / "other.raw", 4 * MiB, [(0, b"not me")])
    guest.add(other, 0, 1, OTHER_UUID)  # another disk sits at the address vSphere gave
    guest.add(descriptor, 3, 4, UUID)
    told = context(guest, attached_disks={2000: str(AttachedDisk(0, 1, UUID))})

    assert await read_all(HotaddMode(), task_for(len(content)), told) == content


async def test_without_a_wwid_the_disk_is_found_by_its_scsi_address(
    guest: ProxyGuest, disk: tuple[Path, bytes]
) -> None:
    descriptor, content = disk
    guest.add(descriptor, 0, 2)
    told = context(guest, attached_disks={2000: str(AttachedDisk(0, 2, UUID))})

    assert await read_all(HotaddMode(), task_for(len(content)), told) == content


async def test_unit_7_is_the_controllers_own_and_never_taken_for_a_disk(
    guest: ProxyGuest, disk: tuple[Path, bytes]
) -> None:
    guest.add(disk[0], 0, 7)
    told = context(guest, attached_disks={2000: str(AttachedDisk(0, 7))})

    result = await HotaddMode(device_wait=0.2).probe(task_for(), told)

    assert not result.usable
    assert "scsi0:7" in result.reason and "no such SCSI disk" in result.reason


async def test_a_device_at_the_address_with_another_disks_wwid_is_not_taken(
    guest: ProxyGuest, disk: tuple[Path, bytes]
) -> None:
    guest.add(disk[0], 0, 1, OTHER_UUID)
    told = context(guest, attached_disks={2000: str(AttachedDisk(0, 1, UUID))})

    result = await HotaddMode(device_wait=0.2).probe(task_for(), told)

    assert not result.usable
    assert "proxy VM backup-proxy has it at scsi0:1" in result.reason
    assert str(guest.root / "sys/bus/scsi/devices") in result.reason


async def test_a_disk_that_shows_up_late_is_waited_for(
    guest: ProxyGuest, disk: tuple[Path, bytes]
) -> None:
    descriptor, content = disk
    told = context(guest, attached_disks={2000: str(AttachedDisk(0, 1, UUID))})

    async def plug_in_later() -> None:
        await asyncio.sleep(0.4)
        guest.add(descriptor, 0, 1, UUID)

    plugged = asyncio.create_task(plug_in_later())
    assert (await HotaddMode(device_wait=5).probe(task_for(len(content)), told)).usable
    await plugged


async def test_probe_passes_on_why_the_manager_did_not_attach_the_disk(
    guest: ProxyGuest,
) -> None:
    why = "host esx-02 of proxy VM backup-proxy does not see datastore DS1 (it sees DS9)"
    told = context(guest, hotadd_refusals={2000: why})

    result = await HotaddMode().probe(task_for(), told)

    assert not result.usable
    assert result.reason == f"hotadd: [DS1] db01/db01.vmdk: {why}"


async def test_probe_says_a_proxy_that_is_no_vm_cannot_hot_add(guest: ProxyGuest) -> None:
    result = await HotaddMode().probe(task_for(), ProxyContext(proxy="proxy-1"))

    assert not result.usable
    assert "proxy proxy-1 is not a VM" in result.reason


async def test_probe_names_the_disk_that_is_not_attached_and_the_proxy_vm(
    guest: ProxyGuest,
) -> None:
    told = context(guest, attached_disks={2001: str(AttachedDisk(0, 1, UUID))})

    result = await HotaddMode().probe(task_for(), told)

    assert not result.usable
    assert result.reason == ("hotadd: [DS1] db01/db01.vmdk is not attached to proxy VM "
                             "backup-proxy")


async def test_probe_on_a_machine_without_scsi_devices_says_so(tmp_path: Path) -> None:
    told = ProxyContext(proxy="proxy-1", proxy_vm="backup-proxy", device_root=str(tmp_path),
                        attached_disks={2000: str(AttachedDisk(0, 1, UUID))})

    result = await HotaddMode().probe(task_for(), told)

    assert not result.usable
    assert "shows no SCSI devices" in result.reason


def test_an_attached_disks_address_reads_back_as_it_was_written() -> None:
    disk = AttachedDisk(1, 12, UUID)
    assert str(disk) == f"scsi1:12 {UUID}"
    assert AttachedDisk.parse(str(disk)) == disk
    assert AttachedDisk.parse("scsi0:3") == AttachedDisk(0, 3, "")
    with pytest.raises(ValueError, match="sda"):
        AttachedDisk.parse("sda")


def test_the_installed_plugin_provides_hotadd() -> None:
    modes = transport_modes(make_plugin_manager())
    assert isinstance(modes["hotadd"], HotaddMode)


def test_the_plugin_table_accepts_an_absolute_device_root_and_names_what_is_wrong() -> None:
    assert vbrd_validate_plugin_config("transport_san", {"x": 1}) is None
    assert vbrd_validate_plugin_config("transport_hotadd", {"device_root": "/srv/p"}) == []
    problems = vbrd_validate_plugin_config("transport_hotadd",
                                           {"device_root": "proxy", "sysfs": "/sys"})
    assert problems is not None and len(problems) == 2
    assert any("'sysfs'" in p for p in problems)
    assert any("absolute path" in p and "'proxy'" in p for p in problems)


# --------------------------------------------------------------------------------------------
# a real block device (a read-only loop device), as a proxy's kernel shows a hot-added disk


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("a loop device needs root and losetup")
    image = make_raw(tmp_path / "disk.raw", 3 * MiB + 512 * 3,
                     [(0, b"\x01" * 4096), (MiB + 3, os.urandom(200_000)), (3 * MiB, b"end")])
    made = subprocess.run(["losetup", "--read-only", "--find", "--show", str(image)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"no loop device on this machine: {made.stderr.strip()}")
    device = Path(made.stdout.strip())
    try:
        yield device, image.read_bytes()
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=True)


async def test_a_block_device_is_read_raw_and_exactly(
    guest: ProxyGuest, loop_device: tuple[Path, bytes]
) -> None:
    device, content = loop_device
    guest.add(device, 0, 1, UUID)
    told = context(guest, attached_disks={2000: str(AttachedDisk(0, 1, UUID))})

    reader = await HotaddMode().open(task_for(len(content)), told)
    try:
        assert isinstance(reader, BlockDeviceReader)
        assert [e async for e in reader.extents()] == [Extent(0, len(content))]
        chunks = await asyncio.gather(*(reader.read(o, min(MiB, len(content) - o))
                                        for o in range(0, len(content), MiB)))
        assert hashlib.sha256(b"".join(chunks)).digest() == hashlib.sha256(content).digest()
        assert await reader.read(MiB + 1, 7) == content[MiB + 1:MiB + 8]
        with pytest.raises(TransportError, match="holds"):
            await reader.read(len(content) - 4, 5)
    finally:
        await reader.close()


async def test_a_block_device_of_another_size_than_the_disk_is_refused(
    guest: ProxyGuest, loop_device: tuple[Path, bytes]
) -> None:
    device, content = loop_device
    guest.add(device, 0, 1, UUID)
    told = context(guest, attached_disks={2000: str(AttachedDisk(0, 1, UUID))})

    result = await HotaddMode().probe(task_for(len(content) + MiB), told)

    assert not result.usable
    assert str(len(content) + MiB) in result.reason and str(len(content)) in result.reason


# --------------------------------------------------------------------------------------------
# the proxy's own disks are not for reading, whatever address a request names


@pytest.mark.parametrize("use", ["mounted", "holder"])
async def test_a_disk_the_proxy_itself_uses_is_refused_at_any_address(
    guest: ProxyGuest, loop_device: tuple[Path, bytes], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, use: str,
) -> None:
    """A request may name any SCSI address as "attached"; the proxy VM's system disk (at
    0:0, mounted, or under LVM) is never read, the reason naming how the proxy uses it."""
    device, content = loop_device
    rdev = device.stat().st_rdev
    number = f"{os.major(rdev)}:{os.minor(rdev)}"
    if use == "mounted":
        mountinfo = tmp_path / "mountinfo"
        mountinfo.write_text(f"22 1 {number} / / rw,relatime shared:1 - ext4 {device} rw\n")
        monkeypatch.setattr(mode_module, "MOUNTINFO", mountinfo)
        why = f"device {number} is mounted at /"
    else:
        (guest.root / "sys/dev/block" / number / "holders" / "dm-0").mkdir(parents=True)
        why = f"{number} holds dm-0"
    name = guest.add(device, 0, 0)
    told = context(guest, attached_disks={2000: str(AttachedDisk(0, 0, ""))})
    task = replace(task_for(len(content)), disk_uuid="")

    with pytest.raises(TransportError) as err:
        await read_all(HotaddMode(), task, told)
    assert f"/dev/{name} (SCSI 0:0:0:0) is this proxy's own disk, not a hot-added one: " \
           f"{why}" in str(err.value)
