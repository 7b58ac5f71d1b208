"""``vbrctl`` against a real daemon API on a unix socket, as an administrator uses it.

``main([...])`` runs in a thread (it has its own event loop) while the API serves on this
test's loop. The daemon's engine is real; its vCenter is unreachable, so a started job fails
in initialization. :class:`Scripted` stands in for the Backup Manager where a session must
succeed, warn or move data.
"""
from __future__ import annotations

import asyncio
import io
import json
import shutil
import sys
import tempfile
import types
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vbrd.api import serve
from vbrd.api.server import ApiServer
from vbrd.cli.vbrctl import ProgressView, main
from vbrd.config import Config, JobSettings, load_config
from vbrd.engine import Engine
from vbrd.events import (
    DiskTransferred,
    Event,
    PhaseFinished,
    PhaseStarted,
    SessionFinished,
    SessionLog,
    SessionStarted,
    SnapshotCreated,
    TransferProgress,
    TransportSelected,
)
from vbrd.plugins import make_plugin_manager
from vbrd.repository import PointInfo, Repository, block_digest, is_zero

pytestmark = pytest.mark.asyncio(loop_scope="session")

VCENTER_URL = "http://127.0.0.1:9/sdk"
MiB = 1 << 20

CONFIG = f"""
[daemon]
state_dir = "state"
api_listen = ""
api_socket = "{{socket}}"

[vcenters.lab]
url = "{VCENTER_URL}"
user = "user"
password_file = "vcenter-password"

[repositories.default]
path = "repo"
block_size = "64KiB"

[jobs.nightly]
vcenter = "lab"
repository = "default"
transport = "nbd"
vms = ["linux-vm"]

[jobs.weekly]
vcenter = "lab"
repository = "default"
vms = ["windows-vm"]
schedule = "daily 22:00"

[jobs."db/daily copy"]
vcenter = "lab"
repository = "default"
vms = ["db-vm"]
"""


class Scripted:
    """Stands in for the Backup Manager: one VM, one disk over nbd, a final ``status``."""

    status = "success"
    pause = 0.005

    def __init__(self, engine: Engine, job: JobSettings, session_id: str, *, trigger: str,
                 stop: asyncio.Event) -> None:
        self.engine, self.job, self.session_id = engine, job, session_id
        self.trigger, self.stop = trigger, stop

    def script(self) -> list[tuple[type[Event], dict[str, Any]]]:
        vm = {"vm": "linux-vm"}
        disk = {**vm, "disk": 2000}
        steps: list[tuple[type[Event], dict[str, Any]]] = [
            (PhaseStarted, {"name": "initialization"}),
            (PhaseFinished, {"name": "initialization"}),
            (SnapshotCreated, {**vm, "snapshot": "snapshot-7", "name": "vbrd-x"}),
            (TransportSelected, {**disk, "mode": "nbd"}),
        ]
        for done in (2 * MiB, 4 * MiB, 6 * MiB, 8 * MiB):
            steps.append((TransferProgress, {
                **disk, "bytes_read": done, "bytes_sent": done, "bytes_done": done,
                "bytes_total": 8 * MiB, "rate": 40e6, "bottleneck": "target"}))
        steps.append((DiskTransferred, {
            **disk, "mode": "nbd", "bytes_read": 8 * MiB, "bytes_sent": 6 * MiB,
            "bytes_stored": 3 * MiB, "blocks_total": 8, "incremental": False}))
        if self.status == "warning":
            steps.append((SessionLog, {**vm, "level": "warning",
                                       "message": "guest processing skipped"}))
        return steps

    def announce(self) -> None:
        self.engine.bus.publish(SessionStarted(session_id=self.session_id, job=self.job.name,
                                               trigger=self.trigger))

    async def run(self) -> str:
        emit = self.engine.bus.publish
        status = self.status
        for cls, fields in self.script():
            await asyncio.sleep(self.pause)
            if self.stop.is_set():
                status = "stopped"
                break
            emit(cls(session_id=self.session_id, **fields))
        emit(SessionFinished(session_id=self.session_id, job=self.job.name, status=status))
        return status


def use_manager(monkeypatch: pytest.MonkeyPatch, manager: type) -> None:
    """Make ``engine.start_job`` run ``manager`` instead of the Backup Manager."""
    module = types.ModuleType("vbrd.manager")
    module.BackupManager = manager  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vbrd.manager", module)


@pytest.fixture
def socket_path() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="vbrctl-", dir="/tmp"))
    yield directory / "vbrd.sock"
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def config(tmp_path: Path, socket_path: Path) -> Config:
    (tmp_path / "vcenter-password").write_text("vc-password\n")
    file = tmp_path / "vbrd.toml"
    file.write_text(CONFIG.replace("{socket}", str(socket_path)))
    return load_config(file)


@pytest.fixture
async def engine(config: Config) -> AsyncIterator[Engine]:
    engine = Engine(config, pm=make_plugin_manager(only=["transport_nbd"]))
    try:
        yield engine
    finally:
        await engine.stop_all(timeout=10)
        engine.close()


@pytest.fixture
async def server(engine: Engine, config: Config) -> AsyncIterator[ApiServer]:
    async with serve(engine, config) as server:
        yield server


def make_point(config: Config, vm: str, disks: dict[int, bytes]) -> PointInfo:
    """A committed restore point of ``vm`` holding ``disks`` (device key → content)."""
    settings = config.repositories["default"]
    repo = Repository.open_or_create(settings.path, block_size=settings.block_size)
    size = repo.block_size
    with repo.begin_point(vm, session_id="s-1", metadata={"name": vm}, parent=None) as point:
        for key, data in disks.items():
            index = point.add_disk(key, label=f"disk {key}", capacity=len(data), inherit=False)
            for n, at in enumerate(range(0, len(data), size)):
                block = data[at:at + size]
                digest = None if is_zero(block) else block_digest(block)
                if digest is not None:
                    repo.put_block(digest, repo.codec.compress(block))
                index.set_block(n, digest)
        return point.commit()


def disk_content(seed: int, blocks: int = 4) -> bytes:
    """Blocks of 64 KiB: distinct data, with the second one all zeros."""
    parts = [bytes([seed, n]) * (32 << 10) for n in range(blocks)]
    parts[1] = bytes(64 << 10)
    return b"".join(parts)


@dataclass
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def vbrctl(capsys: pytest.CaptureFixture[str], socket_path: Path) -> Any:
    async def run(*argv: str, socket: bool = True) -> Run:
        args = ["--socket", str(socket_path), *argv] if socket else list(argv)
        code = await asyncio.wait_for(asyncio.to_thread(main, args), timeout=60)
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)
    return run


# --------------------------------------------------------------------------------------------
# listings


async def test_jobs_lists_the_configured_jobs(server: ApiServer, vbrctl: Any) -> None:
    result = await vbrctl("jobs")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].split() == ["JOB", "TRANSPORT", "SCHEDULE", "VMS", "STATE"]
    assert lines[1].startswith("db/daily copy  auto")
    assert lines[2].split()[:2] == ["nightly", "nbd"]
    assert "never ran" in lines[2]
    assert lines[3].split()[:2] == ["weekly", "auto"]
    assert "daily 22:00" in lines[3]


async def test_plugins_lists_what_each_provides_and_what_failed_to_load(
        config: Config, vbrctl: Any, tmp_path: Path) -> None:
    dropins = tmp_path / "dropins"
    dropins.mkdir()
    (dropins / "tracer.py").write_text(
        "from vbrd import hookimpl\n__version__ = '0.3'\n\n"
        "@hookimpl\ndef vbrd_event(event):\n    pass\n")
    (dropins / "broken.py").write_text("import no_such_module_anywhere\n")
    pm = make_plugin_manager([dropins], only=["transport_nbd", "guest_vix", "tracer",
                                              "broken"])
    engine = Engine(config, pm=pm)
    try:
        async with serve(engine, config):
            result = await vbrctl("plugins")
            listed = json.loads((await vbrctl("plugins", "--json")).out)
    finally:
        engine.close()
    assert result.code == 0, result.err
    rows = {line.split()[0]: line for line in result.out.splitlines()[1:]
            if not line.startswith("not loaded")}
    assert result.out.splitlines()[0].split() == ["PLUGIN", "VERSION", "SOURCE", "PROVIDES",
                                                  "HOOKS"]
    assert set(rows) == {"transport_nbd", "guest_vix", "tracer"}
    assert "built-in" in rows["transport_nbd"] and " nbd " in rows["transport_nbd"]
    assert " vix " in rows["guest_vix"] and "guest_processors" in rows["guest_vix"]
    assert rows["tracer"].split()[1] == "0.3" and rows["tracer"].endswith("event")
    assert "not loaded: broken (drop-in" in result.out
    assert "no_such_module_anywhere" in result.out
    tracer = next(p for p in listed["plugins"] if p["name"] == "tracer")
    assert tracer["hooks"] == ["vbrd_event"] and tracer["source"].startswith("drop-in ")
    assert [f["name"] for f in listed["failures"]] == ["broken"]


async def test_json_listings_are_the_apis_data(server: ApiServer, engine: Engine,
                                               vbrctl: Any) -> None:
    for argv in (["--json", "jobs"], ["jobs", "--json"]):
        result = await vbrctl(*argv)
        assert result.code == 0
        assert [j["name"] for j in json.loads(result.out)] == [
            "db/daily copy", "nightly", "weekly"]
    session_id = await engine.start_job("nightly", trigger="cli")
    await engine.wait_session(session_id)
    sessions = json.loads((await vbrctl("sessions", "--json")).out)
    assert [(s["id"], s["trigger"], s["status"]) for s in sessions] == [
        (session_id, "cli", "failed")]


async def test_config_names_the_socket(server: ApiServer, config: Config, vbrctl: Any) -> None:
    result = await vbrctl("--config", str(config.path), "jobs", socket=False)
    assert result.code == 0, result.err
    assert "nightly" in result.out


async def test_config_works_for_an_operator_who_cannot_read_the_secrets(
        server: ApiServer, config: Config, vbrctl: Any, tmp_path: Path) -> None:
    (tmp_path / "vcenter-password").unlink()  # as unreadable as a root-only file
    result = await vbrctl("--config", str(config.path), "jobs", socket=False)
    assert result.code == 0, result.err
    assert "nightly" in result.out


async def test_a_config_error_is_reported_with_exit_code_2(tmp_path: Path, vbrctl: Any) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nstate_dirr = '/x'\n")
    result = await vbrctl("--config", str(bad), "jobs", socket=False)
    assert result.code == 2
    assert "daemon.state_dirr: unknown key" in result.err


# --------------------------------------------------------------------------------------------
# starting and following


async def test_start_follow_exits_1_when_the_session_fails(server: ApiServer, engine: Engine,
                                                          vbrctl: Any) -> None:
    result = await vbrctl("start", "nightly", "--follow")
    assert result.code == 1, result.err
    assert "initialization started" in result.out
    assert f"error: vCenter lab ({VCENTER_URL})" in result.out
    assert "session finished: failed" in result.out.rstrip().splitlines()[-1]
    [session] = engine.catalog.sessions()
    assert session.status == "failed"
    assert session.trigger == "api"


@pytest.mark.parametrize("status, code", [("success", 0), ("warning", 3)])
async def test_start_follow_exits_with_the_sessions_status(
        server: ApiServer, vbrctl: Any, monkeypatch: pytest.MonkeyPatch,
        status: str, code: int) -> None:
    use_manager(monkeypatch, type("S", (Scripted,), {"status": status}))
    result = await vbrctl("start", "nightly", "--follow")
    assert result.code == code, result.err
    lines = result.out.splitlines()
    assert any(line.endswith("linux-vm: snapshot vbrd-x created") for line in lines)
    progress = [line for line in lines if line.startswith("transfer [")]
    assert progress[-1].startswith(f"transfer [{'#' * 30}] 100.0% 8.0 MiB of 8.0 MiB")
    assert "bottleneck: target" in progress[0]
    assert any("linux-vm disk 2000: full via nbd: read 8.0 MiB, transferred 6.0 MiB, "
               "stored 3.0 MiB" in line for line in lines)
    assert lines[-1].endswith(f"session finished: {status}")


async def test_start_follow_json_prints_one_event_per_line(
        server: ApiServer, vbrctl: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    use_manager(monkeypatch, Scripted)
    result = await vbrctl("--json", "start", "weekly", "--follow")
    assert result.code == 0
    events = [json.loads(line) for line in result.out.splitlines()]
    assert events[0]["type"] == "session.started"
    assert events[-1] == {**events[-1], "type": "session.finished", "status": "success"}
    assert sum(e["type"] == "transfer.progress" for e in events) == 4


async def test_start_without_follow_prints_the_session(server: ApiServer, engine: Engine,
                                                       vbrctl: Any) -> None:
    result = await vbrctl("start", "db/daily copy")
    assert result.code == 0, result.err
    assert result.out.startswith("started session ")
    session_id = result.out.removeprefix("started session ").rstrip("\n")
    assert await engine.wait_session(session_id) == "failed"
    [record] = engine.catalog.sessions()
    assert (record.id, record.job) == (session_id, "db/daily copy")
    shown = await vbrctl("session", session_id)
    assert shown.code == 0, shown.err
    assert f"session   {session_id}\njob       db/daily copy (trigger api)" in shown.out


async def test_progress_is_redrawn_in_place_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    view = ProgressView(out, tty=True)
    for done in (1 * MiB, 2 * MiB):
        view.handle({"type": "transfer.progress", "vm": "vm", "disk": 2000,
                     "bytes_done": done, "bytes_total": 4 * MiB, "rate": 1e6,
                     "bottleneck": "network", "time": "2024-01-01T00:00:00+00:00"})
    view.handle({"type": "log", "level": "info", "message": "hello",
                 "time": "2024-01-01T00:00:01+00:00"})
    view.close()
    text = out.getvalue()
    assert text.count("\r\x1b[K[") == 2
    assert " 25.0% " in text and " 50.0% 2.0 MiB of 4.0 MiB" in text
    assert "bottleneck: network" in text
    assert "\r\x1b[K" in text.split("50.0%")[1], "the bar is cleared before the next line"
    assert text.endswith("info: hello\n")


# --------------------------------------------------------------------------------------------
# sessions


async def test_session_shows_the_record_the_disks_and_the_events(
        server: ApiServer, engine: Engine, vbrctl: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    use_manager(monkeypatch, type("S", (Scripted,), {"status": "warning"}))
    session_id = await engine.start_job("nightly")
    assert await engine.wait_session(session_id) == "warning"

    result = await vbrctl("session", session_id)
    assert result.code == 0, result.err
    out = result.out
    assert f"session   {session_id}" in out
    assert "status    warning" in out
    disks = out.split("disks:\n")[1].split("\n\n")[0].splitlines()
    assert disks[0].split() == ["VM", "DISK", "TRANSPORT", "READ", "TRANSFERRED", "STORED",
                                "KIND"]
    assert disks[1].split() == ["linux-vm", "2000", "nbd", "8.0", "MiB", "6.0", "MiB", "3.0",
                                "MiB", "full"]
    assert "warning: guest processing skipped" in out
    # the catalog keeps the first and the last of the four quick updates
    assert "(2 progress updates not shown)" in out

    as_json = json.loads((await vbrctl("session", session_id, "--json")).out)
    assert as_json["disks"][0]["bytes_stored"] == 3 * MiB


async def test_a_session_without_disks_shows_no_disk_table(server: ApiServer, engine: Engine,
                                                           vbrctl: Any) -> None:
    session_id = await engine.start_job("nightly")
    await engine.wait_session(session_id)
    result = await vbrctl("session", session_id)
    assert result.code == 0
    assert "status    failed" in result.out
    assert "disks:" not in result.out


async def test_stop_asks_a_running_session_to_stop(
        server: ApiServer, engine: Engine, vbrctl: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    use_manager(monkeypatch, type("Slow", (Scripted,), {"pause": 0.2}))
    session_id = await engine.start_job("nightly")
    result = await vbrctl("stop", session_id)
    assert result.code == 0, result.err
    assert await engine.wait_session(session_id) == "stopped"
    again = await vbrctl("stop", "no-such-session")
    assert again.code == 1
    assert "no session 'no-such-session'" in again.err


# --------------------------------------------------------------------------------------------
# restore points


async def test_points_lists_restore_points_of_all_vms_or_one(
        server: ApiServer, config: Config, vbrctl: Any) -> None:
    repo_path = config.repositories["default"].path
    missing = await vbrctl("points")  # listing never creates a repository
    assert missing.code == 1 and str(repo_path) in missing.err and "mounted" in missing.err
    assert not repo_path.exists()
    Repository.create(repo_path, block_size=64 << 10)
    assert (await vbrctl("points")).out == "no restore points\n"
    linux = make_point(config, "linux-vm", {2000: disk_content(1)})
    windows = make_point(config, "windows-vm", {2000: disk_content(2), 2001: disk_content(3)})

    result = await vbrctl("points")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].split() == ["POINT", "VM", "CREATED", "KIND", "DISKS", "DATA", "STORED",
                                "REPOSITORY"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows.keys() == {linux.point_id, windows.point_id}
    assert "linux-vm" in rows[linux.point_id] and "full" in rows[linux.point_id]
    assert "2000, 2001" in rows[windows.point_id]

    only = json.loads((await vbrctl("points", "windows-vm", "--json")).out)
    assert [(p["point_id"], p["repository"]) for p in only] == [(windows.point_id, "default")]


async def test_restore_writes_the_disk_image_bit_for_bit(
        server: ApiServer, config: Config, vbrctl: Any, tmp_path: Path) -> None:
    content = {2000: disk_content(4), 2001: disk_content(5, blocks=3)}
    point = make_point(config, "two-disk-vm", content)

    result = await vbrctl("restore", point.point_id, "--disk", "2001", "--to",
                          str(tmp_path / "disk-2001.img"))
    assert result.code == 0, result.err
    assert (tmp_path / "disk-2001.img").read_bytes() == content[2001]
    assert f"restored disk 2001 of restore point {point.point_id}" in result.out

    unnamed = await vbrctl("restore", point.point_id, "--to", str(tmp_path / "x.img"))
    assert unnamed.code != 0
    assert "--disk" in unnamed.err
    missing = await vbrctl("restore", "no-such-point", "--to", str(tmp_path / "y.img"))
    assert missing.code == 1
    assert "no restore point 'no-such-point'" in missing.err
    assert not (tmp_path / "x.img").exists() and not (tmp_path / "y.img").exists()


async def test_verify_names_a_damaged_block_and_exits_1(
        server: ApiServer, config: Config, vbrctl: Any) -> None:
    good = make_point(config, "linux-vm", {2000: disk_content(6)})
    damaged_data = disk_content(7)
    damaged = make_point(config, "windows-vm", {2000: damaged_data})
    clean = await vbrctl("verify")
    assert (clean.code, clean.out) == (0, "all restore points: no problems found\n")

    third_block = block_digest(damaged_data[2 * (64 << 10):3 * (64 << 10)]).hex()
    block_file = config.repositories["default"].path / "blocks" / third_block[:2] / third_block
    block_file.write_bytes(b"not a zstd frame")

    result = await vbrctl("verify")
    assert result.code == 1
    assert f"point {damaged.point_id}, disk 2000, offset {2 * (64 << 10)}:" in result.out
    assert good.point_id not in result.out
    assert (await vbrctl("verify", good.point_id)).code == 0
    # verify quarantined the damaged point: listed as damaged, verify keeps saying so
    as_json = await vbrctl("verify", damaged.point_id, "--json")
    assert as_json.code == 1
    (problem,) = json.loads(as_json.out)
    assert problem["point"] == damaged.point_id and "quarantined" in problem["reason"]
    assert f"offset {2 * (64 << 10)}" in problem["reason"]
    listed = await vbrctl("points")
    (line,) = [x for x in listed.out.splitlines() if damaged.point_id in x]
    assert "damaged" in line


# --------------------------------------------------------------------------------------------
# errors


async def test_an_unreachable_daemon_is_named(tmp_path: Path, vbrctl: Any) -> None:
    missing = tmp_path / "nowhere.sock"
    result = await vbrctl("--socket", str(missing), "jobs", socket=False)
    assert result.code == 1
    assert str(missing) in result.err
    assert "is the daemon running?" in result.err
    assert result.out == ""


async def test_api_errors_give_their_message_and_exit_code(server: ApiServer,
                                                          vbrctl: Any) -> None:
    unknown = await vbrctl("start", "nonexistent")
    assert (unknown.code, unknown.err.strip()) == (1, "vbrctl: no job named 'nonexistent'")
    bad = await vbrctl("sessions", "--limit", "0")
    assert bad.code == 2
    assert "'limit' must be positive" in bad.err


# --------------------------------------------------------------------------------------------
# repository maintenance


async def test_point_delete_and_gc_free_the_blocks_only_that_point_named(
        server: ApiServer, config: Config, vbrctl: Any) -> None:
    old = make_point(config, "linux-vm", {2000: disk_content(8)})
    kept = make_point(config, "linux-vm", {2000: disk_content(9)})
    repo = Repository.open(config.repositories["default"].path)
    before = repo.stats().blocks

    deleted = await vbrctl("point", "delete", old.point_id)
    assert deleted.code == 0, deleted.err
    assert old.point_id in deleted.out and "gc" in deleted.out
    assert [p.point_id for p in repo.points()] == [kept.point_id]
    assert repo.stats().blocks == before, "blocks stay until gc"

    collected = await vbrctl("gc")
    assert collected.code == 0, collected.err
    assert "repository default: removed 3 unused blocks" in collected.out
    assert repo.stats().blocks == before - 3
    assert (await vbrctl("verify")).code == 0

    again = await vbrctl("gc", "default", "--json")
    assert json.loads(again.out)[0]["blocks_removed"] == 0
    unknown = await vbrctl("point", "delete", old.point_id)
    assert unknown.code == 1 and old.point_id in unknown.err
    assert (await vbrctl("gc", "nowhere")).code == 1


async def test_gc_over_the_api_waits_for_no_vm_and_names_a_busy_repository(
        server: ApiServer, config: Config, vbrctl: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from vbrd import maintenance

    make_point(config, "linux-vm", {2000: disk_content(10)})
    monkeypatch.setattr(maintenance, "GC_WAIT", 0.2)
    with Repository.open(config.repositories["default"].path).writing():
        busy = await vbrctl("gc")
    assert busy.code == 1 and "in use by a writer" in busy.err


async def test_vbrd_repo_init_creates_the_configured_repository_once(
        config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    from vbrd.cli.vbrd import main as vbrd_main

    path = config.repositories["default"].path
    assert vbrd_main(["repo", "init", "--config", str(config.path)]) == 0
    assert f"created repository default at {path}" in capsys.readouterr().out
    assert Repository.open(path).block_size == 64 << 10
    assert vbrd_main(["repo", "init", "--config", str(config.path), "default"]) == 0
    assert "already a repository" in capsys.readouterr().out
    assert vbrd_main(["repo", "init", "--config", str(config.path), "nowhere"]) == 2
