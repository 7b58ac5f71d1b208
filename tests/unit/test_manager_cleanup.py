"""The Backup Manager cleans up whatever happens: a stop that loses patience, a failed read,
what an earlier run left behind.

Whole sessions run through :class:`vbrd.manager.BackupManager` against a stand-in vCenter
(:class:`tests.unit.fake_vcenter.FakeVCenter`), so that a cancellation can be delivered
exactly while a given vCenter call or guest step is in flight. ``stop_all(0)`` is what the
daemon does once ``daemon.stop_timeout`` has passed: ask every session to stop, then cancel
the ones still running. Data transport is refused by a policy plugin (the phase hook), or
replaced by a failing one, where a test is about what surrounds it.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MINIMAL_CONFIG
from tests.unit.fake_vcenter import FakeVCenter, proxy_vm, vdisk, vm_info
from vbrd import hookimpl
from vbrd.config import load_config
from vbrd.engine import Engine
from vbrd.errors import TransportError, VbrdError
from vbrd.events import Event
from vbrd.manager import data_transport, guest_processing
from vbrd.manager.snapshot_commit import hunt_with
from vbrd.plugins import make_plugin_manager
from vbrd.vsphere import SnapshotInfo

CONFIG = MINIMAL_CONFIG.replace('[proxies.local]\n', '[proxies.local]\nvm = "backup-proxy"\n')\
    .replace('vms = ["linux-vm"]', 'vms = ["db01"]') + """
[jobs.guest]
vcenter = "lab"
repository = "default"
vms = ["db01"]

[jobs.guest.guest]
enabled = true

[jobs.hot]
vcenter = "lab"
repository = "default"
vms = ["db01"]
transport = "hotadd"
"""
OTHER_INSTALLATION = "0123456789abcdef0123456789abcdef"


class RefuseDataTransport:
    """A policy plugin that refuses phase 5, so that a session goes from 3 to 6 at once."""

    @hookimpl
    def vbrd_before_phase(self, session_id: str, job: str, phase: str, vm: str) -> None:
        if phase == "data_transport":
            raise VbrdError("data transport refused by policy")


class FakeGuest:
    """A guest processor (``vix``) whose thaw takes ``thaw_time`` seconds (None: forever)."""

    name = "vix"
    families = ("other",)

    def __init__(self, log: list[tuple[str, Any]], thaw_time: float | None) -> None:
        self.log, self.thaw_time = log, thaw_time
        self.processor = "vix"

    @hookimpl
    def vbrd_guest_processors(self) -> list[Any]:
        return [self]

    async def connect(self, vm: Any, context: Any) -> FakeGuest:
        return self

    async def prepare(self) -> None:
        pass

    async def freeze(self) -> None:
        self.log.append(("frozen", None))

    async def thaw(self) -> None:
        self.log.append(("thaw started", None))
        if self.thaw_time is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.thaw_time or 0)
        self.log.append(("thawed", None))

    async def after_backup(self, success: bool) -> None:
        pass

    async def close(self) -> None:
        pass


class Harness:
    def __init__(self, engine: Engine, vcenter: FakeVCenter) -> None:
        self.engine, self.vcenter = engine, vcenter
        self.events: list[Event] = []
        engine.bus.subscribe(self.events.append)

    async def start(self, job: str = "nightly") -> str:
        return await self.engine.start_job(job, trigger="cli")

    async def finish(self, session: str, timeout: float = 30.0) -> str:
        status = await asyncio.wait_for(self.engine.wait_session(session), timeout)
        await self.vcenter.settled()
        return status

    async def when(self, kind: str) -> None:
        """Wait until vCenter (or the guest) logged ``kind``."""
        for _ in range(3000):
            if kind in self.vcenter.kinds():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"never saw {kind!r}: {self.vcenter.log}")

    async def stop_after_stop_timeout(self) -> None:
        """The daemon's stop once ``stop_timeout`` passed: stop requested, then cancelled."""
        await self.engine.stop_all(0)
        await self.vcenter.settled()

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.type == kind]

    def logs(self, level: str) -> list[str]:
        return [e.message for e in self.of("log") if e.level == level]  # type: ignore[attr-defined]


@pytest.fixture
def harness(write_config: Callable[[str], Path],
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    vcenter = FakeVCenter(proxy_vm(), vms=[vm_info(disks=[vdisk(2000, "[DS1] db01/db01.vmdk")])])
    monkeypatch.setattr("vbrd.manager.VSphere", lambda settings: vcenter)
    config = load_config(write_config(CONFIG))
    engine = Engine(config, pm=make_plugin_manager(only=["transport_hotadd"]))
    yield Harness(engine, vcenter)
    engine.close()


def refuse_data_transport(harness: Harness) -> None:
    harness.engine.pm.register(RefuseDataTransport(), name="refuse-data-transport")


# ---- cancellation after stop_timeout ------------------------------------------------------


async def test_a_snapshot_whose_creation_completes_under_cancellation_is_removed(harness):
    vcenter = harness.vcenter
    vcenter.create_delay = 0.3
    refuse_data_transport(harness)
    session = await harness.start()
    await harness.when("create started")

    await harness.stop_after_stop_timeout()

    assert harness.engine.sessions == {}
    assert vcenter.snaps == {}, "the snapshot made while the session was cancelled is gone"
    kinds = vcenter.kinds()
    assert kinds.index("created") < kinds.index("removed") < kinds.index("closed")
    (removed,) = harness.of("snapshot.removed")
    assert removed.session_id == session and not removed.orphan  # type: ignore[attr-defined]


async def test_the_vcenter_session_is_closed_only_after_the_snapshot_removal_finished(harness):
    vcenter = harness.vcenter
    vcenter.remove_delay = 0.3
    refuse_data_transport(harness)
    await harness.start()
    await harness.when("remove started")

    await harness.stop_after_stop_timeout()

    assert vcenter.snaps == {}
    kinds = vcenter.kinds()
    assert kinds.index("removed") < kinds.index("closed")
    assert kinds.count("remove started") == 1, "the hunter does not race phase 6"


async def test_a_thaw_in_flight_when_the_session_is_cancelled_runs_to_its_end(harness):
    vcenter = harness.vcenter
    harness.engine.pm.register(FakeGuest(vcenter.log, thaw_time=0.3), name="fake-guest")
    refuse_data_transport(harness)
    await harness.start("guest")
    await harness.when("thaw started")

    await harness.stop_after_stop_timeout()

    kinds = vcenter.kinds()
    assert "thawed" in kinds, "the guest is not left frozen"
    assert kinds.index("thawed") < kinds.index("removed") < kinds.index("closed")
    (thawed,) = harness.of("guest.thawed")
    assert thawed.ok  # type: ignore[attr-defined]


async def test_a_thaw_that_hangs_is_given_up_at_its_deadline_and_cleanup_goes_on(
        harness, monkeypatch):
    monkeypatch.setattr(guest_processing, "THAW_TIMEOUT", 0.2)
    vcenter = harness.vcenter
    harness.engine.pm.register(FakeGuest(vcenter.log, thaw_time=None), name="fake-guest")
    refuse_data_transport(harness)
    session = await harness.start("guest")

    assert await harness.finish(session) == "failed"

    assert vcenter.snaps == {}
    assert any("post-thaw failed: post-thaw did not finish within 0.2 s" in m
               for m in harness.logs("warning"))
    (thawed,) = harness.of("guest.thawed")
    assert not thawed.ok  # type: ignore[attr-defined]


# ---- hot-add ------------------------------------------------------------------------------


async def test_a_hot_added_disk_is_detached_after_a_failed_read_before_the_snapshot_goes(
        harness, monkeypatch):
    async def reading_fails(*args: Any, **kwargs: Any) -> Any:
        raise TransportError("hotadd: the proxy lost the hot-added device")

    monkeypatch.setattr(data_transport, "run_transfer", reading_fails)
    vcenter = harness.vcenter
    session = await harness.start("hot")

    assert await harness.finish(session) == "failed"

    (finished,) = harness.of("vm.finished")
    assert "the proxy lost the hot-added device" in finished.reason  # type: ignore[attr-defined]
    assert vcenter.attached == {} and vcenter.tags == {}
    kinds = vcenter.kinds()
    assert kinds.index("attached") < kinds.index("detached") < kinds.index("remove started")
    (detached,) = harness.of("hotadd.detached")
    assert detached.ok and not detached.orphan  # type: ignore[attr-defined]


async def test_disks_an_earlier_run_left_attached_are_detached_after_the_next_session(harness):
    vcenter, me = harness.vcenter, harness.engine.installation_id
    mine = vcenter.attach_leftover(
        "[DS1] db02/db02.vmdk",
        f"installation={me}; session=S-killed; file=[DS1] db02/db02.vmdk")
    vcenter.attach_leftover(
        "[DS1] db03/db03.vmdk",
        f"installation={OTHER_INSTALLATION}; session=S-dr; file=[DS1] db03/db03.vmdk")
    vcenter.attach_leftover("[DS1] scratch/scratch.vmdk")  # an administrator's, untagged
    left = vcenter.add_snapshot(
        "vbrd-S-killed", f"vbrd backup snapshot; installation={me}; session=S-killed; "
                         f"job=nightly", vm="db02")
    refuse_data_transport(harness)
    session = await harness.start()

    await harness.finish(session)

    assert sorted(str(d.file) for d in vcenter.attached.values()) == [
        "[DS1] db03/db03.vmdk", "[DS1] scratch/scratch.vmdk"]
    assert mine.address not in vcenter.tags
    assert left.moref not in vcenter.snaps, "its snapshot could go once the disk was detached"
    assert vcenter.kinds().index("detached") < vcenter.log.index(("removed", left.moref))


# ---- the CBT activation snapshot ----------------------------------------------------------


async def test_a_hunt_while_cbt_is_being_activated_leaves_that_snapshot_to_its_session(
        harness):
    vcenter = harness.vcenter
    vcenter.vms[0].cbt_enabled = False
    refuse_data_transport(harness)
    hunted: list[list[str]] = []

    async def another_session_hunts(snap: SnapshotInfo) -> None:
        if snap.name.startswith("vbrd-cbt-"):
            vcenter.tick()
            hunted.append(await hunt_with(harness.engine, vcenter,  # type: ignore[arg-type]
                                          "S-other"))

    vcenter.on_created = another_session_hunts
    session = await harness.start()

    assert await harness.finish(session) == "failed"  # data transport was refused

    assert hunted == [[]]
    (cbt,) = [name for kind, name in vcenter.log
              if kind == "create started" and name.startswith("vbrd-cbt-")]
    assert cbt == f"vbrd-cbt-{session}"
    assert vcenter.snaps == {}
    assert not any("CBT" in m for m in harness.logs("warning"))
