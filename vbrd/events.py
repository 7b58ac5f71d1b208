"""The events of a session, one class per phase transition.

Every event is a frozen dataclass with a stable wire name (``type``), the session it belongs
to, the phase, the VM/disk where it applies and the time. Events go on the bus
(:mod:`vbrd.bus`), into the catalog (the session log) and out of the API as JSON, so a script
can follow a session without parsing prose.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from time import monotonic as _monotonic
from typing import Any, ClassVar


class Phase:
    """The six phases of docs/architecture.md section 1, plus the session around them."""

    SESSION = "session"
    INITIALIZATION = "initialization"
    GUEST_PROCESSING = "guest_processing"
    SNAPSHOT = "snapshot"
    GUEST_RELEASE = "guest_release"
    DATA_TRANSPORT = "data_transport"
    SNAPSHOT_COMMIT = "snapshot_commit"

    ORDER = (INITIALIZATION, GUEST_PROCESSING, SNAPSHOT, GUEST_RELEASE, DATA_TRANSPORT,
             SNAPSHOT_COMMIT)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of all events. ``type`` is the wire name."""

    type: ClassVar[str] = "event"
    phase: ClassVar[str] = Phase.SESSION

    session_id: str
    vm: str = ""
    disk: int | None = None
    time: str = field(default_factory=_now)
    monotonic: float = field(default_factory=_monotonic)

    def to_dict(self) -> dict[str, Any]:
        data = {"type": self.type, "phase": self.phase}
        for f in dataclasses.fields(self):
            data[f.name] = getattr(self, f.name)
        return data


EVENT_TYPES: dict[str, type[Event]] = {}


def _register(cls: type[Event]) -> type[Event]:
    EVENT_TYPES[cls.type] = cls
    return cls


# --------------------------------------------------------------------------------------------
# session


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class SessionStarted(Event):
    """``session.started``: a job run began (trigger: schedule, api, cli)."""

    type: ClassVar[str] = "session.started"
    job: str
    trigger: str


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class SessionFinished(Event):
    """``session.finished``: status is ``success``, ``warning``, ``failed`` or ``stopped``."""

    type: ClassVar[str] = "session.finished"
    job: str
    status: str
    reason: str = ""


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class PhaseStarted(Event):
    """``phase.started``: a phase began, for the session or for one VM."""

    type: ClassVar[str] = "phase.started"
    name: str


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class PhaseFinished(Event):
    """``phase.finished``: a phase ended; ``ok`` false carries the reason."""

    type: ClassVar[str] = "phase.finished"
    name: str
    ok: bool = True
    reason: str = ""


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class SessionLog(Event):
    """``log``: a line of the session log for the administrator (info, warning, error)."""

    type: ClassVar[str] = "log"
    level: str
    message: str


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class VmFinished(Event):
    """``vm.finished``: one VM of the session is done (success, warning, failed)."""

    type: ClassVar[str] = "vm.finished"
    status: str
    reason: str = ""
    point_id: str = ""


# --------------------------------------------------------------------------------------------
# initialization


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskPlanned(Event):
    """``task.planned``: one task (VM disk) was planned."""

    type: ClassVar[str] = "task.planned"
    phase: ClassVar[str] = Phase.INITIALIZATION
    label: str
    capacity: int


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceWaiting(Event):
    """``resource.waiting``: a task waits for a proxy or repository slot."""

    type: ClassVar[str] = "resource.waiting"
    phase: ClassVar[str] = Phase.INITIALIZATION
    reason: str


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceAssigned(Event):
    """``resource.assigned``: a task got a proxy and a repository slot; ``reason`` says why
    that proxy."""

    type: ClassVar[str] = "resource.assigned"
    phase: ClassVar[str] = Phase.INITIALIZATION
    proxy: str
    repository: str
    reason: str = ""


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceReleased(Event):
    """``resource.released``: a task's slots were given back."""

    type: ClassVar[str] = "resource.released"
    phase: ClassVar[str] = Phase.DATA_TRANSPORT
    proxy: str
    repository: str


# --------------------------------------------------------------------------------------------
# guest processing and release


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class GuestAttempt(Event):
    """``guest.attempt``: a guest processor was tried; outcome connected/unreachable/failed."""

    type: ClassVar[str] = "guest.attempt"
    phase: ClassVar[str] = Phase.GUEST_PROCESSING
    processor: str
    outcome: str
    reason: str = ""


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class GuestFrozen(Event):
    """``guest.frozen``: pre-freeze ran; the guest is quiesced."""

    type: ClassVar[str] = "guest.frozen"
    phase: ClassVar[str] = Phase.GUEST_PROCESSING
    processor: str


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class GuestThawed(Event):
    """``guest.thawed``: post-thaw ran; guest I/O resumed."""

    type: ClassVar[str] = "guest.thawed"
    phase: ClassVar[str] = Phase.GUEST_RELEASE
    processor: str
    ok: bool = True
    reason: str = ""


# --------------------------------------------------------------------------------------------
# snapshot and snapshot commit


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotCreated(Event):
    """``snapshot.created``: vbrd's snapshot of a VM exists."""

    type: ClassVar[str] = "snapshot.created"
    phase: ClassVar[str] = Phase.SNAPSHOT
    snapshot: str
    name: str
    quiesced: bool = False


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotRemoved(Event):
    """``snapshot.removed``: vbrd's snapshot was committed (consolidated) and is gone."""

    type: ClassVar[str] = "snapshot.removed"
    phase: ClassVar[str] = Phase.SNAPSHOT_COMMIT
    snapshot: str
    orphan: bool = False


# --------------------------------------------------------------------------------------------
# data transport


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class TransportSelected(Event):
    """``transport.selected``: the mode that reads a disk, and why others were skipped."""

    type: ClassVar[str] = "transport.selected"
    phase: ClassVar[str] = Phase.DATA_TRANSPORT
    mode: str
    skipped: tuple[tuple[str, str], ...] = ()


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class TransferProgress(Event):
    """``transfer.progress``: bytes read/sent of a disk so far, rate and bottleneck."""

    type: ClassVar[str] = "transfer.progress"
    phase: ClassVar[str] = Phase.DATA_TRANSPORT
    bytes_read: int
    bytes_sent: int
    bytes_done: int
    bytes_total: int
    rate: float
    bottleneck: str = ""


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class DiskTransferred(Event):
    """``disk.transferred``: one disk is in the repository (durable, not yet a point)."""

    type: ClassVar[str] = "disk.transferred"
    phase: ClassVar[str] = Phase.DATA_TRANSPORT
    mode: str
    bytes_read: int
    bytes_sent: int
    bytes_stored: int
    blocks_total: int
    incremental: bool
    reason: str = ""


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class DiskAttached(Event):
    """``hotadd.attached``: a snapshot's disk was hot-added to the proxy VM (``device``:
    ``scsiBUS:UNIT UUID``), read-only (independent non-persistent)."""

    type: ClassVar[str] = "hotadd.attached"
    phase: ClassVar[str] = Phase.DATA_TRANSPORT
    proxy_vm: str
    device: str
    file: str


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class DiskDetached(Event):
    """``hotadd.detached``: a hot-added disk was removed from the proxy VM (its file kept);
    ``orphan`` when a crashed daemon had left it, ``ok`` false when vCenter refused."""

    type: ClassVar[str] = "hotadd.detached"
    phase: ClassVar[str] = Phase.DATA_TRANSPORT
    proxy_vm: str
    device: str
    file: str
    ok: bool = True
    reason: str = ""
    orphan: bool = False


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class PointCommitted(Event):
    """``point.committed``: a restore point became visible in the repository."""

    type: ClassVar[str] = "point.committed"
    phase: ClassVar[str] = Phase.DATA_TRANSPORT
    point_id: str
    repository: str
