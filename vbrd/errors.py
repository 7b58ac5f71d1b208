"""One error root for everything vbrd reports to a human.

Each error carries the exit code the CLI uses and the HTTP status the API answers with, so
that neither has to guess from the exception type. Messages are written for the
administrator who reads them at 3 a.m.: they name the thing that is wrong and why.
"""
from __future__ import annotations


class VbrdError(Exception):
    """Base of all expected failures; anything else is a bug."""

    exit_code = 1
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(VbrdError):
    """The configuration cannot be used. The daemon refuses to start (exit code 2)."""

    exit_code = 2
    http_status = 400

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file, self.key, self.reason = file, key, reason
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")


class UsageError(VbrdError):
    """A request or command line that cannot be honoured as given."""

    exit_code = 2
    http_status = 400


class NotFound(VbrdError):
    """A job, session, restore point, VM or disk that does not exist."""

    http_status = 404


class Conflict(VbrdError):
    """The request clashes with the current state (a job that is already running)."""

    http_status = 409


class VSphereError(VbrdError):
    """vCenter or ESXi refused or failed a request."""

    http_status = 502


class SnapshotError(VSphereError):
    """A VM snapshot could not be created or removed."""


class SnapshotGone(SnapshotError):
    """A snapshot vbrd made is no longer there (removed or replaced by someone else)."""


class ChangeTrackingError(VSphereError):
    """CBT cannot answer (disabled, reset, or the changeId is unknown)."""


class GuestError(VbrdError):
    """Guest processing failed (script, credentials, application)."""


class GuestUnreachable(GuestError):
    """This guest processor cannot reach the guest; the chain moves to the next one."""


class GuestIdentityError(GuestError):
    """The machine that answered is not the VM's guest (its SMBIOS UUID is another one), or
    cannot prove that it is: nothing is uploaded or run, and the chain stops there."""


class TransportError(VbrdError):
    """A transport mode cannot be used or failed while reading."""


class TransportUnavailable(TransportError):
    """`probe` said no: this mode cannot read this disk from this proxy."""


class RepositoryError(VbrdError):
    """The repository cannot be opened, read or written."""


class CorruptBlockError(RepositoryError):
    """A stored block does not match its digest. Names point, disk and offset."""

    def __init__(self, point: str, disk: str, offset: int, reason: str) -> None:
        self.point, self.disk, self.offset = point, disk, offset
        super().__init__(
            f"restore point {point}, disk {disk}, offset {offset}: corrupt block ({reason})"
        )


class SessionStopped(VbrdError):
    """The session was asked to stop; cleanup ran."""


class StateError(VbrdError):
    """The daemon's state directory cannot be used: its catalog or installation id is
    damaged or cannot be opened, or another daemon holds the directory. The daemon refuses to
    start (exit code 3) rather than guess."""

    exit_code = 3


class CatalogUnavailable(VbrdError):
    """The catalog cannot answer within its bound (its writes are failing); try again later."""

    http_status = 503
