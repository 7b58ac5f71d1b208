"""The multi-host set-up: a backup server, two proxies and a repository host on this machine.

``hosts`` (one per test session) makes the network namespaces of :mod:`.netns`, starts a
``vbrd agent`` in each proxy's and the repository host's namespace — each with its own
certificate (made at first start, pinned below by the fingerprint that ``vbrd agent
--fingerprint`` printed) and secret — and a lab with two extra VMs of three disks, small
disks. The backup server (the Manager, in-process or as a ``vbrd run`` daemon) stays in the
root namespace, where the lab's vCenter listens on loopback.

Namespaces need root and iproute2. When they cannot be made, the tests are skipped with the
reason — except in CI (``CI=true``), where that is a failure.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.multihost import netns

ROOT = Path(__file__).resolve().parents[2]
AGENT_PORT = 8471
READY_TIMEOUT = 30.0
#: The repositories the repository host's agent serves; each test writes its own, so that
#: its first backup of a VM is a full.
REPOSITORIES = ("r-eight", "r-failover", "r-busy", "r-throttle", "r-checks")
DISK_SCALE = 0.375
EXTRA_VMS = 2


def _unavailable(reason: str) -> None:
    message = f"the multi-host tests cannot run: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@dataclass
class AgentProcess:
    """One ``vbrd agent`` in its host's namespace."""

    name: str
    net: netns.Network
    directory: Path
    repositories: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    fingerprint: str = ""

    @property
    def address(self) -> str:
        return f"{self.net.address(self.name)}:{AGENT_PORT}"

    @property
    def config(self) -> Path:
        return self.directory / "agent.toml"

    @property
    def secret_file(self) -> Path:
        return self.directory / "secret"

    @property
    def log(self) -> Path:
        return self.directory / "agent.log"

    def prepare(self, repo_root: Path, datastores: dict[str, Path]) -> None:
        """A repository agent serving ``repositories`` under ``repo_root``, or (none) a proxy
        agent that sees the lab's ``datastores`` and may load the random-disk test mode."""
        self.directory.mkdir(parents=True)
        self.secret_file.write_text(secrets.token_hex(32) + "\n")
        self.secret_file.chmod(0o600)
        if self.repositories:
            policy = 'role = "repository"\n' + "".join(
                f'\n[repositories.{name}]\npath = "{repo_root / name}"\n'
                for name in self.repositories)
        else:
            policy = ('role = "proxy"\nplugin_modules = ["tests.multihost.random_disk"]\n'
                      '\n[san_paths]\n' + "".join(f'{name} = "{where}"\n'
                                                  for name, where in datastores.items()))
        self.config.write_text(textwrap.dedent(f"""\
            [agent]
            name = "{self.name}"
            listen = "0.0.0.0:{AGENT_PORT}"
            state_dir = "state"
            secret_file = "secret"
            log_level = "info"
            """) + policy)
        printed = subprocess.run(
            [sys.executable, "-m", "vbrd.cli.vbrd", "agent", "--config", str(self.config),
             "--fingerprint"], capture_output=True, text=True, timeout=60, check=True,
            cwd=ROOT).stdout.strip()
        self.fingerprint = printed.removeprefix('fingerprint = "').removesuffix('"')

    def start(self) -> None:
        """Start it in its namespace and wait for its READY (sd_notify)."""
        notify = self.directory / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            notify.unlink()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(str(notify))
            listener.settimeout(READY_TIMEOUT)
            env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [*self.net.exec_prefix(self.name), sys.executable, "-m", "vbrd.cli.vbrd",
                     "agent", "--config", str(self.config)], cwd=ROOT, env=env,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + READY_TIMEOUT
            while True:
                try:
                    message = listener.recv(4096).decode()
                except TimeoutError:
                    message = ""
                if "READY=1" in message:
                    return
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"agent {self.name} did not become ready; its log:\n"
                                       f"{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """Gone at once, as a crashed host: SIGKILL (its data movers die with it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Hosts:
    net: netns.Network
    lab: dict[str, Any]
    base: Path
    agents: dict[str, AgentProcess] = field(default_factory=dict)

    @property
    def repo_root(self) -> Path:
        return self.base / "repos"

    def vm(self, name: str) -> dict[str, Any]:
        return next(v for v in self.lab["vms"] if v["name"] == name)

    def ensure_running(self) -> None:
        """Restart any agent a test killed."""
        for agent in self.agents.values():
            if not agent.running:
                agent.start()

    def manager_config(self, where: Path, body: str = "", *,
                       proxy_tasks: int = 2, repository_tasks: int = 8) -> Path:
        """The backup server's config: the lab's vCenter, the two proxies and the repository
        host's repositories through their agents, plus ``body`` (jobs, traffic rules)."""
        where.mkdir(parents=True, exist_ok=True)
        vc = self.lab["vcenter"]
        datastores = {d["name"]: d for d in self.lab["datastores"]}
        # which datastores the proxies see (this picks the san mode); where they see them
        # only their agents say (agent.toml), so the paths here lead nowhere
        san_paths = "\n".join(f'{name} = "/nowhere/the/agents/map/{name}"'
                              for name in sorted(datastores))
        parts = [textwrap.dedent(f"""\
            [daemon]
            state_dir = "{where / 'state'}"
            api_listen = ""
            api_socket = "{where / 'vbrd.sock'}"
            log_level = "info"

            [vcenters.lab]
            url = "{vc['url']}"
            user = "{vc['user']}"
            password_file = "{vc['password_file']}"
            verify_tls = false
            datacenter = "{vc['datacenter']}"
            """)]
        for name in ("proxy-a", "proxy-b"):
            agent = self.agents[name]
            parts.append(textwrap.dedent(f"""\
                [proxies.{name}]
                address = "{agent.address}"
                fingerprint = "{agent.fingerprint}"
                secret_file = "{agent.secret_file}"
                max_tasks = {proxy_tasks}
                transport_modes = ["san", "nbd"]
                network = "proxies"
                [proxies.{name}.san_paths]
                """) + san_paths + "\n")
        repo = self.agents["repo"]
        for name in REPOSITORIES:
            parts.append(textwrap.dedent(f"""\
                [repositories.{name}]
                path = "{self.repo_root / name}"
                address = "{repo.address}"
                fingerprint = "{repo.fingerprint}"
                secret_file = "{repo.secret_file}"
                max_tasks = {repository_tasks}
                network = "storage"
                """))
        parts.append(textwrap.dedent(body))
        path = where / "vbrd.toml"
        path.write_text("\n".join(parts))
        return path


@pytest.fixture(scope="session")
def hosts() -> Iterator[Hosts]:
    if os.geteuid() != 0:
        _unavailable("network namespaces need root")
    try:
        netns.probe()
    except netns.NetnsUnavailable as e:
        _unavailable(str(e))
    try:
        from vbrd.lab import lab as lab_module
    except ImportError as e:
        _unavailable(f"vbrd.lab cannot be imported ({e})")
    netns.remove_leftovers()
    base = Path(tempfile.mkdtemp(prefix="vbrd-multihost-"))
    base.chmod(0o755)
    lab_dir = base / "lab"
    net = netns.Network()
    hosts: Hosts | None = None
    try:
        try:
            lab_json = lab_module.up(lab_dir, disk_scale=DISK_SCALE, guests=False,
                                     extra_vms=EXTRA_VMS)
        except Exception as e:  # noqa: BLE001 - every cause is reported, by name
            _unavailable(f"the lab did not start: {type(e).__name__}: {e}")
        net.up()
        hosts = Hosts(net, json.loads(lab_json.read_text()), base)
        for name, repositories in (("proxy-a", ()), ("proxy-b", ()), ("repo", REPOSITORIES)):
            agent = AgentProcess(name, net, base / "agents" / name, repositories)
            agent.prepare(hosts.repo_root, {
                d["name"]: Path(hosts.lab["dir"]) / "datastores" / d["name"]
                for d in hosts.lab["datastores"]})
            hosts.agents[name] = agent
        for agent in hosts.agents.values():
            agent.start()
        yield hosts
    finally:
        if hosts is not None:
            for agent in hosts.agents.values():
                agent.stop()
        net.down()
        with contextlib.suppress(Exception):
            lab_module.down(lab_dir)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def multihost(hosts: Hosts) -> Hosts:
    """The hosts, with every agent running (a test before may have killed one)."""
    hosts.ensure_running()
    return hosts
