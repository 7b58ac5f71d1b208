"""The Manager's side of hot-add: which disks it attaches, and that it always detaches them.

vCenter is a stand-in here (:class:`tests.unit.fake_vcenter.FakeVCenter`, which records what it
was asked and can be slow or refuse), so that decisions and cancellation can be checked
exactly; the real thing is exercised against the lab in tests/integration/test_transport_modes.py.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MINIMAL_CONFIG
from tests.unit.fake_vcenter import FakeVCenter, MiB, proxy_vm, vdisk
from tests.vmdk_support import convert, make_raw
from vbrd.config import load_config
from vbrd.engine import Engine, RunningSession
from vbrd.errors import TransportError
from vbrd.manager import hotadd
from vbrd.manager.context import SessionContext
from vbrd.models import AttachedDisk, ProxyContext, VmRef
from vbrd.vsphere import VmInfo

OTHER_INSTALLATION = "0123456789abcdef0123456789abcdef"
AUTO = ["san", "hotadd", "nbd"]


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
    assert "detached again after this session and at the next daemon start" in line.message


async def test_each_attached_disk_is_tagged_with_this_installation_until_detached(session):
    vcenter = FakeVCenter(proxy_vm())
    ctx = session(vcenter)
    me = ctx.engine.installation_id

    async with hotadd.attached_to_proxy(ctx, SOURCE, [vdisk(2000, "[DS1] db01/db01.vmdk")],
                                        proxy_context(), ["hotadd"]) as given:
        assert given.attached_disks == {2000: str(AttachedDisk(0, 1, vcenter.attached[2100]
                                                                .uuid))}
        assert vcenter.tags == {
            "scsi0:1": f"installation={me}; session=s1; file=[DS1] db01/db01.vmdk"}
    assert vcenter.attached == {} and vcenter.tags == {}


async def test_a_read_that_fails_still_detaches_before_the_failure_goes_on(session):
    vcenter = FakeVCenter(proxy_vm())
    ctx = session(vcenter)

    with pytest.raises(TransportError, match="the proxy lost the hot-added device"):
        async with hotadd.attached_to_proxy(ctx, SOURCE, [vdisk(2000, "[DS1] db01/db01.vmdk")],
                                            proxy_context(), ["hotadd"]):
            raise TransportError("hotadd: the proxy lost the hot-added device")

    assert [kind for kind, _ in vcenter.log] == ["attach started", "attached", "detached"]
    assert vcenter.attached == {} and vcenter.tags == {}


async def test_leftovers_are_only_disks_this_installation_tagged_for_a_finished_session(
        session):
    vcenter = FakeVCenter(proxy_vm())
    ctx = session(vcenter)
    ctx.config = ctx.engine.config = _with_proxy_vm(ctx.config, "backup-proxy")
    me = ctx.engine.installation_id
    running = asyncio.ensure_future(asyncio.Event().wait())
    ctx.engine.sessions["S-running"] = RunningSession("S-running", "nightly", running)

    def tag(installation: str, session_id: str, file: str) -> str:
        return f"installation={installation}; session={session_id}; file={file}"

    crashed = vcenter.attach_leftover("[DS1] crashed/crashed.vmdk",
                                      tag(me, "S-killed", "[DS1] crashed/crashed.vmdk"))
    vcenter.attach_leftover("[DS1] dr/dr.vmdk",
                            tag(OTHER_INSTALLATION, "S-dr", "[DS1] dr/dr.vmdk"))
    vcenter.attach_leftover("[DS1] admin/scratch.vmdk")  # an administrator's, untagged
    vcenter.attach_leftover("[DS1] shared/data.vmdk", tag(me, "S-killed", "[DS1] shared/"
                                                          "data.vmdk"), mode="persistent")
    vcenter.attach_leftover("[DS1] busy/busy.vmdk", tag(me, "S-running", "[DS1] busy/busy.vmdk"))
    vcenter.attach_leftover("[DS1] moved/new.vmdk", tag(me, "S-killed", "[DS1] moved/old.vmdk"))
    vcenter.tags["scsi0:15"] = tag(me, "S-killed", "[DS1] gone/gone.vmdk")  # its disk is gone
    seen: list[Any] = []
    ctx.engine.bus.subscribe(seen.append)
    try:
        detached = await hotadd.detach_leftovers(ctx.engine, vcenter,  # type: ignore[arg-type]
                                                 "S-now")
    finally:
        running.cancel()

    assert detached == ["[DS1] crashed/crashed.vmdk"]
    assert crashed.key not in vcenter.attached
    assert sorted(str(d.file) for d in vcenter.attached.values()) == [
        "[DS1] admin/scratch.vmdk", "[DS1] busy/busy.vmdk", "[DS1] dr/dr.vmdk",
        "[DS1] moved/new.vmdk", "[DS1] shared/data.vmdk"]
    assert crashed.address not in vcenter.tags and "scsi0:15" not in vcenter.tags
    (event,) = [e for e in seen if e.type == "hotadd.detached"]
    assert event.orphan and event.session_id == "S-now"


def _with_proxy_vm(config: Any, vm: str) -> Any:
    from dataclasses import replace

    proxies = {name: replace(p, vm=vm) for name, p in config.proxies.items()}
    return replace(config, proxies=proxies)
