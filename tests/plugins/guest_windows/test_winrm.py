"""The winrm guest processor against the lab's Windows guest (vbrd.lab.winrm): uploads,
application discovery and transaction log handling. The endpoint's own records are the
evidence: ``commands.jsonl`` (every command it received) and ``sql.jsonl`` (every log
backup to NUL). What the contract suite checks for every processor is not repeated."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import uuid
from pathlib import Path
from typing import Any

import pytest

import plugins.guest_windows
from plugins.guest_windows import vbrd_validate_plugin_config
from tests.plugins.guest_support import (
    LAB_WINRM,
    RecordingContext,
    make_context,
    marker_dir,
    marking,
    order,
    processor_from_plugin,
    script,
    write_config,
)
from vbrd.errors import GuestError, GuestIdentityError, GuestUnreachable
from vbrd.lab.guests import GuestEndpoint
from vbrd.models import VmRef

WINRM = processor_from_plugin(plugins.guest_windows, "winrm")


def vm_at(guest: GuestEndpoint) -> VmRef:
    return VmRef("windows-vm", "vm-2", "windows", uuid=guest.system_uuid,
                 ip_addresses=(guest.host,))


def records(guest: GuestEndpoint, name: str) -> list[dict[str, Any]]:
    path = Path(guest.root) / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def install(guest: GuestEndpoint, services: list[str], databases: list[Any]) -> None:
    """What the guest "runs": its services and SQL Server databases (read live)."""
    (Path(guest.root) / "services.json").write_text(json.dumps(services))
    (Path(guest.root) / "databases.json").write_text(json.dumps(databases))


async def backup(guest: GuestEndpoint, tmp_path: Path, *, success: bool = True,
                 **table: Any) -> tuple[RecordingContext, list[dict[str, Any]]]:
    """One guest session around a (pretend) backup; returns the log and the truncations."""
    before = len(records(guest, "sql.jsonl"))
    ctx = make_context(write_config(tmp_path / "config", windows=guest, guest=table,
                                    plugins=LAB_WINRM))
    session = await WINRM.connect(vm_at(guest), ctx)
    try:
        await session.prepare()
        await session.freeze()
        await session.thaw()
        await session.after_backup(success)
    finally:
        await session.close()
    return ctx, records(guest, "sql.jsonl")[before:]


# --------------------------------------------------------------------------------------------
# scripts


@pytest.mark.lab
async def test_the_endpoint_saw_the_scripts_run_from_the_injected_copies(windows_guest,
                                                                         tmp_path):
    install(windows_guest, [], [])
    markers = marker_dir(Path(windows_guest.root))
    pre = script(tmp_path, "pre-freeze", "windows", marking(markers, "pre-freeze"))
    post = script(tmp_path, "post-thaw", "windows", marking(markers, "post-thaw"))
    seen_before = len(records(windows_guest, "commands.jsonl"))
    await backup(windows_guest, tmp_path, windows_pre_freeze=str(pre),
                 windows_post_thaw=str(post))
    assert order(markers) == ["pre-freeze", "post-thaw"]
    scripts = [c["powershell"] or "" for c in records(windows_guest, "commands.jsonl")
               [seen_before:]]
    runs = [s for s in scripts if s.startswith("$ErrorActionPreference = 'Stop'\n& ")]
    assert len(runs) == 2
    assert "\\vbrd-" in runs[0] and runs[0].split("\n")[1].endswith("\\pre-freeze.ps1'")
    assert runs[1].split("\n")[1].endswith("\\post-thaw.ps1'")


@pytest.mark.lab
async def test_a_script_larger_than_a_command_line_arrives_byte_for_byte(windows_guest,
                                                                         tmp_path):
    install(windows_guest, [], [])
    markers = marker_dir(Path(windows_guest.root))
    pre = tmp_path / "pre-freeze.ps1"
    filler = "".join(f"# {secrets.token_hex(40)}\n" for _ in range(400))  # ~33 KiB
    checksum = f'#lab: sha256sum "${{VBRD_GUEST_SCRIPT:-$0}}" > {markers}/sum\n'
    pre.write_text(f'{checksum}{filler}Write-Output "done"\n')
    await backup(windows_guest, tmp_path, windows_pre_freeze=str(pre))
    assert (markers / "sum").read_text().split()[0] == hashlib.sha256(pre.read_bytes()).hexdigest()


@pytest.mark.lab
async def test_scripts_that_windows_cannot_run_are_refused_before_connecting(windows_guest,
                                                                              tmp_path):
    sh = script(tmp_path, "pre-freeze", "linux", "true")
    ctx = make_context(write_config(tmp_path / "config", windows=windows_guest,
                                    guest={"windows_pre_freeze": str(sh)}, plugins=LAB_WINRM))
    with pytest.raises(GuestError, match=r"must be a \.ps1, \.bat or \.cmd file"):
        await WINRM.connect(vm_at(windows_guest), ctx)


@pytest.mark.lab
async def test_a_refused_login_is_a_failure_not_unreachable(windows_guest, tmp_path):
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    guest = dataclasses.replace(windows_guest, password_file=str(wrong))
    ctx = make_context(write_config(tmp_path / "config", windows=guest, guest={},
                                    plugins=LAB_WINRM))
    with pytest.raises(GuestError, match="WinRM login as Administrator .* was refused") as e:
        await WINRM.connect(vm_at(windows_guest), ctx)
    assert not isinstance(e.value, GuestUnreachable)


@pytest.mark.lab
async def test_ntlm_against_an_endpoint_that_speaks_only_basic_is_refused(windows_guest,
                                                                         tmp_path):
    """The default transport never falls back to sending the password in the clear."""
    ctx = make_context(write_config(tmp_path / "config", windows=windows_guest, guest={}))
    with pytest.raises(GuestError, match=r"refused \(ntlm\)"):
        await WINRM.connect(vm_at(windows_guest), ctx)


# --------------------------------------------------------------------------------------------
# applications and transaction logs

DATABASES = ["sales", "hr", "master", {"name": "scratch", "recovery_model": "SIMPLE"},
             {"name": "archive", "state": "OFFLINE"}]


@pytest.mark.lab
async def test_truncate_backs_up_the_log_of_every_online_full_recovery_database_to_nul(
        windows_guest, tmp_path):
    install(windows_guest, ["MSSQLSERVER"], DATABASES)
    ctx, truncated = await backup(windows_guest, tmp_path, log_handling="truncate")
    assert sorted(t["database"] for t in truncated) == ["hr", "sales"]
    assert all(t["query"] == f"BACKUP LOG [{t['database']}] TO DISK = N'NUL'" for t in truncated)
    assert "applications found: MSSQLSERVER" in ctx.log_text
    assert "truncated (log backup to NUL) for sales, hr" in ctx.log_text


# A name that ends a PowerShell string with a typographic quote and runs a statement of its
# own if it is ever spliced into a script; the guest's C:\pwned would show that it ran.
HOSTILE = "x\u201d; New-Item -ItemType Directory 'C:\\pwned'; \u201c"


@pytest.mark.lab
async def test_a_database_name_with_typographic_quotes_cannot_break_out(windows_guest, tmp_path):
    install(windows_guest, ["MSSQLSERVER"], ["sales", HOSTILE])
    seen_before = len(records(windows_guest, "commands.jsonl"))
    ctx, truncated = await backup(windows_guest, tmp_path, log_handling="truncate")
    assert not (Path(windows_guest.root) / "pwned").exists()
    assert sorted(t["database"] for t in truncated) == sorted(["sales", HOSTILE])
    assert {t["query"] for t in truncated} == {
        "BACKUP LOG [sales] TO DISK = N'NUL'", f"BACKUP LOG [{HOSTILE}] TO DISK = N'NUL'"}
    sent = records(windows_guest, "commands.jsonl")[seen_before:]
    assert not any("pwned" in (c["powershell"] or c["command_line"]) for c in sent), \
        "database names stay inside SQL Server"
    assert f"truncated (log backup to NUL) for sales, {HOSTILE}" in ctx.log_text


@pytest.mark.lab
async def test_a_log_that_cannot_be_backed_up_is_named_and_the_others_are_truncated(
        windows_guest, tmp_path):
    install(windows_guest, ["MSSQLSERVER"], [
        "sales", {"name": "new]db", "log_backup_error":
                  "BACKUP LOG cannot be performed because there is no current database backup."}])
    with pytest.raises(GuestError, match=r"new\]db.*no current database backup"):
        await backup(windows_guest, tmp_path, log_handling="truncate")
    assert records(windows_guest, "sql.jsonl")[-1]["database"] == "sales"


@pytest.mark.lab
@pytest.mark.parametrize("mode", ["copy_only", "leave"])
async def test_copy_only_and_leave_never_touch_a_log(windows_guest, tmp_path, mode):
    install(windows_guest, ["MSSQLSERVER"], DATABASES)
    ctx, truncated = await backup(windows_guest, tmp_path, log_handling=mode)
    assert truncated == []
    assert f"left as they are (log_handling = {mode})" in ctx.log_text


@pytest.mark.lab
async def test_a_failed_backup_truncates_nothing(windows_guest, tmp_path):
    install(windows_guest, ["MSSQLSERVER"], DATABASES)
    ctx, truncated = await backup(windows_guest, tmp_path, success=False,
                                  log_handling="truncate")
    assert truncated == []
    assert "the backup did not succeed" in ctx.log_text


@pytest.mark.lab
async def test_exchange_logs_are_not_truncated_and_the_log_says_why(windows_guest, tmp_path):
    install(windows_guest, ["MSExchangeIS", "NTDS"], [])
    ctx, truncated = await backup(windows_guest, tmp_path, log_handling="truncate")
    assert truncated == []
    assert "applications found: MSExchangeIS, NTDS" in ctx.log_text
    assert any("Exchange" in w and "copy-only" in w for w in ctx.warnings())
    assert "Active Directory needs no log truncation" in ctx.log_text


@pytest.mark.lab
async def test_a_guest_without_applications_gets_no_log_handling(windows_guest, tmp_path):
    install(windows_guest, [], DATABASES)
    ctx, truncated = await backup(windows_guest, tmp_path, log_handling="truncate")
    assert truncated == []
    assert "applications found: none" in ctx.log_text
    assert "transaction log" not in ctx.log_text


# --------------------------------------------------------------------------------------------
# [plugins.guest_windows]


def test_the_plugin_validates_its_own_table_only():
    assert vbrd_validate_plugin_config("guest_linux", {"anything": 1}) is None
    assert vbrd_validate_plugin_config("guest_windows", {"transport": "basic"}) == []
    problems = vbrd_validate_plugin_config("guest_windows", {"transport": "telnet",
                                                             "port": 5985})
    assert problems is not None and len(problems) == 2
    assert any("plugins.guest_windows.transport" in p and "telnet" in p for p in problems)
    assert any("plugins.guest_windows.port: unknown key" in p for p in problems)


# --------------------------------------------------------------------------------------------
# who the guest is


@pytest.mark.lab
async def test_a_machine_that_is_not_the_vm_is_refused_before_anything_is_uploaded_or_run(
        windows_guest, tmp_path):
    """VM sql02's Tools report the address of another machine (the lab guest): the one
    command that machine gets is the identity query; no script reaches it."""
    markers = marker_dir(Path(windows_guest.root))
    pre = script(tmp_path, "pre-freeze", "windows", marking(markers, "pre-freeze"))
    ctx = make_context(write_config(tmp_path / "config", windows=windows_guest,
                                    guest={"windows_pre_freeze": str(pre)}, plugins=LAB_WINRM))
    other = VmRef("sql02", "vm-9", "windows", uuid=str(uuid.uuid4()),
                  ip_addresses=(windows_guest.host,))
    seen_before = len(records(windows_guest, "commands.jsonl"))
    with pytest.raises(GuestIdentityError) as refused:
        await WINRM.connect(other, ctx)
    message = str(refused.value).lower()  # Windows shows UUIDs in capitals
    assert other.uuid in message and windows_guest.system_uuid in message
    scripts = [c["powershell"] or "" for c in records(windows_guest, "commands.jsonl")
               [seen_before:]]
    assert scripts == ["(Get-CimInstance Win32_ComputerSystemProduct).UUID\nexit 0\n"]
    assert order(markers) == []


@pytest.mark.lab
async def test_an_address_outside_the_guest_networks_gets_no_request_at_all(windows_guest,
                                                                            tmp_path):
    ctx = make_context(write_config(tmp_path / "config", windows=windows_guest,
                                    guest={"networks": ["192.0.2.0/24"]}, plugins=LAB_WINRM))
    seen_before = len(records(windows_guest, "commands.jsonl"))
    with pytest.raises(GuestUnreachable, match="192.0.2.0/24"):
        await WINRM.connect(vm_at(windows_guest), ctx)
    assert len(records(windows_guest, "commands.jsonl")) == seen_before
