"""The engine: what a running daemon holds and what its API and schedule act on.

One object owns the configuration, the bus, the catalog, the plugins and the running
sessions, so that the API, the CLI, the schedule and signal handling all start, stop and
inspect jobs the same way (and a job that is already running is refused the same way).
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vbrd.bus import EventBus
from vbrd.catalog import Catalog
from vbrd.config import Config, JobSettings
from vbrd.errors import ConfigError, Conflict, NotFound, UsageError
from vbrd.events import Event
from vbrd.installation import load_or_create
from vbrd.maintenance import Maintenance
from vbrd.plugins import PluginManager, call_each, make_plugin_manager, transport_mode_plugins
from vbrd.scheduler import ResourceScheduler
from vbrd.transport.remote import Agents
from vbrd.transport.rules import TrafficShaper

log = logging.getLogger(__name__)


@dataclass
class RunningSession:
    id: str
    job: str
    task: asyncio.Task[str]
    stop: asyncio.Event = field(default_factory=asyncio.Event)


def validate_plugin_tables(config: Config, pm: PluginManager) -> None:
    """Each ``[plugins.<name>]`` table must belong to a loaded plugin that accepts it."""
    for name, table in config.plugins.items():
        answers = [a.value for a in call_each(pm, "vbrd_validate_plugin_config", name=name,
                                              table=dict(table))]
        if not answers:
            raise ConfigError(str(config.path), f"plugins.{name}",
                              "no loaded plugin owns this table (is the plugin installed and "
                              "not disabled?)")
        problems = [p for answer in answers for p in answer]
        if problems:
            raise ConfigError(str(config.path), f"plugins.{name}", "; ".join(problems))


def validate_transport_modes(config: Config, pm: PluginManager) -> None:
    """Every mode a job or proxy names must be one a loaded plugin provides (``auto`` tries
    the built-in modes that are loaded and names the others as not available)."""
    loaded = transport_mode_plugins(pm)
    known = ", ".join(f"{m} (plugin {p})" for m, p in sorted(loaded.items())) or "none"

    def check(key: str, mode: str) -> None:
        if mode not in loaded:
            raise ConfigError(str(config.path), key,
                              f"no loaded plugin provides the transport mode {mode!r}; the "
                              f"loaded modes are: {known}")

    for job in config.jobs.values():
        if job.transport != "auto":
            check(f"jobs.{job.name}.transport", job.transport)
    for proxy in config.proxies.values():
        for mode in proxy.transport_modes:
            check(f"proxies.{proxy.name}.transport_modes", mode)


def new_session_id(job: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", job)
    return f"{stamp}-{safe}-{secrets.token_hex(3)}"


class Engine:
    def __init__(self, config: Config, *, pm: PluginManager | None = None) -> None:
        self.config = config
        self.bus = EventBus()
        #: written on every snapshot and hot-added disk (vbrd.installation)
        self.installation_id = load_or_create(config.daemon.state_dir)
        self.catalog = Catalog(config.daemon.catalog_path)
        self.pm = pm or make_plugin_manager(config.daemon.plugin_dirs,
                                            config.daemon.disabled_plugins)
        validate_plugin_tables(config, self.pm)
        validate_transport_modes(config, self.pm)
        self.sessions: dict[str, RunningSession] = {}
        # shared by every session: slots are per proxy/repository, limits per network rule
        self.scheduler = ResourceScheduler.from_config(config)
        self.shaper = TrafficShaper(config.traffic_rules)
        self.agents = Agents()
        self.maintenance = Maintenance()
        self._unsubscribe = [self.bus.subscribe(self.catalog.record),
                             self.bus.subscribe(self._notify_plugins)]
        for interrupted in self.catalog.mark_interrupted():
            log.warning("session %s was interrupted by a daemon stop; marked failed",
                        interrupted)

    def _notify_plugins(self, event: Event) -> None:
        call_each(self.pm, "vbrd_event", event=event)

    # jobs ------------------------------------------------------------------------------

    def job(self, name: str) -> JobSettings:
        try:
            return self.config.jobs[name]
        except KeyError:
            raise NotFound(f"no job named {name!r}") from None

    def running_session_of(self, job: str) -> RunningSession | None:
        return next((s for s in list(self.sessions.values()) if s.job == job), None)

    async def jobs(self) -> list[dict[str, Any]]:
        out = []
        for name, job in sorted(self.config.jobs.items()):
            running = self.running_session_of(name)
            last = await asyncio.to_thread(self.catalog.sessions, name, 1)
            out.append({
                "name": name, "vms": list(job.vms), "transport": job.transport,
                "schedule": job.schedule.text if job.schedule else "",
                "repository": job.repository, "guest_processing": job.guest.enabled,
                "running_session": running.id if running else None,
                "last_session": last[0].to_dict() if last else None,
            })
        return out

    async def start_job(self, name: str, trigger: str = "api") -> str:
        """Start a session of the job; returns its id at once (the session runs on)."""
        job = self.job(name)
        if running := self.running_session_of(name):
            raise Conflict(f"job {name!r} is already running (session {running.id})")
        from vbrd.manager import BackupManager

        session_id = new_session_id(name)
        stop = asyncio.Event()
        manager = BackupManager(self, job, session_id, trigger=trigger, stop=stop)
        manager.announce()
        task = asyncio.create_task(manager.run(), name=f"session {session_id}")
        self.sessions[session_id] = RunningSession(session_id, name, task, stop)
        task.add_done_callback(lambda _t: self.sessions.pop(session_id, None))
        return session_id

    async def wait_session(self, session_id: str) -> str:
        running = self.sessions.get(session_id)
        if running is not None:
            return await asyncio.shield(running.task)
        record = await asyncio.to_thread(self.catalog.session, session_id)
        if record is None:
            raise NotFound(f"no session {session_id!r}")
        return record.status

    async def stop_session(self, session_id: str) -> None:
        running = self.sessions.get(session_id)
        if running is None:
            if await asyncio.to_thread(self.catalog.session, session_id) is None:
                raise NotFound(f"no session {session_id!r}")
            raise Conflict(f"session {session_id} is not running")
        running.stop.set()

    async def stop_all(self, timeout: float) -> None:
        """Ask every running session to stop and give their cleanup ``timeout`` seconds."""
        for running in self.sessions.values():
            running.stop.set()
        tasks = [s.task for s in self.sessions.values()]
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            log.error("session %s did not finish its cleanup in %.0f s; cancelling",
                      task.get_name(), timeout)
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=10)

    # sessions --------------------------------------------------------------------------

    def session_info(self, session_id: str) -> dict[str, Any]:
        record = self.catalog.session(session_id)
        if record is None:
            raise NotFound(f"no session {session_id!r}")
        events = self.catalog.events(session_id)
        disks: dict[str, dict[str, Any]] = {}
        for e in events:
            if e["type"] in ("disk.transferred", "transport.selected"):
                d = disks.setdefault(f"{e['vm']}:{e['disk']}", {"vm": e["vm"], "disk": e["disk"]})
                d.update({k: v for k, v in e.items() if k in (
                    "mode", "bytes_read", "bytes_sent", "bytes_stored", "blocks_total",
                    "incremental", "reason")})
        return {**record.to_dict(), "disks": list(disks.values()), "events": events}

    # restore points --------------------------------------------------------------------

    def repository(self, name: str | None = None) -> Any:
        """The configured repository, opened — never created: every caller here reads or
        maintains it, and a mistyped or unmounted path must be an error that names it, not
        a new empty repository. Backups create it (saying so); so does ``vbrd repo init``."""
        from vbrd.errors import RepositoryError
        from vbrd.repository import Repository

        if name is not None and name not in self.config.repositories:
            raise NotFound(f"no repository named {name!r}")
        settings = (self.config.repositories[name] if name
                    else next(iter(self.config.repositories.values()), None))
        if settings is None:
            raise NotFound("no repository is configured")
        try:
            return Repository.open(settings.path)
        except RepositoryError as e:
            raise RepositoryError(
                f"repository {settings.name} ({settings.path}): {e} — is the path right and "
                f"its file system mounted? A backup creates a repository there, or "
                f"`vbrd repo init`") from e

    def restore_points(self, vm: str | None = None) -> list[dict[str, Any]]:
        """Every point, good ones first (``damaged: false``), then quarantined ones with
        the reason they are out of use."""
        points: list[dict[str, Any]] = []
        damaged: list[dict[str, Any]] = []
        for name in self.config.repositories:
            repo = self.repository(name)
            for p in repo.points(vm):
                points.append({"repository": name, **p.to_dict(), "damaged": False})
            for d in repo.damaged_points(vm):
                damaged.append({"repository": name, **d.to_dict()})
        return points + damaged

    def _repository_of(self, point_id: str) -> Any:
        for name in self.config.repositories:
            repo = self.repository(name)
            if repo.contains(point_id):
                return repo
        raise NotFound(f"no restore point {point_id!r}")

    def delete_point(self, point_id: str) -> dict[str, Any]:
        """Delete one restore point (good or damaged); its blocks go at the next gc."""
        repo = self._repository_of(point_id)
        repo.delete_point(point_id)
        return {"point": point_id, "deleted": True}

    async def gc(self, name: str | None = None) -> list[dict[str, Any]]:
        """Run the repositories' maintenance now (one, or all): see :mod:`vbrd.maintenance`.
        Waits for writers of each repository for up to its gc timeout."""
        from vbrd.maintenance import collect_garbage

        names = [name] if name is not None else list(self.config.repositories)
        results = []
        for repo_name in names:
            repo = await asyncio.to_thread(self.repository, repo_name)
            results.append(await collect_garbage(repo, repo_name, wait=True))
        return results

    async def restore(self, point_id: str, disk_key: int | None, dest: Path) -> dict[str, Any]:
        repo = self._repository_of(point_id)
        point = repo.point(point_id)
        keys = [d.key for d in point.disks]
        if disk_key is None:
            if len(keys) != 1:
                raise UsageError(f"restore point {point_id} has disks {keys}; name one "
                                f"with --disk")
            disk_key = keys[0]
        if disk_key not in keys:
            raise NotFound(f"restore point {point_id} has no disk {disk_key} (disks: {keys})")
        stats = await asyncio.to_thread(repo.restore_disk, point_id, disk_key, dest)
        return {"point": point_id, "disk": disk_key, "path": str(dest), **_as_dict(stats)}

    async def verify(self, point_id: str | None = None) -> list[dict[str, Any]]:
        if point_id is not None:
            repos = [self._repository_of(point_id)]
        else:
            repos = [self.repository(n) for n in self.config.repositories]
        problems: list[dict[str, Any]] = []
        for repo in repos:
            for p in await asyncio.to_thread(repo.verify, point_id):
                problems.append(_as_dict(p))
        return problems

    # lifecycle -------------------------------------------------------------------------

    def replace_config(self, config: Config) -> None:
        """Use a new configuration for sessions started from now on (and new slot counts
        and traffic rules for tasks that start from now on)."""
        validate_plugin_tables(config, self.pm)
        validate_transport_modes(config, self.pm)
        self.config = config
        self.scheduler.configure({p.name: p.max_tasks for p in config.proxies.values()},
                                 {r.name: r.max_tasks for r in config.repositories.values()})
        self.shaper.configure(config.traffic_rules)

    def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self.catalog.close()


def _as_dict(value: Any) -> dict[str, Any]:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    return dict(value)
