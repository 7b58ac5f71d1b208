"""vSphere Guest Operations (what backup software calls VIX), for asyncio.

Through VMware Tools, vCenter runs programs in a guest and moves files in and out of it
without any network path to the guest: the way in of last resort. Every SOAP call runs off
the event loop through :meth:`vbrd.vsphere.VSphere.call`, so pyvmomi stays behind the vSphere
layer; file contents travel over HTTPS to the URL vCenter hands out (``PUT`` to the guest,
``GET`` from it), with aiohttp.

Faults become vbrd's guest errors with a message naming the VM and the operation:
:class:`~vbrd.errors.GuestUnreachable` when the Tools cannot be reached (not running, VM
off), so that the guest processing chain can tell "no way in" from "failed in the guest";
:class:`~vbrd.errors.GuestError` for everything else (login refused, file missing...).
"""
from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from pyVmomi import vim, vmodl

from vbrd.errors import GuestError, GuestUnreachable, VSphereError
from vbrd.models import Secret

if TYPE_CHECKING:
    from vbrd.vsphere import VSphere

T = TypeVar("T")

TRANSFER_TIMEOUT = 300.0
"""Seconds for one file transfer to or from a guest."""


@dataclass(frozen=True)
class ToolsState:
    """What vCenter knows about the VMware Tools of a VM right now."""

    power_state: str
    running_status: str  # guestToolsRunning | guestToolsNotRunning | guestToolsExecutingScripts
    operations_ready: bool
    uuid: str = ""  # the VM's BIOS UUID (config.uuid)

    @property
    def usable(self) -> bool:
        return (self.power_state == "poweredOn" and self.running_status == "guestToolsRunning"
                and self.operations_ready)


@dataclass(frozen=True)
class GuestProcess:
    """A program started in the guest, as ListProcessesInGuest reports it."""

    pid: int
    exit_code: int | None  # None while it runs
    ended: bool


class GuestOperations:
    """The guest operations of one VM, with one guest login.

    ``vm`` is the VM's name for messages; the VM object is looked up by moref, since guest
    processors get a :class:`vbrd.models.VmRef`, not the Manager's pyvmomi object.
    """

    def __init__(self, vsphere: VSphere, moref: str, vm: str, user: str,
                 password: Secret) -> None:
        self.vsphere = vsphere
        self.moref = moref
        self.vm = vm
        self.user = user
        self._password = password
        self._objects_cache: tuple[Any, Any, Any] | None = None

    # plumbing ------------------------------------------------------------------------------

    def _auth(self) -> Any:
        return vim.vm.guest.NamePasswordAuthentication(
            username=self.user, password=self._password.reveal(), interactiveSession=False)

    def _objects(self) -> tuple[Any, Any, Any]:
        """The VM, process manager and file manager (looked up once per vCenter session)."""
        if self._objects_cache is None:
            content = self.vsphere.content
            gom = content.guestOperationsManager
            vm = vim.VirtualMachine(self.moref, content.rootFolder._stub)
            self._objects_cache = (vm, gom.processManager, gom.fileManager)
        return self._objects_cache

    async def _blocking(self, fn: Callable[[], T]) -> T:
        """``fn`` through the vSphere layer. After vCenter expired the session, the layer
        logs in again but the objects above still belong to the old session: forget them and
        try once more."""
        try:
            return await self.vsphere.call(fn)
        except vim.fault.NotAuthenticated:
            self._objects_cache = None
            return await self.vsphere.call(fn)

    async def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """Run ``fn(vm_object, auth, process_manager, file_manager, *args)`` off the loop and
        turn faults into guest errors that say ``what`` failed on which VM."""
        def run() -> Any:
            vm, pm, fm = self._objects()
            return fn(vm, self._auth(), pm, fm, *args)

        try:
            return await self._blocking(run)
        except vim.fault.InvalidGuestLogin:
            raise GuestError(f"the guest of VM {self.vm} refused the login of {self.user} "
                             f"({what})") from None
        except (vim.fault.GuestOperationsUnavailable, vim.fault.InvalidPowerState,
                vim.fault.GuestComponentsOutOfDate) as e:
            raise GuestUnreachable(f"VMware Tools of VM {self.vm} cannot run guest operations "
                                   f"({_fault_text(e)})") from None
        except vim.fault.FileFault as e:
            raise GuestError(f"{what} in the guest of VM {self.vm}: {_fault_text(e)} "
                             f"({getattr(e, 'file', '') or 'no file named'})") from None
        except vmodl.fault.ManagedObjectNotFound:
            raise GuestError(f"vCenter no longer knows VM {self.vm} ({self.moref})") from None
        except vmodl.MethodFault as e:
            raise GuestError(f"{what} in the guest of VM {self.vm} failed: "
                             f"{_fault_text(e)}") from None
        except VSphereError as e:
            raise GuestUnreachable(f"guest operations need vCenter, which failed: {e}") from None

    # state ---------------------------------------------------------------------------------

    async def tools_state(self) -> ToolsState:
        def read() -> ToolsState:
            vm = self._objects()[0]
            guest = vm.guest
            config = vm.config
            return ToolsState(power_state=str(vm.runtime.powerState),
                              running_status=str(guest.toolsRunningStatus or ""),
                              operations_ready=bool(guest.guestOperationsReady),
                              uuid=str(getattr(config, "uuid", "") or ""))

        try:
            return await self._blocking(read)
        except vmodl.fault.ManagedObjectNotFound:
            raise GuestError(f"vCenter no longer knows VM {self.vm} ({self.moref})") from None
        except vmodl.MethodFault as e:
            raise GuestError(f"reading the VMware Tools state of VM {self.vm} failed: "
                             f"{_fault_text(e)}") from None
        except VSphereError as e:
            raise GuestUnreachable(f"guest operations need vCenter, which failed: {e}") from None

    async def check_login(self) -> None:
        """One cheap authenticated call, so that a wrong password shows at connect and not
        halfway through preparing the guest."""
        def ask(vm: Any, auth: Any, pm: Any, fm: Any) -> None:
            pm.ListProcessesInGuest(vm, auth, [0])

        await self._call("logging in", ask)

    # processes -----------------------------------------------------------------------------

    async def start_program(self, program: str, arguments: str, *,
                            working_directory: str | None = None,
                            env: tuple[str, ...] = ()) -> int:
        def start(vm: Any, auth: Any, pm: Any, fm: Any) -> int:
            spec = vim.vm.guest.ProcessManager.ProgramSpec(
                programPath=program, arguments=arguments,
                workingDirectory=working_directory, envVariables=list(env) or None)
            return int(pm.StartProgramInGuest(vm, auth, spec))

        pid: int = await self._call(f"starting {program}", start)
        return pid

    async def process(self, pid: int) -> GuestProcess:
        def read(vm: Any, auth: Any, pm: Any, fm: Any) -> GuestProcess:
            for info in pm.ListProcessesInGuest(vm, auth, [pid]) or []:
                if int(info.pid) == pid:
                    ended = info.endTime is not None
                    return GuestProcess(pid, int(info.exitCode) if ended else None, ended)
            raise GuestError(f"process {pid} is not known to the guest of VM {self.vm}")

        result: GuestProcess = await self._call(f"asking for process {pid}", read)
        return result

    async def wait(self, pid: int, timeout: float) -> GuestProcess | None:
        """Poll until the process ends; ``None`` when ``timeout`` seconds went by first."""
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            proc = await self.process(pid)
            if proc.ended:
                return proc
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 2.0)

    async def terminate(self, pid: int) -> None:
        def kill(vm: Any, auth: Any, pm: Any, fm: Any) -> None:
            pm.TerminateProcessInGuest(vm, auth, pid)

        await self._call(f"terminating process {pid}", kill)

    # files ---------------------------------------------------------------------------------

    async def make_temp_directory(self, prefix: str, suffix: str = "") -> str:
        """A new folder in the guest user's temporary directory (as the guest makes it:
        mode 0700 on Linux, the user's own TEMP on Windows)."""
        def create(vm: Any, auth: Any, pm: Any, fm: Any) -> str:
            return str(fm.CreateTemporaryDirectoryInGuest(vm, auth, prefix, suffix))

        path: str = await self._call("creating a temporary folder", create)
        return path

    async def delete_directory(self, path: str, *, recursive: bool = True) -> None:
        def delete(vm: Any, auth: Any, pm: Any, fm: Any) -> None:
            fm.DeleteDirectoryInGuest(vm, auth, path, recursive)

        await self._call(f"removing {path}", delete)

    async def delete_file(self, path: str) -> None:
        def delete(vm: Any, auth: Any, pm: Any, fm: Any) -> None:
            fm.DeleteFileInGuest(vm, auth, path)

        await self._call(f"removing {path}", delete)

    async def upload(self, path: str, data: bytes, *, posix_mode: int | None = None) -> None:
        """Write ``data`` to ``path`` in the guest (replacing it)."""
        def initiate(vm: Any, auth: Any, pm: Any, fm: Any) -> str:
            attrs = (vim.vm.guest.FileManager.PosixFileAttributes(permissions=posix_mode)
                     if posix_mode is not None else vim.vm.guest.FileManager.FileAttributes())
            return str(fm.InitiateFileTransferToGuest(vm, auth, path, attrs, len(data), True))

        url = await self._call(f"uploading {path}", initiate)
        await self._transfer("PUT", url, path, data)

    async def download(self, path: str) -> bytes:
        def initiate(vm: Any, auth: Any, pm: Any, fm: Any) -> str:
            return str(fm.InitiateFileTransferFromGuest(vm, auth, path).url)

        url = await self._call(f"downloading {path}", initiate)
        return await self._transfer("GET", url, path)

    async def _transfer(self, method: str, url: str, path: str, data: bytes = b"") -> bytes:
        settings = self.vsphere.settings
        target = transfer_url(url, settings.url)
        ssl_arg: ssl.SSLContext | bool = (ssl.create_default_context() if settings.verify_tls
                                          else False)
        timeout = aiohttp.ClientTimeout(total=TRANSFER_TIMEOUT, sock_connect=10)
        what = "upload to" if method == "PUT" else "download from"
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                async with http.request(method, target, data=data if method == "PUT" else None,
                                        ssl=ssl_arg) as response:
                    body = await response.read()
                    if response.status >= 300:
                        raise GuestError(
                            f"the {what} the guest of VM {self.vm} ({path}) was refused by "
                            f"{urlsplit(target).netloc} (HTTP {response.status}: "
                            f"{body[:200].decode('utf-8', 'replace').strip()})")
                    return body
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise GuestError(f"the {what} the guest of VM {self.vm} ({path}) failed: "
                             f"{type(e).__name__}: {e}") from None



def transfer_url(url: str, vcenter_url: str) -> str:
    """The URL to move a guest file with. ESXi answers ``https://*/guestFile?...`` (or
    ``https://*:443/...``) when it cannot know the name the client reached it by; the client
    puts in the host it talks to, as every pyvmomi user does."""
    parts = urlsplit(url)
    if parts.hostname != "*":
        return url
    host = urlsplit(vcenter_url).hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _fault_text(e: Any) -> str:
    msg = getattr(e, "msg", None)
    if msg:
        return str(msg)
    messages = [m.message for m in getattr(e, "faultMessage", None) or [] if m.message]
    return "; ".join(messages) or type(e).__name__.rsplit(".", 1)[-1]
