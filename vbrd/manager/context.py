"""What every phase of one session shares: the job, the bus, the stop request, vCenter."""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vbrd.errors import SessionStopped
from vbrd.events import Event, PhaseFinished, PhaseStarted, SessionLog

if TYPE_CHECKING:
    from vbrd.config import Config, JobSettings
    from vbrd.engine import Engine
    from vbrd.vsphere import VSphere

log = logging.getLogger("vbrd.session")


@dataclass
class SessionContext:
    engine: Engine
    config: Config
    job: JobSettings
    session_id: str
    stop: asyncio.Event
    vsphere: VSphere
    warnings: list[str] = field(default_factory=list)
    # warnings per VM: VMs run side by side, so a VM's status counts only its own
    vm_warnings: Counter[str] = field(default_factory=Counter)

    def emit(self, event_type: type[Event], **fields: Any) -> None:
        self.engine.bus.publish(event_type(session_id=self.session_id, **fields))

    def say(self, level: str, message: str, *, vm: str = "", disk: int | None = None) -> None:
        """A line of the session log (and of the daemon's log)."""
        if level == "warning":
            self.warnings.append(message)
            self.vm_warnings[vm] += 1
        getattr(log, level if level != "warning" else "warning")(
            "%s: %s", self.session_id, message)
        self.emit(SessionLog, level=level, message=message, vm=vm, disk=disk)

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise SessionStopped(f"session {self.session_id} was asked to stop")

    def phase(self, name: str, vm: str = "") -> _PhaseScope:
        return _PhaseScope(self, name, vm)


class _PhaseScope:
    """Emits phase.started/finished around a phase body and asks the phase hook first."""

    def __init__(self, ctx: SessionContext, name: str, vm: str) -> None:
        self.ctx, self.name, self.vm = ctx, name, vm

    async def __aenter__(self) -> _PhaseScope:
        self.ctx.emit(PhaseStarted, name=self.name, vm=self.vm)
        try:
            self.ctx.engine.pm.hook.vbrd_before_phase(
                session_id=self.ctx.session_id, job=self.ctx.job.name, phase=self.name,
                vm=self.vm)
        except BaseException as e:
            self.ctx.emit(PhaseFinished, name=self.name, vm=self.vm, ok=False, reason=str(e))
            raise
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.ctx.emit(PhaseFinished, name=self.name, vm=self.vm, ok=exc is None,
                      reason="" if exc is None else (str(exc) or type(exc).__name__))
