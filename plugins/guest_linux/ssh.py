"""The ``ssh`` guest processor: asyncssh to the address VMware Tools report."""
from __future__ import annotations

import asyncio
import contextlib
import shlex
from typing import Any

import asyncssh

from vbrd.config import Credentials
from vbrd.errors import GuestError, GuestIdentityError, GuestUnreachable
from vbrd.guest_common import (
    SMBIOS_UUID_FILE,
    GuestScript,
    RunResult,
    ScriptedSession,
    check_identity,
    credentials_for,
    first_listening,
    load_scripts,
)
from vbrd.models import VmRef

from .host_keys import HostKeyPolicy, fingerprint, policy_for, record_first_key

LOGIN_TIMEOUT = 30.0
"""Seconds for the SSH handshake and login once the port answered."""


async def connect(vm: VmRef, context: Any) -> SshSession:
    """Log in to the guest and be ready to run the job's scripts (SshProcessor.connect)."""
    settings = context.job.guest
    creds = credentials_for(context, "linux")
    scripts = await load_scripts(settings, "linux")
    port = settings.ssh_port
    address = await first_listening(vm, port, "SSH", networks=settings.networks)
    policy = await policy_for(settings, context.config.daemon.state_dir, address, port)
    conn = await _login(vm, address, port, creds, policy)
    try:
        # Before anything else, and before a first-seen host key is trusted: is this the VM?
        check_identity(vm, await _system_uuid(conn, address, settings.elevate),
                       f"over SSH at {address}:{port}")
        if policy.record:
            key = conn.get_server_host_key()
            if key is not None:
                await record_first_key(policy, address, port, key)
                context.say("info", f"VM {vm.name}: first SSH contact with {address}:{port}; "
                                    f"its host key {fingerprint(key)} is now trusted and "
                                    f"recorded in {policy.file}", vm=vm.name)
    except BaseException:
        conn.close()
        raise
    context.say("info", f"VM {vm.name}: connected over SSH to {address}:{port} as "
                        f"{creds.user} ({policy.describe()})", vm=vm.name)
    return SshSession(vm, context, scripts, conn, address, creds.user)


async def _login(vm: VmRef, address: str, port: int, creds: Credentials,
                 policy: HostKeyPolicy) -> asyncssh.SSHClientConnection:
    where = f"{address}:{port} of VM {vm.name}"
    try:
        return await asyncssh.connect(
            address, port, username=creds.user,
            password=creds.password.reveal() if creds.password else None,
            client_keys=[str(creds.key_file)] if creds.key_file else None,
            known_hosts=policy.known_hosts,
            # a daemon must not pick up root's ~/.ssh/config, agent or default keys
            config=None, agent_path=None, connect_timeout=LOGIN_TIMEOUT)
    except asyncssh.PermissionDenied:
        raise GuestError(f"SSH login as {creds.user} to {where} was refused; check the "
                         f"password or key of [credentials.{creds.name}]") from None
    except asyncssh.HostKeyNotVerifiable as e:
        hint = (" (trust on first use: the guest's key changed since it was recorded; if the "
                "change is expected, remove the guest's line from that file)"
                if policy.mode == "tofu" else "")
        raise GuestError(f"the SSH host key of {where} does not match {policy.file}{hint}: "
                         f"{e.reason}") from None
    except (OSError, TimeoutError, asyncssh.Error) as e:
        raise GuestUnreachable(f"SSH to {where} failed: {_reason(e)}") from None
    except asyncssh.KeyImportError as e:
        raise GuestError(f"the SSH key file {creds.key_file} of [credentials.{creds.name}] "
                         f"cannot be used: {e}") from None


async def _system_uuid(conn: asyncssh.SSHClientConnection, address: str,
                       elevate: bool) -> str:
    """The guest's SMBIOS UUID as Linux shows it. The file is root's, so an account that
    does not elevate reads it through ``sudo -n`` when it may, and without sudo when it
    can; a guest that lets neither happen cannot prove who it is and is refused."""
    read = f"cat {SMBIOS_UUID_FILE}"
    attempts = [f"sudo -n -- {read}"] if elevate else [read, f"sudo -n -- {read}"]
    failures: list[str] = []
    for command in attempts:
        try:
            result = await conn.run(command, check=False, timeout=60, encoding="utf-8",
                                    errors="replace")
        except (OSError, asyncssh.Error) as e:
            raise GuestError(f"the SSH connection to {address} broke while reading the "
                             f"guest's system UUID: {_reason(e)}") from None
        if result.exit_status == 0:
            return str(result.stdout or "")
        why = (str(result.stderr or result.stdout or "").strip()[:200]
               or f"exit code {result.exit_status}")
        failures.append(f"{command}: {why}")
    raise GuestIdentityError(f"the guest at {address} cannot be checked to be the VM: reading "
                             f"its system UUID failed ({'; '.join(failures)}); the login "
                             f"account needs root, or passwordless sudo, for {read}")


def _reason(e: BaseException) -> str:
    if isinstance(e, asyncssh.Error):
        return e.reason
    if isinstance(e, TimeoutError):
        return f"no login within {LOGIN_TIMEOUT:g} s"
    return str(getattr(e, "strerror", None) or e) or type(e).__name__


class SshSession(ScriptedSession):
    processor = "ssh"

    def __init__(self, vm: VmRef, context: Any, scripts: dict[str, GuestScript],
                 conn: asyncssh.SSHClientConnection, address: str, user: str) -> None:
        super().__init__(vm, context, scripts)
        self.conn = conn
        self.address = address
        self.how = "over SSH as root (sudo)" if self.settings.elevate else f"over SSH as {user}"
        self._sftp: asyncssh.SFTPClient | None = None

    def _elevated(self, command: str) -> str:
        return f"sudo -n -- {command}" if self.settings.elevate else command

    async def _run(self, command: str, timeout: float, what: str
                   ) -> asyncssh.SSHCompletedProcess:
        """Run a command with stderr merged into stdout; the connection breaking, or the
        command outliving ``timeout`` (:class:`asyncssh.TimeoutError`, which carries the
        output so far), are the only exceptions."""
        try:
            return await self.conn.run(command, stderr=asyncssh.STDOUT, check=False,
                                       timeout=timeout, encoding="utf-8", errors="replace")
        except asyncssh.TimeoutError:
            raise
        except (OSError, asyncssh.Error) as e:
            raise GuestError(f"the SSH connection to {self.address} broke "
                             f"while {what}: {_reason(e)}") from None

    async def _helper(self, command: str, what: str) -> asyncssh.SSHCompletedProcess:
        try:
            return await self._run(command, 60, what)
        except asyncssh.TimeoutError:
            raise GuestError(f"no answer from {self.address} within 60 s while {what}") from None

    async def _make_folder(self) -> str:
        result = await self._helper('umask 077 && mktemp -d "${TMPDIR:-/tmp}/vbrd.XXXXXXXXXX"',
                                    "creating the scripts' folder")
        folder = str(result.stdout or "").strip()
        if result.exit_status != 0 or not folder.startswith("/"):
            raise GuestError(f"cannot create a temporary folder in the guest "
                             f"(mktemp -d exited with {result.exit_status}): "
                             f"{self._shown(str(result.stdout or ''))}")
        return folder

    async def _upload(self, folder: str, name: str, data: bytes) -> str:
        path = f"{folder}/{name}"
        try:
            if self._sftp is None:
                self._sftp = await self.conn.start_sftp_client()
            async with self._sftp.open(path, "wb",
                                       asyncssh.SFTPAttrs(permissions=0o700)) as f:
                await f.write(data)
            await self._sftp.chmod(path, 0o700)
        except (OSError, asyncssh.Error) as e:
            raise GuestError(f"cannot upload {name} to {path} over SFTP: "
                             f"{_reason(e)}") from None
        return path

    async def _run_script(self, script: GuestScript, path: str, timeout: float) -> RunResult:
        # A script without "#!" would be run by whatever shell sshd hands us; say which.
        command = shlex.quote(path) if script.data.startswith(b"#!") else \
            f"/bin/sh {shlex.quote(path)}"
        try:
            async with await self.conn.create_process(
                    self._elevated(command), stderr=asyncssh.STDOUT, encoding="utf-8",
                    errors="replace") as process:
                try:
                    result = await process.wait(check=False, timeout=timeout)
                except asyncssh.TimeoutError as e:
                    with contextlib.suppress(OSError, asyncssh.Error):
                        process.terminate()  # sudo passes the signal on to the script
                    return RunResult(-1, str(e.stdout or ""), timed_out=True)
        except (OSError, asyncssh.Error) as e:
            raise GuestError(f"the SSH connection to {self.address} broke "
                             f"while the {script.phase} script ran: {_reason(e)}") from None
        code = result.exit_status
        output = result.stdout if isinstance(result.stdout, str) else ""
        if code is None or code < 0:
            signal = result.exit_signal[0] if result.exit_signal else "unknown"
            return RunResult(128, f"{output}\n(killed by signal {signal})")
        return RunResult(code, output)

    async def _remove_folder(self, folder: str) -> None:
        # Elevated, because an elevated script may have left root's files in its folder.
        result = await self._helper(self._elevated(f"rm -rf -- {shlex.quote(folder)}"),
                                    "removing the scripts' folder")
        if result.exit_status != 0:
            raise GuestError(f"rm -rf exited with {result.exit_status}: "
                             f"{self._shown(str(result.stdout or ''))}")

    async def _disconnect(self) -> None:
        if self._sftp is not None:
            sftp, self._sftp = self._sftp, None
            sftp.exit()
        self.conn.close()
        await asyncio.wait_for(self.conn.wait_closed(), 5)
