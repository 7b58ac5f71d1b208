"""SSH host key checking: ``known_hosts``, ``tofu`` (trust on first use) or ``off``.

Trust on first use is only as good as its memory, so the recorded key is written in the
ordinary OpenSSH ``known_hosts`` format (``[address]:port type key``) where an administrator
can read, pre-seed or delete it, and a changed key is refused rather than re-learned.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from vbrd.errors import GuestError

# One lock per known_hosts file, so that two sessions meeting new guests at the same time
# append whole lines.
_locks: dict[Path, asyncio.Lock] = {}


@dataclass(frozen=True)
class HostKeyPolicy:
    """What to hand asyncssh as ``known_hosts``, and where to record a first-seen key."""

    mode: str
    known_hosts: Any  # asyncssh's known_hosts argument: None (no check) or the keys to trust
    file: Path | None
    record: bool = False  # tofu and no key known yet: accept it, then append it to ``file``

    def describe(self) -> str:
        if self.mode == "off":
            return "host key checking is off"
        return f"host keys from {self.file}"


def known_hosts_file(settings: Any, state_dir: Path) -> Path | None:
    """The file the job names, or for ``tofu`` without one, the daemon's own."""
    if settings.known_hosts is not None:
        return Path(settings.known_hosts)
    if settings.host_key_check == "tofu":
        return state_dir / "known_hosts"
    return None


async def policy_for(settings: Any, state_dir: Path, address: str, port: int) -> HostKeyPolicy:
    mode = settings.host_key_check
    if mode == "off":
        return HostKeyPolicy(mode, None, None)
    file = known_hosts_file(settings, state_dir)
    if mode == "known_hosts":
        if file is None:
            file = Path.home() / ".ssh" / "known_hosts"
        if not await asyncio.to_thread(file.is_file):
            raise GuestError(f"host_key_check is known_hosts but the known_hosts file {file} "
                             f"does not exist")
        return HostKeyPolicy(mode, await _read(file), file)
    assert file is not None
    known = await _read(file) if await asyncio.to_thread(file.is_file) else None
    if known is not None and any(known.match(address, address, port)[:2]):
        return HostKeyPolicy(mode, known, file)
    return HostKeyPolicy(mode, None, file, record=True)


async def record_first_key(policy: HostKeyPolicy, address: str, port: int,
                           key: asyncssh.SSHKey) -> None:
    """Append the key a ``tofu`` connection accepted to the known_hosts file."""
    assert policy.file is not None
    pattern = address if port == 22 else f"[{address}]:{port}"
    key_type, key_data = key.export_public_key("openssh").decode().split()[:2]
    line = f"{pattern} {key_type} {key_data}\n"
    file = policy.file
    lock = _locks.setdefault(file, asyncio.Lock())

    def append() -> None:
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(file, "a", encoding="utf-8") as f:
            f.write(line)

    async with lock:
        try:
            await asyncio.to_thread(append)
        except OSError as e:
            raise GuestError(f"cannot record the SSH host key of {pattern} in {file}: "
                             f"{e.strerror or e}") from None


def fingerprint(key: asyncssh.SSHKey) -> str:
    return str(key.get_fingerprint("sha256"))


async def _read(file: Path) -> asyncssh.SSHKnownHosts:
    try:
        text = await asyncio.to_thread(file.read_text, encoding="utf-8")
        return asyncssh.import_known_hosts(text)
    except (OSError, ValueError) as e:
        raise GuestError(f"cannot read the known_hosts file {file}: {e}") from None
