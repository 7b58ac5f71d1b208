"""The data path's watchdog: a transfer without progress ends, its movers killed, naming why.

The movers here are stand-ins that say what the test makes them say, and the watchdog's
clock is the test's, so the five minutes of a stall pass in milliseconds.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from vbrd.models import DatastoreFile, DiskTask, ProxyContext, VmRef
from vbrd.transport import SourceSpec, TransferRules, run_transfer
from vbrd.transport.movers import TransferStalled, Watchdog


class StandInMover:
    """A data mover that says only what the test makes it say."""

    def __init__(self, role: str) -> None:
        self.role, self.pid = role, 0
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.on_event: Callable[[dict[str, Any]], None] = lambda _: None
        self.finished: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.commands: list[dict[str, Any]] = []
        self.killed = False

    def send(self, obj: dict[str, Any]) -> None:
        self.commands.append(obj)

    async def listening(self, timeout: float) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": 1}

    def failure(self) -> str:
        return self.error or f"the {self.role} stand-in failed"

    @property
    def succeeded(self) -> bool:
        return self.finished.done() and self.finished.result() == 0

    @property
    def lost(self) -> bool:
        return False

    async def kill(self) -> None:
        self.killed = True
        if not self.finished.done():
            self.finished.set_result(-9)

    def say(self, **event: Any) -> None:
        self.on_event(event)


class StandInHost:
    def __init__(self) -> None:
        self.movers: dict[str, StandInMover] = {}

    async def start(self, role: str, config: dict[str, Any]) -> StandInMover:
        mover = self.movers[role] = StandInMover(role)
        return mover


SPEC = SourceSpec(
    task=DiskTask(session_id="s-1", vm=VmRef("web01", "vm-42"), disk_key=2000,
                  label="Hard disk 1", capacity=64 << 20,
                  backing=DatastoreFile("LocalDS_0", "web01/web01.vmdk")),
    modes=["san", "nbd"], proxy=ProxyContext("proxy-1"))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def started(host: StandInHost) -> tuple[StandInMover, StandInMover]:
    for _ in range(200):
        source = host.movers.get("source")
        if source is not None and source.commands:
            return source, host.movers["target"]
        await asyncio.sleep(0.005)
    raise AssertionError("the transfer never told its proxy side where to connect")


async def still_running(transfer: asyncio.Task[Any]) -> bool:
    await asyncio.sleep(0.05)  # several polls of the watchdog
    return not transfer.done()


def progress(n: int) -> dict[str, Any]:
    return {"event": "progress", "bytes_read": n, "bytes_sent": n, "bytes_done_of_total": n,
            "total_bytes": 64 << 20, "rate_bps": 0.0, "bottleneck": "source"}


async def test_a_transfer_without_progress_for_the_timeout_is_ended_and_both_movers_killed(
    tmp_path: Any,
) -> None:
    clock, host = Clock(), StandInHost()
    watchdog = Watchdog(300, clock=clock, poll=0.002)
    transfer = asyncio.create_task(run_transfer(
        SPEC, "/repo", TransferRules(block_size=1 << 20, compression_level=3),
        on_progress=lambda p: None, index_out=str(tmp_path / "map"), source_host=host,
        target_host=host, watchdog=watchdog))
    source, target = await started(host)
    source.say(event="mode", mode="san", fallbacks=[])

    # a long transfer is no stall as long as its bytes move
    for n in range(1, 6):
        clock.now += 200
        source.say(**progress(n << 20))
        assert await still_running(transfer)
    # reports whose counts stand still (a stopped repository side) are no progress
    for _ in range(2):
        clock.now += 140
        source.say(**progress(5 << 20))
        assert await still_running(transfer)
    clock.now += 19.5
    assert await still_running(transfer)
    clock.now += 1

    with pytest.raises(TransferStalled) as stalled:
        await asyncio.wait_for(transfer, 5)
    assert str(stalled.value) == (
        "the transfer of Hard disk 1 of VM web01 (reading with san) made no progress for "
        "300 s (the stall timeout is 300 s); both data movers were stopped")
    assert stalled.value.mode == "san"
    assert source.killed and target.killed


async def test_a_proxy_side_that_says_nothing_at_all_is_a_stall_too(tmp_path: Any) -> None:
    clock, host = Clock(), StandInHost()
    transfer = asyncio.create_task(run_transfer(
        SPEC, "/repo", TransferRules(block_size=1 << 20, compression_level=3),
        on_progress=lambda p: None, index_out=str(tmp_path / "map"), source_host=host,
        target_host=host, watchdog=Watchdog(60, clock=clock, poll=0.002)))
    source, target = await started(host)
    clock.now += 59
    assert await still_running(transfer)
    clock.now += 1
    with pytest.raises(TransferStalled, match="made no progress for 60 s") as stalled:
        await asyncio.wait_for(transfer, 5)
    assert stalled.value.mode == "" and "reading with" not in str(stalled.value)
    assert source.killed and target.killed


def test_a_watchdog_needs_a_positive_timeout() -> None:
    with pytest.raises(ValueError, match="positive"):
        Watchdog(0)
