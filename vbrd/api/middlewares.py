"""The API's middlewares: one error shape for every failure, and the bearer token over TCP.

Every error leaves as ``{"error": {"type": ..., "message": ...}}`` with the status the
:class:`~vbrd.errors.VbrdError` subclass declares, so the CLI and scripts read one shape.
Authentication runs before routing has any visible effect: over TCP a request without the
right token gets the same 401 whether its path, method or job exists or not, so nothing about
the daemon leaks to a caller who does not hold the token. The unix socket needs no token; its
file mode (0660) decides who may connect.
"""
from __future__ import annotations

import hmac
import logging
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web

from vbrd.api.keys import TOKEN
from vbrd.errors import VbrdError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

UNAUTHORIZED_MESSAGE = ("this API needs an 'Authorization: Bearer TOKEN' header with the "
                        "daemon's token")


def error_response(status: int, type_: str, message: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"type": type_, "message": message}}, status=status,
                             headers=headers)


def over_unix_socket(request: web.Request) -> bool:
    """True when the request came in on the unix socket; anything unknown counts as TCP."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and getattr(sock, "family", None) == socket.AF_UNIX


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except VbrdError as e:
        return error_response(e.http_status, type(e).__name__, e.message)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: v for k, v in e.headers.items()
                   if k.lower() in ("allow", "www-authenticate")}
        message = e.text if e.text and e.text != f"{e.status}: {e.reason}" else e.reason
        return error_response(e.status, type(e).__name__.removeprefix("HTTP"), message,
                              headers)
    except Exception:
        log.exception("API request %s %s failed", request.method, request.path)
        return error_response(500, "InternalError",
                              "the daemon failed to answer this request; its log has the "
                              "details")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not over_unix_socket(request) and not _token_ok(request):
        return error_response(401, "Unauthorized", UNAUTHORIZED_MESSAGE,
                              {"WWW-Authenticate": 'Bearer realm="vbrd"'})
    return await handler(request)


def _token_ok(request: web.Request) -> bool:
    expected = request.app[TOKEN]
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if not expected or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), expected)
