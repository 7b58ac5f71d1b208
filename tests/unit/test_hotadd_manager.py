"""The Manager's side of hot-add: which disks it attaches, and that it always detaches them.

vCenter is a stand-in here (:class:`FakeVCenter`, which records what it was asked and can be
slow or refuse), so that decisions and cancellation can be checked exactly; the real thing is
exercised against the lab in tests/integration/test_transport_modes.py.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MINIMAL_CONFIG
from tests.vmdk_support import convert, make_raw
from vbrd.config import VCenterSettings, load_config
from vbrd.engine import Engine
from vbrd.errors import NotFound, VSphereError
from vbrd.manager import hotadd
from vbrd.manager.context import SessionContext
from vbrd.models import AttachedDisk, DatastoreFile, ProxyContext, Secret, VmRef
from vbrd.vsphere import ProxyVm, ScsiDisk, VirtualDisk, VmInfo

MiB = 1 << 20
AUTO = ["san", "hotadd", "nbd"]


class FakeVCenter:
    """Just the hot-add calls, answering from a proxy VM description."""

    def __init__(self, proxy: ProxyVm | None, *, attach_delay: float = 0.0,
                 detach_delay: float = 0.0, detach_refusals: int = 0) -> None:
        self.proxy = proxy
        self.attach_delay, self.detach_delay = attach_delay, detach_delay
        self.detach_refusals = detach_refusals
        self.log: list[tuple[str, Any]] = []
        self.attached: dict[int, ScsiDisk] = {}
        self.settings = VCenterSettings("lab", "http://127.0.0.1:9/sdk", "user", Secret("p"))

    async def proxy_vm(self, name: str) -> ProxyVm:
        if self.proxy is None or name != self.proxy.name:
            raise NotFound(f"VM {name!r} was not found in vCenter lab")
        return self.proxy

    async def attach_disks(self, vm: ProxyVm,
                           disks: Sequence[tuple[DatastoreFile, int]]) -> list[ScsiDisk]:
        self.log.append(("attach started", [str(f) for f, _ in disks]))
        await asyncio.sleep(self.attach_delay)
        made = []
        for i, (file, capacity) in enumerate(disks):
            disk = ScsiDisk(key=2100 + i, file=file, controller_key=1000, bus=0, unit=1 + i,
                            uuid=f"6000c29{i}-0000-0000-0000-000000000000",
                            mode="independent_nonpersistent", capacity=capacity)
            self.attached[disk.key] = disk
            made.append(disk)
        self.log.append(("attached", [d.key for d in made]))
        return made

    async def detach_disks(self, vm: ProxyVm, keys: Sequence[int]) -> None:
        await asyncio.sleep(self.detach_delay)
        if self.detach_refusals:
            self.detach_refusals -= 1
            self.log.append(("detach refused", sorted(keys)))
            raise VSphereError("vCenter is busy")
        for key in keys:
            self.attached.pop(key, None)
        self.log.append(("detached", sorted(keys)))

    async def foreign_disks(self, vm: ProxyVm) -> list[ScsiDisk]:
        return list(self.attached.values())


def proxy_vm(**fields: Any) -> ProxyVm:
    values: dict[str, Any] = dict(name="backup-proxy", moref="vm-900", host="esx-01",
                                  power_state="poweredOn", datastores=("DS1", "DS2"),
                                  directory="backup-proxy", disks=[])
    values.update(fields)
    return ProxyVm(**values)


def vdisk(key: int, file: str, capacity: int = 4 * MiB) -> VirtualDisk:
    return VirtualDisk(key=key, label=f"Hard disk {key - 1999}", capacity=capacity,
                       backing=DatastoreFile.parse(file), change_id=None, uuid="",
                       controller_key=1000, unit_number=key - 2000, independent=False)


SOURCE = VmInfo(ref=VmRef("db01", "vm-7"), template=False, cbt_enabled=True, disks=[],
                folder_path="", cluster="", host="", resource_pool="", has_snapshots=False)


@pytest.fixture
def session(
    write_config: Callable[[str], Path],
) -> Iterator[Callable[[FakeVCenter], SessionContext]]:
    config = load_config(write_config(MINIMAL_CONFIG))
    engine = Engine(config)

    def make(vcenter: FakeVCenter) -> SessionContext:
        return SessionContext(engine=engine, config=config, job=config.jobs["nightly"],
                              session_id="s1", stop=asyncio.Event(),
                              vsphere=vcenter)  # type: ignore[arg-type]

    yield make
    engine.close()


def proxy_context(**fields: Any) -> ProxyContext:
    return ProxyContext(proxy="local", proxy_vm="backup-proxy", **fields)


async def test_disks_on_datastores_the_proxys_host_cannot_see_are_refused_with_why(session):
    vcenter = FakeVCenter(proxy_vm(datastores=("DS1",)))
    disks = [vdisk(2000, "[DS1] db01/db01.vmdk"), vdisk(2001, "[DS9] db01/db01_1.vmdk")]

    async with hotadd.attached_to_proxy(session(vcenter), SOURCE, disks, proxy_context(),
                                        ["hotadd"]) as proxy:
        uuid = vcenter.attached[2100].uuid
        assert proxy.attached_disks == {2000: str(AttachedDisk(0, 1, uuid))}
        assert proxy.hotadd_refusals == {2001: "host esx-01 of proxy VM backup-proxy does not "
                                               "see datastore DS9 (it sees DS1)"}
    assert vcenter.attached == {}
    assert [kind for kind, _ in vcenter.log] == ["attach started", "attached", "detached"]


@pytest.mark.parametrize("proxy, context, reason", [
    (proxy_vm(power_state="poweredOff"), proxy_context(),
     "proxy VM backup-proxy is poweredOff; hot-added disks reach only a running guest"),
    (proxy_vm(moref="vm-7"), proxy_context(),
     "VM db01 is the proxy VM itself; its own disks cannot be hot-added to it"),
    (None, proxy_context(), "proxy VM backup-proxy was not found in vCenter lab"),
    (proxy_vm(), ProxyContext(proxy="local"),
     "proxy local is not a VM (its [proxies.local] table names no `vm`), and hot-add "
     "attaches disks to the proxy's own VM"),
])
async def test_nothing_is_attached_when_the_proxy_cannot_hot_add(session, proxy, context,
                                                                  reason):
    vcenter = FakeVCenter(proxy)
    disks = [vdisk(2000, "[DS1] db01/db01.vmdk")]

    async with hotadd.attached_to_proxy(session(vcenter), SOURCE, disks, context,
                                        ["hotadd"]) as given:
        assert given.hotadd_refusals == {2000: reason}
        assert given.attached_disks == {}
    assert vcenter.log == []


async def test_a_job_without_hotadd_asks_vcenter_nothing(session):
    vcenter = FakeVCenter(proxy_vm())
    context = proxy_context()
    async with hotadd.attached_to_proxy(session(vcenter), SOURCE,
                                        [vdisk(2000, "[DS1] db01/db01.vmdk")], context,
                                        ["san", "nbd"]) as given:
        assert given is context
    assert vcenter.log == []


async def test_auto_attaches_only_what_san_cannot_read_from_this_machine(session, tmp_path):
    ds1 = tmp_path / "ds1"
    (ds1 / "db01").mkdir(parents=True)
    convert(make_raw(tmp_path / "db01.raw", 4 * MiB, [(0, b"data")]), ds1 / "db01/db01.vmdk")
    vcenter = FakeVCenter(proxy_vm())
    disks = [vdisk(2000, "[DS1] db01/db01.vmdk"), vdisk(2001, "[DS2] db01/db01_1.vmdk")]
    context = proxy_context(san_paths={"DS1": str(ds1)})

    async with hotadd.attached_to_proxy(session(vcenter), SOURCE, disks, context,
                                        AUTO) as given:
        assert list(given.attached_disks) == [2001]
        assert "the san mode could read this disk" in given.hotadd_refusals[2000]
    assert vcenter.log[0] == ("attach started", ["[DS2] db01/db01_1.vmdk"])


async def test_a_session_cancelled_while_attaching_still_detaches_once_attached(session):
    vcenter = FakeVCenter(proxy_vm(), attach_delay=0.3)
    entered = asyncio.Event()

    async def backup() -> None:
        async with hotadd.attached_to_proxy(session(vcenter), SOURCE,
                                            [vdisk(2000, "[DS1] db01/db01.vmdk")],
                                            proxy_context(), ["hotadd"]):
            entered.set()

    task = asyncio.create_task(backup())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert not entered.is_set()
    assert [kind for kind, _ in vcenter.log] == ["attach started", "attached", "detached"]
    assert vcenter.attached == {}


async def test_a_session_cancelled_while_reading_finishes_the_detach_before_it_ends(session):
    vcenter = FakeVCenter(proxy_vm(), detach_delay=0.3)
    reading = asyncio.Event()

    async def backup() -> None:
        async with hotadd.attached_to_proxy(session(vcenter), SOURCE,
                                            [vdisk(2000, "[DS1] db01/db01.vmdk")],
                                            proxy_context(), ["hotadd"]):
            reading.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(backup())
    await reading.wait()
    task.cancel()
    await asyncio.sleep(0.05)
    task.cancel()  # cancelled twice: a stop that loses patience
    with pytest.raises(asyncio.CancelledError):
        await task

    assert vcenter.log[-1] == ("detached", [2100]), "the detach ran to its end first"


async def test_a_refused_detach_is_retried(session, monkeypatch):
    monkeypatch.setattr(hotadd, "DETACH_RETRY_DELAY", 0.01)
    vcenter = FakeVCenter(proxy_vm(), detach_refusals=2)
    ctx = session(vcenter)
    seen: list[Any] = []
    ctx.engine.bus.subscribe(seen.append)

    async with hotadd.attached_to_proxy(ctx, SOURCE, [vdisk(2000, "[DS1] db01/db01.vmdk")],
                                        proxy_context(), ["hotadd"]):
        pass

    assert [kind for kind, _ in vcenter.log][-3:] == ["detach refused", "detach refused",
                                                     "detached"]
    (detached,) = [e for e in seen if e.type == "hotadd.detached"]
    assert detached.ok and detached.file == "[DS1] db01/db01.vmdk"


async def test_a_detach_vcenter_keeps_refusing_is_reported_not_raised(session, monkeypatch):
    monkeypatch.setattr(hotadd, "DETACH_RETRY_DELAY", 0.01)
    vcenter = FakeVCenter(proxy_vm(), detach_refusals=hotadd.DETACH_ATTEMPTS)
    ctx = session(vcenter)
    seen: list[Any] = []
    ctx.engine.bus.subscribe(seen.append)

    async with hotadd.attached_to_proxy(ctx, SOURCE, [vdisk(2000, "[DS1] db01/db01.vmdk")],
                                        proxy_context(), ["hotadd"]):
        pass

    (detached,) = [e for e in seen if e.type == "hotadd.detached"]
    assert not detached.ok and detached.reason == "vCenter is busy"
    (line,) = [e for e in seen if e.type == "log" and e.level == "error"]
    assert "could not be detached from proxy VM backup-proxy" in line.message
    assert "the next daemon start detaches them" in line.message


async def test_leftovers_are_only_nonpersistent_disks_no_running_session_holds(session):
    vcenter = FakeVCenter(proxy_vm())
    ctx = session(vcenter)
    ctx.config = ctx.engine.config = _with_proxy_vm(ctx.config, "backup-proxy")
    vcenter.attached = {
        2100: ScsiDisk(2100, DatastoreFile.parse("[DS1] crashed/crashed.vmdk"), 1000, 0, 1, "",
                       "independent_nonpersistent", MiB),
        2101: ScsiDisk(2101, DatastoreFile.parse("[DS1] shared/data.vmdk"), 1000, 0, 2, "",
                       "persistent", MiB),
    }
    seen: list[Any] = []
    ctx.engine.bus.subscribe(seen.append)

    detached = await hotadd.detach_leftovers(ctx.engine, vcenter,  # type: ignore[arg-type]
                                             "daemon-start")

    assert detached == ["[DS1] crashed/crashed.vmdk"]
    assert list(vcenter.attached) == [2101], "an admin's persistent disk stays"
    (event,) = [e for e in seen if e.type == "hotadd.detached"]
    assert event.orphan and event.session_id == "daemon-start"


def _with_proxy_vm(config: Any, vm: str) -> Any:
    from dataclasses import replace

    proxies = {name: replace(p, vm=vm) for name, p in config.proxies.items()}
    return replace(config, proxies=proxies)
