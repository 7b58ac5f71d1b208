"""The lab's guest endpoints, as vbrd's guest processors will meet them.

The Linux guest is checked with asyncssh (what the Linux guest processor uses), the Windows
guest with unmodified pywinrm (what the Windows guest processor uses). Each guest is started
and stopped through vbrd.lab.guests directly, without the simulated vCenter.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import requests
import winrm
from winrm.exceptions import InvalidCredentialsError

from vbrd.lab.guests import (
    GuestEndpoint,
    read_guest,
    set_guest_running,
    start_linux_guest,
    start_windows_guest,
    stop_guest,
)

pytestmark = pytest.mark.lab


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def process_tree(pid: int) -> set[tuple[int, str]]:
    """``pid`` and its descendants as (pid, start time), so that a reused pid never matches."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), fields[19])
    found = {(pid, table[pid][1])} if pid in table else set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, started) in table.items():
            if ppid == parent:
                found.add((child, started))
                todo.append(child)
    return found


def still_running(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    alive = set()
    for pid, started in processes:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[19] == started and fields[0] != "Z":
            alive.add((pid, started))
    return alive


def wait_for_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)
    return path.read_text().strip()


def password(endpoint: GuestEndpoint) -> str:
    return Path(endpoint.password_file).read_text().strip()


def ssh_connect(endpoint: GuestEndpoint, **kwargs: object) -> Any:
    """asyncssh.connect for this guest, as an async context manager."""
    options: dict[str, object] = {"username": endpoint.user, "password": password(endpoint),
                                  "known_hosts": endpoint.known_hosts}
    options.update(kwargs)
    return asyncssh.connect(endpoint.host, port=endpoint.port, **options)


def session(endpoint: GuestEndpoint, transport: str = "basic",
            secret: str | None = None) -> winrm.Session:
    return winrm.Session(f"http://{endpoint.host}:{endpoint.port}/wsman",
                         auth=(endpoint.user, secret if secret is not None else password(endpoint)),
                         transport=transport)


def upload_script(data: bytes, path: str, chunk: int = 2000) -> list[str]:
    """PowerShell scripts that upload ``data`` in chunks, as a guest plugin would."""
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] or [b""]
    scripts = []
    for n, piece in enumerate(pieces):
        b64 = base64.b64encode(piece).decode()
        if n == 0:
            scripts.append(f"[IO.File]::WriteAllBytes('{path}', "
                           f"[Convert]::FromBase64String('{b64}'))")
        else:
            scripts.append(f"Add-Content -Encoding Byte -Path '{path}' "
                           f"-Value ([Convert]::FromBase64String('{b64}'))")
    return scripts


# --------------------------------------------------------------------------------------------
# Linux guest: OpenSSH
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linux_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestEndpoint]:
    endpoint = start_linux_guest(tmp_path_factory.mktemp("lab-linux"))
    yield endpoint
    stop_guest(endpoint)


async def test_linux_guest_accepts_the_password_and_its_user_elevates_with_sudo(
        linux_guest: GuestEndpoint) -> None:
    async with ssh_connect(linux_guest) as conn:
        whoami = await conn.run("id -un", check=True)
        elevated = await conn.run("sudo -n id -u", check=True)
    assert str(whoami.stdout).strip() == "vbrdguest"
    assert str(elevated.stdout).strip() == "0"


async def test_linux_guest_accepts_its_key_and_proves_its_host_key(
        linux_guest: GuestEndpoint) -> None:
    async with ssh_connect(linux_guest, password=None,
                           client_keys=[linux_guest.key_file]) as conn:
        result = await conn.run("id -un", check=True)
    assert str(result.stdout).strip() == "vbrdguest"


async def test_linux_guest_rejects_a_wrong_password(linux_guest: GuestEndpoint) -> None:
    with pytest.raises(asyncssh.PermissionDenied):
        async with ssh_connect(linux_guest, password="not-the-password", client_keys=None):
            pass


async def test_linux_guest_user_writes_markers_into_the_guest_root_without_sudo(
        linux_guest: GuestEndpoint) -> None:
    async with ssh_connect(linux_guest) as conn:
        await conn.run('echo frozen > "$VBRD_GUEST_ROOT/pre-freeze.marker"', check=True)
        async with conn.start_sftp_client() as sftp:
            await sftp.put(__file__, f"{linux_guest.root}/uploaded.py")
    marker = Path(linux_guest.root) / "pre-freeze.marker"
    assert marker.read_text() == "frozen\n"
    assert (Path(linux_guest.root) / "uploaded.py").read_bytes() == Path(__file__).read_bytes()


async def test_linux_guest_switched_off_refuses_connections_and_comes_back_on_the_same_port(
        tmp_path: Path) -> None:
    endpoint = start_linux_guest(tmp_path)
    try:
        set_guest_running(tmp_path, "ssh", False)
        with pytest.raises(ConnectionRefusedError):
            async with ssh_connect(endpoint):
                pass
        set_guest_running(tmp_path, "ssh", True)
        async with ssh_connect(endpoint) as conn:
            result = await conn.run("sudo -n id -u", check=True)
        assert str(result.stdout).strip() == "0"
        assert read_guest(tmp_path, "linux").port == endpoint.port
    finally:
        stop_guest(endpoint)


async def test_stopping_the_linux_guest_ends_sshd_and_open_sessions(tmp_path: Path) -> None:
    endpoint = start_linux_guest(tmp_path)
    try:
        async with ssh_connect(endpoint) as conn:
            # a session that would outlive a careless stop: a detached, elevated sleeper
            await conn.run(f'sudo -n setsid sh -c \'echo $$ > {endpoint.root}/sleeper; '
                           f'exec sleep 300\' > /dev/null 2>&1 &', check=True)
            sleeper = int(wait_for_file(Path(endpoint.root) / "sleeper"))
            before = process_tree(endpoint.pid)
            assert sleeper in {pid for pid, _ in before}
            await asyncio.to_thread(stop_guest, endpoint)
    except (asyncssh.ConnectionLost, asyncssh.DisconnectError):
        pass
    assert len(before) >= 3
    assert still_running(before) == set()


def test_guest_endpoint_round_trips_through_json(linux_guest: GuestEndpoint) -> None:
    text = json.dumps(linux_guest.to_dict())
    assert GuestEndpoint.from_dict(json.loads(text)) == linux_guest


# --------------------------------------------------------------------------------------------
# Windows guest: WS-Management for unmodified pywinrm
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def windows_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestEndpoint]:
    endpoint = start_windows_guest(tmp_path_factory.mktemp("lab-windows"))
    yield endpoint
    stop_guest(endpoint)


@pytest.mark.parametrize("transport", ["basic", "plaintext"])
def test_pywinrm_runs_a_command_and_gets_its_output_and_exit_code(
        windows_guest: GuestEndpoint, transport: str) -> None:
    guest = session(windows_guest, transport)
    whoami = guest.run_cmd("whoami")
    failed = guest.run_cmd("cmd", ["/c", "exit", "3"])
    assert (whoami.status_code, whoami.std_out) == (0, b"vbrd-win\\administrator\r\n")
    assert failed.status_code == 3


def test_an_unknown_command_fails_and_names_itself(windows_guest: GuestEndpoint) -> None:
    result = session(windows_guest).run_cmd("defrag C: /U")
    assert result.status_code != 0
    assert b"'defrag' is not recognized" in result.std_err


def test_run_ps_uploads_runs_and_removes_a_script(windows_guest: GuestEndpoint) -> None:
    guest = session(windows_guest)
    root = Path(windows_guest.root)
    script = (b"# pre-freeze: flush the application\r\n"
              b"Write-Output 'flushing'\r\n"
              b"#lab: echo \"frozen $1\" > \"$VBRD_GUEST_ROOT/vbrd/froze.marker\"\r\n"
              b"#lab: echo flushed; exit 7\r\n") * 40  # big enough to need chunks
    setup = guest.run_ps("$ErrorActionPreference = 'Stop'\n"
                         "New-Item -ItemType Directory -Force -Path 'C:\\vbrd\\scripts' | Out-Null")
    assert setup.status_code == 0, setup.std_err
    uploads = upload_script(script, "C:\\vbrd\\scripts\\pre-freeze.ps1")
    assert len(uploads) > 1
    for upload in uploads:
        result = guest.run_ps(upload)
        assert result.status_code == 0, result.std_err
    assert (root / "vbrd/scripts/pre-freeze.ps1").read_bytes() == script

    ran = guest.run_ps("& 'C:\\vbrd\\scripts\\pre-freeze.ps1' now\nexit $LASTEXITCODE")
    assert ran.status_code == 7
    assert ran.std_out.splitlines()[0] == b"flushed"
    assert (root / "vbrd/froze.marker").read_text() == "frozen now\n"

    removed = guest.run_ps("Remove-Item -Recurse -Force 'C:\\vbrd\\scripts'")
    assert removed.status_code == 0, removed.std_err
    assert not (root / "vbrd/scripts").exists()


def test_a_batch_file_runs_through_cmd_and_its_exit_code_reaches_lastexitcode(
        windows_guest: GuestEndpoint) -> None:
    guest = session(windows_guest)
    batch = b"@echo off\r\nREM #lab: echo batch ran; exit 4\r\n"
    for upload in upload_script(batch, "C:\\thaw.bat"):
        assert guest.run_ps(upload).status_code == 0
    explicit = guest.run_ps("cmd /c 'C:\\thaw.bat'; exit $LASTEXITCODE")
    implicit = guest.run_ps("cmd /c 'C:\\thaw.bat'")
    direct = guest.run_cmd("cmd /c C:\\thaw.bat")
    assert (explicit.status_code, explicit.std_out) == (4, b"batch ran\n")
    assert implicit.status_code == 1  # as powershell.exe: failure of the last statement
    assert direct.status_code == 4


def test_a_script_without_lab_lines_fails_instead_of_pretending(
        windows_guest: GuestEndpoint) -> None:
    guest = session(windows_guest)
    for upload in upload_script(b"Stop-Service MSSQLSERVER\r\n", "C:\\real-only.ps1"):
        assert guest.run_ps(upload).status_code == 0
    result = guest.run_ps("& 'C:\\real-only.ps1'")
    assert result.status_code == 1
    assert b"C:\\real-only.ps1 has no '#lab:' lines" in result.std_err


def test_an_unknown_statement_fails_the_script_before_anything_runs(
        windows_guest: GuestEndpoint) -> None:
    result = session(windows_guest).run_ps(
        "New-Item -ItemType Directory -Force -Path 'C:\\never'\nStop-Computer -Force")
    assert result.status_code == 1
    assert b"Stop-Computer -Force" in result.std_err
    assert not (Path(windows_guest.root) / "never").exists()


def test_paths_never_leave_the_guest_root(windows_guest: GuestEndpoint) -> None:
    guest = session(windows_guest)
    outside = Path(windows_guest.root).parent / "outside.txt"
    escape = guest.run_ps("[IO.File]::WriteAllBytes('C:\\..\\outside.txt', "
                          "[Convert]::FromBase64String('aGk='))")
    other_drive = guest.run_ps("Remove-Item -Force 'D:\\data'")
    assert escape.status_code == 1 and b"leaves the C: drive" in escape.std_err
    assert other_drive.status_code == 1 and b"drive D: does not exist" in other_drive.std_err
    assert not outside.exists()


def test_application_discovery_reads_the_installed_services(
        windows_guest: GuestEndpoint) -> None:
    services = Path(windows_guest.root) / "services.json"
    services.write_text(json.dumps(["MSSQLSERVER", {"Name": "NTDS", "Status": "Stopped"}]))
    result = session(windows_guest).run_ps(
        "Get-Service -Name MSSQLSERVER,MSExchangeIS,NTDS -ErrorAction SilentlyContinue "
        "| ConvertTo-Json")
    found = json.loads(result.std_out)
    assert [(s["Name"], s["Status"]) for s in found] == [("MSSQLSERVER", "Running"),
                                                         ("NTDS", "Stopped")]
    assert result.std_err == b""


def test_sql_log_truncation_is_recorded_only_where_sql_server_is_installed(
        windows_guest: GuestEndpoint) -> None:
    root = Path(windows_guest.root)
    guest = session(windows_guest)
    (root / "services.json").write_text(json.dumps(["MSSQLSERVER"]))
    truncated = guest.run_ps("sqlcmd -S . -E -Q \"BACKUP LOG [sales] TO DISK='NUL'\"\n"
                             "exit $LASTEXITCODE")
    cmdlet = guest.run_ps("Invoke-Sqlcmd -ServerInstance . -Query \"BACKUP LOG hr TO DISK='NUL'\"")
    (root / "services.json").write_text("[]")
    without_sql = guest.run_ps("Invoke-Sqlcmd -Query \"BACKUP LOG crm TO DISK='NUL'\"")
    assert (truncated.status_code, cmdlet.status_code) == (0, 0), truncated.std_err
    assert without_sql.status_code == 1
    records = [json.loads(line) for line in (root / "sql.jsonl").read_text().splitlines()]
    assert [r["database"] for r in records] == ["sales", "hr"]


def test_every_command_is_logged_decoded_in_order(tmp_path: Path) -> None:
    endpoint = start_windows_guest(tmp_path)
    try:
        guest = session(endpoint)
        guest.run_cmd("hostname")
        guest.run_ps("Test-Path 'C:\\Windows'")
        guest.run_cmd("echo done")
    finally:
        stop_guest(endpoint)
    log = [json.loads(line)
           for line in (Path(endpoint.root) / "commands.jsonl").read_text().splitlines()]
    assert [(e["command_line"].split()[0], e["powershell"]) for e in log] == [
        ("hostname", None), ("powershell", "Test-Path 'C:\\Windows'"), ("echo", None)]


def test_a_command_line_longer_than_windows_allows_fails_as_on_windows(
        windows_guest: GuestEndpoint) -> None:
    too_big = upload_script(b"x" * 6000, "C:\\big.bin", chunk=6000)[0]
    result = session(windows_guest).run_ps(too_big)
    assert result.status_code != 0
    assert b"command line is too long" in result.std_err
    assert not (Path(windows_guest.root) / "big.bin").exists()


def test_a_wrong_password_is_rejected_as_pywinrm_expects(windows_guest: GuestEndpoint) -> None:
    with pytest.raises(InvalidCredentialsError):
        session(windows_guest, secret="not-the-password").run_cmd("whoami")


def test_terminating_a_command_kills_what_it_runs(windows_guest: GuestEndpoint) -> None:
    root = Path(windows_guest.root)
    guest = session(windows_guest)
    for upload in upload_script(b"#lab: echo $$ > \"$VBRD_GUEST_ROOT/long.pid\"; exec sleep 300\n",
                                "C:\\long.ps1"):
        assert guest.run_ps(upload).status_code == 0
    protocol = guest.protocol
    shell = protocol.open_shell()
    command = protocol.run_command(shell, "powershell -Command \"& 'C:\\long.ps1'\"")
    pid = int(wait_for_file(root / "long.pid"))
    sleeper = {(pid, started) for p, started in process_tree(pid) if p == pid}
    assert still_running(sleeper)
    protocol.cleanup_command(shell, command)
    protocol.close_shell(shell)
    deadline = time.monotonic() + 5
    while still_running(sleeper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert still_running(sleeper) == set()


def test_windows_guest_switched_off_refuses_connections_and_comes_back(tmp_path: Path) -> None:
    endpoint = start_windows_guest(tmp_path)
    try:
        set_guest_running(tmp_path, "winrm", False)
        with pytest.raises(requests.exceptions.ConnectionError, match="Connection refused"):
            session(endpoint).run_cmd("whoami")
        set_guest_running(tmp_path, "winrm", True)
        assert session(endpoint).run_cmd("whoami").status_code == 0
    finally:
        stop_guest(endpoint)


def test_stopping_the_windows_guest_leaves_no_process(tmp_path: Path) -> None:
    endpoint = start_windows_guest(tmp_path)
    guest = session(endpoint)
    for upload in upload_script(b"#lab: (setsid sleep 300 &); echo $$ > \"$VBRD_GUEST_ROOT/pid\"; "
                                b"exec sleep 300\n", "C:\\hang.ps1"):
        assert guest.run_ps(upload).status_code == 0
    guest.protocol.run_command(guest.protocol.open_shell(), "powershell -File C:\\hang.ps1")
    wait_for_file(Path(endpoint.root) / "pid")
    before = process_tree(endpoint.pid)
    stop_guest(endpoint)
    assert len(before) >= 4  # supervisor, endpoint, the script's sleep and its detached sleep
    assert still_running(before) == set()


def test_long_running_and_large_outputs_arrive_whole(windows_guest: GuestEndpoint) -> None:
    impatient = winrm.Session(f"http://{windows_guest.host}:{windows_guest.port}/wsman",
                              auth=(windows_guest.user, password(windows_guest)),
                              transport="basic", operation_timeout_sec=1, read_timeout_sec=2)
    script = b"#lab: sleep 1.5; head -c 200000 /dev/zero | tr '\\0' x; exit 2\n"
    for upload in upload_script(script, "C:\\slow.ps1"):
        assert impatient.run_ps(upload).status_code == 0
    result = impatient.run_ps("& 'C:\\slow.ps1'; exit $LASTEXITCODE")
    assert result.status_code == 2
    assert result.std_out == b"x" * 200000
