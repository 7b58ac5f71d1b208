"""Guest processing of Windows guests over WinRM (processor ``winrm``).

The job's scripts (``.ps1``, ``.bat`` or ``.cmd``) are uploaded into a new folder under the
login user's ``%TEMP%`` (readable only by that user, SYSTEM and Administrators) in chunks
that fit a command line, run there with PowerShell, and removed at the end. WinRM runs
commands with the account's full token, so there is no separate elevation step: use an
account that is an administrator of the guest. When WinRM cannot reach the guest, the
Manager moves on to VIX.

Only addresses inside the job's guest ``networks`` are contacted: VMware Tools report what
the guest says about itself. Once the shell is open, before anything is uploaded or run, the
guest must show the VM's BIOS UUID as its SMBIOS UUID (``(Get-CimInstance
Win32_ComputerSystemProduct).UUID``); any other machine is refused.

How to speak WinRM is set in ``[plugins.guest_windows]`` (see :class:`.options.WinRmOptions`)::

    [plugins.guest_windows]
    transport = "ntlm"          # ntlm | kerberos | credssp | basic | plaintext
    scheme = "http"             # http | https (the port is the job's winrm_port)
    server_cert_validation = "validate"   # or "ignore", for https

The lab's Windows guest speaks only HTTP Basic, so the lab's configuration sets
``transport = "basic"``; real Windows guests keep the default, NTLM with message encryption.

Applications and transaction logs
---------------------------------
Application discovery asks for the services ``MSSQLSERVER`` (SQL Server, default instance),
``MSExchangeIS`` (Exchange) and ``NTDS`` (Active Directory). After the backup, the job's
``log_handling`` decides:

- ``truncate``, and only when the backup succeeded:

  - SQL Server: for every online user database in the full recovery model, a log backup to
    the ``NUL`` device, in one T-SQL batch run by ``sqlcmd -E`` (so the WinRM account needs the
    SQL Server sysadmin role) that finds the databases and names each with ``QUOTENAME`` in
    its ``BACKUP LOG``: database names never travel through PowerShell. A log that cannot be
    backed up is named in the error, the others are truncated all the same. The log is then
    reusable and stops growing; point-in-time restore between image backups is given up,
    which is what truncation means.
  - Exchange: not truncated. Exchange truncates its logs only after a *full* VSS backup, and
    the snapshot's VSS backup through VMware Tools quiescing is *copy-only*; the session log
    says so with a warning.
  - Active Directory: nothing to do (circular logging); said in the session log.
- ``copy_only``: nothing is truncated for any application; the image backup is copy-only and
  does not disturb another product's log backup chain (SQL Server log backups, Exchange
  full backups). This is the default.
- ``leave``: nothing is done for any application either; said for clarity when logs are
  managed entirely outside vbrd.

Whatever ``log_handling`` says, VMware Tools quiescing (the quiesced snapshot) is a
copy-only VSS backup and never truncates a log by itself.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vbrd import hookimpl
from vbrd.protocols import GuestProcessor

from .options import WinRmOptions

if TYPE_CHECKING:
    from vbrd.models import VmRef

    from .remote import WinRmSession


class WinRmProcessor:
    """pywinrm is imported when a guest is first processed, not when the daemon starts."""

    name = "winrm"
    families: tuple[str, ...] = ("windows",)
    rank = 10

    async def connect(self, vm: VmRef, context: Any) -> WinRmSession:
        from .remote import connect

        return await connect(vm, context)

PLUGIN_TABLE = "guest_windows"


@hookimpl
def vbrd_guest_processors() -> list[GuestProcessor]:
    return [WinRmProcessor()]


@hookimpl
def vbrd_validate_plugin_config(name: str, table: dict[str, Any]) -> list[str] | None:
    if name != PLUGIN_TABLE:
        return None
    return WinRmOptions.problems(table)
