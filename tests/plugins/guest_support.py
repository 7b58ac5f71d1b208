"""What the guest processor tests share: processors loaded through the hook, a job config
pointing at real guest endpoints, a context recording the session log, and test scripts.

The context stands in for the Manager's ``SessionContext`` with exactly the attributes a
guest processor is documented to use (``config``, ``job``, ``vsphere``, ``session_id``,
``say``); the processors, the guests and the config loader are the real ones.
"""
from __future__ import annotations

import json
import os
import secrets
import textwrap
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy
import pytest

from vbrd import PROJECT_NAME, hookspecs
from vbrd.config import Config, JobSettings, load_config
from vbrd.lab.guests import (
    GuestEndpoint,
    read_guest,
    start_linux_guest,
    start_windows_guest,
    stop_guest,
)
from vbrd.models import VmRef
from vbrd.protocols import GuestProcessor

JOB = "guest-test"


def processor_from_plugin(plugin: ModuleType, name: str) -> GuestProcessor:
    """The processor ``name`` as the daemon gets it: through ``vbrd_guest_processors``."""
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    manager.register(plugin)
    found = {p.name: p for provided in manager.hook.vbrd_guest_processors() for p in provided}
    return found[name]


@dataclass
class RecordingContext:
    """The parts of the Manager's SessionContext a guest processor uses."""

    config: Config
    job: JobSettings
    vsphere: Any = None
    session_id: str = "test-session"
    lines: list[tuple[str, str]] = field(default_factory=list)

    def say(self, level: str, message: str, *, vm: str = "", disk: int | None = None) -> None:
        self.lines.append((level, message))

    @property
    def log_text(self) -> str:
        return "\n".join(f"{level}: {message}" for level, message in self.lines)

    def warnings(self) -> list[str]:
        return [message for level, message in self.lines if level == "warning"]


def write_config(directory: Path, *, guest: dict[str, Any],
                 linux: GuestEndpoint | None = None, windows: GuestEndpoint | None = None,
                 vcenter: dict[str, Any] | None = None, plugins: str = "",
                 linux_key: bool = False) -> Config:
    """A vbrd config with one job ``guest-test`` whose guest table is ``guest``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vc-password").write_text((vcenter or {}).get("password", "unused") + "\n")
    vc_url = (vcenter or {}).get("url", "http://127.0.0.1:9/sdk")
    vc_user = (vcenter or {}).get("user", "user")
    parts = [f"""
        [daemon]
        state_dir = "{directory / 'state'}"
        api_listen = ""

        [vcenters.lab]
        url = "{vc_url}"
        user = "{vc_user}"
        password_file = "{directory / 'vc-password'}"
        verify_tls = false

        [repositories.default]
        path = "{directory / 'repo'}"
        """]
    if linux is not None:
        key = f'key_file = "{linux.key_file}"' if linux_key and linux.key_file else ""
        password = "" if linux_key else f'password_file = "{linux.password_file}"'
        parts.append(f"""
        [credentials.linux-guest]
        user = "{linux.user}"
        {password}
        {key}
        """)
    if windows is not None:
        parts.append(f"""
        [credentials.windows-guest]
        user = "{windows.user}"
        password_file = "{windows.password_file}"
        """)
    if plugins:
        parts.append(plugins)
    # the guests listen on loopback addresses; VMware Tools would report them there
    table = {"enabled": True, "timeout": "60s", "networks": ["127.0.0.0/8"], **guest}
    if linux is not None:
        table.setdefault("linux_credentials", "linux-guest")
        table.setdefault("ssh_port", linux.port)
    if windows is not None:
        table.setdefault("windows_credentials", "windows-guest")
        table.setdefault("winrm_port", windows.port)
    parts.append(f"""
        [jobs.{JOB}]
        vcenter = "lab"
        repository = "default"
        vms = ["linux-vm", "windows-vm"]

        [jobs.{JOB}.guest]
        """ + "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items()))
    path = directory / f"vbrd-{uuid.uuid4().hex[:8]}.toml"
    path.write_text("\n".join(textwrap.dedent(p) for p in parts))
    return load_config(path)


def make_context(config: Config, vsphere: Any = None) -> RecordingContext:
    return RecordingContext(config=config, job=config.jobs[JOB], vsphere=vsphere)


@dataclass
class Rig:
    """One guest processor with a guest to work on (see tests/plugins/test_guest_contract.py)."""

    processor: GuestProcessor
    family: str  # "linux" or "windows": which scripts and credentials the job uses
    vm: VmRef
    root: Path  # the guest's files, on this machine
    workdir: Path  # the backup server's side: job scripts and configs
    configure: Callable[[dict[str, Any]], RecordingContext]
    to_host: Callable[[str], Path]  # a path the guest reports -> this machine's path
    unreachable: VmRef
    break_connection: Callable[[RecordingContext], Awaitable[None]]
    repair: Callable[[], None]
    password: str

    def context(self, pre: str | None = None, post: str | None = None,
                **guest: Any) -> RecordingContext:
        keys = (("windows_pre_freeze", "windows_post_thaw") if self.family == "windows"
                else ("pre_freeze", "post_thaw"))
        for key, shell, name in zip(keys, (pre, post), ("pre-freeze", "post-thaw"),
                                    strict=True):
            if shell is not None:
                guest[key] = str(script(self.workdir / "scripts", name, self.family, shell))
        return self.configure(guest)


# --------------------------------------------------------------------------------------------
# scripts


def marker_dir(guest_root: Path) -> Path:
    """A fresh folder in the guest's file system that the guest account and root can write."""
    markers = Path(guest_root) / f"markers-{secrets.token_hex(4)}"
    markers.mkdir()
    os.chmod(markers, 0o777)
    return markers


def script(directory: Path, name: str, family: str, shell: str) -> Path:
    """A job script running ``shell`` (sh): as is on Linux; on Windows as the lab stand-in
    (``#lab:`` lines, see vbrd.lab.winrm), inside a .ps1 that real PowerShell would read as
    comments."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [line for line in textwrap.dedent(shell).strip().splitlines() if line.strip()]
    if family == "windows":
        path = directory / f"{name}.ps1"
        path.write_text("# vbrd test script\n" + "".join(f"#lab: {line}\n" for line in lines))
    else:
        path = directory / f"{name}.sh"
        path.write_text("#!/bin/sh\n" + "\n".join(lines) + "\n")
        path.chmod(0o755)
    return path


def marking(markers: Path, phase: str, extra: str = "") -> str:
    """Shell that records that ``phase`` ran (in order) and as which uid."""
    return f"""
        echo {phase} >> {markers}/order
        id -u > {markers}/{phase}.uid
        echo "{phase} says hello"
        {extra}
        """


def order(markers: Path) -> list[str]:
    path = markers / "order"
    return path.read_text().split() if path.exists() else []


# --------------------------------------------------------------------------------------------
# guest endpoints (import these fixtures into a test module to use them)


@pytest.fixture(scope="session")
def guests_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("guests")


@pytest.fixture(scope="session")
def linux_guest(guests_dir: Path) -> Iterator[GuestEndpoint]:
    """The lab's Linux guest (a real sshd, user vbrdguest with passwordless sudo)."""
    endpoint = start_linux_guest(guests_dir)
    try:
        yield endpoint
    finally:
        stop_guest(read_guest(guests_dir, "linux"))


@pytest.fixture(scope="session")
def windows_guest(guests_dir: Path) -> Iterator[GuestEndpoint]:
    """The lab's Windows guest (a WinRM endpoint emulating PowerShell in a sandbox)."""
    endpoint = start_windows_guest(guests_dir)
    try:
        yield endpoint
    finally:
        stop_guest(read_guest(guests_dir, "windows"))


def windows_host_path(root: Path | str, guest_path: str) -> Path:
    """Where a lab Windows guest keeps ``C:\\...`` (its root stands for C:)."""
    drive, _, rest = guest_path.partition(":")
    assert drive.upper() == "C", guest_path
    return Path(root).joinpath(*[p for p in rest.replace("/", "\\").split("\\") if p])


LAB_WINRM = """
[plugins.guest_windows]
transport = "basic"
"""
