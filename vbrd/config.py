"""The configuration: one TOML file read into typed, validated settings.

Validation is strict because a typo in a backup config is found at 3 a.m. otherwise: unknown
keys are errors, and every error names the file, the key path and the reason
(:class:`vbrd.errors.ConfigError`, exit code 2). Secrets are referenced (``*_file`` or
``*_env``), read at load time into :class:`vbrd.models.Secret` and never logged.
"""
from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli

from vbrd.errors import ConfigError
from vbrd.models import Secret
from vbrd.transport.certs import parse_fingerprint

#: what ``transport = "auto"`` tries, in order (the built-in modes); a mode another plugin
#: provides is used where a job names it. Mode names are checked against the loaded plugins
#: when the daemon starts (:func:`vbrd.engine.validate_transport_modes`).
AUTO_ORDER = ("san", "hotadd", "nbd")
MODE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
               "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

GuestNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# --------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class DaemonSettings:
    state_dir: Path
    api_listen: str = "127.0.0.1:8470"
    api_socket: Path | None = None
    token_file: Path | None = None
    plugin_dirs: tuple[Path, ...] = ()
    disabled_plugins: tuple[str, ...] = ()
    log_level: str = "info"
    stop_timeout: float = 120.0
    #: a disk's transfer without progress this long is ended (both movers killed) and the
    #: disk tried again with another transport mode or proxy, or failed with that reason
    stall_timeout: float = 300.0

    @property
    def catalog_path(self) -> Path:
        return self.state_dir / "catalog.sqlite"


@dataclass(frozen=True)
class VCenterSettings:
    name: str
    url: str
    user: str
    password: Secret = field(repr=False)
    verify_tls: bool = True
    datacenter: str = ""


@dataclass(frozen=True)
class Credentials:
    name: str
    user: str
    password: Secret | None = field(default=None, repr=False)
    key_file: Path | None = None


LOCAL = "local"


@dataclass(frozen=True)
class AgentAccess:
    """How the backup server reaches a host's agent (``address = "host:port"``).

    ``address = "local"`` means no agent: the data movers run on the backup server, under the
    daemon. Otherwise the agent's certificate is pinned by ``fingerprint`` and the Manager
    presents ``secret``.
    """

    address: str = LOCAL
    fingerprint: str = ""
    secret: Secret | None = field(default=None, repr=False)

    @property
    def remote(self) -> bool:
        return self.address != LOCAL

    @property
    def host(self) -> str:
        """The host part of the agent's address (``local`` for the backup server itself)."""
        return split_address(self.address)[0] if self.remote else LOCAL


@dataclass(frozen=True)
class ProxySettings:
    name: str
    address: str = LOCAL
    max_tasks: int = 2
    transport_modes: tuple[str, ...] = ()  # () = every loaded mode
    vm: str = ""
    network: str = ""
    san_paths: Mapping[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    secret: Secret | None = field(default=None, repr=False)

    def offers(self, mode: str) -> bool:
        """Whether this proxy may read disks with ``mode`` (all loaded modes unless its
        ``transport_modes`` names some)."""
        return not self.transport_modes or mode in self.transport_modes

    @property
    def agent(self) -> AgentAccess:
        return AgentAccess(self.address, self.fingerprint, self.secret)


@dataclass(frozen=True)
class RepositorySettings:
    """A repository. With an agent (``address``), the agent's data movers store the blocks,
    and ``path`` is where the backup server itself sees the same repository (on the same
    machine or a shared mount) to commit, list and remove restore points."""

    name: str
    path: Path
    block_size: int = 1 << 20
    compression_level: int = 3
    max_tasks: int = 4
    address: str = LOCAL
    network: str = ""
    fingerprint: str = ""
    secret: Secret | None = field(default=None, repr=False)

    @property
    def agent(self) -> AgentAccess:
        return AgentAccess(self.address, self.fingerprint, self.secret)


@dataclass(frozen=True)
class TrafficRule:
    """A bandwidth limit for the data movers' traffic from one side to the other.

    Each side is named by network (the ``network`` of proxies and repositories) or by host
    (a proxy's or repository's name, or the host of its agent address).
    """

    name: str
    from_network: str
    to_network: str
    limit: float
    hours: tuple[int, int] | None = None  # minutes since midnight, [start, end)
    from_host: str = ""
    to_host: str = ""


@dataclass(frozen=True)
class Schedule:
    """When a job starts by itself: ``daily HH:MM``, ``weekly DAY HH:MM`` or ``every N[smh]``."""

    kind: str  # "daily" | "weekly" | "every"
    at_minute: int = 0
    weekday: int = 0
    interval: float = 0.0
    text: str = ""


@dataclass(frozen=True)
class GuestSettings:
    enabled: bool = False
    on_failure: str = "require"
    elevate: bool = False
    linux_credentials: str = ""
    windows_credentials: str = ""
    pre_freeze: Path | None = None
    post_thaw: Path | None = None
    windows_pre_freeze: Path | None = None
    windows_post_thaw: Path | None = None
    host_key_check: str = "known_hosts"
    known_hosts: Path | None = None
    ssh_port: int = 22
    winrm_port: int = 5985
    timeout: float = 300.0
    log_handling: str = "copy_only"
    networks: tuple[GuestNetwork, ...] = ()
    """Where SSH and WinRM may look for the guest: the addresses VMware Tools report come
    from inside the guest, so only those in these networks are contacted (none: VIX only)."""
    processors: tuple[str, ...] = ()  # the job's own chain order; () = by the processors' rank


@dataclass(frozen=True)
class JobSettings:
    name: str
    vcenter: str
    repository: str
    transport: str = "auto"
    cbt: bool = True
    vms: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()
    clusters: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    resource_pools: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    exclude_disks: tuple[str, ...] = ()
    schedule: Schedule | None = None
    retention_points: int = 7
    proxies: tuple[str, ...] = ()
    guest: GuestSettings = field(default_factory=GuestSettings)

    @property
    def transport_order(self) -> tuple[str, ...]:
        return AUTO_ORDER if self.transport == "auto" else (self.transport,)


@dataclass(frozen=True)
class Config:
    path: Path
    daemon: DaemonSettings
    vcenters: Mapping[str, VCenterSettings]
    credentials: Mapping[str, Credentials]
    proxies: Mapping[str, ProxySettings]
    repositories: Mapping[str, RepositorySettings]
    traffic_rules: tuple[TrafficRule, ...]
    jobs: Mapping[str, JobSettings]
    plugins: Mapping[str, Mapping[str, Any]]

    def secrets(self) -> list[str]:
        """Every secret value this config holds, for redaction of logs and guest output."""
        values = [v.password.reveal() for v in self.vcenters.values()]
        values += [c.password.reveal() for c in self.credentials.values() if c.password]
        values += [p.secret.reveal() for p in self.proxies.values() if p.secret]
        values += [r.secret.reveal() for r in self.repositories.values() if r.secret]
        return [v for v in values if v]


# --------------------------------------------------------------------------------------------
# parsing


class _Table:
    """A TOML table being consumed: each key read is ticked off; leftovers are errors."""

    def __init__(self, loader: _Loader, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            loader.fail(path, f"must be a table, not {_kind(data)}")
        self.loader, self.data, self.path = loader, data, path
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ..., *,
            check: Callable[[Any], str | None] | None = None) -> Any:
        self.seen.add(name)
        if name not in self.data:
            if default is ...:
                self.loader.fail(self.key(name), "is required")
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(value, kinds) or (float in kinds and isinstance(value, int))
        if not ok:
            names = " or ".join(_type_name(k) for k in kinds)
            self.loader.fail(self.key(name), f"must be {names}, not {_kind(value)}")
        if check is not None and (problem := check(value)):
            self.loader.fail(self.key(name), problem)
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.get(name, list, [])
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.loader.fail(f"{self.key(name)}[{i}]", f"must be a string, not {_kind(item)}")
        return tuple(value)

    def sub(self, name: str) -> _Table:
        self.seen.add(name)
        return _Table(self.loader, self.data.get(name, {}), self.key(name))

    def done(self) -> None:
        for unknown in sorted(set(self.data) - self.seen):
            self.loader.fail(self.key(unknown), "unknown key")


class _Loader:
    def __init__(self, file: Path, env: Mapping[str, str]) -> None:
        self.file, self.env = file, env

    def fail(self, key: str, reason: str) -> None:
        raise ConfigError(str(self.file), key, reason)

    def path(self, value: str) -> Path:
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self.file.parent / p)

    def secret(self, table: _Table, base: str, *, required: bool) -> Secret | None:
        """``<base>_file`` or ``<base>_env``; a literal ``<base>`` is refused on purpose."""
        if base in table.data:
            table.seen.add(base)
            self.fail(table.key(base), f"secrets are not accepted inline; use {base}_file "
                                       f"or {base}_env")
        file_ = table.get(f"{base}_file", str, None)
        env = table.get(f"{base}_env", str, None)
        if file_ and env:
            self.fail(table.key(f"{base}_file"), f"give {base}_file or {base}_env, not both")
        if file_:
            p = self.path(file_)
            try:
                return Secret(p.read_text().strip())
            except OSError as e:
                self.fail(table.key(f"{base}_file"), f"cannot read {p}: {e.strerror}")
        if env:
            if env not in self.env:
                self.fail(table.key(f"{base}_env"), f"environment variable {env} is not set")
            return Secret(self.env[env])
        if required:
            self.fail(table.key(f"{base}_file"), f"is required (or {base}_env)")
        return None


def parse_size(text: str | int) -> int:
    """``"1MiB"`` → 1048576. Integers are bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (try \"1MiB\")")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_rate(text: str) -> float:
    """``"20MB/s"`` → 20e6 bytes per second."""
    m = re.fullmatch(r"\s*(.+?)\s*/\s*s\s*", text)
    if not m:
        raise ValueError(f"not a rate: {text!r} (try \"20MB/s\")")
    return float(parse_size(m.group(1)))


def parse_duration(text: str | int | float) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (try \"30s\" or \"5m\")")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def parse_schedule(text: str) -> Schedule | None:
    words = text.lower().split()
    if not words:
        return None

    def clock(word: str) -> int:
        m = re.fullmatch(r"(\d{1,2}):(\d{2})", word)
        if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
            raise ValueError(f"not a time of day: {word!r} (try 22:00)")
        return int(m.group(1)) * 60 + int(m.group(2))

    if words[0] == "daily" and len(words) == 2:
        return Schedule("daily", at_minute=clock(words[1]), text=text)
    if words[0] == "weekly" and len(words) == 3:
        if words[1][:3] not in _WEEKDAYS:
            raise ValueError(f"not a weekday: {words[1]!r}")
        return Schedule("weekly", weekday=_WEEKDAYS.index(words[1][:3]),
                        at_minute=clock(words[2]), text=text)
    if words[0] == "every" and len(words) == 2:
        interval = parse_duration(words[1])
        if interval <= 0:
            raise ValueError("the interval must be positive")
        return Schedule("every", interval=interval, text=text)
    raise ValueError(f"not a schedule: {text!r} (try \"daily 22:00\", \"weekly sun 03:00\" "
                     f"or \"every 30m\")")


def _checked(parse: Callable[[Any], Any]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        try:
            parse(value)
        except ValueError as e:
            return str(e)
        return None
    return check


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, not {v!r}"


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be positive"


def _positive_duration(v: Any) -> float:
    seconds = parse_duration(v)
    if seconds <= 0:
        raise ValueError(f"must be a positive duration, not {v!r}")
    return seconds


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raise :class:`ConfigError` on the first problem."""
    file = Path(path).absolute()
    try:
        raw = tomli.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(str(file), "", "no such file") from None
    except OSError as e:
        raise ConfigError(str(file), "", f"cannot read: {e.strerror}") from None
    except tomli.TOMLDecodeError as e:
        raise ConfigError(str(file), "", f"not valid TOML: {e}") from None
    return from_mapping(raw, file, env if env is not None else os.environ)


def from_mapping(raw: Mapping[str, Any], file: Path, env: Mapping[str, str]) -> Config:
    ld = _Loader(file, env)
    root = _Table(ld, dict(raw), "")

    d = root.sub("daemon")
    socket = d.get("api_socket", str, "")
    token = d.get("token_file", str, "")
    daemon = DaemonSettings(
        state_dir=ld.path(d.get("state_dir", str, "/var/lib/vbrd")),
        api_listen=d.get("api_listen", str, "127.0.0.1:8470",
                         check=lambda v: None if v == "" or re.fullmatch(r".+:\d+", v)
                         else "must be HOST:PORT or empty"),
        api_socket=ld.path(socket) if socket else None,
        token_file=ld.path(token) if token else None,
        plugin_dirs=tuple(ld.path(p) for p in d.strings("plugin_dirs")),
        disabled_plugins=d.strings("disabled_plugins"),
        log_level=d.get("log_level", str, "info",
                        check=_one_of("debug", "info", "warning", "error")),
        stop_timeout=parse_duration(d.get("stop_timeout", (str, int, float), 120,
                                          check=_checked(parse_duration))),
        stall_timeout=parse_duration(d.get("stall_timeout", (str, int, float), 300,
                                           check=_checked(_positive_duration))),
    )
    d.done()
    if daemon.api_listen and not daemon.token_file:
        ld.fail("daemon.token_file", "is required when api_listen is set (the TCP API "
                                     "always asks for a bearer token)")

    vcenters: dict[str, VCenterSettings] = {}
    vc_root = root.sub("vcenters")
    vc_root.seen.update(vc_root.data)
    for name in vc_root.data:
        t = _Table(ld, vc_root.data[name], vc_root.key(name))
        vcenters[name] = VCenterSettings(
            name=name,
            url=t.get("url", str, check=lambda v: None if re.match(r"https?://", v)
                      else "must be an http:// or https:// URL"),
            user=t.get("user", str),
            password=ld.secret(t, "password", required=True),  # type: ignore[arg-type]
            verify_tls=t.get("verify_tls", bool, True),
            datacenter=t.get("datacenter", str, ""),
        )
        t.done()

    credentials: dict[str, Credentials] = {}
    cr_root = root.sub("credentials")
    cr_root.seen.update(cr_root.data)
    for name in cr_root.data:
        t = _Table(ld, cr_root.data[name], cr_root.key(name))
        key_file = t.get("key_file", str, "")
        cred = Credentials(name=name, user=t.get("user", str),
                           password=ld.secret(t, "password", required=False),
                           key_file=ld.path(key_file) if key_file else None)
        if cred.key_file and not cred.key_file.is_file():
            ld.fail(t.key("key_file"), f"no such file: {cred.key_file}")
        if not cred.password and not cred.key_file:
            ld.fail(t.key("password_file"), "give password_file, password_env or key_file")
        credentials[name] = cred
        t.done()

    proxies: dict[str, ProxySettings] = {}
    px_root = root.sub("proxies")
    px_root.seen.update(px_root.data)
    for name in px_root.data:
        t = _Table(ld, px_root.data[name], px_root.key(name))
        modes = t.strings("transport_modes")
        for m in modes:
            if not MODE_NAME.match(m):
                ld.fail(t.key("transport_modes"), f"{m!r} is not a transport mode name "
                                                  f"(lowercase letters, digits, - and _)")
        san = t.sub("san_paths")
        san.seen.update(san.data)
        for ds, where in san.data.items():
            if not isinstance(where, str):
                ld.fail(san.key(ds), f"must be a string, not {_kind(where)}")
        access = _agent_access(ld, t)
        proxies[name] = ProxySettings(
            name=name, address=access.address,
            max_tasks=t.get("max_tasks", int, 2, check=_positive), transport_modes=modes,
            vm=t.get("vm", str, ""), network=t.get("network", str, ""),
            san_paths={ds: str(ld.path(p)) for ds, p in san.data.items()},
            fingerprint=access.fingerprint, secret=access.secret)
        t.done()

    repositories: dict[str, RepositorySettings] = {}
    rp_root = root.sub("repositories")
    rp_root.seen.update(rp_root.data)
    for name in rp_root.data:
        t = _Table(ld, rp_root.data[name], rp_root.key(name))
        block = parse_size(t.get("block_size", (str, int), "1MiB", check=_checked(parse_size)))
        if block < 64 * 1024 or block > 64 << 20 or block & (block - 1):
            ld.fail(t.key("block_size"), "must be a power of two between 64KiB and 64MiB")
        access = _agent_access(ld, t)
        repositories[name] = RepositorySettings(
            name=name, path=ld.path(t.get("path", str)), block_size=block,
            compression_level=t.get("compression_level", int, 3,
                                    check=lambda v: None if -7 <= v <= 22
                                    else "must be between -7 and 22 (zstd levels)"),
            max_tasks=t.get("max_tasks", int, 4, check=_positive),
            address=access.address, network=t.get("network", str, ""),
            fingerprint=access.fingerprint, secret=access.secret)
        t.done()

    rules: list[TrafficRule] = []
    raw_rules = root.get("traffic_rules", list, [])
    for i, item in enumerate(raw_rules):
        t = _Table(ld, item, f"traffic_rules[{i}]")
        hours_text = t.get("hours", str, "", check=lambda v: None if re.fullmatch(
            r"\d{1,2}:\d{2}-\d{1,2}:\d{2}", v) else "must be HH:MM-HH:MM")
        hours = None
        if hours_text:
            a, b = hours_text.split("-")
            hours = (_minutes(a), _minutes(b))
        sides = {}
        for side in ("from", "to"):
            network = t.get(f"{side}_network", str, "")
            host = t.get(f"{side}_host", str, "")
            if bool(network) == bool(host):
                ld.fail(t.key(f"{side}_network"), f"give {side}_network or {side}_host "
                                                  f"(exactly one of them)")
            sides[side] = (network, host)
        rules.append(TrafficRule(
            name=t.get("name", str, f"rule-{i}"), from_network=sides["from"][0],
            to_network=sides["to"][0],
            limit=parse_rate(t.get("limit", str, check=_checked(parse_rate))), hours=hours,
            from_host=sides["from"][1], to_host=sides["to"][1]))
        t.done()

    jobs: dict[str, JobSettings] = {}
    jb_root = root.sub("jobs")
    jb_root.seen.update(jb_root.data)
    for name in jb_root.data:
        t = _Table(ld, jb_root.data[name], jb_root.key(name))
        job = JobSettings(
            name=name,
            vcenter=t.get("vcenter", str, check=lambda v: None if v in vcenters
                          else f"no vCenter named {v!r} in [vcenters]"),
            repository=t.get("repository", str, check=lambda v: None if v in repositories
                             else f"no repository named {v!r} in [repositories]"),
            transport=t.get("transport", str, "auto", check=lambda v: None if MODE_NAME.match(v)
                            else f"{v!r} is not a transport mode name (auto, or a mode a "
                                 f"loaded plugin provides: san, hotadd, nbd, ...)"),
            cbt=t.get("cbt", bool, True),
            vms=t.strings("vms"), folders=t.strings("folders"), clusters=t.strings("clusters"),
            hosts=t.strings("hosts"), resource_pools=t.strings("resource_pools"),
            tags=t.strings("tags"), exclude=t.strings("exclude"),
            exclude_disks=t.strings("exclude_disks"),
            schedule=parse_schedule(t.get("schedule", str, "", check=_checked(parse_schedule))),
            retention_points=t.get("retention_points", int, 7, check=_positive),
            proxies=t.strings("proxies"),
            guest=_guest(ld, t.sub("guest"), credentials),
        )
        for p in job.proxies:
            if p not in proxies:
                ld.fail(t.key("proxies"), f"no proxy named {p!r} in [proxies]")
        if not (job.vms or job.folders or job.clusters or job.hosts or job.resource_pools
                or job.tags):
            ld.fail(t.key("vms"), "the job selects no VMs (give vms, folders, clusters, "
                                  "hosts, resource_pools or tags)")
        jobs[name] = job
        t.done()

    plugins_table = root.sub("plugins")
    plugins_table.seen.update(plugins_table.data)
    plugins = {k: dict(v) for k, v in plugins_table.data.items() if isinstance(v, dict)}

    root.done()
    return Config(path=file, daemon=daemon, vcenters=vcenters, credentials=credentials,
                  proxies=proxies, repositories=repositories, traffic_rules=tuple(rules),
                  jobs=jobs, plugins=plugins)


# --------------------------------------------------------------------------------------------
# the agent's own configuration (``vbrd agent --config FILE``, etc/agent.toml)


@dataclass(frozen=True)
class AgentRepository:
    """A repository on the agent's host that its data movers may store blocks in."""

    name: str
    path: Path
    block_size: int = 1 << 20
    compression_level: int = 3


AGENT_ROLES = ("proxy", "repository")
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)?")


@dataclass(frozen=True)
class AgentSettings:
    """An agent's own policy, which no request can change: its ``role`` (a proxy agent starts
    proxy-side data movers only, a repository agent repository-side ones), the plugins a
    proxy's movers may load (installed ones, ``plugin_dirs`` and the ``plugin_modules`` it
    allows), where it sees each datastore (``san_paths``) and its devices (``device_root``),
    and the repositories it serves."""

    path: Path
    name: str
    role: str
    listen: str
    state_dir: Path
    secret: Secret = field(repr=False)
    certificate: Path
    key: Path
    data_host: str = ""
    plugin_dirs: tuple[Path, ...] = ()
    disabled_plugins: tuple[str, ...] = ()
    plugin_modules: tuple[str, ...] = ()
    san_paths: Mapping[str, str] = field(default_factory=dict)
    device_root: str = "/"
    log_level: str = "info"
    stop_timeout: float = 30.0
    repositories: Mapping[str, AgentRepository] = field(default_factory=dict)

    def secrets(self) -> list[str]:
        return [self.secret.reveal()]


def load_agent_config(path: str | os.PathLike[str],
                      env: Mapping[str, str] | None = None) -> AgentSettings:
    """Read and validate an agent's config file; :class:`ConfigError` on the first problem."""
    file = Path(path).absolute()
    try:
        raw = tomli.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(str(file), "", "no such file") from None
    except OSError as e:
        raise ConfigError(str(file), "", f"cannot read: {e.strerror}") from None
    except tomli.TOMLDecodeError as e:
        raise ConfigError(str(file), "", f"not valid TOML: {e}") from None
    ld = _Loader(file, env if env is not None else os.environ)
    root = _Table(ld, dict(raw), "")
    a = root.sub("agent")
    state_dir = ld.path(a.get("state_dir", str, "/var/lib/vbrd-agent"))
    cert = a.get("certificate", str, "")
    key = a.get("key", str, "")
    role = a.get("role", str, check=_one_of(*AGENT_ROLES))
    proxy = role == "proxy"

    def proxy_only(key: str, value: Any, what: str) -> Any:
        if value and not proxy:
            ld.fail(key, f"only a proxy agent {what}; this one is a {role} agent")
        return value

    modules = proxy_only(a.key("plugin_modules"), a.strings("plugin_modules"),
                         "loads transport plugins")
    for module in modules:
        if not _MODULE_NAME.fullmatch(module):
            ld.fail(a.key("plugin_modules"), f"{module!r} is not a module name "
                                              f"(package.module or package.module:object)")
    san = root.sub("san_paths")
    san.seen.update(san.data)
    proxy_only("san_paths", san.data, "reads datastores")
    for ds, where in san.data.items():
        if not isinstance(where, str):
            ld.fail(san.key(ds), f"must be a string, not {_kind(where)}")
    device_root = a.get("device_root", str, "/", check=lambda v: None if v.startswith("/")
                        else f"must be an absolute path, not {v!r}")
    proxy_only(a.key("device_root"), device_root != "/", "reads hot-added devices")
    settings = AgentSettings(
        path=file,
        name=a.get("name", str, "") or os.uname().nodename,
        role=role,
        listen=a.get("listen", str, "0.0.0.0:8471", check=_checked(split_address)),
        state_dir=state_dir,
        secret=ld.secret(a, "secret", required=True),  # type: ignore[arg-type]
        certificate=ld.path(cert) if cert else state_dir / "agent.crt",
        key=ld.path(key) if key else state_dir / "agent.key",
        data_host=a.get("data_host", str, ""),
        plugin_dirs=tuple(ld.path(p) for p in proxy_only(
            a.key("plugin_dirs"), a.strings("plugin_dirs"), "loads transport plugins")),
        disabled_plugins=proxy_only(a.key("disabled_plugins"), a.strings("disabled_plugins"),
                                    "loads transport plugins"),
        plugin_modules=modules,
        san_paths={ds: str(ld.path(p)) for ds, p in san.data.items()},
        device_root=device_root,
        log_level=a.get("log_level", str, "info",
                        check=_one_of("debug", "info", "warning", "error")),
        stop_timeout=parse_duration(a.get("stop_timeout", (str, int, float), 30,
                                          check=_checked(parse_duration))),
        repositories=_agent_repositories(ld, root.sub("repositories")),
    )
    if proxy and settings.repositories:
        ld.fail("repositories", "a proxy agent serves no repositories; run a repository agent "
                                "(role = \"repository\") for them")
    a.done()
    if len(settings.secret.reveal()) < 16:
        ld.fail("agent.secret_file", "the shared secret is shorter than 16 characters; use a "
                                     "long random one (e.g. `openssl rand -hex 32`)")
    root.done()
    return settings


def _agent_repositories(ld: _Loader, table: _Table) -> dict[str, AgentRepository]:
    table.seen.update(table.data)
    out: dict[str, AgentRepository] = {}
    for name in table.data:
        t = _Table(ld, table.data[name], table.key(name))
        block = parse_size(t.get("block_size", (str, int), "1MiB", check=_checked(parse_size)))
        if block < 64 * 1024 or block > 64 << 20 or block & (block - 1):
            ld.fail(t.key("block_size"), "must be a power of two between 64KiB and 64MiB")
        out[name] = AgentRepository(
            name=name, path=ld.path(t.get("path", str)), block_size=block,
            compression_level=t.get("compression_level", int, 3,
                                    check=lambda v: None if -7 <= v <= 22
                                    else "must be between -7 and 22 (zstd levels)"))
        t.done()
    return out


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` → ``(host, port)``; ValueError otherwise."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\s\[\]]+):(\d+)", address.strip())
    if not m:
        raise ValueError(f"not HOST:PORT: {address!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return host, port


def _agent_access(ld: _Loader, t: _Table) -> AgentAccess:
    """``address`` (``local`` or an agent's HOST:PORT), and for an agent its pinned
    certificate fingerprint and the shared secret."""
    address = t.get("address", str, LOCAL, check=lambda v: None if v == LOCAL else (
        _checked(split_address)(v) and f"must be \"local\" or the agent's HOST:PORT, not {v!r}"))
    fingerprint = t.get("fingerprint", str, "", check=lambda v: _checked(parse_fingerprint)(v)
                        if v else None)
    secret = ld.secret(t, "secret", required=address != LOCAL)
    if address == LOCAL:
        for key, value in (("fingerprint", fingerprint), ("secret_file", secret)):
            if value:
                ld.fail(t.key(key), "only an agent (address = \"HOST:PORT\") has one; "
                                    "address is \"local\"")
    elif not fingerprint:
        ld.fail(t.key("fingerprint"), "is required with an agent address: pin the agent's "
                                      "certificate (`vbrd agent --config FILE --fingerprint` "
                                      "on that host prints it)")
    return AgentAccess(address, fingerprint, secret)


def _guest(ld: _Loader, t: _Table, credentials: Mapping[str, Credentials]) -> GuestSettings:
    def cred_ref(v: str) -> str | None:
        return None if v in credentials else f"no credentials named {v!r} in [credentials]"

    def script(key: str) -> Path | None:
        value = t.get(key, str, "")
        if not value:
            return None
        p = ld.path(value)
        if not p.is_file():
            ld.fail(t.key(key), f"no such script: {p}")
        return p

    known = t.get("known_hosts", str, "")
    g = GuestSettings(
        enabled=t.get("enabled", bool, False),
        on_failure=t.get("on_failure", str, "require", check=_one_of("require", "try")),
        elevate=t.get("elevate", bool, False),
        linux_credentials=t.get("linux_credentials", str, "", check=cred_ref),
        windows_credentials=t.get("windows_credentials", str, "", check=cred_ref),
        pre_freeze=script("pre_freeze"), post_thaw=script("post_thaw"),
        windows_pre_freeze=script("windows_pre_freeze"),
        windows_post_thaw=script("windows_post_thaw"),
        host_key_check=t.get("host_key_check", str, "known_hosts",
                             check=_one_of("known_hosts", "tofu", "off")),
        known_hosts=ld.path(known) if known else None,
        ssh_port=t.get("ssh_port", int, 22), winrm_port=t.get("winrm_port", int, 5985),
        timeout=parse_duration(t.get("timeout", (str, int, float), 300,
                                     check=_checked(parse_duration))),
        log_handling=t.get("log_handling", str, "copy_only",
                           check=_one_of("truncate", "copy_only", "leave")),
        networks=_networks(ld, t, "networks"),
        processors=tuple(t.strings("processors")),
    )
    t.done()
    return g


def _networks(ld: _Loader, t: _Table, key: str) -> tuple[GuestNetwork, ...]:
    found = []
    for i, text in enumerate(t.strings(key)):
        try:
            found.append(ipaddress.ip_network(text.strip()))
        except ValueError as e:
            ld.fail(f"{t.key(key)}[{i}]", f"not a network ({e}); give an address or "
                                          f"ADDRESS/PREFIX, e.g. \"10.0.0.0/8\"")
    return tuple(found)


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "a list", dict: "a table"}.get(kind, kind.__name__)


def _kind(value: Any) -> str:
    return _type_name(type(value)) if not isinstance(value, bool) else "true or false"
