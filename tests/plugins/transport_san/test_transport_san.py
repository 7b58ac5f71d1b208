"""The san mode: datastores as this proxy mounts them, mapped by ``san_paths``.

What every mode must do is in tests/plugins/test_transport_contract.py; here is what is
particular to reading storage directly.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from plugins.transport_san.mode import SanMode
from tests.vmdk_support import convert, create_child, make_raw, to_raw, write
from vbrd.errors import TransportError
from vbrd.models import DatastoreFile, DiskTask, ProxyContext, VmRef
from vbrd.vmdk import datastores

pytestmark = pytest.mark.asyncio(loop_scope="session")

MiB = 1 << 20


def task_for(datastore: str, path: str) -> DiskTask:
    return DiskTask(
        session_id="session-1", vm=VmRef("db01", "vm-7"), disk_key=2001, label="Hard disk 2",
        capacity=0, backing=DatastoreFile(datastore, path),
    )


def set_parent_hint(sparse: Path, hint: str) -> None:
    """Rewrite the parentFileNameHint in a hosted sparse file's embedded descriptor, as ESXi
    writes it for a parent on another datastore."""
    data = bytearray(sparse.read_bytes()[:64 * 1024])
    start = data.index(b"# Disk DescriptorFile")
    end = data.index(b"\x00", start)
    text = bytes(data[start:end]).decode()
    old = next(line for line in text.splitlines() if line.startswith("parentFileNameHint="))
    new_text = text.replace(old, f'parentFileNameHint="{hint}"').encode()
    with open(sparse, "r+b") as out:
        out.seek(start)
        out.write(new_text + b"\x00" * max(0, end - start - len(new_text)))


async def read_all(mode: SanMode, task: DiskTask, context: ProxyContext) -> bytes:
    reader = await mode.open(task, context)
    try:
        return await reader.read(0, reader.size)
    finally:
        await reader.close()


async def test_a_parent_on_another_datastore_is_found_through_its_vmfs_volumes_path(
    tmp_path: Path,
) -> None:
    gold, fast = tmp_path / "gold", tmp_path / "fast"
    (gold / "template").mkdir(parents=True)
    (fast / "clone").mkdir(parents=True)
    raw = make_raw(tmp_path / "base.raw", 4 * MiB, [(MiB, b"\x07" * 9000)])
    base = convert(raw, gold / "template" / "template.vmdk", "monolithicFlat")
    child = create_child(base, fast / "clone" / "clone-000001.vmdk")
    write(child, 2 * MiB, 5000, 0x3C)
    expected = hashlib.sha256(to_raw(child, tmp_path / "expected.raw").read_bytes()).hexdigest()
    set_parent_hint(child, "/vmfs/volumes/gold-ds/template/template.vmdk")
    task = task_for("fast-ds", "clone/clone-000001.vmdk")

    context = ProxyContext(proxy="proxy-2", san_paths={"fast-ds": str(fast), "gold-ds": str(gold)})
    data = await read_all(SanMode(), task, context)
    assert hashlib.sha256(data).hexdigest() == expected

    only_fast = ProxyContext(proxy="proxy-2", san_paths={"fast-ds": str(fast)})
    result = await SanMode().probe(task, only_fast)
    assert not result.usable
    assert "gold-ds" in result.reason
    assert "proxy-2" in result.reason


async def test_an_unmapped_datastore_is_named_with_the_ones_this_proxy_has(tmp_path: Path) -> None:
    context = ProxyContext(proxy="proxy-3", san_paths={"nfs-a": str(tmp_path), "nfs-b": "/mnt/b"})
    result = await SanMode().probe(task_for("vmfs-lun-9", "vm/vm.vmdk"), context)

    assert not result.usable
    assert "datastore vmfs-lun-9 is not mapped on proxy proxy-3" in result.reason
    assert "nfs-a, nfs-b" in result.reason


async def test_a_path_that_leaves_the_datastore_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    context = ProxyContext(proxy="proxy-1", san_paths={"ds": str(tmp_path / "ds")})
    with pytest.raises(TransportError, match="lies outside datastore ds"):
        await SanMode().open(task_for("ds", "../../etc/shadow"), context)


async def test_extents_of_a_flat_disk_skip_the_holes_of_its_file(tmp_path: Path) -> None:
    (tmp_path / "vm").mkdir()
    raw = make_raw(tmp_path / "base.raw", 256 * MiB, [(100 * MiB, b"\x01" * 3000)])
    convert(raw, tmp_path / "vm" / "vm.vmdk", "monolithicFlat")
    context = ProxyContext(proxy="proxy-1", san_paths={"ds": str(tmp_path)})

    reader = await SanMode().open(task_for("ds", "vm/vm.vmdk"), context)
    try:
        extents = [extent async for extent in reader.extents()]
    finally:
        await reader.close()
    assert sum(e.length for e in extents) <= MiB
    assert any(e.offset <= 100 * MiB and 100 * MiB + 3000 <= e.end for e in extents)


# --------------------------------------------------------------------------------------------
# a planted descriptor cannot make the proxy read outside the datastore


SECRET = b"root:x:0:0:the proxy's own file, not a disk\n" * 64


def descriptor(extent: str, parent: str = "") -> str:
    parent_lines = (f'parentCID=fffffffe\nparentFileNameHint="{parent}"\n' if parent
                    else "parentCID=ffffffff\n")
    return ("# Disk DescriptorFile\nversion=1\nCID=fffffffe\n" + parent_lines
            + 'createType="monolithicFlat"\n\n# Extent description\n'
            + f'RW 4 FLAT "{extent}" 0\n\n# The Disk Data Base\nddb.adapterType = "lsilogic"\n')


@pytest.fixture
def export(tmp_path: Path) -> tuple[Path, Path]:
    """A datastore directory ``ds`` with a VM folder, and beside it a file of the proxy's own
    that no disk may read."""
    (tmp_path / "ds" / "vm").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    secret = tmp_path / "outside" / "secret"
    secret.write_bytes(SECRET)
    return tmp_path / "ds", secret


def plant(export: Path, body: str, name: str = "vm/vm.vmdk") -> DiskTask:
    (export / name).write_text(body)
    return task_for("ds", name)


@pytest.mark.parametrize("extent", ["../../outside/secret", "../" * 12 + "etc/passwd",
                                    "ABSOLUTE"])
async def test_an_extent_named_outside_the_datastore_is_refused_naming_it_and_the_datastore(
    export: tuple[Path, Path], extent: str,
) -> None:
    ds, secret = export
    extent = str(secret) if extent == "ABSOLUTE" else extent
    task = plant(ds, descriptor(extent))
    context = ProxyContext(proxy="proxy-1", san_paths={"ds": str(ds)})

    with pytest.raises(TransportError) as err:
        await read_all(SanMode(), task, context)
    message = str(err.value)
    assert extent in message and f"outside datastore ds ({ds})" in message, message
    probe = await SanMode().probe(task, context)
    assert not probe.usable and extent in probe.reason


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "without-openat2"])
async def test_a_symbolic_link_in_the_export_that_points_out_of_it_is_refused(
    export: tuple[Path, Path], openat2: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not openat2:  # as on a kernel before 5.6: the real path is checked instead
        monkeypatch.setattr(datastores, "_openat2_usable", False)
    ds, secret = export
    (ds / "vm" / "vm-flat.vmdk").symlink_to(Path("../../outside/secret"))
    (ds / "vm" / "abs-flat.vmdk").symlink_to(secret)
    (ds / "link.vmdk").symlink_to(Path("../outside/leaf.vmdk"))
    (secret.parent / "leaf.vmdk").write_text(descriptor("secret"))
    context = ProxyContext(proxy="proxy-1", san_paths={"ds": str(ds)})

    for name, task in [("vm/vm-flat.vmdk", plant(ds, descriptor("vm-flat.vmdk"))),
                       ("vm/abs-flat.vmdk", plant(ds, descriptor("abs-flat.vmdk"), "vm/b.vmdk")),
                       ("link.vmdk", task_for("ds", "link.vmdk"))]:
        with pytest.raises(TransportError) as err:
            await read_all(SanMode(), task, context)
        message = str(err.value)
        assert f"{ds / name} leads outside datastore ds ({ds}) through a symbolic link" \
            in message, message


async def test_a_parent_named_outside_the_datastore_is_refused(
    export: tuple[Path, Path],
) -> None:
    ds, secret = export
    (secret.parent / "base.vmdk").write_text(descriptor("secret"))
    (ds / "vm" / "vm-flat.vmdk").write_bytes(bytes(2048))
    task = plant(ds, descriptor("vm-flat.vmdk", parent="../../outside/base.vmdk"))
    context = ProxyContext(proxy="proxy-1", san_paths={"ds": str(ds)})

    with pytest.raises(TransportError, match=r'"../../outside/base.vmdk", which lies outside '
                                             r"datastore ds"):
        await read_all(SanMode(), task, context)


async def test_a_symbolic_link_that_stays_inside_the_export_is_followed(
    export: tuple[Path, Path],
) -> None:
    ds, _ = export
    (ds / "data").mkdir()
    (ds / "data" / "disk-flat.vmdk").write_bytes(b"\x42" * 2048)
    (ds / "vm" / "vm-flat.vmdk").symlink_to(Path("../data/disk-flat.vmdk"))
    task = plant(ds, descriptor("vm-flat.vmdk"))
    context = ProxyContext(proxy="proxy-1", san_paths={"ds": str(ds)})

    assert await read_all(SanMode(), task, context) == b"\x42" * 2048


async def test_a_disk_file_shorter_than_the_disks_capacity_is_named_short(
    tmp_path: Path,
) -> None:
    """What vSphere calls the disk's descriptor is a 1 MiB remnant of a 4 MiB disk: the
    reason says the file is short, not that an extent was opened instead of a descriptor."""
    (tmp_path / "vm").mkdir()
    (tmp_path / "vm" / "vm.vmdk").write_bytes(b"\x5a" * MiB)
    task = replace(task_for("ds", "vm/vm.vmdk"), capacity=4 * MiB)
    context = ProxyContext(proxy="proxy-1", san_paths={"ds": str(tmp_path)})

    result = await SanMode().probe(task, context)

    assert not result.usable
    assert "holds 1048576 bytes, less than the disk's capacity of 4194304" in result.reason
    assert "not its extent" not in result.reason
