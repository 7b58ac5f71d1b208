"""Schedules fire when an administrator expects them to."""
from __future__ import annotations

from datetime import datetime, timedelta

from vbrd.config import parse_schedule
from vbrd.daemon import next_run


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_daily_fires_later_today_or_tomorrow():
    daily = parse_schedule("daily 22:00")
    assert daily
    assert next_run(daily, at("2026-11-25T21:59:00"), None) == at("2026-11-25T22:00:00")
    assert next_run(daily, at("2026-11-25T22:00:00"), None) == at("2026-11-26T22:00:00")


def test_weekly_fires_on_the_named_day():
    weekly = parse_schedule("weekly sun 03:00")
    assert weekly
    # 2026-11-25 is a Wednesday
    assert next_run(weekly, at("2026-11-25T12:00:00"), None) == at("2026-11-29T03:00:00")
    assert next_run(weekly, at("2026-11-29T03:00:01"), None) == at("2026-12-06T03:00:00")


def test_every_counts_from_the_last_run():
    every = parse_schedule("every 30m")
    assert every
    now = at("2026-11-25T12:00:00")
    assert next_run(every, now, None) == now + timedelta(minutes=30)
    assert next_run(every, now, now - timedelta(minutes=10)) == now + timedelta(minutes=20)
    assert next_run(every, now, now - timedelta(hours=2)) == now
