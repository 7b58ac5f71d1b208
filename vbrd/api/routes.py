"""The API's routes under ``/api/v1`` (docs/architecture.md, section 6) and their handlers.

Handlers are thin: they check the request, ask the :class:`~vbrd.engine.Engine`, and answer
JSON. Catalog and repository reads go through a thread, so a slow disk never stalls the event
loop that also carries the sessions' events. ``openapi.py`` describes exactly these routes; a
test holds the two together.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from aiohttp import web

from vbrd.api.keys import CLOSING, ENGINE
from vbrd.api.middlewares import over_unix_socket
from vbrd.api.openapi import openapi_document
from vbrd.errors import NotFound, UsageError, VbrdError
from vbrd.events import Event

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
KEEPALIVE_SECONDS = 15.0

routes = web.RouteTableDef()


def setup_routes(app: web.Application) -> None:
    app.router.add_routes(routes)


class Forbidden(VbrdError):
    """The request is valid but not allowed over this connection."""

    http_status = 403


# --------------------------------------------------------------------------------------------
# request bodies


_NULL = type(None)


async def read_body(request: web.Request,
                    fields: dict[str, tuple[type, ...]],
                    required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object in the body, checked against ``fields`` (name → accepted types).

    An empty body is an empty object. Anything else that is not a JSON object with known
    fields of the right types is a :class:`UsageError` (400) that names the problem.
    """
    raw = await request.read()
    if not raw.strip():
        data: Any = {}
    else:
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            raise UsageError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"the request body must be a JSON object, not {_json_kind(data)}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise UsageError(f"unknown field {unknown[0]!r} in the request body "
                         f"(known fields: {known})")
    for name in required:
        if name not in data:
            raise UsageError(f"the request body needs the field {name!r}")
    for name, value in data.items():
        kinds = fields[name]
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            wanted = " or ".join(_TYPE_NAMES[k] for k in kinds)
            raise UsageError(f"field {name!r} must be {wanted}, not {_json_kind(value)}")
    return data


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", _NULL: "null",
               dict: "an object", list: "an array", float: "a number"}


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _query_int(request: web.Request, name: str, default: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"query parameter {name!r} must be an integer, not {text!r}") from None
    if value <= 0:
        raise UsageError(f"query parameter {name!r} must be positive")
    return value


# --------------------------------------------------------------------------------------------
# jobs


@routes.get(f"{PREFIX}/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    return web.json_response({"jobs": await request.app[ENGINE].jobs()}, dumps=_dumps)


@routes.post(f"{PREFIX}/jobs/{{name}}/start")
async def start_job(request: web.Request) -> web.Response:
    await read_body(request, {})
    session_id = await request.app[ENGINE].start_job(request.match_info["name"], trigger="api")
    return web.json_response({"session_id": session_id}, status=202)


# --------------------------------------------------------------------------------------------
# sessions


@routes.get(f"{PREFIX}/sessions")
async def list_sessions(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    job = request.query.get("job") or None
    limit = _query_int(request, "limit", 100)
    records = await asyncio.to_thread(engine.catalog.sessions, job, limit)
    return web.json_response({"sessions": [r.to_dict() for r in records]})


@routes.get(f"{PREFIX}/sessions/{{id}}")
async def get_session(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    session_id = request.match_info["id"]
    try:
        info = await asyncio.to_thread(engine.session_info, session_id)
    except NotFound:
        running = engine.sessions.get(session_id)
        if running is None:
            raise
        # Started a moment ago: its first event is not in the catalog yet.
        info = {"id": session_id, "job": running.job, "trigger": "", "status": "running",
                "reason": "", "started": None, "finished": None, "disks": [], "events": []}
    return web.json_response(info, dumps=_dumps)


@routes.post(f"{PREFIX}/sessions/{{id}}/stop")
async def stop_session(request: web.Request) -> web.Response:
    await read_body(request, {})
    session_id = request.match_info["id"]
    await request.app[ENGINE].stop_session(session_id)
    return web.json_response({"session_id": session_id, "stopping": True}, status=202)


@routes.get(f"{PREFIX}/sessions/{{id}}/events")
async def session_events(request: web.Request) -> web.StreamResponse:
    """The session's events as server-sent events: the stored ones, then live ones.

    The stream subscribes to the bus *before* it reads the catalog, so an event published
    in between is in both; it is recognised by its (type, monotonic time) and sent once.
    Each message's ``id`` is the event's position in the session (1, 2, ...), so a client
    that reconnects with ``Last-Event-ID: N`` continues after the Nth event.
    """
    engine = request.app[ENGINE]
    session_id = request.match_info["id"]
    last_id = _last_event_id(request)

    live: asyncio.Queue[Event] = asyncio.Queue()
    unsubscribe = engine.bus.subscribe(
        lambda e: live.put_nowait(e) if e.session_id == session_id else None)
    try:
        running = engine.sessions.get(session_id)
        if running is None and await asyncio.to_thread(
                engine.catalog.session, session_id) is None:
            raise NotFound(f"no session {session_id!r}")
        stored = await asyncio.to_thread(engine.catalog.events, session_id)

        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"})
        await response.prepare(request)
        try:
            position = 0
            seen: set[tuple[str, float]] = set()
            for data in stored:
                data.pop("seq", None)
                seen.add((data["type"], data["monotonic"]))
                position += 1
                if position > last_id:
                    await response.write(_sse(position, data))
                if data["type"] == "session.finished":
                    return response
            events = _live_events(live, running.task if running else None,
                                  request.app[CLOSING], response)
            async with aclosing(events):
                async for event in events:
                    if (event.type, event.monotonic) in seen:
                        continue
                    position += 1
                    if position > last_id:
                        await response.write(_sse(position, event.to_dict()))
                    if event.type == "session.finished":
                        break
        except ConnectionResetError:
            log.debug("event stream of session %s: the client went away", session_id)
        return response
    finally:
        unsubscribe()


async def _live_events(live: asyncio.Queue[Event], task: asyncio.Task[Any] | None,
                       closing: asyncio.Event,
                       response: web.StreamResponse) -> AsyncGenerator[Event, None]:
    """Live events until the session's task is over and drained, or the server closes.

    Waiting on the task too means a session that died without ``session.finished`` (a bug,
    or a session that was not running at all) ends the stream instead of hanging it.
    """
    while True:
        if not live.empty():
            yield live.get_nowait()
            continue
        if task is None or task.done() or closing.is_set():
            return
        getter = asyncio.ensure_future(live.get())
        closer = asyncio.ensure_future(closing.wait())
        try:
            done, _ = await asyncio.wait({getter, task, closer}, timeout=KEEPALIVE_SECONDS,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            closer.cancel()
            if not getter.done():
                getter.cancel()
        if getter in done:
            yield getter.result()
        elif not done:
            await response.write(b": keepalive\n\n")


def _last_event_id(request: web.Request) -> int:
    text = request.headers.get("Last-Event-ID", "").strip()
    if not text:
        return 0
    if not text.isdigit():
        raise UsageError(f"Last-Event-ID must be an event number, not {text!r}")
    return int(text)


def _sse(position: int, data: dict[str, Any]) -> bytes:
    return f"id: {position}\nevent: {data['type']}\ndata: {_dumps(data)}\n\n".encode()


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)


# --------------------------------------------------------------------------------------------
# restore points


@routes.get(f"{PREFIX}/restore-points")
async def list_restore_points(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    vm = request.query.get("vm") or None
    points = await asyncio.to_thread(engine.restore_points, vm)
    return web.json_response({"restore_points": points}, dumps=_dumps)


@routes.post(f"{PREFIX}/restore-points/restore")
async def restore(request: web.Request) -> web.Response:
    if not over_unix_socket(request):
        raise Forbidden("restores write files on the daemon's machine and are only accepted "
                        "on the unix socket (use vbrctl there)")
    body = await read_body(request, {"point": (str,), "disk": (int, _NULL), "to": (str,)},
                           required=("point", "to"))
    dest = Path(body["to"])
    if not dest.is_absolute():
        raise UsageError(f"'to' must be an absolute path on the daemon's machine, "
                         f"not {body['to']!r}")
    result = await request.app[ENGINE].restore(body["point"], body.get("disk"), dest)
    return web.json_response(result, dumps=_dumps)


@routes.post(f"{PREFIX}/restore-points/verify")
async def verify(request: web.Request) -> web.Response:
    body = await read_body(request, {"point": (str, _NULL)})
    problems = await request.app[ENGINE].verify(body.get("point"))
    return web.json_response({"problems": problems}, dumps=_dumps)


@routes.delete(f"{PREFIX}/restore-points/{{id}}")
async def delete_restore_point(request: web.Request) -> web.Response:
    result = await asyncio.to_thread(request.app[ENGINE].delete_point, request.match_info["id"])
    return web.json_response(result, dumps=_dumps)


# --------------------------------------------------------------------------------------------
# repository maintenance


@routes.post(f"{PREFIX}/gc")
async def collect_garbage(request: web.Request) -> web.Response:
    body = await read_body(request, {"repository": (str, _NULL)})
    results = await request.app[ENGINE].gc(body.get("repository"))
    return web.json_response({"results": results}, dumps=_dumps)


# --------------------------------------------------------------------------------------------
# plugins


@routes.get(f"{PREFIX}/plugins")
async def list_plugins(request: web.Request) -> web.Response:
    """The loaded plugins, what each provides, and the ones that failed to load."""
    from vbrd.plugins import plugins_report

    return web.json_response(plugins_report(request.app[ENGINE].pm))


# --------------------------------------------------------------------------------------------
# health


@routes.get(f"{PREFIX}/health")
async def health(request: web.Request) -> web.Response:
    """Whether the daemon can keep its records: ``degraded`` names each problem (the
    session catalog failing to write, events dropped), for monitoring to alert on."""
    catalog = request.app[ENGINE].catalog.health()
    problems = [catalog.problem] if catalog.problem else []
    if catalog.dropped:
        problems.append(f"{catalog.dropped} session event(s) were dropped because the "
                        f"session catalog could not be written")
    return web.json_response({
        "status": "degraded" if problems else "ok", "problems": problems,
        "catalog": {"pending": catalog.pending, "dropped": catalog.dropped}})


# --------------------------------------------------------------------------------------------
# the API's own description


@routes.get(f"{PREFIX}/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())
