"""The Manager's side of the agents: data movers on proxy and repository hosts.

:class:`AgentClient` talks to one agent (:mod:`vbrd.transport.agent`) over HTTPS. It trusts
the agent only if its certificate has the fingerprint the config pins, and presents the shared
secret. :class:`AgentMovers` is a :class:`vbrd.transport.movers.MoverHost` for
:func:`vbrd.transport.movers.run_transfer`; the :class:`RemoteMover` it starts behaves like a
local mover process: commands go to the agent, the agent's stream of the mover's events comes
back, and a repository side's block map is fetched to this machine when it succeeded.

Any failure to reach an agent, or losing its stream, is a :class:`MoverLost` for that side, so
the Manager can give a proxy's task to another proxy.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from vbrd.config import AgentAccess, split_address
from vbrd.errors import TransportError
from vbrd.transport.certs import fingerprint_of_pem, format_fingerprint, parse_fingerprint
from vbrd.transport.movers import MoverLost

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
#: Without a line (the agent sends a heartbeat every 2 s) for this long, the agent is lost.
STREAM_TIMEOUT = 15.0
REQUEST_TIMEOUT = 30.0


class AgentError(TransportError):
    """An agent could not be used."""


class AgentUnreachable(AgentError):
    """The agent does not answer (connection refused, timed out, lost)."""


class AgentRefused(AgentError):
    """The agent and the Manager do not trust each other: wrong certificate or secret."""


class AgentClient:
    """One agent, as the config names it (``what`` is e.g. ``"proxy proxy-a"``)."""

    def __init__(self, what: str, access: AgentAccess) -> None:
        if not access.remote or access.secret is None:
            raise AgentError(f"{what} has no agent address and secret")
        self.what = what
        self.address = access.address
        self.pin = parse_fingerprint(access.fingerprint)
        self._secret = access.secret
        host, port = split_address(access.address)
        self.base = f"https://{f'[{host}]' if ':' in host else host}:{port}/api/v1"
        self._certificate = ""

    def session(self, *, read_timeout: float | None = REQUEST_TIMEOUT) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(self.pin)),
            headers={"Authorization": f"Bearer {self._secret.reveal()}"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT,
                                          sock_read=read_timeout),
        )

    def explain(self, e: BaseException) -> AgentError:
        """An exception of aiohttp's as a sentence naming the agent and the cause."""
        where = f"the agent of {self.what} at {self.address}"
        if isinstance(e, AgentError):
            return e
        if isinstance(e, aiohttp.ServerFingerprintMismatch):
            return AgentRefused(
                f"{where} presents a certificate with fingerprint "
                f"{format_fingerprint(e.got)}, but the config pins "
                f"{format_fingerprint(e.expected)}; refusing to talk to it (another machine "
                f"answers at that address, or the agent made a new certificate)")
        if isinstance(e, aiohttp.ClientConnectorError):
            return AgentUnreachable(f"cannot reach {where}: {e.os_error.strerror or e}")
        if isinstance(e, aiohttp.ClientResponseError) and e.status == 401:
            return AgentRefused(f"{where} refused the shared secret (check secret_file)")
        if isinstance(e, TimeoutError | asyncio.TimeoutError):
            return AgentUnreachable(f"{where} did not answer in time")
        text = str(e) or type(e).__name__
        return AgentUnreachable(f"lost the connection to {where}: {text}")

    async def _check(self, response: aiohttp.ClientResponse) -> None:
        if response.status < 400:
            return
        try:
            message = (await response.json()).get("error", "")
        except (aiohttp.ContentTypeError, ValueError):
            message = (await response.text())[:200]
        if response.status == 401:
            raise AgentRefused(f"the agent of {self.what} at {self.address} refused the shared "
                               f"secret: {message}")
        raise AgentError(f"the agent of {self.what} at {self.address} answered "
                         f"{response.status}: {message}")

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            async with self.session() as session, session.request(
                    method, f"{self.base}/{path}", json=body) as response:
                await self._check(response)
                if response.status == 204:
                    return None
                return await response.json()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise self.explain(e) from None

    async def info(self) -> dict[str, Any]:
        info: dict[str, Any] = await self.request("GET", "agent")
        return info

    async def certificate(self) -> str:
        """The agent's certificate (PEM), checked against the pinned fingerprint."""
        if not self._certificate:
            pem = str((await self.info()).get("certificate", ""))
            try:
                digest = fingerprint_of_pem(pem)
            except ValueError:
                raise AgentError(f"the agent of {self.what} sent no usable certificate") from None
            if digest != self.pin:
                raise AgentRefused(f"the agent of {self.what} at {self.address} describes a "
                                   f"certificate other than the one it presents")
            self._certificate = pem
        return self._certificate


@dataclass
class AgentMovers:
    """Data movers on an agent's host, as a :class:`vbrd.transport.movers.MoverHost`.

    ``peer_certificate`` is the repository agent's certificate, for a proxy-side mover that
    must trust only it. What the agent decides for itself is left out of the request (see
    :func:`for_agent`).
    """

    agent: AgentClient
    peer_certificate: str = ""

    async def start(self, role: str, config: dict[str, Any]) -> RemoteMover:
        body: dict[str, Any] = {"role": role, "config": for_agent(role, config)}
        if role == "source" and self.peer_certificate:
            body["peer_certificate"] = self.peer_certificate
        session = self.agent.session(read_timeout=STREAM_TIMEOUT)
        try:
            response = await session.post(f"{self.agent.base}/movers", json=body)
            await self.agent._check(response)
            first = json.loads(await response.content.readline() or b"{}")
            if first.get("event") != "started":
                raise AgentError(f"the agent of {self.agent.what} did not start a data mover: "
                                 f"{first}")
        except BaseException as e:
            await session.close()
            if isinstance(e, aiohttp.ClientError | OSError | TimeoutError | AgentError):
                side = "proxy's" if role == "source" else "repository's"
                raise MoverLost(role, f"cannot start the {side} data mover: "
                                      f"{self.agent.explain(e)}") from None
            raise
        return RemoteMover(self.agent, role, session, response, str(first["id"]),
                           int(first.get("pid", 0)), config.get("index_out", ""))


#: What a request's ``rules.tls`` is: TLS, with the agent's own files.
AGENT_TLS = {"certfile": "", "keyfile": "", "cafile": ""}


def for_agent(role: str, config: dict[str, Any]) -> dict[str, Any]:
    """A mover's config as an agent takes it: without what the agent's own ``agent.toml``
    decides, which it refuses to be told.

    Data connections are always TLS with the agent's files (a repository agent presents its
    certificate; a proxy agent trusts the ``peer_certificate`` beside the config), so
    ``rules.tls`` names no file. A proxy agent loads its own plugins and sees datastores and
    devices through its own ``san_paths`` and ``device_root``: the spec carries none of the
    backup server's (whose ``san_paths`` for a proxy only choose the transport mode). Where
    the block map goes on this machine (``index_out``) stays here."""
    out = {k: v for k, v in config.items() if k not in ("index_out", "host", "port")}
    out["rules"] = {**config.get("rules", {}), "tls": dict(AGENT_TLS)}
    spec = config.get("spec")
    if role == "source" and isinstance(spec, dict):
        proxy = {**spec.get("proxy", {}), "san_paths": {}, "device_root": ""}
        out["spec"] = {**spec, "proxy": proxy, "plugin_modules": [], "plugin_dirs": [],
                       "disabled_plugins": [], "plugin_names": None}
    return out


class RemoteMover:
    """A data mover on an agent's host; the same surface as a local mover process."""

    def __init__(self, agent: AgentClient, role: str, session: aiohttp.ClientSession,
                 response: aiohttp.ClientResponse, mover_id: str, pid: int,
                 index_out: str) -> None:
        self.agent, self.role, self.id, self.pid = agent, role, mover_id, pid
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.on_event: Callable[[dict[str, Any]], None] = lambda _: None
        self.lost_reason = ""
        self._session, self._response = session, response
        self._index_out = index_out
        self._exit: dict[str, Any] = {}
        self._commands: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._listening: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future())
        self._sender = asyncio.create_task(self._send_commands())
        self.finished: asyncio.Future[int] = asyncio.ensure_future(self._read())

    def send(self, obj: dict[str, Any]) -> None:
        self._commands.put_nowait(obj)

    async def _send_commands(self) -> None:
        while True:
            command = await self._commands.get()
            try:
                async with self._session.post(f"{self.agent.base}/movers/{self.id}/commands",
                                              json=command) as response:
                    await self.agent._check(response)
            except (aiohttp.ClientError, OSError, TimeoutError, TransportError) as e:
                # the stream tells whether the mover is gone; a lost command is logged
                log.warning("command %s to the %s data mover on %s failed: %s",
                            command.get("command"), self.role, self.agent.what,
                            self.agent.explain(e))

    async def listening(self, timeout: float) -> dict[str, Any]:
        waits: set[asyncio.Future[Any]] = {self._listening, self.finished}
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._listening.done():
            return self._listening.result()
        if self.finished in done:
            raise TransportError(self.failure())
        raise TransportError(f"the {self.role} data mover on {self.agent.what} did not start "
                             f"within {timeout:g} s")

    async def _read(self) -> int:
        try:
            while line := await self._response.content.readline():
                event = json.loads(line)
                kind = event.get("event")
                if kind == "heartbeat":
                    continue
                if kind == "exit":
                    self._exit = event
                    continue
                if kind == "listening" and not self._listening.done():
                    self._listening.set_result(event)
                elif kind == "result":
                    self.result = event["result"]
                elif kind == "error":
                    self.error = str(event.get("message", ""))
                try:
                    self.on_event(event)
                except Exception:
                    log.exception("a transfer event listener failed")
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            self.lost_reason = str(self.agent.explain(e))
        if not self._exit:
            self.lost_reason = self.lost_reason or (
                f"the agent of {self.agent.what} at {self.agent.address} closed the data "
                f"mover's stream before it finished")
            return -1
        code = int(self._exit.get("code", 1))
        if code == 0 and self.role == "target" and self.result is not None:
            try:
                await self._fetch_blockmap()
            except (aiohttp.ClientError, OSError, TimeoutError, TransportError) as e:
                self.error = f"cannot fetch the block map from {self.agent.what}: " \
                             f"{self.agent.explain(e)}"
                return 1
        return code

    async def _fetch_blockmap(self) -> None:
        target = Path(self._index_out)
        partial = target.with_name(target.name + ".fetching")
        async with self._session.get(f"{self.agent.base}/movers/{self.id}/blockmap") as response:
            await self.agent._check(response)
            with open(partial, "wb") as f:
                async for chunk in response.content.iter_chunked(1 << 20):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        os.replace(partial, target)

    def failure(self) -> str:
        if self.error:
            return self.error
        if self.lost_reason:
            return f"the {self.role} data mover is lost: {self.lost_reason}"
        failure = str(self._exit.get("failure", ""))
        return failure or f"the {self.role} data mover on {self.agent.what} exited with " \
                          f"status {self._exit.get('code')}"

    @property
    def succeeded(self) -> bool:
        return self.finished.done() and self.finished.result() == 0 and self.result is not None

    @property
    def lost(self) -> bool:
        """Its agent went away, or the process was killed before it said anything."""
        if not self.finished.done():
            return False
        return bool(self.lost_reason) or (int(self._exit.get("code", 0)) < 0
                                          and not self.error)

    async def kill(self) -> None:
        """Stop it (if it runs) and have the agent remove its files."""
        self._sender.cancel()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                async with self._session.delete(f"{self.agent.base}/movers/{self.id}"):
                    pass
        self._response.close()
        await asyncio.wait({self.finished})
        await self._session.close()


class Agents:
    """The Manager's agent clients, one per configured agent, kept across sessions (so a
    repository agent's certificate is fetched once)."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str, str, str, str], AgentClient] = {}

    def get(self, what: str, access: AgentAccess) -> AgentClient:
        secret = access.secret.reveal() if access.secret is not None else ""
        key = (what, access.address, access.fingerprint, secret)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = AgentClient(what, access)
        return client
