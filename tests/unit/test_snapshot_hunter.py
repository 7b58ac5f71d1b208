"""The snapshot hunter removes this installation's leftover snapshots, and nothing else.

A snapshot is vbrd's to remove only when its name and description say, exactly, that this
installation made it for a session (docs/snapshots.md), that session is not running at the
moment of the removal, and the snapshot is older than the hunt. vCenter is a stand-in here
(:class:`FakeVCenter`), so that the races can be played out step by step.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MINIMAL_CONFIG
from tests.unit.fake_vcenter import FakeVCenter
from vbrd.config import load_config
from vbrd.engine import Engine, RunningSession
from vbrd.manager.snapshot_commit import hunt_with

OTHER_INSTALLATION = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def engine(write_config: Callable[[str], Path]) -> Iterator[Engine]:
    engine = Engine(load_config(write_config(MINIMAL_CONFIG)))
    yield engine
    for running in engine.sessions.values():
        running.task.cancel()
    engine.close()


def backup_snapshot(installation: str, session: str, job: str = "nightly") -> tuple[str, str]:
    """The name and description of a backup session's snapshot, as docs/snapshots.md has it."""
    return (f"vbrd-{session}",
            f"vbrd backup snapshot; installation={installation}; session={session}; job={job}")


def cbt_snapshot(installation: str, session: str, job: str = "nightly") -> tuple[str, str]:
    return (f"vbrd-cbt-{session}",
            f"vbrd CBT activation snapshot; installation={installation}; session={session}; "
            f"job={job}")


def start(engine: Engine, session: str) -> None:
    """``session`` is running in this daemon from now on."""
    task = asyncio.ensure_future(asyncio.Event().wait())
    engine.sessions[session] = RunningSession(session, "nightly", task)


def seen(engine: Engine) -> list[Any]:
    events: list[Any] = []
    engine.bus.subscribe(events.append)
    return events


async def test_a_leftover_of_this_installation_is_removed(engine):
    vcenter = FakeVCenter()
    left = vcenter.add_snapshot(*backup_snapshot(engine.installation_id, "S-killed"))
    cbt = vcenter.add_snapshot(*cbt_snapshot(engine.installation_id, "S-killed"))
    vcenter.tick()
    events = seen(engine)

    removed = await hunt_with(engine, vcenter, "S-now")  # type: ignore[arg-type]

    assert sorted(removed) == sorted([left.moref, cbt.moref])
    assert vcenter.snaps == {}
    assert {e.snapshot for e in events if e.type == "snapshot.removed" and e.orphan} == \
        {left.moref, cbt.moref}


async def test_a_session_that_starts_during_the_walk_keeps_its_snapshot(engine):
    # The walk of every VM's snapshots is slow; a session that starts meanwhile has its
    # snapshot in what the walk returns. Its host's clock runs a little behind vCenter's, so
    # its create time says nothing: only who is running right now does.
    vcenter = FakeVCenter()

    def a_session_starts() -> None:
        start(engine, "S-new")
        vcenter.add_snapshot(*backup_snapshot(engine.installation_id, "S-new"),
                             created=vcenter.now - timedelta(seconds=5))

    vcenter.during_walk = a_session_starts

    removed = await hunt_with(engine, vcenter, "S-now")  # type: ignore[arg-type]

    assert removed == []
    assert [s.name for s in vcenter.snaps.values()] == ["vbrd-S-new"]


async def test_a_snapshot_made_after_the_hunt_began_is_left_for_a_later_hunt(engine):
    # S-quick started and ended during the walk; whatever it left, this hunt began before it
    # and does not judge it.
    vcenter = FakeVCenter()
    vcenter.during_walk = lambda: vcenter.add_snapshot(
        *backup_snapshot(engine.installation_id, "S-quick"))

    removed = await hunt_with(engine, vcenter, "S-now")  # type: ignore[arg-type]

    assert removed == []
    assert [s.name for s in vcenter.snaps.values()] == ["vbrd-S-quick"]


async def test_a_running_sessions_cbt_activation_snapshot_is_kept(engine):
    vcenter = FakeVCenter()
    start(engine, "S-running")
    vcenter.add_snapshot(*cbt_snapshot(engine.installation_id, "S-running"))
    vcenter.tick()

    assert await hunt_with(engine, vcenter, "S-now") == []  # type: ignore[arg-type]
    assert len(vcenter.snaps) == 1


async def test_another_installations_snapshots_are_left_alone(engine):
    # A DR server or a test install on the same vCenter: its sessions are not ours to judge.
    vcenter = FakeVCenter()
    vcenter.add_snapshot(*backup_snapshot(OTHER_INSTALLATION, "S-elsewhere"))
    vcenter.add_snapshot(*cbt_snapshot(OTHER_INSTALLATION, "S-elsewhere"))
    vcenter.tick()

    assert await hunt_with(engine, vcenter, "S-now") == []  # type: ignore[arg-type]
    assert len(vcenter.snaps) == 2


@pytest.mark.parametrize("name, description", [
    ("vbrd-before-upgrade", "the admin's own, before the kernel upgrade"),
    ("vbrd-S-killed", ""),
    ("vbrd-S-killed", "vbrd backup snapshot; session=S-killed; job=nightly"),  # no owner
    ("vbrd-hand-made", "vbrd backup snapshot; installation={me}; session=S-killed; "
                       "job=nightly"),  # the name is not the session's
    ("vbrd-S-killed", "vbrd backup snapshot; installation={me}; session=S-other; "
                      "job=nightly"),  # name and description disagree
    ("vbrd-S-killed", "copied: vbrd backup snapshot; installation={me}; session=S-killed; "
                      "job=nightly"),
])
async def test_a_snapshot_without_this_installations_exact_mark_is_never_touched(
        engine, name, description):
    vcenter = FakeVCenter()
    vcenter.add_snapshot(name, description.format(me=engine.installation_id))
    vcenter.tick()

    assert await hunt_with(engine, vcenter, "S-now") == []  # type: ignore[arg-type]
    assert len(vcenter.snaps) == 1


async def test_a_leftover_someone_removed_meanwhile_is_no_warning(engine):
    vcenter = FakeVCenter()
    left = vcenter.add_snapshot(*backup_snapshot(engine.installation_id, "S-killed"))
    vcenter.tick()
    vcenter.during_walk = None
    events = seen(engine)
    real_walk = vcenter.snapshots

    async def walk_then_someone_removes_it() -> list[Any]:
        found = await real_walk()
        del vcenter.snaps[left.moref]
        return found

    vcenter.snapshots = walk_then_someone_removes_it  # type: ignore[method-assign]

    assert await hunt_with(engine, vcenter, "S-now") == []  # type: ignore[arg-type]
    assert [e for e in events if e.type == "log" and e.level == "warning"] == []
