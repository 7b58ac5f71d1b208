"""The HTTP API: aiohttp over TCP (bearer token) for HTTP triggers, a unix socket for vbrctl.

``serve(engine, config)`` runs it for the daemon; ``make_app(engine)`` is the bare application
(routes in :mod:`vbrd.api.routes`, described by :mod:`vbrd.api.openapi`).
"""
from __future__ import annotations

from vbrd.api.server import ApiServer, make_app, serve

__all__ = ["ApiServer", "make_app", "serve"]
