"""Guest processing of Linux guests over SSH (processor ``ssh``).

The job's scripts are uploaded with SFTP into a private ``mktemp -d`` folder, run there
(with ``sudo -n`` when the job asks to ``elevate``, so the login account needs passwordless
sudo) and removed at the end. Host keys are checked as the job's ``host_key_check`` says:
``known_hosts`` (only keys in the job's ``known_hosts`` file), ``tofu`` (the first key seen
is recorded there, a changed key is refused) or ``off``. When SSH cannot reach the guest,
the Manager moves on to VIX.
"""
from __future__ import annotations

from vbrd import hookimpl
from vbrd.protocols import GuestProcessor

from .ssh import SshProcessor


@hookimpl
def vbrd_guest_processors() -> list[GuestProcessor]:
    return [SshProcessor()]
