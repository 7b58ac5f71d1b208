"""The ``vix`` guest processor: the vSphere Guest Operations API, through VMware Tools."""
from __future__ import annotations

import shlex
from typing import Any

from vbrd.errors import GuestError, GuestIdentityError, GuestUnreachable
from vbrd.guest_common import (
    GuestScript,
    RunResult,
    ScriptedSession,
    credentials_for,
    load_scripts,
)
from vbrd.guestops import GuestOperations
from vbrd.models import VmRef

WINDOWS_SUFFIXES = (".ps1", ".bat", ".cmd")
CMD = r"C:\Windows\System32\cmd.exe"
POWERSHELL = "powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass"


class VixProcessor:
    name = "vix"
    families: tuple[str, ...] = ("linux", "windows", "other")
    rank = 90  # the way in of last resort: after the network ones

    async def connect(self, vm: VmRef, context: Any) -> VixSession:
        settings = context.job.guest
        windows = vm.guest_family == "windows"
        # "other" guests (Unix that is not Linux) take the Linux scripts and credentials.
        family = "windows" if windows else "linux"
        creds = credentials_for(context, family)
        if creds.password is None:
            raise GuestError(f"VIX logs in with a password: [credentials.{creds.name}] has only "
                             f"a key file")
        if context.vsphere is None:
            raise GuestUnreachable("VIX needs a vCenter connection, and this session has none")
        ops = GuestOperations(context.vsphere, vm.moref, vm.name, creds.user, creds.password)
        state = await ops.tools_state()
        # The guest is reached through vCenter, which knows the VM by its moref: what must
        # hold is that this is still the VM the session planned, and that its Tools run.
        if vm.uuid and state.uuid.lower() != vm.uuid.lower():
            raise GuestIdentityError(f"the VM vCenter knows as {vm.moref} is no longer VM "
                                     f"{vm.name}: its BIOS UUID is {state.uuid or 'unset'}, "
                                     f"not {vm.uuid}; nothing was uploaded or run")
        if not state.usable:
            why = ("the VM is not powered on" if state.power_state != "poweredOn" else
                   "VMware Tools are not running in the guest"
                   if state.running_status != "guestToolsRunning" else
                   "VMware Tools are not ready for guest operations")
            raise GuestUnreachable(f"{why} (power {state.power_state}, tools "
                                   f"{state.running_status or 'unknown'})")
        scripts = await load_scripts(settings, family)
        if windows:
            for script in scripts.values():
                if script.source.suffix.lower() not in WINDOWS_SUFFIXES:
                    raise GuestError(f"the {script.phase} script {script.source} cannot run "
                                     f"in a Windows guest: it must be a .ps1, .bat or .cmd file")
        await ops.check_login()
        if settings.elevate:
            context.say("warning", f"VM {vm.name}: VIX runs scripts without elevation (no sudo):"
                                   f" they run as {creds.user}, the account of "
                                   f"[credentials.{creds.name}], although the job asks to "
                                   f"elevate", vm=vm.name)
        context.say("info", f"VM {vm.name}: using VIX (guest operations through VMware Tools) "
                            f"as {creds.user}", vm=vm.name)
        return VixSession(vm, context, scripts, ops, windows=windows, user=creds.user)


class VixSession(ScriptedSession):
    processor = "vix"

    def __init__(self, vm: VmRef, context: Any, scripts: dict[str, GuestScript],
                 ops: GuestOperations, *, windows: bool, user: str) -> None:
        super().__init__(vm, context, scripts)
        self.ops = ops
        self.windows = windows
        self.how = f"through VIX as {user} (not elevated)"

    def _path(self, folder: str, name: str) -> str:
        return f"{folder}\\{name}" if self.windows else f"{folder}/{name}"

    async def _make_folder(self) -> str:
        return await self.ops.make_temp_directory("vbrd-")

    async def _upload(self, folder: str, name: str, data: bytes) -> str:
        path = self._path(folder, name)
        await self.ops.upload(path, data, posix_mode=None if self.windows else 0o700)
        return path

    def _command(self, script: GuestScript, path: str, out: str) -> tuple[str, str]:
        """Program and arguments that run the script with stdout and stderr in ``out``.

        Guest operations start a program without a shell, so a shell does the redirection:
        ``/bin/sh -c`` on Linux, ``cmd.exe /c`` on Windows (where ``""script" > "out""``
        relies on cmd stripping the outer quotes)."""
        if self.windows:
            if script.source.suffix.lower() == ".ps1":
                return CMD, f'/c {POWERSHELL} -File "{path}" > "{out}" 2>&1'
            return CMD, f'/c ""{path}" > "{out}" 2>&1"'
        q = shlex.quote
        if script.data.startswith(b"#!"):
            # the file mode given at upload is a wish; make sure the script can run
            runner = f"chmod 0700 {q(path)} && {q(path)}"
        else:
            runner = f"/bin/sh {q(path)}"
        return "/bin/sh", "-c " + q(f"{runner} > {q(out)} 2>&1")

    async def _run_script(self, script: GuestScript, path: str, timeout: float) -> RunResult:
        assert self.folder is not None
        out = self._path(self.folder, f"{script.phase}.out")
        program, arguments = self._command(script, path, out)
        pid = await self.ops.start_program(program, arguments, working_directory=self.folder)
        proc = await self.ops.wait(pid, timeout)
        if proc is None:
            try:
                await self.ops.terminate(pid)
            except GuestError:
                pass  # it may have ended meanwhile; the timeout is what we report
        output = await self._output(out)
        if proc is None:
            return RunResult(-1, output, timed_out=True)
        return RunResult(proc.exit_code if proc.exit_code is not None else -1, output)

    async def _output(self, path: str) -> bytes:
        try:
            return await self.ops.download(path)
        except GuestError as e:
            return f"(the script's output could not be read back: {e})".encode()

    async def _remove_folder(self, folder: str) -> None:
        await self.ops.delete_directory(folder, recursive=True)

    async def _disconnect(self) -> None:
        """The vCenter connection belongs to the session; there is nothing of ours to close."""

    async def after_backup(self, success: bool) -> None:
        if self.windows and success and self.settings.log_handling == "truncate":
            self.context.say(
                "warning", f"VM {self.vm.name}: transaction logs were not truncated: "
                           f"application discovery and log truncation run over WinRM, and "
                           f"VIX was the way into this guest", vm=self.vm.name)
