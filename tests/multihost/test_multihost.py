"""Backups across hosts: two proxies and a repository host in their own network namespaces,
each with its own ``vbrd agent``; the backup server in the root namespace.

What a user checks: slots bound how many disks move at once and every proxy takes its share;
a proxy that dies mid-job hands its disks to the other one and the restore points are still
whole; a job whose only proxy is busy waits for it (and says so in ``vbrctl start --follow``)
and then runs; a traffic rule between the proxies' and the repository's networks holds,
shared fairly; and neither side talks to a stranger.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.backup_support import disk_content_sha256, events_of, file_sha256
from tests.multihost.conftest import Hosts
from vbrd.config import AgentAccess, load_config
from vbrd.engine import Engine
from vbrd.events import Event
from vbrd.models import DatastoreFile, DiskTask, ProxyContext, Secret, VmRef
from vbrd.repository import Repository
from vbrd.transport import SourceSpec, TlsSettings, TransferControl, TransferRules, run_transfer
from vbrd.transport.remote import AgentClient, AgentMovers, AgentRefused, Agents
from vbrd.transport.rules import TrafficShaper

pytestmark = [pytest.mark.lab, pytest.mark.multihost]
on_the_session_loop = pytest.mark.asyncio(loop_scope="session")

MiB = 1 << 20
#: 2 + 3 + 3 disks
EIGHT = ["two-disk-vm", "extra-vm-1", "extra-vm-2"]


def job(name: str, vms: list[str], repository: str, **settings: Any) -> str:
    lines = [f"[jobs.{name}]", 'vcenter = "lab"', f'repository = "{repository}"',
             'transport = "san"', "vms = " + json.dumps(vms)]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def rule(limit: str) -> str:
    return ("[[traffic_rules]]\nname = \"proxies-to-storage\"\nfrom_network = \"proxies\"\n"
            f"to_network = \"storage\"\nlimit = \"{limit}\"\n")


async def run_session(config: Path, name: str,
                      on_event: Callable[[Event], None] | None = None
                      ) -> tuple[str, list[dict[str, Any]]]:
    """One session of a job through the real Manager in this process (the backup server)."""
    engine = Engine(load_config(config))
    unsubscribe = engine.bus.subscribe(on_event) if on_event is not None else None
    try:
        session = await engine.start_job(name, trigger="cli")
        status = await asyncio.wait_for(engine.wait_session(session), 600)
        return status, engine.catalog.events(session)
    finally:
        if unsubscribe is not None:
            unsubscribe()
        engine.close()


def concurrency(events: list[dict[str, Any]]) -> tuple[int, dict[str, int]]:
    """The most tasks that held slots at once, overall and per proxy."""
    running: dict[tuple[str, int], str] = {}
    peak, per_proxy = 0, {}
    for e in events:
        key = (e["vm"], e["disk"])
        if e["type"] == "resource.assigned":
            running[key] = e["proxy"]
            peak = max(peak, len(running))
            load = sum(1 for p in running.values() if p == e["proxy"])
            per_proxy[e["proxy"]] = max(per_proxy.get(e["proxy"], 0), load)
        elif e["type"] == "resource.released":
            running.pop(key, None)
    return peak, per_proxy


def logs(events: list[dict[str, Any]]) -> list[str]:
    return [f"{e['level']}: {e['message']}" for e in events if e["type"] == "log"]


def sources(hosts: Hosts, vms: list[str]) -> dict[tuple[str, int], str]:
    return {(vm, d["key"]): disk_content_sha256(d["descriptor"])
            for vm in vms for d in hosts.vm(vm)["disks"]}


def restored(hosts: Hosts, repository: str, vms: list[str],
             where: Path) -> dict[tuple[str, int], str]:
    repo = Repository.open(hosts.repo_root / repository)
    out = {}
    for vm in vms:
        (point,) = repo.points(vm)
        for d in hosts.vm(vm)["disks"]:
            image = where / f"{vm}-{d['key']}.raw"
            repo.restore_disk(point.point_id, d["key"], image)
            out[(vm, d["key"])] = file_sha256(image)
            image.unlink()
    return out


# --------------------------------------------------------------------------------------------
# slots


@on_the_session_loop
async def test_two_proxies_of_two_slots_move_at_most_four_of_eight_disks_at_once_and_both_work(
        multihost: Hosts, tmp_path: Path) -> None:
    config = multihost.manager_config(tmp_path, job("eight", EIGHT, "r-eight"))
    expected = sources(multihost, EIGHT)
    before = multihost.net.counters()

    status, events = await run_session(config, "eight")

    after = multihost.net.counters()
    assert status == "success", logs(events)
    assert len(events_of(events, "task.planned")) == 8
    peak, per_proxy = concurrency(events)
    assert peak == 4, "two proxies of two slots: four tasks at once, never more"
    assert per_proxy == {"proxy-a": 2, "proxy-b": 2}
    transferred = events_of(events, "disk.transferred")
    assert len(transferred) == 8
    proxy_of = {(e["vm"], e["disk"]): e["proxy"] for e in events_of(events, "resource.assigned")}
    for proxy in ("proxy-a", "proxy-b"):
        sent = sum(e["bytes_sent"] for e in transferred if proxy_of[(e["vm"], e["disk"])] == proxy)
        assert sent > 0, f"{proxy} moved no disk"
        # what its data movers sent really left that host
        assert after[proxy][0] - before[proxy][0] >= sent
    stored = sum(e["bytes_stored"] for e in transferred)
    assert after["repo"][1] - before["repo"][1] >= stored > 0
    # the VMs ran side by side: every VM's snapshot existed before the first one was removed
    created = [e["monotonic"] for e in events_of(events, "snapshot.created")]
    removed = [e["monotonic"] for e in events_of(events, "snapshot.removed")]
    assert len(created) == 3 and max(created) < min(removed)
    assert restored(multihost, "r-eight", EIGHT, tmp_path) == expected


@on_the_session_loop
async def test_a_proxy_that_dies_mid_job_hands_its_disks_to_the_other_and_the_points_are_whole(
        multihost: Hosts, tmp_path: Path) -> None:
    # slow enough (8 MB/s shared) that transfers are surely running when proxy-a dies
    config = multihost.manager_config(tmp_path, job("failover", EIGHT, "r-failover")
                                      + rule("8MB/s"))
    expected = sources(multihost, EIGHT)
    on_proxy: dict[tuple[str, int | None], str] = {}
    killed_during: set[tuple[str, int | None]] = set()

    def kill_proxy_a_mid_transfer(event: Event) -> None:
        key = (event.vm, event.disk)
        if event.type == "resource.assigned":
            on_proxy[key] = event.proxy  # type: ignore[attr-defined]
        elif event.type == "resource.released":
            on_proxy.pop(key, None)
        elif (event.type == "transfer.progress" and not killed_during
              and on_proxy.get(key) == "proxy-a" and event.bytes_sent > 0  # type: ignore
              and event.bytes_done < event.bytes_total):  # type: ignore[attr-defined]
            killed_during.update(k for k, p in on_proxy.items() if p == "proxy-a")
            multihost.agents["proxy-a"].kill()

    status, events = await run_session(config, "failover", kill_proxy_a_mid_transfer)

    assert killed_during, "proxy-a was never seen mid-transfer"
    assert status == "warning", logs(events)
    warnings = [m for m in logs(events) if m.startswith("warning:")]
    assert any("proxy proxy-a failed" in m and "starts over on another proxy" in m
               for m in warnings), warnings
    for vm, disk in killed_during:
        proxies = [e["proxy"] for e in events_of(events, "resource.assigned", vm=vm, disk=disk)]
        assert proxies == ["proxy-a", "proxy-b"], (vm, disk, proxies)
    kill_time = min(e["monotonic"] for e in events if e["type"] == "log"
                    and "proxy proxy-a failed" in e["message"])
    later = [e for e in events_of(events, "resource.assigned") if e["monotonic"] > kill_time]
    assert later and {e["proxy"] for e in later} == {"proxy-b"}, "proxy-a is out of rotation"
    assert len(events_of(events, "disk.transferred")) == 8, "each disk is in its point once"
    assert {e["status"] for e in events_of(events, "vm.finished")} <= {"success", "warning"}
    repo = Repository.open(multihost.repo_root / "r-failover")
    assert repo.verify() == []
    assert restored(multihost, "r-failover", EIGHT, tmp_path) == expected


# --------------------------------------------------------------------------------------------
# waiting, as the daemon and vbrctl show it


class Daemon:
    """``vbrd run`` on the backup server (the root namespace), driven through vbrctl."""

    def __init__(self, config: Path) -> None:
        self.socket = config.parent / "vbrd.sock"
        self.log = open(config.parent / "daemon.log", "wb")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen([sys.executable, "-m", "vbrd.cli.vbrd", "run",
                                      "--config", str(config)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while self.vbrctl("jobs").returncode != 0:
            assert self.proc.poll() is None, (config.parent / "daemon.log").read_text()
            assert time.monotonic() < deadline, "the daemon did not answer within 30 s"
            time.sleep(0.2)

    def vbrctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vbrd.cli.vbrctl", "--socket",
                               str(self.socket), *args], capture_output=True, text=True,
                              timeout=timeout)

    def session(self, session_id: str) -> dict[str, Any]:
        proc = self.vbrctl("--json", "session", session_id)
        assert proc.returncode == 0, proc.stderr
        info: dict[str, Any] = json.loads(proc.stdout)
        return info

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)
        self.log.close()


def test_a_job_whose_only_proxy_is_busy_waits_for_a_slot_and_then_runs(
        multihost: Hosts, tmp_path: Path) -> None:
    body = (job("hog", ["extra-vm-1"], "r-busy", proxies=["proxy-a"])
            + job("waiter", ["off-vm"], "r-busy", proxies=["proxy-a"]) + rule("4MB/s"))
    daemon = Daemon(multihost.manager_config(tmp_path, body))
    try:
        started = daemon.vbrctl("--json", "start", "hog")
        assert started.returncode == 0, started.stderr
        hog = json.loads(started.stdout)["session_id"]
        deadline = time.monotonic() + 60
        while len(events_of(daemon.session(hog)["events"], "resource.assigned")) < 2:
            assert time.monotonic() < deadline, "the hog job never held both slots of proxy-a"
            time.sleep(0.1)

        follow = daemon.vbrctl("start", "waiter", "--follow", timeout=300)

        assert follow.returncode == 0, follow.stdout + follow.stderr
        # each line: "HH:MM:SS what happened"
        lines = [line.partition(" ")[2] for line in follow.stdout.splitlines()]
        waiting = ("off-vm disk 2000: waiting for resources: waiting for a proxy slot "
                   "(proxy-a: 2 of 2 slots busy)")
        assigned = "off-vm disk 2000: proxy proxy-a, repository r-busy"
        assert waiting in lines and assigned in lines, follow.stdout
        assert lines.index(waiting) < lines.index(assigned)
        assert lines[-1] == "session finished: success"

        deadline = time.monotonic() + 120
        while (info := daemon.session(hog))["status"] == "running":
            assert time.monotonic() < deadline, "the hog job did not finish"
            time.sleep(0.2)
        assert info["status"] == "success"
        hog_events = info["events"]
        (waiter_id,) = [s["id"] for s in json.loads(daemon.vbrctl("--json", "sessions").stdout)
                        if s["job"] == "waiter"]
        (given,) = events_of(daemon.session(waiter_id)["events"], "resource.assigned")
        freed = [e["monotonic"] for e in events_of(hog_events, "resource.released")]
        assert min(freed) <= given["monotonic"], "the slot came from the hog job's release"
        # fairness: the waiting job got that slot before the hog job's own third disk
        third = events_of(hog_events, "resource.assigned")[2]
        assert given["monotonic"] < third["monotonic"]
    finally:
        daemon.stop()


# --------------------------------------------------------------------------------------------
# trust


@on_the_session_loop
async def test_agents_refuse_a_wrong_secret_and_the_manager_refuses_a_wrong_certificate(
        multihost: Hosts, tmp_path: Path) -> None:
    a, b = multihost.agents["proxy-a"], multihost.agents["proxy-b"]
    wrong_secret = AgentClient("proxy proxy-a", AgentAccess(a.address, a.fingerprint,
                                                            Secret("not-the-secret" * 2)))
    with pytest.raises(AgentRefused, match="refused the shared secret"):
        await wrong_secret.info()
    assert f"refused a request from {multihost.net.address('server')}" in a.log.read_text()

    impostor = AgentClient("proxy proxy-b", AgentAccess(
        b.address, a.fingerprint, Secret(b.secret_file.read_text().strip())))
    with pytest.raises(AgentRefused, match=f"fingerprint {b.fingerprint}, but the config "
                                           f"pins {a.fingerprint}"):
        await impostor.info()

    # a job whose only proxy presents another certificate fails, naming it, and moves nothing
    config = multihost.manager_config(tmp_path, job("pinned", ["off-vm"], "r-checks",
                                                    proxies=["proxy-b"]))
    config.write_text(config.read_text().replace(
        f'fingerprint = "{b.fingerprint}"', f'fingerprint = "{a.fingerprint}"'))
    status, events = await run_session(config, "pinned")
    assert status == "failed"
    (vm,) = events_of(events, "vm.finished")
    assert "proxy proxy-b failed" in vm["reason"] and a.fingerprint in vm["reason"]
    assert events_of(events, "disk.transferred") == []


@on_the_session_loop
async def test_the_backup_servers_own_proxy_stores_on_the_repository_host_over_tls(
        multihost: Hosts, tmp_path: Path) -> None:
    san_paths = "\n".join(f'{d["name"]} = "{Path(multihost.lab["dir"]) / "datastores" / d["name"]}"'
                          for d in multihost.lab["datastores"])
    body = ('[proxies.local]\naddress = "local"\ntransport_modes = ["san"]\n'
            f"[proxies.local.san_paths]\n{san_paths}\n"
            + job("here", ["off-vm"], "r-checks", proxies=["local"]))
    config = multihost.manager_config(tmp_path, body)
    expected = sources(multihost, ["off-vm"])
    before = multihost.net.counters()

    status, events = await run_session(config, "here")

    after = multihost.net.counters()
    assert status == "success", logs(events)
    (transferred,) = events_of(events, "disk.transferred")
    # the blocks left the backup server and reached the repository host
    assert after["server"][0] - before["server"][0] >= transferred["bytes_stored"] > 0
    assert after["repo"][1] - before["repo"][1] >= transferred["bytes_stored"]
    assert restored(multihost, "r-checks", ["off-vm"], tmp_path) == expected


# --------------------------------------------------------------------------------------------
# traffic rules


@pytest.mark.slow
@on_the_session_loop
async def test_a_20_mb_s_rule_between_the_proxy_and_repository_networks_holds_and_is_shared(
        multihost: Hosts, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """480 MiB from proxy-a; ten seconds in, 100 MiB from proxy-b: one rule's 20 MB/s, all
    of it to proxy-a alone, half each while both run, measured on the repository host's and
    the proxies' network ports over the ~30 s transfer."""
    config = load_config(multihost.manager_config(tmp_path, rule("20MB/s")))
    shaper = TrafficShaper(config.traffic_rules)
    agents = Agents()
    repository = config.repositories["r-throttle"]
    repo_agent = agents.get("repository r-throttle", repository.agent)
    certificate = await repo_agent.certificate()
    samples: list[tuple[float, dict[str, tuple[int, int]]]] = []

    async def sample() -> None:
        while True:
            samples.append((time.monotonic(), await asyncio.to_thread(multihost.net.counters)))
            await asyncio.sleep(0.25)

    async def transfer(proxy_name: str, size: int, seed: int) -> None:
        proxy = config.proxies[proxy_name]
        task = DiskTask(session_id="throttle", vm=VmRef(f"vm-{seed}", f"vm-{seed}"),
                        disk_key=2000, label="Hard disk 1", capacity=size,
                        backing=DatastoreFile("random", f"vm-{seed}/disk.vmdk"),
                        extra={"seed": seed})
        spec = SourceSpec(task=task, modes=["random"], proxy=ProxyContext(proxy=proxy_name))
        control = TransferControl()
        with shaper.join(proxy, repository, control) as flow:
            rules = TransferRules(1 << 20, 3, bandwidth_limit=flow.limit, tls=TlsSettings())
            await run_transfer(spec, repository.name, rules, on_progress=lambda _: None,
                               index_out=str(tmp_path / f"{seed}.map"), control=control,
                               source_host=AgentMovers(agents.get(f"proxy {proxy_name}",
                                                                  proxy.agent), certificate),
                               target_host=AgentMovers(repo_agent))

    sampler = asyncio.create_task(sample())
    try:
        first = asyncio.create_task(transfer("proxy-a", 480 * MiB, 1))
        await asyncio.sleep(10)
        second = asyncio.create_task(transfer("proxy-b", 100 * MiB, 2))
        await asyncio.gather(first, second)
    finally:
        sampler.cancel()

    def busy(host: str, direction: int) -> tuple[float, float, int]:
        """When ``host`` moved bulk data (over 1 MiB per sample), and how much."""
        pairs = zip(samples[1:], samples[:-1], strict=True)
        moving = [(t, c[host][direction]) for (t, c), (_, prev) in pairs
                  if c[host][direction] - prev[host][direction] > MiB]
        start = max(t for t, c in samples if t < moving[0][0])
        before = [c[host][direction] for t, c in samples if t == start][0]
        return start, moving[-1][0], moving[-1][1] - before

    start, end, received = busy("repo", 1)
    total_rate = received / (end - start)
    b_start, b_end, _ = busy("proxy-b", 0)

    def rate(host: str, t0: float, t1: float) -> float:
        (c0,) = [c[host][0] for t, c in samples if t == t0]
        (c1,) = [c[host][0] for t, c in samples if t == t1]
        return (c1 - c0) / (t1 - t0)

    inner = [t for t, _ in samples if b_start + 1 <= t <= b_end - 1]
    shared_a, shared_b = rate("proxy-a", inner[0], inner[-1]), rate("proxy-b", inner[0],
                                                                     inner[-1])
    record_property("throttle_total_mb_s", round(total_rate / 1e6, 2))
    record_property("throttle_seconds", round(end - start, 1))
    record_property("throttle_shared_mb_s", (round(shared_a / 1e6, 2), round(shared_b / 1e6, 2)))
    print(f"repository host received {received / 1e6:.0f} MB in {end - start:.1f} s: "
          f"{total_rate / 1e6:.2f} MB/s; while both ran: proxy-a {shared_a / 1e6:.2f} MB/s, "
          f"proxy-b {shared_b / 1e6:.2f} MB/s")
    assert end - start >= 28
    assert total_rate == pytest.approx(20e6, rel=0.10)
    assert shared_a == pytest.approx(10e6, rel=0.10)
    assert shared_b == pytest.approx(10e6, rel=0.10)
