"""The daemon: ``vbrd run --config FILE`` on uvloop.

Lifecycle: starting → running → stopping → stopped. SIGTERM/SIGINT ask running sessions to
stop and give their cleanup (thaw, snapshot commit) ``daemon.stop_timeout`` seconds before
exit; SIGHUP reloads the configuration (a broken new one is refused and the old one kept).
systemd ``Type=notify`` is served through ``$NOTIFY_SOCKET`` (READY, STOPPING, WATCHDOG).
"""
from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import socket
from datetime import datetime, timedelta
from pathlib import Path

import uvloop

from vbrd.config import Config, JobSettings, Schedule, load_config
from vbrd.engine import Engine
from vbrd.errors import Conflict, VbrdError
from vbrd.logs import REDACTOR, setup_logging
from vbrd.manager.hotadd import detach_leftovers
from vbrd.manager.snapshot_commit import hunt_with
from vbrd.plugins import call_each
from vbrd.statedir import StateDirLock
from vbrd.vsphere import VSphere

log = logging.getLogger(__name__)


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


def sd_notify(message: str) -> None:
    """Tell systemd about our state; a no-op when not started by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as e:
            log.warning("cannot notify systemd at %s: %s", address, e)


def next_run(schedule: Schedule, now: datetime, last: datetime | None) -> datetime:
    """When a schedule next fires after ``now`` (local time)."""
    if schedule.kind == "every":
        base = last or now
        return max(now, base + timedelta(seconds=schedule.interval)) if last else \
            now + timedelta(seconds=schedule.interval)
    at = now.replace(hour=schedule.at_minute // 60, minute=schedule.at_minute % 60,
                     second=0, microsecond=0)
    if schedule.kind == "daily":
        return at if at > now else at + timedelta(days=1)
    days = (schedule.weekday - now.weekday()) % 7
    candidate = at + timedelta(days=days)
    return candidate if candidate > now else candidate + timedelta(days=7)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = State.STARTING
        self.stopping = asyncio.Event()
        # one daemon per state directory: two would both write its catalog and each mark the
        # other's running sessions interrupted
        self._state_lock = StateDirLock.acquire(config.daemon.state_dir)
        try:
            self.engine = Engine(config)
        except BaseException:
            self._state_lock.release()
            raise
        self._last_runs: dict[str, datetime] = {}

    async def run(self) -> int:
        from vbrd.api.server import ApiServer

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for failure in self.engine.pm.failures:
            log.error("plugin %s from %s was not loaded: %s", failure.name, failure.source,
                      failure.reason)
        api = ApiServer(self.engine)
        await api.start()
        call_each(self.engine.pm, "vbrd_startup", config=self.config)
        self.state = State.RUNNING
        sd_notify("READY=1\nSTATUS=running")
        log.info("vbrd is running (%d jobs)", len(self.config.jobs))
        background = [asyncio.create_task(self._schedule(), name="schedule"),
                      asyncio.create_task(self._watchdog(), name="watchdog"),
                      asyncio.create_task(self._hunt_at_start(), name="snapshot hunter")]
        try:
            await self.stopping.wait()
        finally:
            self.state = State.STOPPING
            sd_notify("STOPPING=1\nSTATUS=stopping: waiting for sessions to clean up")
            log.info("stopping: asking %d running session(s) to stop",
                     len(self.engine.sessions))
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.engine.stop_all(self.config.daemon.stop_timeout)
            await api.stop()
            self.engine.close()
            self._state_lock.release()
            self.state = State.STOPPED
            log.info("stopped")
        return 0

    def reload(self) -> None:
        try:
            new = load_config(self.config.path)
            self.engine.replace_config(new)  # checks it against the loaded plugins first
        except VbrdError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        REDACTOR.set_secrets(new.secrets())
        self.config = new
        log.info("configuration reloaded from %s (%d jobs)", new.path, len(new.jobs))

    async def _watchdog(self) -> None:
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if not usec:
            return
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(usec / 2e6)

    async def _hunt_at_start(self) -> None:
        """Detach the disks a previous daemon left hot-added to proxy VMs, then remove the vbrd
        snapshots it left behind (ESXi cannot remove a snapshot while its disk is attached)."""
        for settings in self.config.vcenters.values():
            vsphere = VSphere(settings)
            try:
                detached = await detach_leftovers(self.engine, vsphere, "daemon-start")
                if detached:
                    log.info("detached %d leftover hot-added disk(s) from proxy VMs in vCenter "
                             "%s", len(detached), settings.name)
                removed = await hunt_with(self.engine, vsphere, "daemon-start")
                if removed:
                    log.info("snapshot hunter removed %d leftover snapshot(s) in vCenter %s",
                             len(removed), settings.name)
            except VbrdError as e:
                log.warning("snapshot hunter could not check vCenter %s: %s", settings.name, e)
            finally:
                await vsphere.close()

    def _due(self, job: JobSettings, now: datetime) -> datetime | None:
        if job.schedule is None:
            return None
        return next_run(job.schedule, now, self._last_runs.get(job.name))

    async def _schedule(self) -> None:
        planned: dict[str, datetime] = {}
        while True:
            now = datetime.now()
            for name, job in self.config.jobs.items():
                if name not in planned and (due := self._due(job, now)) is not None:
                    planned[name] = due
            for name in list(planned):
                if name not in self.config.jobs or self.config.jobs[name].schedule is None:
                    del planned[name]
            for name, due in list(planned.items()):
                if due <= now:
                    del planned[name]
                    self._last_runs[name] = now
                    try:
                        session = await self.engine.start_job(name, trigger="schedule")
                        log.info("schedule started job %s (session %s)", name, session)
                    except Conflict as e:
                        log.warning("schedule skipped job %s: %s", name, e)
            wake = min(planned.values(), default=now + timedelta(seconds=60))
            await asyncio.sleep(max(0.2, min(60.0, (wake - datetime.now()).total_seconds())))


def run(config_path: str | Path) -> int:
    """Load the config (exit 2 when it is invalid) and run the daemon until stopped."""
    config = load_config(config_path)
    setup_logging(config.daemon.log_level, config.secrets())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_main(config))


async def _main(config: Config) -> int:
    return await Daemon(config).run()
