"""The agent trusts only the backup server that knows its secret, the Manager trusts only the
agent whose certificate it pinned, and a mover never outlives the Manager's interest in it."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from tests.vmdk_support import convert, make_raw
from vbrd.config import AgentAccess, load_agent_config
from vbrd.models import DatastoreFile, DiskTask, ProxyContext, Secret, VmRef
from vbrd.repository import Repository
from vbrd.transport import SourceSpec, TlsSettings, TransferRules, run_transfer
from vbrd.transport.agent import Agent
from vbrd.transport.blockmap import read_block_map
from vbrd.transport.movers import MoverLost
from vbrd.transport.remote import AgentClient, AgentMovers, AgentRefused, AgentUnreachable
from vbrd.transport.spec import source_to_json

pytestmark = pytest.mark.asyncio(loop_scope="session")

SECRET = "agent-secret-for-the-unit-tests-0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def agent_config(directory: Path, name: str, port: int, *, role: str = "repository",
                 policy: str = "") -> Path:
    """An agent's config: a repository agent serving ``main``, or a proxy agent whose own
    policy (``plugin_modules``, ``[san_paths]``, ...) is ``policy``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "secret").write_text(SECRET + "\n")
    path = directory / "agent.toml"
    served = '\n[repositories.main]\npath = "repo"\n' if role == "repository" else ""
    path.write_text(f"""
[agent]
name = "{name}"
role = "{role}"
listen = "127.0.0.1:{port}"
state_dir = "state"
secret_file = "secret"
""" + policy + served)
    return path


@pytest_asyncio.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    service = Agent(load_agent_config(agent_config(tmp_path / "a", "agent-a", free_port())))
    service.prepare()
    await asyncio.to_thread(service.prepare_repositories)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def client(agent: Agent, *, secret: str = SECRET, fingerprint: str = "") -> AgentClient:
    access = AgentAccess(agent.settings.listen, fingerprint or agent.fingerprint, Secret(secret))
    return AgentClient("proxy proxy-a", access)


async def test_the_pinned_agent_answers_with_its_certificate(agent: Agent) -> None:
    info = await client(agent).info()
    assert info["name"] == "agent-a"
    assert info["fingerprint"] == agent.fingerprint
    assert list(info["repositories"]) == ["main"]
    assert await client(agent).certificate() == agent.certificate


async def test_a_wrong_secret_is_refused_and_starts_nothing(agent: Agent,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    wrong = client(agent, secret="not-the-secret-at-all-0123")
    with pytest.raises(AgentRefused, match="refused the shared secret"):
        await wrong.info()
    with pytest.raises(MoverLost, match="refused the shared secret") as err:
        await AgentMovers(wrong).start("target", {"repository": "main", "rules": {}})
    assert err.value.role == "target"
    assert agent.movers == {}
    assert "wrong secret" in caplog.text

    async with aiohttp.ClientSession() as session, session.get(
            f"https://{agent.settings.listen}/api/v1/agent", ssl=False) as response:
        assert response.status == 401, "no secret at all is refused as well"


async def test_a_certificate_other_than_the_pinned_one_is_refused_by_the_manager(
        agent: Agent, tmp_path: Path) -> None:
    impostor = Agent(load_agent_config(agent_config(tmp_path / "b", "impostor", free_port())))
    impostor.prepare()
    await impostor.start()
    try:
        # the impostor knows the secret and answers where the Manager expects agent-a
        pinned_elsewhere = AgentClient("proxy proxy-a", AgentAccess(
            impostor.settings.listen, agent.fingerprint, Secret(SECRET)))
        with pytest.raises(AgentRefused) as err:
            await pinned_elsewhere.info()
        assert impostor.fingerprint in str(err.value)
        assert f"the config pins {agent.fingerprint}" in str(err.value)
        assert impostor.fingerprint != agent.fingerprint
    finally:
        await impostor.stop()


async def test_an_agent_that_does_not_answer_is_reported_unreachable(agent: Agent) -> None:
    nobody = AgentClient("proxy proxy-b", AgentAccess(f"127.0.0.1:{free_port()}",
                                                      agent.fingerprint, Secret(SECRET)))
    with pytest.raises(AgentUnreachable, match="cannot reach the agent of proxy proxy-b"):
        await nobody.info()


async def test_a_repository_the_agent_does_not_serve_is_named_with_those_it_does(
        agent: Agent) -> None:
    with pytest.raises(MoverLost, match=r"serves no repository named 'elsewhere' \(it serves: "
                                        r"main\)"):
        await AgentMovers(client(agent)).start("target", {"repository": "elsewhere",
                                                          "rules": {}, "token": "t" * 43})


async def test_a_mover_dies_when_the_managers_stream_closes(agent: Agent) -> None:
    rules = {"block_size": 1 << 20, "compression_level": 3, "bandwidth_limit": None,
             "tls": {"certfile": "", "keyfile": "", "cafile": ""}}
    mover = await AgentMovers(client(agent)).start("target", {
        "repository": "main", "rules": rules, "token": "t" * 32, "index_out": "unused",
        "host": "127.0.0.1", "port": 0})
    address = await mover.listening(30)
    assert address["host"] == "127.0.0.1"
    pid = mover.pid
    os.kill(pid, 0)  # it runs

    await mover._session.close()  # the Manager goes away without a word

    for _ in range(100):
        if not agent.movers:
            break
        await asyncio.sleep(0.1)
    assert agent.movers == {}, "the agent forgot the mover"
    for _ in range(100):
        if not running(pid):
            break
        await asyncio.sleep(0.1)
    assert not running(pid), "the mover process was stopped"


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def test_the_fingerprint_command_prints_what_the_agent_serves(tmp_path: Path) -> None:
    path = agent_config(tmp_path, "agent-c", free_port())

    def fingerprint_command() -> str:
        return subprocess.run([sys.executable, "-m", "vbrd.cli.vbrd", "agent", "--config",
                               str(path), "--fingerprint"], capture_output=True, text=True,
                              timeout=60, check=True).stdout.strip()

    printed = await asyncio.to_thread(fingerprint_command)
    again = await asyncio.to_thread(fingerprint_command)
    service = Agent(load_agent_config(path))
    service.prepare()
    await service.start()
    try:
        served = (await client(service).info())["fingerprint"]
    finally:
        await service.stop()
    assert printed == again == f'fingerprint = "{served}"', "made once, then kept"
    assert (tmp_path / "state" / "agent.key").stat().st_mode & 0o077 == 0


# --------------------------------------------------------------------------------------------
# the agent's own policy: what a request (and so the shared secret) cannot change

MiB = 1 << 20
RULES = {"block_size": MiB, "compression_level": 3, "bandwidth_limit": None,
         "tls": {"certfile": "", "keyfile": "", "cafile": ""}}
ALLOWED_MODULE = "tests.integration.transport_test_modes"


@pytest_asyncio.fixture
async def proxy_agent(tmp_path: Path) -> AsyncIterator[Agent]:
    """A proxy agent that sees datastore ``ds`` at ``tmp_path/ds`` and may load one extra
    plugin module."""
    (tmp_path / "ds" / "vm").mkdir(parents=True)
    policy = (f'plugin_modules = ["{ALLOWED_MODULE}"]\n'
              f'device_root = "{tmp_path / "proxy-root"}"\n'
              f'\n[san_paths]\nds = "{tmp_path / "ds"}"\n')
    service = Agent(load_agent_config(agent_config(tmp_path / "p", "proxy-a", free_port(),
                                                   role="proxy", policy=policy)))
    service.prepare()
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def source_config(*, modules: list[str] | None = None, san_paths: dict[str, str] | None = None,
                  device_root: str = "", tls: object = RULES["tls"]) -> dict[str, object]:
    task = DiskTask(session_id="s-1", vm=VmRef("web01", "vm-42"), disk_key=2000,
                    label="Hard disk 1", capacity=4 * MiB,
                    backing=DatastoreFile("ds", "vm/vm.vmdk"))
    spec = source_to_json(SourceSpec(task=task, modes=["san"], proxy=ProxyContext(
        proxy="proxy-a", san_paths=san_paths or {}, device_root=device_root),
        plugin_modules=modules or []))
    return {"spec": spec, "rules": {**RULES, "tls": tls}, "token": "t" * 43}


async def post_mover(agent: Agent, body: dict[str, object]) -> tuple[int, str]:
    """A request to start a mover exactly as given (not through AgentMovers, which sends
    only what an agent accepts); the status and the agent's first line or error."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {SECRET}"}) as session:
        async with session.post(f"https://{agent.settings.listen}/api/v1/movers", json=body,
                                ssl=False) as response:
            if response.status >= 400:
                return response.status, (await response.json())["error"]
            first = await response.content.readline()
            await asyncio.sleep(0)
            return response.status, first.decode()


async def test_a_request_naming_a_plugin_module_the_agent_does_not_allow_is_refused(
        proxy_agent: Agent, agent: Agent) -> None:
    status, error = await post_mover(proxy_agent, {
        "role": "source", "config": source_config(modules=["os", ALLOWED_MODULE]),
        "peer_certificate": agent.certificate})
    assert status == 400
    assert error == ("agent proxy-a loads only the plugin modules its agent.toml allows "
                     f"({ALLOWED_MODULE}); the request names 'os'")
    assert proxy_agent.movers == {}


@pytest.mark.parametrize(("change", "named"), [
    ({"san_paths": {"ds": "/"}}, "san_paths"),
    ({"device_root": "/"}, "device_root"),
])
async def test_a_request_carrying_its_own_path_map_or_device_root_is_refused(
        proxy_agent: Agent, agent: Agent, change: dict[str, object], named: str) -> None:
    status, error = await post_mover(proxy_agent, {
        "role": "source", "config": source_config(**change),  # type: ignore[arg-type]
        "peer_certificate": agent.certificate})
    assert status == 400
    assert error.startswith(f"agent proxy-a uses its own {named} (agent.toml); the request "
                            f"may not give one")
    assert proxy_agent.movers == {}


@pytest.mark.parametrize("tls", [None, {"certfile": "", "keyfile": "", "cafile": "/etc/ssl"}])
async def test_a_plaintext_data_connection_or_caller_chosen_tls_files_are_refused(
        proxy_agent: Agent, agent: Agent, tls: object) -> None:
    status, error = await post_mover(proxy_agent, {
        "role": "source", "config": source_config(tls=tls),
        "peer_certificate": agent.certificate})
    assert status == 400
    assert "data connections are always TLS with the agent's own files" in error
    status, error = await post_mover(agent, {"role": "target", "config": {
        "repository": "main", "rules": {**RULES, "tls": tls}, "token": "t" * 43}})
    assert status == 400
    assert "data connections are always TLS with the agent's own files" in error
    status, error = await post_mover(proxy_agent, {"role": "source",
                                                   "config": source_config()})
    assert status == 400 and "needs the repository agent's certificate" in error


@pytest.mark.parametrize("token", [None, "", "short", 12345])
async def test_a_mover_without_a_task_token_worth_the_name_is_refused(
        agent: Agent, token: object) -> None:
    status, error = await post_mover(agent, {"role": "target", "config": {
        "repository": "main", "rules": RULES, "token": token}})
    assert (status, error) == (400, "a mover's task token must be a string of at least 32 "
                                    "characters")
    assert agent.movers == {}


async def test_an_agent_refuses_movers_of_the_role_it_does_not_have(
        proxy_agent: Agent, agent: Agent) -> None:
    with pytest.raises(MoverLost, match="agent agent-a is a repository agent; it starts no "
                                        "proxy-side \\(source\\) data movers"):
        await AgentMovers(client(agent), agent.certificate).start("source", source_config())
    with pytest.raises(MoverLost, match="agent proxy-a is a proxy agent; it starts no "
                                        "repository-side \\(target\\) data movers"):
        await AgentMovers(client(proxy_agent)).start("target", {
            "repository": "main", "rules": RULES, "token": "t" * 43})
    assert agent.movers == {} and proxy_agent.movers == {}
    assert (await client(proxy_agent).info())["role"] == "proxy"


@pytest.mark.parametrize("peer", ["TWO", "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n"
                                         "-----END CERTIFICATE-----\n", "not a certificate"])
async def test_a_peer_certificate_that_is_not_exactly_one_certificate_is_refused(
        proxy_agent: Agent, agent: Agent, peer: str) -> None:
    if peer == "TWO":
        peer = agent.certificate + proxy_agent.certificate
    status, error = await post_mover(proxy_agent, {
        "role": "source", "config": source_config(), "peer_certificate": peer})
    assert status == 400
    assert error.startswith("the peer certificate must be exactly one PEM X.509 certificate")
    assert proxy_agent.movers == {}
    assert list((proxy_agent.settings.state_dir / "movers").iterdir()) == []


async def test_a_proxy_agent_reads_through_its_own_datastore_map_into_a_repository_agent(
        proxy_agent: Agent, agent: Agent, tmp_path: Path) -> None:
    """The Manager's spec names the datastore; where the proxy sees it, the proxy's agent
    alone says (the Manager's own san_paths for that proxy never reach it)."""
    raw = make_raw(tmp_path / "disk.raw", 4 * MiB, [(MiB, b"\x07" * 9000), (3 * MiB, b"x")])
    convert(raw, tmp_path / "ds" / "vm" / "vm.vmdk", "monolithicFlat")
    task = DiskTask(session_id="s-1", vm=VmRef("web01", "vm-42"), disk_key=2000,
                    label="Hard disk 1", capacity=4 * MiB,
                    backing=DatastoreFile("ds", "vm/vm.vmdk"))
    spec = SourceSpec(task=task, modes=["san"], proxy=ProxyContext(
        proxy="proxy-a", san_paths={"ds": "/the/backup/servers/view"}, device_root="/x"))
    started: list[Path] = []
    original = proxy_agent._source_config

    def spy(config: dict[str, object], workdir: Path, peer: object) -> dict[str, object]:
        started.append(workdir)
        return original(config, workdir, peer)  # type: ignore[arg-type]

    proxy_agent._source_config = spy  # type: ignore[method-assign]
    result = await run_transfer(
        spec, "main", TransferRules(MiB, 3, tls=TlsSettings()), on_progress=lambda _: None,
        index_out=str(tmp_path / "disk.map"),
        source_host=AgentMovers(client(proxy_agent), agent.certificate),
        target_host=AgentMovers(client(agent)))

    assert result.modes_used == ["san"]
    repo = Repository.open(agent.settings.repositories["main"].path)
    data = raw.read_bytes()
    for entry in read_block_map(str(tmp_path / "disk.map")).entries():
        block = data[entry.block_no * MiB:entry.block_no * MiB + entry.length]
        assert (repo.read_block(entry.digest, entry.length) if entry.digest else bytes(MiB)) \
            == block
    (workdir,) = started
    assert workdir.parent.stat().st_mode & 0o777 == 0o700


async def test_each_movers_work_directory_is_its_own_and_private(
        proxy_agent: Agent, agent: Agent) -> None:
    first = await AgentMovers(client(proxy_agent), agent.certificate).start(
        "source", source_config())
    second = await AgentMovers(client(proxy_agent), agent.certificate).start(
        "source", source_config())
    try:
        dirs = [m.workdir for m in proxy_agent.movers.values()]
        assert len(set(dirs)) == 2
        for mover in proxy_agent.movers.values():
            environ = Path(f"/proc/{mover.process.pid}/environ").read_bytes().split(b"\0")
            assert f"TMPDIR={mover.workdir}".encode() in environ, "its temporary files too"
        for workdir in dirs:
            assert workdir.stat().st_mode & 0o777 == 0o700
            assert (workdir / "peer.pem").stat().st_mode & 0o777 == 0o600
            assert (workdir / "peer.pem").read_text() == agent.certificate
    finally:
        await first.kill()
        await second.kill()
    assert all(not d.exists() for d in dirs)
