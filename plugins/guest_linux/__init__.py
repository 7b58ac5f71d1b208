"""Guest processing of Linux guests over SSH (processor ``ssh``).

The job's scripts are uploaded with SFTP into a private ``mktemp -d`` folder, run there
(with ``sudo -n`` when the job asks to ``elevate``, so the login account needs passwordless
sudo) and removed at the end. Host keys are checked as the job's ``host_key_check`` says:
``known_hosts`` (only keys in the job's ``known_hosts`` file), ``tofu`` (the first key seen
is recorded there, a changed key is refused) or ``off``. When SSH cannot reach the guest,
the Manager moves on to VIX.

Only addresses inside the job's guest ``networks`` are contacted: VMware Tools report what
the guest says about itself. Right after login, before any key is recorded, file uploaded or
script run, the guest must show the VM's BIOS UUID as its SMBIOS UUID
(``/sys/class/dmi/id/product_uuid``, root's file: read with ``sudo -n`` when the account
elevates, else directly or, failing that, with ``sudo -n``); any other machine is refused.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vbrd import hookimpl
from vbrd.protocols import GuestProcessor

if TYPE_CHECKING:
    from vbrd.models import VmRef

    from .ssh import SshSession


class SshProcessor:
    """asyncssh is imported when a guest is first processed, not when the daemon starts."""

    name = "ssh"
    families: tuple[str, ...] = ("linux",)
    rank = 10

    async def connect(self, vm: VmRef, context: Any) -> SshSession:
        from .ssh import connect

        return await connect(vm, context)


@hookimpl
def vbrd_guest_processors() -> list[GuestProcessor]:
    return [SshProcessor()]
