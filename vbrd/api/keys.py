"""The typed keys under which the API application keeps what its handlers share.

One module for all of them (as aiohttp's demos do), so a handler never reaches into the app
with a bare string and mypy knows what each key holds.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from vbrd.engine import Engine

ENGINE = web.AppKey("engine", Engine)
"""The daemon's engine: jobs, sessions, bus, catalog, repositories."""

TOKEN_FILE = web.AppKey("token_file", Path)
"""Where the TCP API's bearer token is read from at startup (absent: TCP refuses all)."""

TOKEN = web.AppKey("token", bytes)
"""The bearer token every TCP request must present; empty means no TCP request is allowed."""

CLOSING = web.AppKey("closing", asyncio.Event)
"""Set when the server shuts down, so that live event streams end instead of holding it up."""
