"""Traffic rules: which transfers a rule covers, when, and how its limit is shared."""
from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import MINIMAL_CONFIG
from vbrd.config import ProxySettings, RepositorySettings, TrafficRule, load_config
from vbrd.errors import ConfigError
from vbrd.models import Secret
from vbrd.transport.rules import TrafficShaper, rule_active, rule_applies

MB = 1e6
AGENT = {"fingerprint": "sha256:" + "ab" * 32, "secret": Secret("s" * 20)}
PROXY_A = ProxySettings(name="proxy-a", address="10.9.0.11:8471", network="proxies", **AGENT)
PROXY_B = ProxySettings(name="proxy-b", address="10.9.0.12:8471", network="proxies", **AGENT)
LOCAL = ProxySettings(name="local", network="lab")
REPO = RepositorySettings(name="main", path=Path("/srv/repo"), address="10.9.0.21:8471",
                          network="storage", **AGENT)


def rule(limit_mb: float, name: str = "r", *, from_network: str = "proxies",
         to_network: str = "storage", from_host: str = "", to_host: str = "",
         hours: tuple[int, int] | None = None) -> TrafficRule:
    return TrafficRule(name=name, from_network="" if from_host else from_network,
                       to_network="" if to_host else to_network, limit=limit_mb * MB,
                       hours=hours, from_host=from_host, to_host=to_host)


class Recorder:
    """A transfer's rate control, recording every limit it is handed."""

    def __init__(self) -> None:
        self.limits: list[float | None] = []

    def set_bandwidth_limit(self, bps: float | None) -> None:
        self.limits.append(bps)

    @property
    def now(self) -> float | None:
        return self.limits[-1] if self.limits else None


def test_a_rule_covers_transfers_between_its_networks_or_its_hosts():
    assert rule_applies(rule(20), PROXY_A, REPO)
    assert not rule_applies(rule(20), LOCAL, REPO), "the local proxy is on network lab"
    assert not rule_applies(rule(20, to_network="dr"), PROXY_A, REPO)
    by_name = rule(20, from_host="proxy-a", to_host="main")
    assert rule_applies(by_name, PROXY_A, REPO) and not rule_applies(by_name, PROXY_B, REPO)
    by_address = rule(20, from_host="10.9.0.12", to_host="10.9.0.21")
    assert rule_applies(by_address, PROXY_B, REPO) and not rule_applies(by_address, PROXY_A,
                                                                          REPO)


@pytest.mark.parametrize(("hours", "clock", "active"), [
    (None, "03:00", True),
    ((8 * 60, 18 * 60), "07:59", False),
    ((8 * 60, 18 * 60), "08:00", True),
    ((8 * 60, 18 * 60), "17:59", True),
    ((8 * 60, 18 * 60), "18:00", False),
    ((22 * 60, 6 * 60), "23:30", True),
    ((22 * 60, 6 * 60), "05:59", True),
    ((22 * 60, 6 * 60), "12:00", False),
])
def test_a_rule_with_hours_applies_only_then(hours, clock, active):
    h, m = map(int, clock.split(":"))
    assert rule_active(rule(20, hours=hours), datetime(2024, 3, 4, h, m)) is active


def test_one_rules_limit_is_shared_equally_and_handed_out_again_as_movers_come_and_go():
    shaper = TrafficShaper([rule(20)])
    a, b, c = Recorder(), Recorder(), Recorder()

    first = shaper.join(PROXY_A, REPO, a)
    assert a.now == 20 * MB
    second = shaper.join(PROXY_B, REPO, b)
    assert a.now == b.now == 10 * MB
    third = shaper.join(PROXY_A, REPO, c)
    assert a.now == b.now == c.now == pytest.approx(20 * MB / 3)
    assert "traffic rule r: 20.0 MB/s shared by 3 data movers" in third.why

    second.leave()
    assert a.now == c.now == 10 * MB
    first.leave()
    third.leave()
    assert shaper.flows == ()
    assert b.limits == [10 * MB, 20 * MB / 3], "a mover that left is not touched again"


def test_a_transfer_under_two_rules_gets_the_smaller_share_and_one_under_none_no_limit():
    shaper = TrafficShaper([rule(20, "wide"), rule(3, "narrow", from_host="proxy-b",
                                                   to_host="main")])
    a, b, free = Recorder(), Recorder(), Recorder()
    shaper.join(PROXY_A, REPO, a)
    shaper.join(PROXY_B, REPO, b)
    shaper.join(LOCAL, REPO, free)

    assert a.now == 10 * MB, "wide: 20 MB/s between two movers"
    assert b.now == 3 * MB, "narrow alone is smaller than its half of wide"
    assert free.limits == [None]


async def test_a_rule_starts_limiting_when_its_hours_begin_during_a_transfer():
    # the clock starts a moment before 08:00 and runs at real speed
    t0, start = time.monotonic(), datetime(2024, 3, 4, 7, 59, 59, 700_000)

    def now() -> datetime:
        return start + timedelta(seconds=time.monotonic() - t0)

    shaper = TrafficShaper([rule(20, hours=(8 * 60, 18 * 60))], now=now)
    control = Recorder()
    flow = shaper.join(PROXY_A, REPO, control)
    assert control.limits == [None]
    await asyncio.sleep(0.6)
    assert control.limits == [None, 20 * MB]
    flow.leave()


def test_the_config_takes_rules_by_network_or_host_and_refuses_half_a_side(write_config):
    body = MINIMAL_CONFIG + """
[[traffic_rules]]
name = "to-dr"
from_network = "lab"
to_host = "dr-repo.example.com"
limit = "20MB/s"
hours = "22:00-06:00"
"""
    (r,) = load_config(write_config(body)).traffic_rules
    assert (r.from_network, r.to_host, r.limit, r.hours) == ("lab", "dr-repo.example.com",
                                                             20e6, (22 * 60, 6 * 60))
    with pytest.raises(ConfigError) as err:
        load_config(write_config(body.replace('to_host = "dr-repo.example.com"', "")))
    assert err.value.key == "traffic_rules[0].to_network"
    assert "to_network or to_host" in err.value.reason
