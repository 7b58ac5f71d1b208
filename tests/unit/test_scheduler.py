"""The resource scheduler: slots bound the tasks, the best proxy wins, nobody starves, and a
slot always comes back."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vbrd.config import JobSettings, ProxySettings, RepositorySettings
from vbrd.models import Secret
from vbrd.scheduler import (
    UNLIKELY,
    Candidate,
    Lease,
    NoProxyAvailable,
    ResourceScheduler,
    disk_candidates,
)

SAN = 0
HOTADD = 1
NBD = 2


def both(*names: str, tier: int = SAN) -> list[Candidate]:
    return [Candidate(n, tier, "san") for n in names]


async def settle() -> None:
    """Let every task that can run, run."""
    for _ in range(5):
        await asyncio.sleep(0)


def start(scheduler: ResourceScheduler, group: str, candidates: list[Candidate],
          repository: str = "repo", label: str = "") -> asyncio.Task[Lease]:
    return asyncio.create_task(scheduler.acquire(group, candidates, repository, label=label))


def granted(tasks: list[asyncio.Task[Lease]]) -> list[Lease]:
    return [t.result() for t in tasks if t.done() and not t.cancelled()]


async def test_two_proxies_of_two_slots_run_at_most_four_of_eight_tasks_and_both_are_used():
    scheduler = ResourceScheduler({"a": 2, "b": 2}, {"repo": 8})
    tasks = [start(scheduler, "s1", both("a", "b"), label=f"disk {i}") for i in range(8)]
    await settle()

    running = granted(tasks)
    assert len(running) == 4
    assert sorted(lease.proxy for lease in running) == ["a", "a", "b", "b"]
    assert scheduler.usage()["proxies"] == {"a": (2, 2), "b": (2, 2)}

    running[0].release()
    await settle()
    assert len(granted(tasks)) == 5, "a freed slot goes to the next waiting task at once"
    for lease in granted(tasks):
        lease.release()
    await settle()
    for lease in granted(tasks):
        lease.release()
    await settle()
    assert all(t.done() for t in tasks)
    assert scheduler.usage()["proxies"] == {"a": (0, 2), "b": (0, 2)}


async def test_the_repositorys_slots_bound_the_tasks_too():
    scheduler = ResourceScheduler({"a": 4}, {"repo": 1})
    tasks = [start(scheduler, "s1", both("a")) for _ in range(3)]
    reasons: list[str] = []
    late = asyncio.create_task(scheduler.acquire("s1", both("a"), "repo",
                                                 on_wait=reasons.append))
    await settle()
    assert len(granted(tasks)) == 1
    assert reasons == ["waiting for a repository slot (repo: 1 of 1 slots busy)"]
    late.cancel()
    for t in tasks:
        t.cancel()
    await settle()


async def test_a_task_waits_for_a_proxy_that_reads_from_storage_rather_than_take_an_nbd_one():
    scheduler = ResourceScheduler({"san-proxy": 1, "nbd-proxy": 4}, {"repo": 8})
    candidates = [Candidate("san-proxy", SAN, "san"), Candidate("nbd-proxy", NBD, "nbd")]
    first = await scheduler.acquire("s1", candidates, "repo")
    reasons: list[str] = []
    second = asyncio.create_task(scheduler.acquire("s1", candidates, "repo",
                                                   on_wait=reasons.append))
    await settle()

    assert first.proxy == "san-proxy" and first.mode == "san"
    assert not second.done(), "the free nbd proxy is not taken while the san proxy is busy"
    assert reasons == ["waiting for a proxy slot (san-proxy: 1 of 1 slots busy)"]
    first.release()
    await settle()
    assert second.result().proxy == "san-proxy"
    second.result().release()


async def test_the_least_loaded_proxy_is_chosen_among_equals():
    scheduler = ResourceScheduler({"small": 2, "big": 8}, {"repo": 16})
    first = await scheduler.acquire("s1", both("small", "big"), "repo")
    second = await scheduler.acquire("s1", both("small", "big"), "repo")
    third = await scheduler.acquire("s1", both("small", "big"), "repo")

    # idle equals go by name; then the smaller share of busy slots wins: 0/2 < 1/8 < 1/2
    assert [first.proxy, second.proxy, third.proxy] == ["big", "small", "big"]
    assert "small had 0 of 2 slots busy" in second.reason
    assert "big (1 of 8 slots busy)" in second.reason


async def test_a_job_arriving_late_is_served_before_the_rest_of_a_long_job():
    scheduler = ResourceScheduler({"a": 1}, {"repo": 8})
    order: list[str] = []

    async def task(group: str, label: str) -> None:
        async with await scheduler.acquire(group, both("a"), "repo", label=label):
            order.append(label)
            await asyncio.sleep(0.01)

    long_job = [asyncio.create_task(task("long", f"long-{i}")) for i in range(5)]
    await settle()
    late = [asyncio.create_task(task("late", f"late-{i}")) for i in range(2)]
    other = asyncio.create_task(task("other", "other-0"))
    await asyncio.gather(*long_job, *late, other)

    # round robin between the jobs (the one served longest ago first): nobody waits for the
    # whole long job, and within a job the order is first come, first served
    assert order == ["long-0", "late-0", "other-0", "long-1", "late-1", "long-2", "long-3",
                     "long-4"]


async def test_a_task_whose_only_proxy_is_busy_is_not_starved_by_tasks_that_have_more_choice():
    scheduler = ResourceScheduler({"a": 1, "b": 1}, {"repo": 8})
    hold_a = await scheduler.acquire("s0", both("a"), "repo")
    hold_b = await scheduler.acquire("s0", both("b"), "repo")
    narrow = start(scheduler, "narrow", both("a"))
    wide = [start(scheduler, f"wide-{i}", both("a", "b")) for i in range(3)]
    await settle()

    hold_b.release()
    await settle()
    assert granted(wide) and granted(wide)[0].proxy == "b"
    hold_a.release()
    await settle()
    assert narrow.done() and narrow.result().proxy == "a"
    for lease in [narrow.result(), *granted(wide)]:
        lease.release()
    await settle()
    for t in wide:
        t.cancel()
    await settle()


async def test_a_slot_comes_back_on_success_failure_and_cancellation():
    scheduler = ResourceScheduler({"a": 1}, {"repo": 1})

    async with await scheduler.acquire("s", both("a"), "repo"):
        pass
    assert scheduler.usage()["proxies"]["a"] == (0, 1)

    with pytest.raises(RuntimeError):
        async with await scheduler.acquire("s", both("a"), "repo"):
            raise RuntimeError("the transfer failed")
    assert scheduler.usage()["proxies"]["a"] == (0, 1)

    holding = asyncio.Event()

    async def hold_forever() -> None:
        async with await scheduler.acquire("s", both("a"), "repo"):
            holding.set()
            await asyncio.Event().wait()

    holder = asyncio.create_task(hold_forever())
    await holding.wait()
    waiter = start(scheduler, "s", both("a"), label="waiter")
    await settle()
    assert scheduler.waiting == ["waiter"]

    waiter.cancel()
    await settle()
    assert scheduler.waiting == [], "a cancelled waiter leaves the queue"
    holder.cancel()
    await settle()
    assert scheduler.usage() == {"proxies": {"a": (0, 1)}, "repositories": {"repo": (0, 1)}}

    lease = await scheduler.acquire("s", both("a"), "repo")
    lease.release()
    lease.release()
    assert scheduler.usage()["proxies"]["a"] == (0, 1), "releasing twice gives back one slot"


async def test_a_lease_granted_in_the_instant_its_waiter_is_cancelled_is_given_back():
    scheduler = ResourceScheduler({"a": 1}, {"repo": 1})
    first = await scheduler.acquire("s", both("a"), "repo")
    waiter = start(scheduler, "s", both("a"))
    await settle()
    first.release()  # grants the waiter's future ...
    waiter.cancel()  # ... before the waiter ran again
    await settle()
    assert waiter.cancelled()
    assert scheduler.usage()["proxies"]["a"] == (0, 1)


async def test_a_failed_proxy_is_out_of_rotation_and_its_tasks_go_elsewhere_or_fail():
    scheduler = ResourceScheduler({"a": 2, "b": 2}, {"repo": 8}, down_seconds=0.2)
    scheduler.mark_down("a", "its agent does not answer")

    elsewhere = await scheduler.acquire("s", both("a", "b"), "repo")
    assert elsewhere.proxy == "b"
    with pytest.raises(NoProxyAvailable, match="proxy a failed: its agent does not answer"):
        await scheduler.acquire("s", both("a"), "repo", label="disk 2000 of VM x")
    assert not scheduler.in_rotation("a")

    await asyncio.sleep(0.3)
    assert scheduler.in_rotation("a")
    again = await scheduler.acquire("s", both("a"), "repo")
    assert again.proxy == "a"
    elsewhere.release()
    again.release()


async def test_a_waiting_task_fails_when_its_last_candidate_fails():
    scheduler = ResourceScheduler({"a": 1}, {"repo": 8})
    busy = await scheduler.acquire("s", both("a"), "repo")
    waiter = start(scheduler, "s", both("a"), label="Hard disk 1 of VM x")
    await settle()
    scheduler.mark_down("a", "the data mover died")
    await settle()
    with pytest.raises(NoProxyAvailable, match="Hard disk 1 of VM x: proxy a failed"):
        waiter.result()
    busy.release()


async def test_more_slots_from_a_new_configuration_admit_waiting_tasks():
    scheduler = ResourceScheduler({"a": 1}, {"repo": 8})
    busy = await scheduler.acquire("s", both("a"), "repo")
    waiter = start(scheduler, "s", both("a"))
    await settle()
    assert not waiter.done()
    scheduler.configure({"a": 2}, {"repo": 8})
    await settle()
    assert waiter.result().proxy == "a"
    busy.release()
    waiter.result().release()


# --------------------------------------------------------------------------------------------
# candidates


def proxy(name: str, **kw: object) -> ProxySettings:
    return ProxySettings(name=name, **kw)  # type: ignore[arg-type]


REPO = RepositorySettings(name="repo", path=Path("/srv/repo"))
REMOTE_REPO = RepositorySettings(name="repo", path=Path("/srv/repo"), address="10.0.0.5:8471",
                                 fingerprint="sha256:" + "ab" * 32, secret=Secret("x" * 20))


def job(**kw: object) -> JobSettings:
    return JobSettings(name="j", vcenter="vc", repository="repo", vms=("vm",),
                       **kw)  # type: ignore[arg-type]


def test_candidates_are_tiered_by_the_best_mode_each_proxy_can_use_for_the_disk():
    proxies = {
        "sees-it": proxy("sees-it", san_paths={"san-ds": "/mnt/san"}),
        "is-a-vm": proxy("is-a-vm", vm="proxy-vm"),
        "network": proxy("network", transport_modes=("nbd",)),
        "wrong-lun": proxy("wrong-lun", transport_modes=("san",), san_paths={"other": "/x"}),
    }
    candidates, passed_over = disk_candidates(job(), proxies, REPO, "san-ds")
    tiers = {c.proxy: (c.tier, c.mode) for c in candidates}

    assert tiers == {"sees-it": (SAN, "san"), "is-a-vm": (HOTADD, "hotadd"),
                     "network": (NBD, "nbd"), "wrong-lun": (UNLIKELY, "san")}
    assert passed_over == []


def test_a_job_pinned_to_a_mode_and_to_proxies_narrows_the_candidates():
    proxies = {"a": proxy("a"), "b": proxy("b", transport_modes=("san",)), "c": proxy("c")}
    candidates, passed_over = disk_candidates(job(transport="nbd", proxies=("a", "b")),
                                              proxies, REPO, "san-ds")
    assert [c.proxy for c in candidates] == ["a"]
    assert passed_over == ["proxy b offers san, the job asks for nbd"]


def test_a_remote_proxy_cannot_serve_a_repository_without_an_agent():
    proxies = {"far": proxy("far", address="10.0.0.9:8471", fingerprint="sha256:" + "cd" * 32,
                            secret=Secret("y" * 20))}
    candidates, passed_over = disk_candidates(job(), proxies, REPO, "san-ds")
    assert candidates == []
    assert "proxy far runs on another host" in passed_over[0]
    assert "repository repo is local" in passed_over[0]

    candidates, _ = disk_candidates(job(), proxies, REMOTE_REPO, "san-ds")
    assert [c.proxy for c in candidates] == ["far"]
