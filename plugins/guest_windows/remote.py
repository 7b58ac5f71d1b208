"""The ``winrm`` guest processor: pywinrm to the address VMware Tools report.

pywinrm is blocking, so every WS-Management round trip runs in a worker thread. One remote
shell is opened at connect and reused for every command of the session; a command is polled
(``Receive``) from the event loop, so that the job's timeout is ours to enforce: when it
runs out, the command is signalled to terminate and the session reports what it printed.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, cast

import requests
import winrm
import winrm.exceptions

from vbrd.errors import GuestError, GuestUnreachable
from vbrd.guest_common import (
    GuestScript,
    RunResult,
    ScriptedSession,
    check_identity,
    credentials_for,
    first_listening,
    load_scripts,
)
from vbrd.models import VmRef

from . import powershell as ps
from .options import WinRmOptions

log = logging.getLogger(__name__)

SCRIPT_SUFFIXES = (".ps1", ".bat", ".cmd")
RECEIVE_WAIT = 5
"""Seconds one Receive may wait for output: how late the job's timeout can be noticed."""
HELPER_TIMEOUT = 120.0
"""Seconds for the plugin's own commands (folder, upload, discovery, log backup)."""


class _Shell:
    """One WinRM remote shell. Blocking: call it from worker threads only."""

    def __init__(self, endpoint: str, options: WinRmOptions, user: str, password: str) -> None:
        self.protocol = winrm.Protocol(
            endpoint=endpoint, transport=cast(Any, options.transport), username=user,
            password=password, server_cert_validation=cast(Any, options.server_cert_validation),
            operation_timeout_sec=RECEIVE_WAIT, read_timeout_sec=RECEIVE_WAIT + 25)
        self.shell_id: str | None = None

    def open(self) -> None:
        self.shell_id = self.protocol.open_shell(codepage=65001)

    def start(self, command_line: str) -> str:
        assert self.shell_id is not None
        command_id: str = self.protocol.run_command(self.shell_id, command_line)
        return command_id

    def receive(self, command_id: str) -> tuple[bytes, bytes, int, bool]:
        assert self.shell_id is not None
        try:
            out, err, code, done = self.protocol.get_command_output_raw(self.shell_id,
                                                                        command_id)
        except winrm.exceptions.WinRMOperationTimeoutError:
            return b"", b"", -1, False  # Windows says "nothing yet"; ask again
        return out, err, code, done

    def stop(self, command_id: str) -> None:
        assert self.shell_id is not None
        self.protocol.cleanup_command(self.shell_id, command_id)

    def close(self) -> None:
        if self.shell_id is not None:
            shell_id, self.shell_id = self.shell_id, None
            self.protocol.close_shell(shell_id)


def _reason(e: BaseException) -> str:
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return "no answer (timeout)"
    if isinstance(e, requests.exceptions.ConnectionError):
        return "connection refused or reset"
    return str(e) or type(e).__name__


async def connect(vm: VmRef, context: Any) -> WinRmSession:
    """Open a remote shell in the guest for the job's scripts (WinRmProcessor.connect)."""
    settings = context.job.guest
    options = WinRmOptions.from_table(dict(context.config.plugins.get("guest_windows", {})))
    creds = credentials_for(context, "windows")
    if creds.password is None:
        raise GuestError(f"WinRM needs a password: [credentials.{creds.name}] has none")
    scripts = await load_scripts(settings, "windows")
    for script in scripts.values():
        if script.source.suffix.lower() not in SCRIPT_SUFFIXES:
            raise GuestError(f"the {script.phase} script {script.source} cannot run in a "
                             f"Windows guest: it must be a .ps1, .bat or .cmd file")
    port = settings.winrm_port
    address = await first_listening(vm, port, "WinRM", networks=settings.networks)
    host = f"[{address}]" if ":" in address else address
    endpoint = f"{options.scheme}://{host}:{port}/wsman"
    shell = _Shell(endpoint, options, creds.user, creds.password.reveal())
    where = f"{endpoint} of VM {vm.name}"
    try:
        await asyncio.to_thread(shell.open)
    except winrm.exceptions.InvalidCredentialsError:
        raise GuestError(f"WinRM login as {creds.user} to {where} was refused "
                         f"({options.transport}); check the password of "
                         f"[credentials.{creds.name}] and the transport in "
                         f"[plugins.guest_windows]") from None
    except requests.exceptions.RequestException as e:
        raise GuestUnreachable(f"WinRM to {where} failed: {_reason(e)}") from None
    except (winrm.exceptions.WinRMError, winrm.exceptions.WinRMTransportError) as e:
        raise GuestError(f"WinRM to {where} refused to open a shell: {_reason(e)}") from None
    session = WinRmSession(vm, context, scripts, shell, endpoint, creds.user)
    try:
        await session.verify_identity()
    except BaseException:
        await session.close()
        raise
    context.say("info", f"VM {vm.name}: connected over WinRM to {endpoint} as {creds.user} "
                        f"({options.transport})", vm=vm.name)
    return session


class WinRmSession(ScriptedSession):
    processor = "winrm"

    def __init__(self, vm: VmRef, context: Any, scripts: dict[str, GuestScript], shell: _Shell,
                 endpoint: str, user: str) -> None:
        super().__init__(vm, context, scripts)
        self.shell = shell
        self.endpoint = endpoint
        self.how = f"over WinRM as {user}"
        self.applications: list[str] = []

    async def verify_identity(self) -> None:
        """Before anything is uploaded or run: is the machine that answered this VM's guest?"""
        reported = await self._checked(ps.system_uuid(), "reading the guest's system UUID")
        check_identity(self.vm, reported, f"over WinRM at {self.endpoint}")

    # running PowerShell -------------------------------------------------------------------

    async def powershell(self, script: str, timeout: float, what: str) -> RunResult:
        """Run a PowerShell script; its output is stdout followed by stderr (readable)."""
        line = ps.command_line(script)
        if len(line) > ps.CMD_LINE_LIMIT:
            raise GuestError(f"the command for {what} is longer than "
                             f"Windows accepts ({len(line)} characters)")
        try:
            command_id = await asyncio.to_thread(self.shell.start, line)
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + timeout
            while True:
                o, e, code, done = await asyncio.to_thread(self.shell.receive, command_id)
                out += o
                err += e
                if done:
                    break
                if time.monotonic() > deadline:
                    await self._stop(command_id)
                    return RunResult(-1, self._output(bytes(out), bytes(err)), timed_out=True)
            await self._stop(command_id)
        except (requests.exceptions.RequestException, winrm.exceptions.WinRMError,
                winrm.exceptions.WinRMTransportError) as e:
            raise GuestError(f"WinRM to {self.endpoint} failed while "
                             f"{what}: {self._redact(_reason(e))}") from None
        return RunResult(code, self._output(bytes(out), bytes(err)))

    async def _stop(self, command_id: str) -> None:
        try:
            await asyncio.to_thread(self.shell.stop, command_id)
        except Exception as e:  # the command is over either way
            log.debug("WinRM: signalling command %s failed: %r", command_id, e)

    @staticmethod
    def _output(out: bytes, err: bytes) -> str:
        text = out.decode("utf-8", errors="replace")
        if err:
            text = f"{text.rstrip()}\n{ps.readable_stderr(bytes(err))}".lstrip("\n")
        return text

    async def _checked(self, script: str, what: str) -> str:
        result = await self.powershell(script, HELPER_TIMEOUT, what)
        if result.timed_out or result.exit_code != 0:
            state = ("did not finish in time" if result.timed_out
                     else f"failed with exit code {result.exit_code}")
            raise GuestError(f"{what} {state} (winrm): "
                             f"{self._shown(result.output) or '(no output)'}")
        return str(result.output)

    # ScriptedSession ----------------------------------------------------------------------

    async def _make_folder(self) -> str:
        name = f"vbrd-{secrets.token_hex(6)}"
        output = await self._checked(ps.make_folder(name), "creating the scripts' folder")
        folder = output.strip().splitlines()[-1].strip() if output.strip() else ""
        if not folder.endswith(name):
            raise GuestError(f"creating the scripts' folder printed "
                             f"{self._shown(output)!r}, not its path")
        return folder

    async def _upload(self, folder: str, name: str, data: bytes) -> str:
        path = f"{folder}\\{name}"
        for chunk in ps.upload_chunks(path, data):
            await self._checked(chunk, f"uploading {name}")
        return path

    async def _run_script(self, script: GuestScript, path: str, timeout: float) -> RunResult:
        return await self.powershell(ps.run_script(path), timeout, f"the {script.phase} script ran")

    async def _remove_folder(self, folder: str) -> None:
        await self._checked(ps.remove_folder(folder), "removing the scripts' folder")

    async def _disconnect(self) -> None:
        await asyncio.to_thread(self.shell.close)

    async def _discover(self) -> None:
        output = await self._checked(ps.discover_applications(), "discovering applications")
        wanted = {name.lower(): name for name in ps.APPLICATION_SERVICES}
        self.applications = [wanted[line.strip().lower()] for line in output.splitlines()
                             if line.strip().lower() in wanted]
        found = ", ".join(self.applications) or "none of " + ", ".join(ps.APPLICATION_SERVICES)
        self.context.say("info", f"VM {self.vm.name}: applications found: {found}",
                         vm=self.vm.name)

    # transaction logs ---------------------------------------------------------------------

    async def after_backup(self, success: bool) -> None:
        """Transaction log handling per the job's ``log_handling`` (see the plugin's
        docstring for what each application gets)."""
        name = self.vm.name
        if not self.applications:
            return
        mode = self.settings.log_handling
        apps = ", ".join(self.applications)
        if mode != "truncate":
            self.context.say("info", f"VM {name}: transaction logs of {apps} left as they are "
                                     f"(log_handling = {mode})", vm=name)
            return
        if not success:
            self.context.say("info", f"VM {name}: transaction logs of {apps} not truncated: "
                                     f"the backup did not succeed", vm=name)
            return
        for app in self.applications:
            if app == "MSSQLSERVER":
                await self._truncate_sql_server()
            elif app == "MSExchangeIS":
                self.context.say(
                    "warning", f"VM {name}: Exchange transaction logs are truncated only by a "
                               f"full VSS backup, which vbrd does not perform (VMware Tools "
                               f"quiescing is copy-only); they were left as they are", vm=name)
            elif app == "NTDS":
                self.context.say("info", f"VM {name}: Active Directory needs no log truncation "
                                         f"(it logs circularly)", vm=name)

    async def _truncate_sql_server(self) -> None:
        """One server-side batch finds the databases and backs up their logs (see
        :data:`.powershell.TRUNCATE_SQL_LOGS`): no database name ever becomes PowerShell."""
        name = self.vm.name
        output = await self._checked(ps.truncate_sql_logs(),
                                     "truncating SQL Server transaction logs")
        outcome = ps.read_log_truncation(output)
        if not outcome.truncated and not outcome.failed:
            self.context.say("info", f"VM {name}: SQL Server has no online user database in "
                                     f"full recovery; no log to truncate", vm=name)
            return
        if outcome.truncated:
            self.context.say("info", f"VM {name}: SQL Server transaction logs truncated (log "
                                     f"backup to NUL) for {', '.join(outcome.truncated)}",
                             vm=name)
        if outcome.failed:
            raise GuestError("; ".join(
                f"the log of SQL Server database {database} could not be truncated: "
                f"{self._redact(message)}" for database, message in outcome.failed))
