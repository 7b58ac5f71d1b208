"""Serving the API: one application, one ``AppRunner``, a TCP site and a unix socket site.

The TCP site (``daemon.api_listen``) is for HTTP triggers from other machines and always asks
for the bearer token read from ``daemon.token_file``; the unix socket (``daemon.api_socket``)
is for ``vbrctl`` on this machine and is guarded by its file mode, 0660: the daemon's user
and group may connect, nobody else.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from vbrd.api.keys import CLOSING, ENGINE, TOKEN, TOKEN_FILE
from vbrd.api.middlewares import auth_middleware, error_middleware
from vbrd.api.routes import setup_routes
from vbrd.config import Config
from vbrd.engine import Engine
from vbrd.errors import ConfigError, VbrdError

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660


def make_app(engine: Engine, token_file: Path | None = None) -> web.Application:
    """The API application; without ``token_file`` every TCP request is refused."""
    app = web.Application(middlewares=[error_middleware, auth_middleware])
    app[ENGINE] = engine
    if token_file is not None:
        app[TOKEN_FILE] = token_file
    app.cleanup_ctx.append(_token_ctx)
    app.cleanup_ctx.append(_streams_ctx)
    app.on_shutdown.append(_end_streams)
    setup_routes(app)
    return app


async def _token_ctx(app: web.Application) -> AsyncIterator[None]:
    token_file = app.get(TOKEN_FILE)
    app[TOKEN] = await asyncio.to_thread(read_token, token_file) if token_file else b""
    yield


async def _streams_ctx(app: web.Application) -> AsyncIterator[None]:
    app[CLOSING] = asyncio.Event()
    yield


async def _end_streams(app: web.Application) -> None:
    app[CLOSING].set()


def read_token(path: Path) -> bytes:
    """The bearer token: the file's content without surrounding whitespace, never empty."""
    try:
        token = path.read_bytes().strip()
    except OSError as e:
        raise ConfigError(str(path), "", f"cannot read the API token file: "
                                         f"{e.strerror}") from None
    if not token:
        raise ConfigError(str(path), "", "the API token file is empty")
    return token


def parse_listen(text: str, config_file: str = "") -> tuple[str, int]:
    """``"127.0.0.1:8470"`` or ``"[::1]:8470"`` → host and port."""
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(config_file, "daemon.api_listen", f"must be HOST:PORT, not {text!r}")
    return host, int(port)


class ApiServer:
    """The running API; ``start()`` binds both sites, ``stop()`` ends streams and unbinds."""

    def __init__(self, engine: Engine, config: Config | None = None) -> None:
        """Serve ``engine``; where to listen comes from ``config``, else the engine's own."""
        config = config if config is not None else engine.config
        self.engine = engine
        self.config_file = str(config.path)
        self.listen = config.daemon.api_listen
        self.socket_path = config.daemon.api_socket
        self.token_file = config.daemon.token_file if self.listen else None
        self.runner: web.AppRunner | None = None
        self._socket_inode: int | None = None

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """Where the TCP site listens (the real port when the config said port 0)."""
        if self.runner is None:
            return None
        for address in self.runner.addresses:
            if isinstance(address, tuple):
                return address[0], address[1]
        return None

    async def start(self) -> None:
        if self.listen and self.token_file is None:
            raise ConfigError(self.config_file, "daemon.token_file",
                              "is required when api_listen is set")
        runner = web.AppRunner(make_app(self.engine, self.token_file),
                               access_log=logging.getLogger("vbrd.api.access"))
        await runner.setup()
        self.runner = runner
        try:
            if self.listen:
                host, port = parse_listen(self.listen, self.config_file)
                await web.TCPSite(runner, host, port).start()
                log.info("API listening on %s (bearer token required)", self.listen)
            if self.socket_path is not None:
                await self._start_unix_site(runner, self.socket_path)
                log.info("API listening on unix socket %s", self.socket_path)
        except BaseException:
            await self.stop()
            raise

    async def _start_unix_site(self, runner: web.AppRunner, path: Path) -> None:
        await asyncio.to_thread(path.parent.mkdir, mode=0o750, parents=True, exist_ok=True)
        await _claim_socket_path(path, self.config_file)
        await web.UnixSite(runner, str(path)).start()
        self._socket_inode = os.lstat(path).st_ino
        await asyncio.to_thread(os.chmod, path, SOCKET_MODE)

    async def stop(self) -> None:
        runner, self.runner = self.runner, None
        if runner is None:
            return
        try:
            await runner.cleanup()
        finally:
            self._remove_socket()

    def _remove_socket(self) -> None:
        """Unlink the socket file this server bound, and only that one."""
        inode, self._socket_inode = self._socket_inode, None
        if self.socket_path is None or inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(self.socket_path).st_ino == inode:
                os.unlink(self.socket_path)


async def _claim_socket_path(path: Path, config_file: str) -> None:
    """Remove a socket left by a daemon that died; refuse one that still answers."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(config_file, "daemon.api_socket", f"{path} exists and is not a socket")
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        await asyncio.to_thread(path.unlink, missing_ok=True)
        return
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    raise VbrdError(f"another process already serves the API socket {path} (is another vbrd "
                    f"running?)")


@contextlib.asynccontextmanager
async def serve(engine: Engine, config: Config | None = None) -> AsyncIterator[ApiServer]:
    """Serve the API for the duration of the ``async with`` block."""
    server = ApiServer(engine, config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


__all__ = ["ApiServer", "make_app", "parse_listen", "read_token", "serve"]
