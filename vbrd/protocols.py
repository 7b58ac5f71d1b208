"""What plugin hooks return. Hooks are plain functions; these objects do the async work."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from vbrd.errors import TransportError
from vbrd.models import DiskTask, Extent, ProbeResult, VmRef


@runtime_checkable
class DiskReader(Protocol):
    """The snapshot's bytes of one disk, as one transport mode reads them."""

    size: int

    def extents(self) -> AsyncIterator[Extent]:
        """The areas worth reading (allocated for a full, changed for an incremental)."""
        ...

    async def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` of the snapshot's point in time."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class TransportMode(Protocol):
    """A way for a proxy to reach a disk: ``san``, ``hotadd``, ``nbd`` or a plugin's own."""

    name: str

    async def probe(self, task: DiskTask, context: Any) -> ProbeResult: ...

    async def open(self, task: DiskTask, context: Any) -> DiskReader: ...


async def probe_by_opening(mode: TransportMode, task: DiskTask, context: Any) -> ProbeResult:
    """A mode that can tell whether it is usable only by trying: open the disk and close it
    again; a TransportError's message is the reason it is not."""
    try:
        reader = await mode.open(task, context)
    except TransportError as exc:
        return ProbeResult.no(str(exc))
    await reader.close()
    return ProbeResult.ok()


@runtime_checkable
class GuestSession(Protocol):
    """A live connection into one guest, from prepare to close."""

    processor: str

    async def prepare(self) -> None: ...

    async def freeze(self) -> None: ...

    async def thaw(self) -> None: ...

    async def after_backup(self, success: bool) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class GuestProcessor(Protocol):
    """Knows one way into guests of some OS families (WinRM, SSH, VIX)."""

    name: str
    #: the OS families (``VmRef.guest_family``: linux, windows, other) it serves
    families: tuple[str, ...]
    #: its place in each family's chain: lower ranks are tried first (the built-ins: ssh and
    #: winrm 10, vix 90); processors of one rank are tried in name order
    rank: int

    async def connect(self, vm: VmRef, context: Any) -> GuestSession:
        """Raise :class:`vbrd.errors.GuestUnreachable` to let the next processor try."""
        ...
