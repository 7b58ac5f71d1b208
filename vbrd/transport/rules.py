"""Network traffic rules: which bandwidth limits apply to a transfer, and each mover's share.

A rule (``[[traffic_rules]]``) limits the data movers' traffic from one side (proxies, by
network or by host) to the other (repositories, likewise), always or during ``hours``. The
limit belongs to the rule, not to each transfer: the movers running under one rule share it
equally, and the shares are handed out again whenever a mover starts or ends and when a rule's
hours begin or end. A transfer under several rules gets the smallest of its shares. The proxy
side's data mover enforces its share (:class:`vbrd.transport.throttle.TokenBucket`), and takes
a new one while it runs (:meth:`vbrd.transport.movers.TransferControl.set_bandwidth_limit`).

The split is equal, not max-min: a mover that cannot use its share (a slow source) leaves
that bandwidth unused rather than handing it to the others.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from vbrd.config import ProxySettings, RepositorySettings, TrafficRule

log = logging.getLogger(__name__)


class RateControl(Protocol):
    def set_bandwidth_limit(self, bps: float | None) -> None: ...


def side_matches(network: str, host: str, settings: ProxySettings | RepositorySettings) -> bool:
    """Whether one side of a rule names this proxy or repository."""
    if network:
        return settings.network == network
    return host in (settings.name, settings.agent.host)


def rule_applies(rule: TrafficRule, proxy: ProxySettings, repository: RepositorySettings) -> bool:
    """Whether ``rule`` covers traffic from ``proxy`` to ``repository`` (at some hour)."""
    return (side_matches(rule.from_network, rule.from_host, proxy)
            and side_matches(rule.to_network, rule.to_host, repository))


def rule_active(rule: TrafficRule, when: datetime) -> bool:
    """Whether the rule's hours include ``when`` (local time). ``22:00-06:00`` spans
    midnight; a rule without hours, or with equal start and end, always applies."""
    if rule.hours is None:
        return True
    start, end = rule.hours
    minute = when.hour * 60 + when.minute
    if start < end:
        return start <= minute < end
    if start > end:
        return minute >= start or minute < end
    return True


def human_rate(bps: float) -> str:
    return f"{bps / 1e6:.1f} MB/s"


@dataclass(eq=False)
class Flow:
    """One running transfer under the shaper; :meth:`leave` when it ends."""

    shaper: TrafficShaper
    proxy: str
    repository: str
    rules: tuple[TrafficRule, ...]
    control: RateControl
    limit: float | None = None
    why: str = ""
    applied: bool = field(default=False, repr=False)

    def leave(self) -> None:
        self.shaper._leave(self)

    def __enter__(self) -> Flow:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.leave()


class TrafficShaper:
    """Shares each traffic rule's limit among the transfers running under it."""

    def __init__(self, rules: Sequence[TrafficRule], *,
                 now: Callable[[], datetime] = datetime.now) -> None:
        self._rules = tuple(rules)
        self._now = now
        self._flows: list[Flow] = []
        self._clock_task: asyncio.Task[None] | None = None

    def configure(self, rules: Sequence[TrafficRule]) -> None:
        """New rules apply to new transfers; running ones keep the rules they started with."""
        self._rules = tuple(rules)

    @property
    def flows(self) -> Sequence[Flow]:
        return tuple(self._flows)

    def join(self, proxy: ProxySettings, repository: RepositorySettings,
             control: RateControl) -> Flow:
        """Register a transfer from ``proxy`` to ``repository``; its control gets its share
        now and whenever the shares change."""
        matching = tuple(r for r in self._rules if rule_applies(r, proxy, repository))
        flow = Flow(self, proxy.name, repository.name, matching, control)
        self._flows.append(flow)
        self.apply()
        if matching and any(r.hours for r in matching):
            self._follow_clock()
        return flow

    def _leave(self, flow: Flow) -> None:
        if flow in self._flows:
            self._flows.remove(flow)
            self.apply()
        if not self._flows and self._clock_task is not None:
            self._clock_task.cancel()
            self._clock_task = None

    def share(self, flow: Flow, when: datetime | None = None) -> tuple[float | None, str]:
        """The flow's limit now and which rule sets it (``None``: no rule limits it)."""
        when = when or self._now()
        best: tuple[float | None, str] = (None, "")
        for rule in flow.rules:
            if not rule_active(rule, when):
                continue
            movers = sum(1 for f in self._flows if rule in f.rules)
            share = rule.limit / max(movers, 1)
            if best[0] is None or share < best[0]:
                best = (share, f"traffic rule {rule.name}: {human_rate(rule.limit)} shared "
                               f"by {movers} data mover{'s' if movers != 1 else ''}")
        return best

    def apply(self) -> None:
        """Hand every flow its current share (only changes are sent to the movers)."""
        when = self._now()
        for flow in list(self._flows):
            limit, why = self.share(flow, when)
            if flow.applied and limit == flow.limit:
                continue
            flow.limit, flow.why, flow.applied = limit, why, True
            try:
                flow.control.set_bandwidth_limit(limit)
            except Exception:
                log.exception("cannot change the bandwidth limit of a transfer from %s to %s",
                              flow.proxy, flow.repository)

    def _follow_clock(self) -> None:
        """While transfers run under rules with hours, re-share at every minute boundary."""
        if self._clock_task is not None and not self._clock_task.done():
            return
        with contextlib.suppress(RuntimeError):
            self._clock_task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while self._flows:
            now = self._now()
            following = (now + timedelta(minutes=1)).replace(second=0, microsecond=0)
            await asyncio.sleep(max(0.05, (following - now).total_seconds()))
            self.apply()
