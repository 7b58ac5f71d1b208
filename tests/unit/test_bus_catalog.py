"""Every event of a session reaches the catalog, in order, and a bad listener harms no one."""
from __future__ import annotations

import asyncio

from vbrd.bus import EventBus
from vbrd.catalog import Catalog
from vbrd.events import PhaseStarted, SessionFinished, SessionLog, SessionStarted


def test_catalog_stores_a_sessions_events_in_order(tmp_path):
    bus = EventBus()
    catalog = Catalog(tmp_path / "catalog.sqlite")
    bus.subscribe(catalog.record)
    bus.publish(SessionStarted(session_id="s1", job="nightly", trigger="cli"))
    for i in range(50):
        bus.publish(SessionLog(session_id="s1", level="info", message=f"line {i}"))
    bus.publish(SessionLog(session_id="other", level="info", message="not mine"))
    bus.publish(SessionFinished(session_id="s1", job="nightly", status="success"))
    events = catalog.events("s1")
    assert [e["type"] for e in events] == ["session.started"] + ["log"] * 50 + [
        "session.finished"]
    assert [e["message"] for e in events[1:-1]] == [f"line {i}" for i in range(50)]
    record = catalog.session("s1")
    assert record and record.status == "success" and record.job == "nightly"
    catalog.close()
    reopened = Catalog(tmp_path / "catalog.sqlite")
    assert len(reopened.events("s1")) == 52
    reopened.close()


def test_interrupted_sessions_are_marked_failed_at_the_next_start(tmp_path):
    catalog = Catalog(tmp_path / "c.sqlite")
    catalog.record(SessionStarted(session_id="s2", job="j", trigger="api"))
    catalog.close()
    again = Catalog(tmp_path / "c.sqlite")
    assert again.mark_interrupted() == ["s2"]
    record = again.session("s2")
    assert record and record.status == "failed" and "daemon stopped" in record.reason
    again.close()


def test_a_failing_listener_does_not_stop_the_others(caplog):
    bus = EventBus()
    seen = []

    def broken(event):
        raise RuntimeError("boom")

    bus.subscribe(broken)
    bus.subscribe(seen.append)
    bus.publish(PhaseStarted(session_id="s", name="snapshot"))
    assert len(seen) == 1
    assert "boom" in caplog.text


async def test_follow_streams_one_session_until_it_finishes():
    bus = EventBus()

    async def produce():
        await asyncio.sleep(0.01)
        bus.publish(PhaseStarted(session_id="a", name="snapshot"))
        bus.publish(PhaseStarted(session_id="b", name="snapshot"))
        bus.publish(SessionFinished(session_id="a", job="j", status="success"))

    task = asyncio.create_task(produce())
    got = [e.type async for e in bus.follow("a")]
    await task
    assert got == ["phase.started", "session.finished"]


def test_unsubscribe_stops_delivery():
    bus = EventBus()
    seen = []
    unsubscribe = bus.subscribe(seen.append)
    unsubscribe()
    bus.publish(PhaseStarted(session_id="s", name="x"))
    assert seen == []
