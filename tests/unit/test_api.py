"""The HTTP API as a script or an HTTP trigger sees it: served for real on TCP and a unix socket.

The engine is the daemon's real one, with a config whose vCenter is at an unreachable
address, so a job started here fails quickly in initialization and still publishes a whole
session's events. Where a test needs a session that succeeds, warns, or runs long, the Backup
Manager is replaced by :class:`ScriptedManager`, which publishes a scripted session on the
bus the way the real one does.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import sys
import tempfile
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from vbrd.api import serve
from vbrd.api.openapi import openapi_document
from vbrd.api.server import ApiServer, make_app
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
    TransferProgress,
    TransportSelected,
)
from vbrd.plugins import make_plugin_manager

pytestmark = pytest.mark.asyncio(loop_scope="session")

TOKEN = "s3cret-token-for-tests"
VCENTER_URL = "http://127.0.0.1:9/sdk"

CONFIG = f"""
[daemon]
state_dir = "state"
api_listen = "127.0.0.1:0"
api_socket = "{{socket}}"
token_file = "api-token"

[vcenters.lab]
url = "{VCENTER_URL}"
user = "user"
password_file = "vcenter-password"
verify_tls = false

[repositories.default]
path = "repo"

[jobs.nightly]
vcenter = "lab"
repository = "default"
transport = "nbd"
vms = ["linux-vm"]

[jobs.weekly]
vcenter = "lab"
repository = "default"
vms = ["windows-vm", "two-disk-vm"]
schedule = "weekly sun 03:00"
"""


class ScriptedManager:
    """Stands in for the Backup Manager: publishes a scripted session, honours stop.

    ``script`` is a list of (event class, fields) published with ``pause`` seconds between
    them; the session ends with ``session.finished`` of ``status`` (or ``stopped``).
    """

    script: list[tuple[type[Event], dict[str, Any]]] = []
    status = "success"
    pause = 0.01

    def __init__(self, engine: Engine, job: JobSettings, session_id: str, *, trigger: str,
                 stop: asyncio.Event) -> None:
        self.engine, self.job, self.session_id = engine, job, session_id
        self.trigger, self.stop = trigger, stop

    def emit(self, cls: type[Event], **fields: Any) -> None:
        self.engine.bus.publish(cls(session_id=self.session_id, **fields))

    def announce(self) -> None:
        self.emit(SessionStarted, job=self.job.name, trigger=self.trigger)

    async def run(self) -> str:
        status = self.status
        for cls, fields in self.script:
            if self.stop.is_set():
                status = "stopped"
                break
            await asyncio.sleep(self.pause)
            self.emit(cls, **fields)
        self.emit(SessionFinished, job=self.job.name, status=status,
                  reason="stopped on request" if status == "stopped" else "")
        return status


def scripted(status: str = "success", *, steps: int = 0, pause: float = 0.01,
             disk_size: int = 8 << 20) -> type[ScriptedManager]:
    """A manager class for one VM with one disk read over nbd, ending in ``status``."""
    script: list[tuple[type[Event], dict[str, Any]]] = [
        (PhaseStarted, {"name": "initialization"}),
        (PhaseFinished, {"name": "initialization"}),
        (TransportSelected, {"vm": "linux-vm", "disk": 2000, "mode": "nbd",
                             "skipped": (("san", "no SAN path to datastore LocalDS_0"),)}),
    ]
    for i in range(1, 5):
        done = disk_size * i // 4
        script.append((TransferProgress, {
            "vm": "linux-vm", "disk": 2000, "bytes_read": done, "bytes_sent": done // 2,
            "bytes_done": done, "bytes_total": disk_size, "rate": 50e6,
            "bottleneck": "source"}))
    script += [(PhaseStarted, {"name": "data_transport", "vm": "linux-vm"})] * steps
    script.append((DiskTransferred, {
        "vm": "linux-vm", "disk": 2000, "mode": "nbd", "bytes_read": disk_size,
        "bytes_sent": disk_size // 2, "bytes_stored": disk_size // 4, "blocks_total": 8,
        "incremental": False}))
    if status == "warning":
        script.append((SessionLog, {"level": "warning", "message": "VMware Tools is not "
                                                                   "running in linux-vm"}))
    return type("Scripted", (ScriptedManager,), {"script": script, "status": status,
                                                 "pause": pause})


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for the unix socket (socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vbrd-api-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def config(tmp_path: Path, socket_dir: Path) -> Config:
    (tmp_path / "api-token").write_text(TOKEN + "\n")
    (tmp_path / "vcenter-password").write_text("vc-password\n")
    file = tmp_path / "vbrd.toml"
    file.write_text(CONFIG.replace("{socket}", str(socket_dir / "run" / "vbrd.sock")))
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
async def server(engine: Engine) -> AsyncIterator[ApiServer]:
    async with serve(engine) as server:  # where to listen: the engine's config
        yield server


@pytest.fixture
def tcp_url(server: ApiServer) -> str:
    assert server.tcp_address is not None
    host, port = server.tcp_address
    return f"http://{host}:{port}/api/v1"


@pytest.fixture
async def http(tcp_url: str) -> AsyncIterator[aiohttp.ClientSession]:
    """A client on the TCP site that presents the right token."""
    async with aiohttp.ClientSession(tcp_url + "/", headers={
            "Authorization": f"Bearer {TOKEN}"}) as session:
        yield session


@pytest.fixture
async def unix(server: ApiServer) -> AsyncIterator[aiohttp.ClientSession]:
    """A client on the unix socket, without any token."""
    assert server.socket_path is not None
    connector = aiohttp.UnixConnector(path=str(server.socket_path))
    async with aiohttp.ClientSession("http://vbrd/", connector=connector) as session:
        yield session


def use_manager(monkeypatch: pytest.MonkeyPatch, manager: type) -> None:
    """Make ``engine.start_job`` run ``manager`` instead of the Backup Manager."""
    module = types.ModuleType("vbrd.manager")
    module.BackupManager = manager  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vbrd.manager", module)


async def read_sse(response: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    """Every message of a server-sent event stream: its id, event name and parsed data."""
    messages, current = [], {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if "data" in current:
                messages.append(current)
            current = {}
            continue
        key, _, value = line.partition(": ")
        if key == "data":
            current[key] = json.loads(value)
        elif key in ("id", "event"):
            current[key] = value
    return messages


async def wait_finished(engine: Engine, session_id: str) -> str:
    return await asyncio.wait_for(engine.wait_session(session_id), timeout=30)


# --------------------------------------------------------------------------------------------
# authentication


ALL_REQUESTS = [
    ("GET", "jobs"), ("POST", "jobs/nightly/start"), ("POST", "jobs/nonexistent/start"),
    ("GET", "sessions"), ("GET", "sessions/some-id"), ("GET", "sessions/some-id/events"),
    ("POST", "sessions/some-id/stop"), ("GET", "restore-points"),
    ("POST", "restore-points/restore"), ("POST", "restore-points/verify"),
    ("GET", "openapi.json"), ("GET", "no-such-route"), ("DELETE", "jobs"),
    ("GET", "/"), ("GET", "/favicon.ico"),
]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}",
                                           "Bearer ", f"Bearer {TOKEN}x"])
async def test_every_tcp_request_without_the_right_token_gets_the_same_401(
        server: ApiServer, tcp_url: str, engine: Engine, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    answers = set()
    async with aiohttp.ClientSession(headers=headers) as client:
        for method, path in ALL_REQUESTS:
            url = tcp_url.removesuffix("/api/v1") + path if path.startswith("/") else (
                f"{tcp_url}/{path}")
            async with client.request(method, url, json={}) as response:
                body = await response.text()
                assert response.status == 401, (method, path, body)
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                answers.add(body)
    assert len(answers) == 1, "the 401 must not depend on the path, method or job"
    assert json.loads(answers.pop())["error"]["type"] == "Unauthorized"
    assert TOKEN not in "".join(answers)
    assert engine.sessions == {}, "no job may start without the token"


async def test_the_token_opens_the_tcp_api(http: aiohttp.ClientSession) -> None:
    async with http.get("jobs") as response:
        assert response.status == 200
        jobs = (await response.json())["jobs"]
    assert [j["name"] for j in jobs] == ["nightly", "weekly"]
    assert jobs[1]["vms"] == ["windows-vm", "two-disk-vm"]
    assert jobs[1]["schedule"] == "weekly sun 03:00"


async def test_the_unix_socket_needs_no_token_and_is_mode_0660(
        server: ApiServer, unix: aiohttp.ClientSession, socket_dir: Path) -> None:
    path = socket_dir / "run" / "vbrd.sock"
    assert server.socket_path == path
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660
    async with unix.get("api/v1/jobs") as response:
        assert response.status == 200
        assert len((await response.json())["jobs"]) == 2


async def test_stopping_the_server_removes_the_socket(engine: Engine, config: Config) -> None:
    assert config.daemon.api_socket is not None
    async with serve(engine, config):
        assert config.daemon.api_socket.exists()
    assert not config.daemon.api_socket.exists()


async def test_a_socket_left_by_a_dead_daemon_is_replaced_but_a_live_one_is_refused(
        engine: Engine, config: Config) -> None:
    path = config.daemon.api_socket
    assert path is not None
    path.parent.mkdir(parents=True)
    import socket as socket_module

    with socket_module.socket(socket_module.AF_UNIX) as stale:
        stale.bind(str(path))  # bound, never listening: what a killed daemon leaves
    async with serve(engine, config):
        with pytest.raises(Exception, match="already serves the API socket"):
            async with serve(engine, config):
                pass
        assert path.exists(), "the refused second server must leave the first one's socket"


async def test_an_empty_token_file_stops_the_server_from_starting(
        engine: Engine, config: Config) -> None:
    assert config.daemon.token_file is not None
    config.daemon.token_file.write_text("\n")
    with pytest.raises(Exception, match="token file is empty"):
        async with serve(engine, config):
            pass


# --------------------------------------------------------------------------------------------
# starting jobs


async def test_starting_an_unknown_job_is_404_and_a_running_one_409(
        http: aiohttp.ClientSession, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    use_manager(monkeypatch, scripted(steps=50))
    async with http.post("jobs/nonexistent/start") as response:
        assert response.status == 404
        assert (await response.json())["error"] == {
            "type": "NotFound", "message": "no job named 'nonexistent'"}

    async with http.post("jobs/nightly/start", json={}) as response:
        assert response.status == 202
        session_id = (await response.json())["session_id"]
    async with http.post("jobs/nightly/start") as response:
        assert response.status == 409
        error = (await response.json())["error"]
    assert error["type"] == "Conflict"
    assert session_id in error["message"]
    await wait_finished(engine, session_id)


@pytest.mark.parametrize("body, problem", [
    (b"{not json", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b'"go"', "must be a JSON object"),
    (b'{"force": true}', "unknown field 'force'"),
])
async def test_a_malformed_start_body_is_a_400_json_error(
        http: aiohttp.ClientSession, engine: Engine, body: bytes, problem: str) -> None:
    async with http.post("jobs/nightly/start", data=body,
                         headers={"Content-Type": "application/json"}) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["type"] == "UsageError"
    assert problem in error["message"]
    assert engine.sessions == {}


async def test_a_session_started_over_http_streams_its_events_in_order(
        http: aiohttp.ClientSession, engine: Engine) -> None:
    async with http.post("jobs/nightly/start") as response:
        assert response.status == 202
        session_id = (await response.json())["session_id"]
    async with http.get(f"sessions/{session_id}/events") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        messages = await asyncio.wait_for(read_sse(response), timeout=30)

    events = [m["data"] for m in messages]
    assert [m["event"] for m in messages] == [e["type"] for e in events]
    assert [m["id"] for m in messages] == [str(i) for i in range(1, len(messages) + 1)]
    assert events[0]["type"] == "session.started"
    assert events[0]["trigger"] == "api"
    assert events[1]["type"] == "phase.started"
    assert events[1]["name"] == "initialization"
    errors = [e for e in events if e["type"] == "log" and e["level"] == "error"]
    assert any(VCENTER_URL in e["message"] for e in errors), errors
    assert events[-1]["type"] == "session.finished"
    assert events[-1]["status"] == "failed"
    assert all(e["session_id"] == session_id for e in events)

    stored = engine.catalog.events(session_id)
    assert [(e["type"], e["monotonic"]) for e in stored] == [
        (e["type"], e["monotonic"]) for e in events]


async def test_a_stream_opened_mid_session_has_no_gaps_and_no_duplicates(
        http: aiohttp.ClientSession, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    use_manager(monkeypatch, scripted(steps=300, pause=0))
    async with http.post("jobs/weekly/start") as response:
        session_id = (await response.json())["session_id"]
    streams = []
    for _ in range(3):  # open streams while the session publishes as fast as it can
        await asyncio.sleep(0.002)
        streams.append(asyncio.create_task(_stream(http, session_id)))
    results = await asyncio.wait_for(asyncio.gather(*streams), timeout=30)

    stored = [(e["type"], e["monotonic"]) for e in engine.catalog.events(session_id)]
    assert len(stored) > 300
    for messages in results:
        assert [(m["data"]["type"], m["data"]["monotonic"]) for m in messages] == stored


async def _stream(http: aiohttp.ClientSession, session_id: str,
                  headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    async with http.get(f"sessions/{session_id}/events", headers=headers) as response:
        assert response.status == 200
        return await read_sse(response)


async def test_the_stream_of_a_finished_session_replays_it_and_resumes_after_last_event_id(
        http: aiohttp.ClientSession, engine: Engine) -> None:
    session_id = await engine.start_job("nightly", trigger="cli")
    await wait_finished(engine, session_id)
    everything = await asyncio.wait_for(_stream(http, session_id), timeout=10)
    assert everything[-1]["event"] == "session.finished"
    rest = await asyncio.wait_for(_stream(http, session_id, {"Last-Event-ID": "2"}), 10)
    assert rest == everything[2:]


async def test_the_stream_of_an_unknown_session_is_404(http: aiohttp.ClientSession) -> None:
    async with http.get("sessions/nope/events") as response:
        assert response.status == 404
        assert (await response.json())["error"]["message"] == "no session 'nope'"


async def test_the_stream_ends_when_the_server_stops(
        engine: Engine, config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    use_manager(monkeypatch, scripted(steps=10_000, pause=0.01))
    async with serve(engine, config) as server:
        assert server.tcp_address is not None
        session_id = await engine.start_job("nightly")
        host, port = server.tcp_address
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            async with c.get(f"http://{host}:{port}/api/v1/sessions/{session_id}/events") as r:
                assert r.status == 200
                await r.content.readline()
                await asyncio.wait_for(server.stop(), timeout=10)
                rest = await asyncio.wait_for(r.content.read(), timeout=10)
    assert b"session.finished" not in rest
    await engine.stop_session(session_id)
    assert await wait_finished(engine, session_id) == "stopped"


# --------------------------------------------------------------------------------------------
# sessions


async def test_sessions_are_listed_newest_first_and_shown_with_disks(
        http: aiohttp.ClientSession, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    use_manager(monkeypatch, scripted("warning"))
    first = await engine.start_job("nightly")
    await wait_finished(engine, first)
    await asyncio.sleep(0.01)
    second = await engine.start_job("weekly")
    await wait_finished(engine, second)

    async with http.get("sessions") as response:
        sessions = (await response.json())["sessions"]
    assert [(s["id"], s["job"], s["status"]) for s in sessions] == [
        (second, "weekly", "warning"), (first, "nightly", "warning")]
    async with http.get("sessions", params={"job": "nightly"}) as response:
        assert [s["id"] for s in (await response.json())["sessions"]] == [first]
    async with http.get("sessions", params={"limit": "zero"}) as response:
        assert response.status == 400

    async with http.get(f"sessions/{first}") as response:
        info = await response.json()
    assert info["status"] == "warning"
    assert info["disks"] == [{
        "vm": "linux-vm", "disk": 2000, "mode": "nbd", "bytes_read": 8 << 20,
        "bytes_sent": 4 << 20, "bytes_stored": 2 << 20, "blocks_total": 8,
        "incremental": False, "reason": ""}]
    assert info["events"][-1]["type"] == "session.finished"

    async with http.get("sessions/unknown") as response:
        assert response.status == 404


async def test_a_running_session_stops_on_request(
        http: aiohttp.ClientSession, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    use_manager(monkeypatch, scripted(steps=10_000))
    async with http.post("jobs/nightly/start") as response:
        session_id = (await response.json())["session_id"]
    async with http.post(f"sessions/{session_id}/stop") as response:
        assert response.status == 202
        assert await response.json() == {"session_id": session_id, "stopping": True}
    assert await wait_finished(engine, session_id) == "stopped"
    async with http.post(f"sessions/{session_id}/stop") as response:
        assert response.status == 409
    async with http.post("sessions/unknown/stop") as response:
        assert response.status == 404


# --------------------------------------------------------------------------------------------
# restore points


async def test_restores_are_refused_over_tcp_even_with_the_token(
        http: aiohttp.ClientSession, tmp_path: Path) -> None:
    async with http.post("restore-points/restore", json={
            "point": "p", "disk": 2000, "to": str(tmp_path / "disk.img")}) as response:
        assert response.status == 403
        assert "unix socket" in (await response.json())["error"]["message"]
    assert not (tmp_path / "disk.img").exists()


@pytest.mark.parametrize("body, problem", [
    ({"disk": 2000, "to": "/tmp/x.img"}, "needs the field 'point'"),
    ({"point": "p", "disk": "2000", "to": "/tmp/x.img"}, "'disk' must be an integer or null"),
    ({"point": "p", "to": "relative.img"}, "absolute path"),
    ({"point": "p", "to": "/tmp/x.img", "overwrite": True}, "unknown field 'overwrite'"),
])
async def test_a_malformed_restore_request_is_a_400(
        unix: aiohttp.ClientSession, body: dict[str, Any], problem: str) -> None:
    async with unix.post("api/v1/restore-points/restore", json=body) as response:
        assert response.status == 400
        assert problem in (await response.json())["error"]["message"]


async def test_verify_takes_only_a_point(unix: aiohttp.ClientSession) -> None:
    async with unix.post("api/v1/restore-points/verify", json={"points": ["a"]}) as response:
        assert response.status == 400
        assert "unknown field 'points'" in (await response.json())["error"]["message"]


# --------------------------------------------------------------------------------------------
# the API's description


async def test_openapi_describes_exactly_the_routes_the_app_serves(
        engine: Engine, http: aiohttp.ClientSession) -> None:
    app = make_app(engine)
    served = {(route.method.lower(), route.resource.canonical)
              for route in app.router.routes()
              if route.method != "HEAD" and route.resource is not None}
    document = openapi_document()
    described = {(method, path) for path, item in document["paths"].items()
                 for method in item if method in ("get", "post", "put", "patch", "delete")}
    assert served == described
    for path, item in document["paths"].items():
        for operation in item.values():
            declared = {p["name"] for p in operation.get("parameters", ())
                        if p["in"] == "path"}
            assert declared == {part[1:-1] for part in path.split("/")
                                if part.startswith("{")}, path
            assert "401" in operation["responses"], path

    async with http.get("openapi.json") as response:
        assert await response.json() == document
    assert document["openapi"].startswith("3.1")
