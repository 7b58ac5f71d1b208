"""Guest processing through VMware Tools (processor ``vix``): the way in of last resort.

The vSphere Guest Operations API runs programs in the guest and moves files in and out of it
through vCenter and VMware Tools, so it needs no network path to the guest, only running
Tools and the guest account's password (a key file is no use here). It serves Linux, Windows
and other guests, after SSH or WinRM could not reach them. The guest's identity is vCenter's
own (the VM is addressed by its moref, never by an address the guest reports): what connect
checks is that the VM behind the moref still has the BIOS UUID the session planned with and
that its Tools are running.

The scripts are uploaded into a temporary folder the Tools create for the login account,
run through ``/bin/sh -c`` (Linux) or ``cmd.exe /c`` (Windows, ``.ps1`` scripts with
``powershell.exe -File``) with their output redirected to a file beside them, which is read
back when the program has ended (polled with ListProcessesInGuest, within the job's
``timeout``); the folder is removed at the end.

What VIX cannot do, and says so in the session log:

- elevation: programs run as the login account, without sudo or UAC elevation; a job that
  asks to ``elevate`` gets a warning naming the account;
- Windows application discovery and transaction log truncation, which need WinRM: with
  ``log_handling = "truncate"`` the logs are left as they are, with a warning.
"""
from __future__ import annotations

from vbrd import hookimpl
from vbrd.protocols import GuestProcessor

from .vix import VixProcessor


@hookimpl
def vbrd_guest_processors() -> list[GuestProcessor]:
    return [VixProcessor()]
