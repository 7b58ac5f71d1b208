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

from vbrd.config import AgentAccess, load_agent_config
from vbrd.models import Secret
from vbrd.transport.agent import Agent
from vbrd.transport.movers import MoverLost
from vbrd.transport.remote import AgentClient, AgentMovers, AgentRefused, AgentUnreachable

pytestmark = pytest.mark.asyncio(loop_scope="session")

SECRET = "agent-secret-for-the-unit-tests-0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def agent_config(directory: Path, name: str, port: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "secret").write_text(SECRET + "\n")
    path = directory / "agent.toml"
    path.write_text(f"""
[agent]
name = "{name}"
listen = "127.0.0.1:{port}"
state_dir = "state"
secret_file = "secret"

[repositories.main]
path = "repo"
""")
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
                                                          "rules": {}})


async def test_a_mover_dies_when_the_managers_stream_closes(agent: Agent) -> None:
    rules = {"block_size": 1 << 20, "compression_level": 3, "bandwidth_limit": None,
             "tls": None}
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
