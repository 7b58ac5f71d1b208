"""What the guest processors (SSH, WinRM, VIX) share: addresses, scripts, output, the session.

Every way into a guest does the same five things — make a private folder, upload the job's
scripts, run pre-freeze, run post-thaw, clean up — and differs only in how it moves bytes and
starts programs. :class:`ScriptedSession` holds the common part, including the rules that make
guest processing safe to rely on:

- a script's output reaches the session log only redacted (every secret of the configuration
  replaced by ``***``) and clipped to :data:`OUTPUT_LIMIT` characters, so a script that echoes
  a password, or prints a megabyte, never puts either into the catalog;
- post-thaw runs at most once, and is safe to call after a failed or interrupted pre-freeze
  (the Manager calls it whenever freeze was started);
- ``close`` never raises: it is called on the way out of failures, often on a dead connection.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vbrd.errors import GuestError, GuestIdentityError, GuestUnreachable

if TYPE_CHECKING:
    from vbrd.config import Credentials, GuestNetwork, GuestSettings
    from vbrd.models import VmRef

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3.0
"""Seconds to wait for one guest address to accept a TCP connection."""

OUTPUT_LIMIT = 4096
"""Characters of a script's output that reach the session log (head and tail are kept)."""

CLEANUP_TIMEOUT = 15.0
"""Seconds ``close`` may spend removing the guest folder before it gives up."""

PRE_FREEZE = "pre-freeze"
POST_THAW = "post-thaw"

_LINK_LOCAL_V4 = ipaddress.ip_network("169.254.0.0/16")


# --------------------------------------------------------------------------------------------
# addresses


def ordered_addresses(addresses: Iterable[str]) -> list[str]:
    """The guest's addresses in the order worth trying: IPv4, then IPv6, link-local last.

    VMware Tools report every address of every NIC, in the guest's own order; a link-local
    address (169.254/16, fe80::/10) is what an interface has when DHCP failed, and is the
    least likely to be reachable from the backup server. Strings that are not addresses are
    dropped, duplicates kept once; otherwise the Tools' order stands.
    """
    seen: set[str] = set()
    ranked: list[tuple[bool, int, int, str]] = []
    for index, text in enumerate(addresses):
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if text in seen:
            continue
        seen.add(text)
        link_local = ip.is_link_local or (ip.version == 4 and ip in _LINK_LOCAL_V4)
        ranked.append((link_local, ip.version, index, text))
    return [text for *_, text in sorted(ranked)]


def allowed_addresses(vm: VmRef, networks: Sequence[GuestNetwork]
                      ) -> tuple[list[str], list[str]]:
    """The VM's addresses (in :func:`ordered_addresses` order) that lie in one of the job's
    guest ``networks``, and those that do not.

    VMware Tools report what the guest says about itself, so an address is only a claim: a
    guest could name another machine and have the job's credentials sent there. Only the
    networks the administrator configured for guests are ever contacted.
    """
    inside: list[str] = []
    outside: list[str] = []
    for text in ordered_addresses(vm.ip_addresses):
        ip = ipaddress.ip_address(text.split("%", 1)[0])
        (inside if any(ip in net for net in networks) else outside).append(text)
    return inside, outside


async def first_listening(vm: VmRef, port: int, service: str, *,
                          networks: Sequence[GuestNetwork],
                          timeout: float = CONNECT_TIMEOUT) -> str:
    """The first of the VM's addresses inside ``networks`` (see :func:`allowed_addresses`)
    where ``port`` accepts a TCP connection within ``timeout`` seconds; addresses outside
    them are never contacted.

    Raises :class:`GuestUnreachable` naming every address tried and why it failed, and the
    addresses left alone, so the session log tells the administrator which firewall, service
    or ``networks`` setting to look at.
    """
    if not vm.ip_addresses:
        raise GuestUnreachable(f"VMware Tools report no IP address for VM {vm.name}, so "
                               f"{service} has nowhere to connect")
    candidates, outside = allowed_addresses(vm, networks)
    left_alone = ""
    if outside and networks:
        left_alone = (f"not contacted, outside the job's guest networks "
                      f"{', '.join(map(str, networks))}: {', '.join(outside)}")
    elif outside:
        left_alone = (f"not contacted: {', '.join(outside)}, since the job names no guest "
                      f"networks (networks in its guest table)")
    if not candidates:
        raise GuestUnreachable(f"{service} has no address of VM {vm.name} to connect to "
                               f"({left_alone or 'VMware Tools report no usable address'})")
    failures: list[str] = []
    for address in candidates:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
        except TimeoutError:
            failures.append(f"{_host_port(address, port)}: no answer in {timeout:g} s")
            continue
        except OSError as e:
            # asyncio words every refusal "Connect call failed"; errno says what happened
            reason = os.strerror(e.errno).lower() if e.errno else str(e)
            failures.append(f"{_host_port(address, port)}: {reason}")
            continue
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return address
    raise GuestUnreachable(f"{service} port {port} of VM {vm.name} is not reachable ("
                           + "; ".join(failures + ([left_alone] if left_alone else [])) + ")")


# --------------------------------------------------------------------------------------------
# identity

SMBIOS_UUID_FILE = "/sys/class/dmi/id/product_uuid"
"""Where a Linux guest shows its SMBIOS system UUID (readable by root only)."""


def same_bios_uuid(expected: str, reported: str) -> bool:
    """Whether a guest's SMBIOS UUID is the VM's BIOS UUID (vCenter's ``config.uuid``).

    Case and surrounding space do not matter. SMBIOS 2.6 and later store the first three
    fields little-endian; which order a guest shows depends on the virtual hardware version and
    on the guest's own reading of the table, so the byte-swapped form counts as the same.
    """
    try:
        want = uuid.UUID(expected.strip())
        got = uuid.UUID(reported.strip())
    except ValueError:
        return False
    return got in (want, uuid.UUID(bytes_le=want.bytes))


def check_identity(vm: VmRef, reported: str, where: str) -> None:
    """Refuse to go on unless the machine that answered ``where`` ("over SSH at 10.0.0.5")
    reported the VM's own BIOS UUID as its SMBIOS UUID (:func:`same_bios_uuid`).

    Called right after login, before anything is uploaded or run: a guest that reports the
    address of another machine sends the job there, and that machine is caught here.
    """
    shown = reported.strip()[:80] or "nothing"
    if not vm.uuid:
        raise GuestIdentityError(f"vCenter reports no BIOS UUID for VM {vm.name}, so the "
                                 f"machine {where} cannot be checked to be its guest; "
                                 f"nothing was uploaded or run")
    if not same_bios_uuid(vm.uuid, reported):
        raise GuestIdentityError(f"the machine {where} is not the guest of VM {vm.name}: it "
                                 f"reports the system UUID {shown!r}, the VM's BIOS UUID is "
                                 f"{vm.uuid}; nothing was uploaded or run (is the address "
                                 f"VMware Tools report for this VM someone else's?)")


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


# --------------------------------------------------------------------------------------------
# output


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***`` (longest first, so that a secret that
    contains another is hidden whole)."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def clip(text: str, limit: int = OUTPUT_LIMIT) -> str:
    """At most about ``limit`` characters of ``text``: the first quarter and the last three
    quarters, since scripts tend to say what they do first and why they failed last."""
    if len(text) <= limit:
        return text
    head, tail = limit // 4, limit - limit // 4
    left_out = len(text) - head - tail
    return f"{text[:head]}\n[... {left_out} characters left out ...]\n{text[-tail:]}"


def shown_output(output: str | bytes, secrets: Iterable[str]) -> str:
    """A script's output as the session log may show it: decoded, redacted, then clipped."""
    if isinstance(output, bytes):
        output = output.decode("utf-8", errors="replace")
    return clip(redact(output.replace("\r\n", "\n"), secrets).strip())


# --------------------------------------------------------------------------------------------
# job settings


@dataclass(frozen=True)
class GuestScript:
    """One of the job's scripts, as it is injected into the guest."""

    phase: str  # PRE_FREEZE | POST_THAW
    source: Path  # on the backup server
    data: bytes

    @property
    def guest_name(self) -> str:
        """The file name in the guest's folder: the phase plus the script's own suffix
        (``pre-freeze.sh``, ``post-thaw.ps1``), so that the guest knows how to run it and
        two scripts of the same name from different folders cannot collide."""
        return f"{self.phase}{self.source.suffix.lower()}"


def credentials_for(context: Any, family: str) -> Credentials:
    """The job's credentials for guests of ``family`` ("linux" or "windows")."""
    settings: GuestSettings = context.job.guest
    key = "windows_credentials" if family == "windows" else "linux_credentials"
    name = getattr(settings, key)
    if not name:
        raise GuestError(f"job {context.job.name}: guest processing of {family} guests needs "
                         f"{key} in [jobs.{context.job.name}.guest]")
    try:
        creds: Credentials = context.config.credentials[name]
    except KeyError:
        raise GuestError(f"job {context.job.name}: no credentials named {name!r} in "
                         f"[credentials]") from None
    return creds


async def load_scripts(settings: GuestSettings, family: str) -> dict[str, GuestScript]:
    """The job's scripts for ``family``, read from the backup server, by phase."""
    if family == "windows":
        wanted = {PRE_FREEZE: settings.windows_pre_freeze, POST_THAW: settings.windows_post_thaw}
    else:
        wanted = {PRE_FREEZE: settings.pre_freeze, POST_THAW: settings.post_thaw}
    scripts: dict[str, GuestScript] = {}
    for phase, source in wanted.items():
        if source is None:
            continue
        try:
            data = await asyncio.to_thread(source.read_bytes)
        except OSError as e:
            raise GuestError(f"cannot read the {phase} script {source}: "
                             f"{e.strerror or e}") from None
        scripts[phase] = GuestScript(phase, source, data)
    return scripts


# --------------------------------------------------------------------------------------------
# the session


@dataclass(frozen=True)
class RunResult:
    """How a program ended in the guest: its exit code and its output (stdout and stderr)."""

    exit_code: int
    output: str | bytes
    timed_out: bool = False


class ScriptedSession(ABC):
    """A guest session that injects the job's scripts and runs them around the snapshot.

    Subclasses say how to make and remove the guest folder, upload a file and run a script
    (:meth:`_make_folder`, :meth:`_upload`, :meth:`_run_script`, :meth:`_remove_folder`,
    :meth:`_disconnect`); this class keeps the order, the bookkeeping and the messages.
    """

    processor: str = ""
    how: str = ""  # "over SSH as root (sudo)": appended to the log line of each script run

    def __init__(self, vm: VmRef, context: Any, scripts: dict[str, GuestScript]) -> None:
        self.vm = vm
        self.context = context
        self.settings: GuestSettings = context.job.guest
        self.scripts = scripts
        self.folder: str | None = None
        self._uploaded: dict[str, str] = {}  # phase -> path in the guest
        self._thawed = False
        self._closed = False

    # what subclasses provide --------------------------------------------------------------

    @abstractmethod
    async def _make_folder(self) -> str:
        """Create a folder only the login user can read; return its path in the guest."""

    @abstractmethod
    async def _upload(self, folder: str, name: str, data: bytes) -> str:
        """Write ``data`` as ``name`` in ``folder``; return the file's path in the guest."""

    @abstractmethod
    async def _run_script(self, script: GuestScript, path: str, timeout: float) -> RunResult:
        """Run ``script``, uploaded to ``path``; wait at most ``timeout`` seconds for it."""

    @abstractmethod
    async def _remove_folder(self, folder: str) -> None:
        """Remove the folder and everything in it."""

    @abstractmethod
    async def _disconnect(self) -> None:
        """Close the connection (it may already be dead)."""

    async def _discover(self) -> None:  # noqa: B027 - optional, most guests need nothing
        """Learn what the guest runs (applications), after the scripts are in place."""

    # the GuestSession protocol ------------------------------------------------------------

    async def prepare(self) -> None:
        if not self.scripts:
            await self._discover()
            return
        self.folder = await self._make_folder()
        for phase, script in self.scripts.items():
            self._uploaded[phase] = await self._upload(self.folder, script.guest_name,
                                                       script.data)
        await self._discover()

    async def freeze(self) -> None:
        await self._run_phase(PRE_FREEZE)

    async def thaw(self) -> None:
        """Post-thaw, once; also after a pre-freeze that failed or never finished, because
        that script may have stopped an application before it failed."""
        if self._thawed:
            return
        self._thawed = True
        if POST_THAW in self.scripts and POST_THAW not in self._uploaded:
            raise GuestError(f"the post-thaw script "
                             f"{self.scripts[POST_THAW].source} was never uploaded into the "
                             f"guest (preparation failed), so it could not run")
        await self._run_phase(POST_THAW)

    async def after_backup(self, success: bool) -> None:  # noqa: B027 - optional
        """Nothing by default; the Windows processor handles transaction logs here."""

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.folder is not None:
                folder, self.folder = self.folder, None
                try:
                    await asyncio.wait_for(self._remove_folder(folder), CLEANUP_TIMEOUT)
                except Exception as e:  # close must not raise; the folder is only left behind
                    reason = self._redact(str(e)) or type(e).__name__
                    self.context.say("warning", f"VM {self.vm.name}: the scripts' folder "
                                                f"{folder} could not be removed from the guest "
                                                f"({reason})", vm=self.vm.name)
        finally:
            try:
                await asyncio.wait_for(self._disconnect(), CLEANUP_TIMEOUT)
            except Exception as e:
                log.debug("%s: closing the %s connection to %s failed: %r",
                          self.context.session_id, self.processor, self.vm.name, e)

    # helpers ------------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        return redact(text, self.context.config.secrets())

    def _shown(self, output: str | bytes) -> str:
        return shown_output(output, self.context.config.secrets())

    async def _run_phase(self, phase: str) -> None:
        script = self.scripts.get(phase)
        if script is None:
            return
        path = self._uploaded[phase]
        name = self.vm.name
        started = time.monotonic()
        result = await self._run_script(script, path, self.settings.timeout)
        took = time.monotonic() - started
        output = self._shown(result.output)
        shown = f"; its output:\n{output}" if output else ", with no output"
        if result.timed_out:
            raise GuestError(f"the {phase} script {script.source.name} did not "
                             f"finish within {self.settings.timeout:g} s ({self.processor})"
                             + (f"; its output so far:\n{output}" if output else
                                ", with no output so far"))
        if result.exit_code != 0:
            raise GuestError(f"the {phase} script {script.source.name} failed with "
                             f"exit code {result.exit_code} ({self.processor}){shown}")
        self.context.say("info", f"VM {name}: {phase} script {script.source.name} ran "
                                 f"{self.how} in {took:.1f} s{shown}", vm=name)
