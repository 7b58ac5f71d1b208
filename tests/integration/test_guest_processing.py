"""Guest processing end to end: the lab's job ``lab-guest`` run by the real Engine and Backup
Manager against the simulated vCenter and the lab's guests (sshd for linux-vm, the WinRM
endpoint for windows-vm, the Guest Operations API for both).

The evidence is what a user would look at: the marker lines the lab's scripts leave in each
guest (phase, uid, time), the Windows endpoint's command log, the session's events in the
catalog, and the snapshots vCenter still has afterwards.
"""
from __future__ import annotations

import json
import logging
import os
import pwd
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli

from vbrd.config import Config, from_mapping
from vbrd.engine import Engine
from vbrd.lab import lab as labctl
from vbrd.plugins import guest_processors
from vbrd.vsphere import SNAPSHOT_PREFIX, VSphere

pytestmark = pytest.mark.lab

JOB = "lab-guest"


# --------------------------------------------------------------------------------------------
# helpers


def lab_config(lab: dict[str, Any], state_dir: Path, *, guest: dict[str, Any] | None = None,
               vms: list[str] | None = None, plugin_dirs: list[str] | None = None) -> Config:
    """The lab's own config, with a state directory (catalog) of the test's own."""
    path = Path(lab["vbrd_config"])
    raw = tomli.loads(path.read_text())
    raw["daemon"]["state_dir"] = str(state_dir)
    raw["daemon"]["api_listen"] = ""
    raw["daemon"].pop("api_socket", None)
    if plugin_dirs:
        raw["daemon"]["plugin_dirs"] = plugin_dirs
    if vms:
        raw["jobs"][JOB]["vms"] = vms
    raw["jobs"][JOB]["guest"].update(guest or {})
    return from_mapping(raw, path, os.environ)


def marker_lines(lab: dict[str, Any], vm: str) -> list[str]:
    entry = next(v for v in lab["vms"] if v["name"] == vm)
    path = Path(entry["marker_file"])
    return path.read_text().splitlines() if path.exists() else []


def marker_time(line: str) -> datetime:
    """``time=2026-01-02T03:04:05.123456789Z`` → an aware datetime (microseconds)."""
    stamp = line.split("time=", 1)[1].strip()
    head, _, fraction = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{fraction[:6]:0<6}+00:00")


def event_time(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["time"])


def happened_in_order(before: str, event: dict[str, Any], after: str) -> bool:
    """The marker line ``before`` was written before ``event``, and ``after`` after it.
    Events carry milliseconds (truncated), so an event may look up to 1 ms early."""
    at = event_time(event)
    return marker_time(before) <= at + timedelta(milliseconds=1) and at <= marker_time(after)


def of_vm(events: list[dict[str, Any]], vm: str, *types: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("vm") == vm and (not types or e["type"] in types)]


def vm_status(events: list[dict[str, Any]], vm: str) -> dict[str, Any]:
    return of_vm(events, vm, "vm.finished")[-1]


async def vbrd_snapshots(lab: dict[str, Any], config: Config, vm: str) -> list[str]:
    vsphere = VSphere(config.vcenters["lab"])
    try:
        return [s.name for s in await vsphere.snapshots()
                if s.vm == vm and s.name.startswith(SNAPSHOT_PREFIX)]
    finally:
        await vsphere.close()


@pytest.fixture
async def run_job(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Run ``lab-guest`` once under a config; return (status, events, engine)."""
    engines: list[Engine] = []

    async def run(config: Config) -> tuple[str, list[dict[str, Any]], Engine, str]:
        engine = Engine(config)
        engines.append(engine)
        found = guest_processors(engine.pm)
        assert {"ssh", "winrm", "vix"} <= set(found), (
            f"the built-in guest processors did not load through the entry point group "
            f"'vbrd' (is vbrd installed, e.g. pip install -e .?): {engine.pm.failures}")
        session_id = await engine.start_job(JOB, trigger="cli")
        status = await engine.wait_session(session_id)
        await engine.catalog.flush()
        return status, engine.catalog.events(session_id), engine, session_id

    yield run
    for engine in engines:
        engine.close()


@pytest.fixture
def network_guests_down(lab: dict[str, Any]) -> Callable[[], None]:
    """Switch the guests' sshd and WinRM endpoint off (connection refused), for this test."""
    stopped: list[str] = []

    def stop() -> None:
        for os_name in ("linux", "windows"):
            labctl.set_guest(lab.dir, os_name, False)
            stopped.append(os_name)

    yield stop
    for os_name in stopped:
        labctl.set_guest(lab.dir, os_name, True)


# --------------------------------------------------------------------------------------------
# the normal way in


async def test_scripts_run_elevated_over_ssh_and_over_winrm_around_the_snapshot(
        lab, tmp_path, run_job):
    config = lab_config(lab, tmp_path / "state")
    linux_before = len(marker_lines(lab, "linux-vm"))
    windows_before = len(marker_lines(lab, "windows-vm"))
    windows = next(v for v in lab["vms"] if v["name"] == "windows-vm")
    commands = Path(windows["guest"]["root"]) / "commands.jsonl"
    commands_before = len(commands.read_text().splitlines()) if commands.exists() else 0

    status, events, _, _ = await run_job(config)

    assert status == "success", [e for e in events if e["type"] in ("log", "vm.finished")]
    for vm, processor in (("linux-vm", "ssh"), ("windows-vm", "winrm")):
        attempts = of_vm(events, vm, "guest.attempt")
        assert [(a["processor"], a["outcome"]) for a in attempts] == [(processor, "connected")]
        sequence = [e["type"] for e in of_vm(events, vm, "guest.frozen", "snapshot.created",
                                             "guest.thawed", "snapshot.removed")]
        assert sequence == ["guest.frozen", "snapshot.created", "guest.thawed",
                            "snapshot.removed"]

    linux = marker_lines(lab, "linux-vm")[linux_before:]
    assert [line.split()[:2] for line in linux] == [["pre-freeze", "uid=0"],
                                                    ["post-thaw", "uid=0"]]
    assert happened_in_order(linux[0], of_vm(events, "linux-vm", "snapshot.created")[0],
                             linux[1])

    windows = marker_lines(lab, "windows-vm")[windows_before:]
    assert [line.split()[0] for line in windows] == ["pre-freeze", "post-thaw"]
    assert happened_in_order(windows[0], of_vm(events, "windows-vm", "snapshot.created")[0],
                             windows[1])
    received = [json.loads(line).get("powershell") or ""
                for line in commands.read_text().splitlines()[commands_before:]]
    ran = [s.splitlines()[1] for s in received if s.startswith("$ErrorActionPreference = "
                                                                "'Stop'\n& ")]
    assert len(ran) == 2
    assert ran[0].endswith("\\pre-freeze.ps1'") and ran[1].endswith("\\post-thaw.ps1'")


# --------------------------------------------------------------------------------------------
# the fallback


async def test_with_sshd_and_winrm_stopped_the_job_goes_through_vix_and_says_why(
        lab, tmp_path, run_job, network_guests_down):
    config = lab_config(lab, tmp_path / "state")
    linux_before = len(marker_lines(lab, "linux-vm"))
    windows_before = len(marker_lines(lab, "windows-vm"))
    network_guests_down()

    status, events, _, _ = await run_job(config)

    for vm, network in (("linux-vm", "ssh"), ("windows-vm", "winrm")):
        attempts = [(a["processor"], a["outcome"]) for a in of_vm(events, vm, "guest.attempt")]
        assert attempts == [(network, "unreachable"), ("vix", "connected")]
        assert vm_status(events, vm)["status"] in ("success", "warning")
    logs = [(e["level"], e["message"]) for e in of_vm(events, "linux-vm", "log")]
    assert any(level == "info" and "ssh cannot reach the guest" in message
               and "refused" in message for level, message in logs), logs
    assert any(level == "warning" and "VIX runs scripts without elevation (no sudo)" in message
               for level, message in logs), logs
    assert status == "warning", "the job asked for elevation and did not get it"

    account = next(v for v in lab["vms"] if v["name"] == "linux-vm")["vix"]["run_as"]
    uid = pwd.getpwnam(account).pw_uid
    linux = marker_lines(lab, "linux-vm")[linux_before:]
    assert [line.split()[:2] for line in linux] == [["pre-freeze", f"uid={uid}"],
                                                    ["post-thaw", f"uid={uid}"]]
    windows = marker_lines(lab, "windows-vm")[windows_before:]
    assert [line.split()[0] for line in windows] == ["pre-freeze", "post-thaw"]
    for vm, lines in (("linux-vm", linux), ("windows-vm", windows)):
        assert happened_in_order(lines[0], of_vm(events, vm, "snapshot.created")[0], lines[1])


# --------------------------------------------------------------------------------------------
# who answers


async def test_a_machine_at_the_vms_address_that_is_not_its_guest_gets_nothing(
        lab, tmp_path, run_job):
    """The address VMware Tools report for linux-vm now leads to a machine with another
    SMBIOS UUID: the job stops there (no VIX detour, no script, no snapshot) and says why."""
    vm = next(v for v in lab["vms"] if v["name"] == "linux-vm")
    config = lab_config(lab, tmp_path / "state", vms=["linux-vm"],
                        guest={"on_failure": "require"})
    before = len(marker_lines(lab, "linux-vm"))
    stranger = str(uuid.uuid4())
    labctl.set_guest_identity(lab.dir, "linux", stranger)
    try:
        status, events, _, _ = await run_job(config)
    finally:
        labctl.set_guest_identity(lab.dir, "linux", vm["uuid"])

    assert status == "failed"
    attempts = [(a["processor"], a["outcome"]) for a in of_vm(events, "linux-vm",
                                                               "guest.attempt")]
    assert attempts == [("ssh", "failed")]
    reason = vm_status(events, "linux-vm")["reason"]
    assert stranger in reason and vm["uuid"] in reason and "not the guest" in reason
    assert marker_lines(lab, "linux-vm")[before:] == []
    assert of_vm(events, "linux-vm", "snapshot.created") == []
    assert await vbrd_snapshots(lab, config, "linux-vm") == []


# --------------------------------------------------------------------------------------------
# failures


def failing_pre_freeze(directory: Path, marker: str, leak: str) -> Path:
    script = directory / "failing-pre-freeze.sh"
    directory.mkdir(parents=True, exist_ok=True)
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "pre-freeze uid=$(id -u) time=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)" >> {marker}
        echo "cannot quiesce the database: lock wait timeout"
        echo "{leak}"
        exit 4
        """))
    return script


async def test_a_failing_pre_freeze_with_require_fails_the_vm_and_leaves_no_snapshot(
        lab, tmp_path, run_job):
    marker = next(v for v in lab["vms"] if v["name"] == "linux-vm")["marker_file"]
    script = failing_pre_freeze(tmp_path / "scripts", marker, "nothing to hide")
    config = lab_config(lab, tmp_path / "state", vms=["linux-vm"],
                        guest={"pre_freeze": str(script), "on_failure": "require"})
    before = len(marker_lines(lab, "linux-vm"))

    status, events, _, _ = await run_job(config)

    assert status == "failed"
    finished = vm_status(events, "linux-vm")
    assert finished["status"] == "failed"
    assert "exit code 4" in finished["reason"]
    assert "cannot quiesce the database: lock wait timeout" in finished["reason"]
    errors = [e["message"] for e in of_vm(events, "linux-vm", "log") if e["level"] == "error"]
    assert any("cannot quiesce the database" in m for m in errors)
    assert of_vm(events, "linux-vm", "snapshot.created") == []
    assert await vbrd_snapshots(lab, config, "linux-vm") == []
    assert [line.split()[0] for line in marker_lines(lab, "linux-vm")[before:]] == [
        "pre-freeze", "post-thaw"], "post-thaw runs after a pre-freeze that failed"


DROPIN = """\
from vbrd import hookimpl
from vbrd.errors import VbrdError


@hookimpl
def vbrd_before_phase(session_id, job, phase, vm):
    if phase == "snapshot":
        raise {exception}("injected: no snapshot for " + vm)
"""


@pytest.mark.parametrize("way_in, exception", [
    ("network", "VbrdError"),
    ("network", "RuntimeError"),
    ("vix", "VbrdError"),
])
async def test_thaw_runs_whatever_fails_between_freeze_and_snapshot(
        lab, tmp_path, run_job, network_guests_down, way_in, exception):
    dropins = tmp_path / "dropins"
    dropins.mkdir()
    (dropins / "refuse_snapshots.py").write_text(DROPIN.format(exception=exception))
    config = lab_config(lab, tmp_path / "state", plugin_dirs=[str(dropins)])
    before = {vm: len(marker_lines(lab, vm)) for vm in ("linux-vm", "windows-vm")}
    if way_in == "vix":
        network_guests_down()

    status, events, engine, _ = await run_job(config)

    assert "refuse_snapshots" in engine.pm.sources, engine.pm.failures
    assert status == "failed"
    for vm in ("linux-vm", "windows-vm"):
        assert vm_status(events, vm)["status"] == "failed"
        assert f"injected: no snapshot for {vm}" in vm_status(events, vm)["reason"]
        assert [e["type"] for e in of_vm(events, vm, "guest.frozen", "guest.thawed",
                                         "snapshot.created")] == ["guest.frozen",
                                                                  "guest.thawed"]
        assert of_vm(events, vm, "guest.thawed")[0]["ok"] is True
        assert [line.split()[0] for line in marker_lines(lab, vm)[before[vm]:]] == [
            "pre-freeze", "post-thaw"]
        assert await vbrd_snapshots(lab, config, vm) == []


# --------------------------------------------------------------------------------------------
# secrets


async def test_credentials_never_appear_in_logs_events_or_the_api(
        lab, tmp_path, run_job, caplog):
    caplog.set_level(logging.DEBUG)
    probe = lab_config(lab, tmp_path / "probe")
    secrets = probe.secrets()
    assert len(secrets) >= 3  # vCenter, Linux guest, Windows guest
    marker = next(v for v in lab["vms"] if v["name"] == "linux-vm")["marker_file"]
    leak = "my secrets: " + " ".join(secrets)
    script = failing_pre_freeze(tmp_path / "scripts", marker, leak)
    state = tmp_path / "state"
    config = lab_config(lab, state, guest={"pre_freeze": str(script), "on_failure": "try"})

    status, events, engine, session_id = await run_job(config)

    assert status == "warning", "on_failure = try goes on crash-consistent"
    assert any("my secrets: ***" in (e.get("message") or "") for e in events)
    api = json.dumps([engine.session_info(session_id), await engine.jobs()], default=str)
    stored = b"".join(p.read_bytes() for p in state.rglob("*") if p.is_file())
    assert stored, "the catalog was written"
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for secret in secrets:
        assert secret not in api
        assert secret.encode() not in stored
        assert secret not in logged


# --------------------------------------------------------------------------------------------
# guest processors from plugins


RANKED_DROPIN = '''
"""A third party's way into Linux guests, ranked before ssh; it finds no way in."""
from vbrd import hookimpl
from vbrd.errors import GuestUnreachable


class Knock:
    name = "knock"
    families = ("linux",)
    rank = {rank}

    async def connect(self, vm, context):
        raise GuestUnreachable(f"knock found no door into {{vm.name}}")


@hookimpl
def vbrd_guest_processors():
    return [Knock()]
'''


@pytest.mark.parametrize(("rank", "order", "tried"), [
    (5, [], ["knock", "ssh"]),
    (50, [], ["ssh"]),
    (50, ["knock", "ssh", "vix"], ["knock", "ssh"]),
])
async def test_a_dropin_guest_processor_takes_its_place_in_the_chain_by_rank_or_job_order(
        lab, tmp_path, run_job, rank, order, tried):
    dropins = tmp_path / "dropins"
    dropins.mkdir()
    (dropins / "knock.py").write_text(RANKED_DROPIN.format(rank=rank))
    config = lab_config(lab, tmp_path / "state", vms=["linux-vm"],
                        plugin_dirs=[str(dropins)], guest={"processors": order})

    status, events, engine, _ = await run_job(config)

    assert "knock" in engine.pm.sources, engine.pm.failures
    assert status == "success", vm_status(events, "linux-vm")
    attempts = of_vm(events, "linux-vm", "guest.attempt")
    assert [a["processor"] for a in attempts] == tried
    assert [a["outcome"] for a in attempts] == ["unreachable"] * (len(tried) - 1) + [
        "connected"]
    if "knock" in tried:
        assert "knock found no door into linux-vm" in attempts[0]["reason"]
