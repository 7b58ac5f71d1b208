"""What every transport mode promises the data mover, checked for each mode alike.

A mode joins this suite by adding a harness to ``HARNESSES``: given datastores (name →
directory of VMDK files), it yields the mode, loaded through the plugin hook as the daemon
loads it, and a proxy context under which the mode can reach those datastores. Every disk
is compared with what qemu reads from the same chain, so modes that pass read identical
bytes.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy
import pytest

import plugins.transport_hotadd
import plugins.transport_nbd
import plugins.transport_san
from tests.vmdk_support import (
    SampleDisk,
    make_sample_datastore,
    serve_datastores,
    sha256_file,
    to_raw,
)
from vbrd import PROJECT_NAME, hookspecs
from vbrd.errors import TransportError
from vbrd.models import DatastoreFile, DiskTask, ProxyContext, Secret, VmRef
from vbrd.protocols import DiskReader, TransportMode

pytestmark = pytest.mark.asyncio(loop_scope="session")

DATASTORE = "DS1"
USER, PASSWORD = "backup@vsphere.local", "pa55 word"


@dataclass
class Harness:
    mode: TransportMode
    context: ProxyContext


def mode_from_plugin(plugin: ModuleType, name: str) -> TransportMode:
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    manager.register(plugin)
    modes = {mode.name: mode for found in manager.hook.vbrd_transport_modes() for mode in found}
    return modes[name]


@asynccontextmanager
async def san_harness(datastores: dict[str, Path]) -> AsyncIterator[Harness]:
    context = ProxyContext(proxy="proxy-1", san_paths={n: str(p) for n, p in datastores.items()})
    yield Harness(mode_from_plugin(plugins.transport_san, "san"), context)


@asynccontextmanager
async def nbd_harness(datastores: dict[str, Path]) -> AsyncIterator[Harness]:
    async with serve_datastores(datastores, USER, PASSWORD) as server:
        context = ProxyContext(
            proxy="proxy-1", vcenter_url=server.url, vcenter_user=USER,
            vcenter_password=Secret(PASSWORD), datacenter="DC0",
        )
        yield Harness(mode_from_plugin(plugins.transport_nbd, "nbd"), context)


@asynccontextmanager
async def hotadd_harness(datastores: dict[str, Path]) -> AsyncIterator[Harness]:
    """The mode behind a stand-in for the Manager's attach (see hotadd_support); its context
    is made per task, so the harness's own says only which proxy this is."""
    from tests.plugins.transport_hotadd.hotadd_support import AttachingMode, ProxyGuest

    with tempfile.TemporaryDirectory(prefix="proxy-guest-") as root:
        mode = AttachingMode(mode_from_plugin(plugins.transport_hotadd, "hotadd"),
                             ProxyGuest(Path(root)), datastores)
        yield Harness(mode, ProxyContext(proxy="proxy-1", proxy_vm="backup-proxy"))


HARNESSES: dict[str, Callable[[dict[str, Path]], AbstractAsyncContextManager[Harness]]] = {
    "san": san_harness,
    "nbd": nbd_harness,
    "hotadd": hotadd_harness,
}


@pytest.fixture(scope="module")
def datastore(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, SampleDisk]]:
    root = tmp_path_factory.mktemp("ds1")
    return root, make_sample_datastore(root)


@pytest.fixture(params=sorted(HARNESSES))
async def harness(
    request: pytest.FixtureRequest, datastore: tuple[Path, dict[str, SampleDisk]]
) -> AsyncIterator[Harness]:
    async with HARNESSES[request.param]({DATASTORE: datastore[0]}) as harness:
        yield harness


def task_for(path: str, capacity: int = 0, datastore: str = DATASTORE) -> DiskTask:
    return DiskTask(
        session_id="session-1", vm=VmRef("vm1", "vm-101"), disk_key=2000, label="Hard disk 1",
        capacity=capacity, backing=DatastoreFile(datastore, path), datacenter="DC0",
    )


def disk(datastore: tuple[Path, dict[str, SampleDisk]], name: str) -> SampleDisk:
    return datastore[1][name]


SHAPES = ["flat", "sparse", "chain"]


@pytest.mark.parametrize("shape", SHAPES)
async def test_probe_says_yes_and_the_reader_has_the_disks_size(
    harness: Harness, datastore: tuple[Path, dict[str, SampleDisk]], shape: str
) -> None:
    sample = disk(datastore, shape)
    task = task_for(sample.path, sample.capacity)

    assert (await harness.mode.probe(task, harness.context)).usable
    reader = await harness.mode.open(task, harness.context)
    try:
        assert isinstance(reader, DiskReader)
        assert reader.size == sample.capacity
    finally:
        await reader.close()


@pytest.mark.parametrize("shape", SHAPES)
async def test_the_whole_disk_reads_as_qemu_reads_it_with_reads_in_parallel(
    harness: Harness, datastore: tuple[Path, dict[str, SampleDisk]], shape: str
) -> None:
    sample = disk(datastore, shape)
    reader = await harness.mode.open(task_for(sample.path), harness.context)
    try:
        chunk = 1 << 20
        offsets = range(0, reader.size, chunk)
        blocks = await asyncio.gather(
            *(reader.read(offset, min(chunk, reader.size - offset)) for offset in offsets)
        )
    finally:
        await reader.close()
    digest = hashlib.sha256(b"".join(blocks)).hexdigest()
    assert digest == hashlib.sha256(sample.reference.read_bytes()).hexdigest()


@pytest.mark.parametrize("shape", SHAPES)
async def test_reads_at_odd_offsets_lengths_and_at_the_end_are_exact(
    harness: Harness, datastore: tuple[Path, dict[str, SampleDisk]], shape: str
) -> None:
    sample = disk(datastore, shape)
    reference = sample.reference.read_bytes()
    rng = random.Random(shape)
    size = sample.capacity
    probes = [(0, 1), (size - 1, 1), (size - 513, 513), (size - 100_003, 100_003), (65_535, 3)]
    probes += [(rng.randrange(size - 400_000), rng.randrange(1, 400_000)) for _ in range(12)]
    reader = await harness.mode.open(task_for(sample.path), harness.context)
    try:
        for offset, length in probes:
            assert await reader.read(offset, length) == reference[offset : offset + length], (
                offset, length
            )
        with pytest.raises(TransportError):
            await reader.read(size - 10, 11)
    finally:
        await reader.close()


@pytest.mark.parametrize("shape", SHAPES)
async def test_extents_lie_inside_the_disk_in_order_and_cover_every_nonzero_byte(
    harness: Harness, datastore: tuple[Path, dict[str, SampleDisk]], shape: str
) -> None:
    sample = disk(datastore, shape)
    reference = sample.reference.read_bytes()
    reader = await harness.mode.open(task_for(sample.path), harness.context)
    try:
        extents = [extent async for extent in reader.extents()]
    finally:
        await reader.close()

    assert extents
    assert all(0 <= e.offset and e.length > 0 and e.end <= sample.capacity for e in extents)
    assert all(a.end < b.offset for a, b in zip(extents, extents[1:], strict=False))
    covered = bytearray(len(reference))
    for extent in extents:
        covered[extent.offset : extent.end] = reference[extent.offset : extent.end]
    assert covered == reference


async def test_probe_names_a_datastore_this_proxy_cannot_reach(harness: Harness) -> None:
    result = await harness.mode.probe(task_for("vm1/flat.vmdk", datastore="Archive-7"),
                                      harness.context)
    assert not result.usable
    assert "Archive-7" in result.reason


async def test_probe_names_a_missing_descriptor_with_its_datastore(harness: Harness) -> None:
    result = await harness.mode.probe(task_for("vm1/gone.vmdk"), harness.context)
    assert not result.usable
    assert f"[{DATASTORE}] vm1/gone.vmdk" in result.reason


async def test_probe_names_the_missing_file_of_a_chain(
    harness: Harness, tmp_path: Path
) -> None:
    ds = make_sample_datastore(tmp_path, seed=11)
    (tmp_path / "vm1" / "chain-000001.vmdk").unlink()
    async with HARNESSES[harness.mode.name]({"DS2": tmp_path}) as other:
        result = await other.mode.probe(task_for(ds["chain"].path, datastore="DS2"), other.context)
        with pytest.raises(TransportError) as caught:
            await other.mode.open(task_for(ds["chain"].path, datastore="DS2"), other.context)
    assert not result.usable
    assert "chain-000001.vmdk" in result.reason
    assert "DS2" in result.reason
    assert "chain-000001.vmdk" in str(caught.value)


async def test_probe_refuses_a_chain_whose_size_is_not_the_disks(
    harness: Harness, datastore: tuple[Path, dict[str, SampleDisk]]
) -> None:
    sample = disk(datastore, "sparse")
    result = await harness.mode.probe(task_for(sample.path, sample.capacity + 512),
                                      harness.context)
    assert not result.usable
    assert str(sample.capacity + 512) in result.reason


# --------------------------------------------------------------------------------------------
# against the lab's simulated vCenter (vbrd/lab): its datastores, its /folder access, its
# snapshots (real sparse deltas)


def lab_san_context(lab: dict[str, Any]) -> ProxyContext:
    paths = {datastore["name"]: datastore["dir"] for datastore in lab["datastores"]}
    return ProxyContext(proxy="lab-proxy", san_paths=paths)


def lab_nbd_context(lab: dict[str, Any]) -> ProxyContext:
    vcenter = lab["vcenter"]
    return ProxyContext(
        proxy="lab-proxy", vcenter_url=vcenter["url"], vcenter_user=vcenter["user"],
        vcenter_password=Secret(vcenter["password"]), verify_tls=vcenter["verify_tls"],
        datacenter=vcenter["datacenter"],
    )


LAB_MODES: dict[str, tuple[ModuleType, Callable[[dict[str, Any]], ProxyContext]]] = {
    "san": (plugins.transport_san, lab_san_context),
    "nbd": (plugins.transport_nbd, lab_nbd_context),
}


def qemu_sha256(descriptor: Path, scratch: Path) -> str:
    digest = sha256_file(to_raw(descriptor, scratch))
    scratch.unlink()
    return digest


async def read_sha256(mode: TransportMode, task: DiskTask, context: ProxyContext) -> str:
    reader = await mode.open(task, context)
    try:
        digest = hashlib.sha256()
        for offset in range(0, reader.size, 8 << 20):
            digest.update(await reader.read(offset, min(8 << 20, reader.size - offset)))
        return digest.hexdigest()
    finally:
        await reader.close()


def lab_task(lab: dict[str, Any], vm: dict[str, Any], disk: dict[str, Any], file: str) -> DiskTask:
    return DiskTask(
        session_id="lab-session", vm=VmRef(vm["name"], vm["moref"]), disk_key=disk["key"],
        label=disk["label"], capacity=disk["capacity"], backing=DatastoreFile.parse(file),
        datacenter=lab["vcenter"]["datacenter"],
    )


def local_path(lab: dict[str, Any], file: str) -> Path:
    where = DatastoreFile.parse(file)
    root = next(d["dir"] for d in lab["datastores"] if d["name"] == where.datastore)
    return Path(root) / where.path


@pytest.mark.lab
@pytest.mark.parametrize("mode_name", sorted(LAB_MODES))
async def test_lab_vm_disks_read_as_qemu_reads_them(
    lab: dict[str, Any], mode_name: str, tmp_path: Path
) -> None:
    plugin, make_context = LAB_MODES[mode_name]
    mode, context = mode_from_plugin(plugin, mode_name), make_context(lab)
    shapes = set()
    for vm in lab["vms"]:
        for disk in vm["disks"]:
            if disk["format"] in shapes:
                continue  # one disk per format keeps this quick
            shapes.add(disk["format"])
            task = lab_task(lab, vm, disk, disk["file"])
            assert (await mode.probe(task, context)).usable
            expected = qemu_sha256(Path(disk["descriptor"]), tmp_path / "reference.raw")
            assert await read_sha256(mode, task, context) == expected, disk["file"]
    assert shapes >= {"flat", "sparse"}


class LabVCenter:
    """Just enough pyvmomi for snapshots, run in a worker thread."""

    def __init__(self, lab: dict[str, Any]) -> None:
        from urllib.parse import urlparse

        from pyVim.connect import SmartConnect

        url = urlparse(lab["vcenter"]["url"])
        self.si = SmartConnect(host=url.hostname, port=url.port, protocol=url.scheme,
                               user=lab["vcenter"]["user"], pwd=lab["vcenter"]["password"])
        content = self.si.RetrieveContent()
        self.content = content

    def vm(self, name: str) -> Any:
        from pyVmomi import vim

        view = self.content.viewManager.CreateContainerView(
            self.content.rootFolder, [vim.VirtualMachine], True
        )
        try:
            return next(vm for vm in view.view if vm.name == name)
        finally:
            view.Destroy()

    def wait(self, task: Any) -> Any:
        """By property path: the simulator's snapshot tasks defeat pyVim's WaitForTask."""
        from pyVmomi import vim, vmodl

        collector = vmodl.query.PropertyCollector
        spec = collector.FilterSpec(
            objectSet=[collector.ObjectSpec(obj=task)],
            propSet=[collector.PropertySpec(type=vim.Task, pathSet=["info.state", "info.result",
                                                                    "info.error"])],
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = self.content.propertyCollector.RetrieveContents([spec])
            props = {p.name: p.val for o in found for p in o.propSet}
            if props["info.state"] == "success":
                return props.get("info.result")
            if props["info.state"] == "error":
                raise AssertionError(f"vCenter task failed: {props.get('info.error')}")
            time.sleep(0.05)
        raise AssertionError("vCenter task did not finish in 60 s")

    def snapshot(self, vm: Any, name: str) -> Any:
        return self.wait(vm.CreateSnapshot_Task(name, "transport contract", False, False))

    def disk_file(self, snapshot: Any, key: int) -> str:
        from pyVmomi import vim

        return next(
            device.backing.fileName for device in snapshot.config.hardware.device
            if isinstance(device, vim.vm.device.VirtualDisk) and device.key == key
        )

    def remove(self, snapshot: Any) -> None:
        self.wait(snapshot.RemoveSnapshot_Task(False))

    def close(self) -> None:
        from pyVim.connect import Disconnect

        Disconnect(self.si)


@pytest.mark.lab
async def test_lab_snapshot_chains_read_point_in_time_and_identically_in_every_mode(
    lab: Any, tmp_path: Path
) -> None:
    from vbrd.lab import lab as lab_module

    vm = next(v for v in lab["vms"] if v["disks"][0]["format"] == "sparse")
    disk = vm["disks"][0]
    vcenter = await asyncio.to_thread(LabVCenter, lab)
    snapshots = []
    try:
        vm_obj = await asyncio.to_thread(vcenter.vm, vm["name"])
        snapshots.append(await asyncio.to_thread(vcenter.snapshot, vm_obj, "contract-1"))
        await asyncio.to_thread(lab_module.write, lab.dir, vm["name"], fraction=0.05, seed=31)
        snapshots.append(await asyncio.to_thread(vcenter.snapshot, vm_obj, "contract-2"))
        await asyncio.to_thread(lab_module.write, lab.dir, vm["name"], fraction=0.05, seed=32)
        files = [await asyncio.to_thread(vcenter.disk_file, s, disk["key"]) for s in snapshots]
        assert files[0] != files[1]
        expected = [qemu_sha256(local_path(lab, f), tmp_path / "reference.raw") for f in files]
        assert expected[0] != expected[1]

        for mode_name, (plugin, make_context) in sorted(LAB_MODES.items()):
            mode, context = mode_from_plugin(plugin, mode_name), make_context(lab)
            for file, sha in zip(files, expected, strict=True):
                got = await read_sha256(mode, lab_task(lab, vm, disk, file), context)
                assert got == sha, (mode_name, file)
    finally:
        for snapshot in reversed(snapshots):
            await asyncio.to_thread(vcenter.remove, snapshot)
        await asyncio.to_thread(vcenter.close)
