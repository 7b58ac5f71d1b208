"""``[plugins.guest_windows]``, apart from pywinrm: the daemon checks it at start, and
imports pywinrm only when a Windows guest is processed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vbrd.errors import GuestError

TRANSPORTS = ("ntlm", "kerberos", "credssp", "basic", "plaintext")
SCHEMES = ("http", "https")


@dataclass(frozen=True)
class WinRmOptions:
    """``[plugins.guest_windows]``: how to speak WinRM to the guests.

    ``transport`` is pywinrm's: ``ntlm`` (the default; encrypts messages over HTTP, what a
    domain or workgroup Windows accepts out of the box), ``kerberos``, ``credssp``, or
    ``basic``/``plaintext`` (the password travels base64-encoded: only over ``https``, or for
    an endpoint that offers nothing else, such as the lab's). ``scheme`` is ``http`` (port
    5985) or ``https`` (5986; the port is the job's ``winrm_port``), and
    ``server_cert_validation`` ``validate`` or ``ignore`` for ``https``.
    """

    transport: str = "ntlm"
    scheme: str = "http"
    server_cert_validation: str = "validate"

    @classmethod
    def problems(cls, table: dict[str, Any]) -> list[str]:
        choices = {"transport": TRANSPORTS, "scheme": SCHEMES,
                   "server_cert_validation": ("validate", "ignore")}
        found = []
        for key, value in table.items():
            if key not in choices:
                found.append(f"plugins.guest_windows.{key}: unknown key (known: "
                             f"{', '.join(choices)})")
            elif value not in choices[key]:
                found.append(f"plugins.guest_windows.{key}: must be one of "
                             f"{', '.join(choices[key])}, not {value!r}")
        return found

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> WinRmOptions:
        problems = cls.problems(table)
        if problems:
            raise GuestError("; ".join(problems))
        return cls(**table)
