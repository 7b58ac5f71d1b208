"""The agent (Transport Service): ``vbrd agent --config FILE`` on a proxy or repository host.

The backup server's Manager asks the agent to start and stop data movers; the agent runs them
as its own child processes (:class:`vbrd.transport.movers.MoverProcess`, as the daemon does
for ``address = "local"``) and relays what they say. The data themselves never pass through
the agent: a task's proxy-side mover connects straight to its repository-side mover, over TLS
with the repository agent's certificate.

Security: HTTPS only, with a self-signed certificate made at first start
(:mod:`vbrd.transport.certs`) whose fingerprint the backup server pins; every request carries
the shared secret (``Authorization: Bearer SECRET``) or is refused with 401.

The API, under ``/api/v1``::

    GET    agent                  name, version, certificate (PEM) and fingerprint, repositories
    POST   movers                 {"role", "config"[, "peer_certificate"]} → a stream of JSON
                                  lines: {"event": "started", "id", "pid"}, then the mover's
                                  own events (vbrd.transport.mover), {"event": "heartbeat"}
                                  every few seconds, and last {"event": "exit", "code",
                                  "failure"}. Closing the stream early kills the mover.
    POST   movers/{id}/commands   {"command": "rate", "bps"} or {"command": "connect", ...}
    GET    movers/{id}/blockmap   the repository side's block map, once it succeeded
    DELETE movers/{id}            kill the mover (if it runs) and remove its files

The agent's policy is its own (``agent.toml``, :class:`vbrd.config.AgentSettings`), and a
request that tries to change it is refused with 400, the reason named:

- its ``role``: a proxy agent starts proxy-side (``source``) movers only, a repository agent
  repository-side (``target``) ones;
- a repository-side mover is named by repository (``config["repository"]`` is a name from the
  agent's ``[repositories]``, never a path the caller chose); it listens on the agent's host,
  announces ``data_host`` (or the address the Manager reached the agent at) and writes its
  block map into its own work directory;
- a proxy-side mover loads the agent's plugins (installed ones less ``disabled_plugins``,
  ``plugin_dirs`` and ``plugin_modules``; a request may name only modules from that list) and
  sees datastores through the agent's ``san_paths`` and devices under its ``device_root``: a
  request carrying a path map, a device root or plugin folders is refused;
- data connections are TLS with the agent's own files: the repository side presents the
  agent's certificate, the proxy side trusts only ``peer_certificate``, which must be exactly
  one X.509 certificate. A request for a plaintext connection or naming TLS files is refused.

Each mover gets a work directory of its own (mode 0700 beneath the agent's 0700
``state_dir/movers``), its ``TMPDIR`` too, removed when the mover is dropped.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from vbrd import __version__
from vbrd.config import AgentSettings, load_agent_config, split_address
from vbrd.errors import VbrdError
from vbrd.logs import setup_logging
from vbrd.transport.certs import (
    ensure_certificate,
    fingerprint_of_pem,
    format_fingerprint,
    single_certificate,
)
from vbrd.transport.movers import MoverProcess

log = logging.getLogger(__name__)

API = "/api/v1"
#: Seconds between heartbeat lines on a mover's stream: how fast either side notices the
#: other is gone when the mover itself is quiet.
HEARTBEAT = 2.0
#: How long a finished mover's files (its block map) wait for the Manager to fetch them.
FINISHED_TTL = 600.0
COMMANDS = ("rate", "connect")
#: The side of a transfer each agent role runs.
ROLE_OF_MOVER = {"source": "proxy", "target": "repository"}
SIDE = {"source": "proxy-side", "target": "repository-side"}
#: What a request's ``rules.tls`` must be: no files named (the agent fills in its own).
AGENT_TLS = {"certfile": "", "keyfile": "", "cafile": ""}
#: The shortest task token a mover accepts (the Manager's are 43 characters).
MIN_TOKEN = 32


@dataclass(eq=False)
class _Mover:
    id: str
    role: str
    process: MoverProcess
    workdir: Path
    finished_at: float | None = None
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)


class Agent:
    """The agent's state: its settings, certificate and running data movers."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.certificate = ""
        self.fingerprint = ""
        self.movers: dict[str, _Mover] = {}
        self._runner: web.AppRunner | None = None
        self._janitor: asyncio.Task[None] | None = None

    # ---- set-up ----------------------------------------------------------------------------

    def prepare(self) -> bool:
        """Make the state directory, the certificate (first start) and the repositories.
        Returns whether the certificate was made now."""
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True)
        host, _ = split_address(s.listen)
        addresses = tuple(a for a in (host, s.data_host) if a and a not in ("0.0.0.0", "::"))
        self.certificate, made = ensure_certificate(s.certificate, s.key, s.name, addresses)
        self.fingerprint = format_fingerprint(fingerprint_of_pem(self.certificate))
        (s.state_dir / "fingerprint").write_text(self.fingerprint + "\n")
        movers = s.state_dir / "movers"
        shutil.rmtree(movers, ignore_errors=True)  # a previous run's leftovers
        movers.mkdir(mode=0o700)
        return made

    def prepare_repositories(self) -> None:
        from vbrd.repository import Repository

        for repo in self.settings.repositories.values():
            Repository.open_or_create(repo.path, block_size=repo.block_size,
                                      compression_level=repo.compression_level)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._authenticate],
                              client_max_size=64 << 20)
        app.router.add_get(f"{API}/agent", self.info)
        app.router.add_post(f"{API}/movers", self.start_mover)
        app.router.add_post(f"{API}/movers/{{id}}/commands", self.command)
        app.router.add_get(f"{API}/movers/{{id}}/blockmap", self.blockmap)
        app.router.add_delete(f"{API}/movers/{{id}}", self.remove)
        return app

    async def start(self) -> None:
        import ssl

        host, port = split_address(self.settings.listen)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.settings.certificate, self.settings.key)
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=context)
        await site.start()
        self._janitor = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
        await asyncio.gather(*(self._drop(m) for m in list(self.movers.values())))
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- middlewares -----------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.content_type == "application/json":
                raise
            return _error(e.status, e.reason)
        except VbrdError as e:
            return _error(400, str(e))

    @web.middleware
    async def _authenticate(self, request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
        offered = request.headers.get("Authorization", "")
        expected = f"Bearer {self.settings.secret.reveal()}"
        if not hmac.compare_digest(offered.encode(), expected.encode()):
            log.warning("refused a request from %s for %s: %s", request.remote, request.path,
                        "no secret given" if not offered else "wrong secret")
            return _error(401, "the agent's shared secret is missing or wrong")
        return await handler(request)

    # ---- handlers --------------------------------------------------------------------------

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "name": self.settings.name,
            "role": self.settings.role,
            "version": __version__,
            "hostname": socket.gethostname(),
            "fingerprint": self.fingerprint,
            "certificate": self.certificate,
            "repositories": {n: {"path": str(r.path), "block_size": r.block_size}
                             for n, r in self.settings.repositories.items()},
            "movers": len(self.movers),
        })

    async def start_mover(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        role = body.get("role")
        config = body.get("config")
        if role not in ("source", "target") or not isinstance(config, dict):
            raise VbrdError("a mover needs a role (source or target) and a config object")
        if ROLE_OF_MOVER[role] != self.settings.role:
            raise VbrdError(f"agent {self.settings.name} is a {self.settings.role} agent; it "
                            f"starts no {SIDE[role]} ({role}) data movers")
        self._check_common(config)
        mover_id = secrets.token_hex(8)
        workdir = self.settings.state_dir / "movers" / mover_id
        workdir.mkdir(mode=0o700)
        try:
            if role == "target":
                config = self._target_config(config, workdir, request)
            else:
                config = self._source_config(config, workdir, body.get("peer_certificate"))
            process = await MoverProcess.start(role, config, tmpdir=workdir)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        mover = _Mover(mover_id, role, process, workdir)
        self.movers[mover_id] = mover
        advertised = self._data_host(request)
        process.on_event = lambda event: mover.queue.put_nowait(
            {**event, "host": advertised} if event.get("event") == "listening" else event)
        log.info("started a %s data mover %s (pid %d) for %s", role, mover_id, process.pid,
                 request.remote)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        try:
            await _send(response, {"event": "started", "id": mover_id, "pid": process.pid})
            await self._relay(mover, response)
        except ConnectionError:
            # the Manager is gone (or dropped the stream): the mover must not outlive it
            if process.proc.returncode is None:
                log.warning("the stream of data mover %s closed early; stopping it", mover_id)
            await self._drop(mover)
        except asyncio.CancelledError:
            await asyncio.shield(self._drop(mover))
            raise
        finally:
            mover.finished_at = time.monotonic()
        return response

    async def _relay(self, mover: _Mover, response: web.StreamResponse) -> None:
        process = mover.process
        while True:
            get = asyncio.ensure_future(mover.queue.get())
            done, _ = await asyncio.wait({get, process.finished}, timeout=HEARTBEAT,
                                         return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                await _send(response, get.result())
                continue
            get.cancel()
            if process.finished in done:
                break
            await _send(response, {"event": "heartbeat"})
        while not mover.queue.empty():
            await _send(response, mover.queue.get_nowait())
        code = process.finished.result()
        await _send(response, {"event": "exit", "code": code,
                               "failure": "" if process.succeeded else process.failure()})
        await response.write_eof()

    def _check_common(self, config: dict[str, Any]) -> None:
        """What both sides' requests must be: TLS with the agent's own files, a task token."""
        rules = config.get("rules")
        if not isinstance(rules, dict):
            raise VbrdError("a mover's config needs its rules (an object)")
        if rules.get("tls") != AGENT_TLS:
            raise VbrdError(f"agent {self.settings.name}: data connections are always TLS with "
                            f"the agent's own files; the request may neither turn TLS off nor "
                            f"name TLS files (rules.tls must be {json.dumps(AGENT_TLS)}, not "
                            f"{json.dumps(rules.get('tls'))[:200]})")
        token = config.get("token")
        if not isinstance(token, str) or len(token) < MIN_TOKEN:
            raise VbrdError(f"a mover's task token must be a string of at least {MIN_TOKEN} "
                            f"characters")

    def _target_config(self, config: dict[str, Any], workdir: Path,
                       request: web.Request) -> dict[str, Any]:
        name = config.get("repository")
        repo = self.settings.repositories.get(str(name))
        if repo is None:
            served = ", ".join(sorted(self.settings.repositories)) or "none"
            raise VbrdError(f"agent {self.settings.name} serves no repository named {name!r} "
                            f"(it serves: {served})")
        host, _ = split_address(self.settings.listen)
        rules = {**config["rules"], "tls": {"certfile": str(self.settings.certificate),
                                            "keyfile": str(self.settings.key), "cafile": ""}}
        return {**config, "repository": str(repo.path), "rules": rules,
                "index_out": str(workdir / "blockmap"), "host": host, "port": 0}

    def _source_config(self, config: dict[str, Any], workdir: Path,
                       peer_certificate: Any) -> dict[str, Any]:
        s = self.settings
        spec = config.get("spec")
        proxy = spec.get("proxy") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not isinstance(proxy, dict):
            raise VbrdError("a proxy-side mover's config needs its spec, with a proxy object")
        modules = spec.get("plugin_modules") or []
        if not isinstance(modules, list):
            raise VbrdError("the spec's plugin_modules must be a list of module names")
        for module in modules:
            if module not in s.plugin_modules:
                allowed = ", ".join(s.plugin_modules) or "none"
                raise VbrdError(f"agent {s.name} loads only the plugin modules its agent.toml "
                                f"allows ({allowed}); the request names {module!r}")
        for owned, given in (("san_paths", proxy.get("san_paths")),
                             ("device_root", proxy.get("device_root")),
                             ("plugin_dirs", spec.get("plugin_dirs")),
                             ("disabled_plugins", spec.get("disabled_plugins"))):
            if given:
                raise VbrdError(f"agent {s.name} uses its own {owned} (agent.toml); the "
                                f"request may not give one")
        if not peer_certificate:
            raise VbrdError("a proxy-side mover needs the repository agent's certificate "
                            "(peer_certificate): it trusts that certificate only")
        pem = single_certificate(peer_certificate)
        peer = workdir / "peer.pem"
        fd = os.open(peer, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pem)
        rules = {**config["rules"], "tls": {"certfile": "", "keyfile": "", "cafile": str(peer)}}
        spec = {**spec,
                "proxy": {**proxy, "san_paths": dict(s.san_paths),
                          "device_root": s.device_root},
                "plugin_modules": list(s.plugin_modules),
                "plugin_dirs": [str(p) for p in s.plugin_dirs],
                "disabled_plugins": list(s.disabled_plugins),
                # the agent's own plugins may provide a mode under another plugin name
                "plugin_names": None}
        return {**config, "spec": spec, "rules": rules}

    def _data_host(self, request: web.Request) -> str:
        if self.settings.data_host:
            return self.settings.data_host
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if isinstance(sockname, tuple) and sockname:
            return str(sockname[0])
        return split_address(self.settings.listen)[0]

    async def command(self, request: web.Request) -> web.Response:
        mover = self._mover(request)
        body = await _json_body(request)
        if body.get("command") not in COMMANDS:
            raise VbrdError(f"unknown command {body.get('command')!r} (known: "
                            f"{', '.join(COMMANDS)})")
        mover.process.send(body)
        return web.Response(status=204)

    async def blockmap(self, request: web.Request) -> web.StreamResponse:
        mover = self._mover(request)
        path = mover.workdir / "blockmap"
        if mover.role != "target" or not path.exists():
            return _error(404, f"data mover {mover.id} has no block map (it is not a "
                               f"repository-side mover, or it did not finish)")
        return web.FileResponse(path)

    async def remove(self, request: web.Request) -> web.Response:
        await self._drop(self._mover(request))
        return web.Response(status=204)

    def _mover(self, request: web.Request) -> _Mover:
        mover = self.movers.get(request.match_info["id"])
        if mover is None:
            raise web.HTTPNotFound(reason=f"no data mover {request.match_info['id']}")
        return mover

    async def _drop(self, mover: _Mover) -> None:
        self.movers.pop(mover.id, None)
        await mover.process.kill()
        await asyncio.to_thread(shutil.rmtree, mover.workdir, True)

    async def _sweep(self) -> None:
        """Forget finished movers whose files nobody fetched."""
        while True:
            await asyncio.sleep(60)
            now = time.monotonic()
            for mover in list(self.movers.values()):
                if mover.finished_at is not None and now - mover.finished_at > FINISHED_TTL:
                    await self._drop(mover)


async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write((json.dumps(event, separators=(",", ":")) + "\n").encode())


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise VbrdError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise VbrdError("the request body is not a JSON object")
    return body


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


# --------------------------------------------------------------------------------------------
# the process


def print_fingerprint(config_path: str | Path) -> int:
    """``vbrd agent --config FILE --fingerprint``: make the certificate if needed, print the
    line to put in the backup server's config, and exit."""
    agent = Agent(load_agent_config(config_path))
    agent.prepare()
    print(f'fingerprint = "{agent.fingerprint}"')
    return 0


def run(config_path: str | Path) -> int:
    """Run the agent in the foreground until SIGTERM/SIGINT (systemd ``Type=notify``)."""
    settings = load_agent_config(config_path)
    setup_logging(settings.log_level, settings.secrets())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_main(settings))


async def _main(settings: AgentSettings) -> int:
    from vbrd.daemon import sd_notify

    agent = Agent(settings)
    made = agent.prepare()
    await asyncio.to_thread(agent.prepare_repositories)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await agent.start()
    if made:
        log.info("made a new certificate %s", settings.certificate)
    print(f"vbrd agent {settings.name} listening on {settings.listen}, certificate "
          f"fingerprint {agent.fingerprint}", flush=True)
    log.info("agent %s listening on %s (certificate %s)", settings.name, settings.listen,
             agent.fingerprint)
    sd_notify(f"READY=1\nSTATUS=listening on {settings.listen}")
    watchdog = asyncio.create_task(_watchdog(sd_notify))
    try:
        await stopping.wait()
    finally:
        sd_notify("STOPPING=1")
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        await asyncio.wait_for(agent.stop(), settings.stop_timeout)
        log.info("stopped")
    return 0


async def _watchdog(notify: Callable[[str], None]) -> None:
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if not usec:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(usec / 2e6)
