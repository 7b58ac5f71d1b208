"""``vbrctl``: the administrator's command line, talking to the daemon over its unix socket.

One function per command; each asks the HTTP API (:mod:`vbrd.api.routes`) and prints either
a table for people or, with ``--json``, the API's JSON for scripts. Exit codes: 0 done,
1 failed (the daemon said no, a session failed or was stopped, verify found problems, the
daemon cannot be reached), 2 the request itself was wrong, 3 a session finished with
warnings.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import tomli

from vbrd.config import load_config
from vbrd.errors import ConfigError, UsageError, VbrdError

DEFAULT_SOCKET = Path("/run/vbrd/vbrd.sock")
SOCKET_ENV = "VBRD_SOCKET"
BASE_URL = "http://vbrd/api/v1"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_WARNING = 0, 1, 2, 3
STATUS_EXIT = {"success": EXIT_OK, "warning": EXIT_WARNING, "failed": EXIT_FAILED,
               "stopped": EXIT_FAILED}


class ApiError(Exception):
    """The daemon answered with an error; carries its status and message."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message

    @property
    def exit_code(self) -> int:
        return EXIT_USAGE if self.status == 400 else EXIT_FAILED


class Unreachable(Exception):
    """The daemon's socket cannot be connected to."""


# --------------------------------------------------------------------------------------------
# talking to the daemon


class Client:
    """A small JSON client for the API on a unix socket."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.socket_path)),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path: str, *, json_body: Any = None,
                      params: dict[str, str] | None = None) -> Any:
        async with self._open(method, path, json_body=json_body, params=params) as response:
            return await response.json()

    def _open(self, method: str, path: str, *, json_body: Any = None,
              params: dict[str, str] | None = None) -> _Request:
        assert self._session is not None
        return _Request(self, self._session.request(
            method, f"{BASE_URL}/{path}", json=json_body, params=params))

    async def events(self, session_id: str) -> AsyncIterator[dict[str, Any]]:
        """The session's events from its server-sent event stream, in order."""
        async with self._open("GET", f"sessions/{_q(session_id)}/events") as response:
            data: list[str] = []
            async for raw in response.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                elif not line and data:
                    yield json.loads("\n".join(data))
                    data = []


def _q(segment: str) -> str:
    """A name as one URL path segment (job names may hold spaces or slashes)."""
    return urllib.parse.quote(segment, safe="")


class _Request:
    """``async with`` around one request: connection errors and API errors become ours."""

    def __init__(self, client: Client, pending: Any) -> None:
        self.client, self.pending = client, pending
        self.response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        try:
            self.response = response = await self.pending
        except aiohttp.ClientConnectorError as e:
            reason = e.os_error.strerror if e.os_error and e.os_error.strerror else str(e)
            raise Unreachable(f"cannot connect to the vbrd daemon at {self.client.socket_path}"
                              f": {reason}; is the daemon running?") from None
        except aiohttp.ClientError as e:
            raise Unreachable(f"the vbrd daemon at {self.client.socket_path} did not answer: "
                              f"{e}; is the daemon running?") from None
        if response.status >= 400:
            try:
                error = (await response.json())["error"]
                type_, message = str(error["type"]), str(error["message"])
            except (ValueError, KeyError, TypeError, aiohttp.ContentTypeError):
                type_, message = "HTTPError", f"{response.status} {response.reason}"
            response.release()
            raise ApiError(response.status, type_, message)
        return response

    async def __aexit__(self, *exc: object) -> None:
        if self.response is not None:
            self.response.release()


# --------------------------------------------------------------------------------------------
# output


def _print_json(value: Any, out: TextIO) -> None:
    print(json.dumps(value, indent=2, default=str), file=out)


def _table(rows: list[list[str]], headers: list[str], out: TextIO) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=True)]
    for row in [headers, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip(),
              file=out)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_rate(bytes_per_second: float) -> str:
    return f"{human_bytes(bytes_per_second)}/s"


def _local_time(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso


def _where(event: dict[str, Any]) -> str:
    vm, disk = event.get("vm") or "", event.get("disk")
    if vm and disk is not None:
        return f"{vm} disk {disk}: "
    return f"{vm}: " if vm else ""


def describe(event: dict[str, Any]) -> str | None:
    """One line for a person about one event; None for events shown otherwise (progress)."""
    t, where = event.get("type", ""), _where(event)
    reason = f": {event['reason']}" if event.get("reason") else ""
    match t:
        case "session.started":
            return (f"session {event['session_id']} started (job {event.get('job')}, "
                    f"trigger {event.get('trigger')})")
        case "session.finished":
            return f"session finished: {event.get('status')}{reason}"
        case "phase.started":
            return f"{where}{event.get('name')} started"
        case "phase.finished":
            if event.get("ok", True):
                return f"{where}{event.get('name')} finished"
            return f"{where}{event.get('name')} failed{reason}"
        case "log":
            return f"{where}{event.get('level', 'info')}: {event.get('message', '')}"
        case "vm.finished":
            point = f" (restore point {event['point_id']})" if event.get("point_id") else ""
            return f"{where}{event.get('status')}{reason}{point}"
        case "task.planned":
            return (f"{where}planned {event.get('label', '')} "
                    f"({human_bytes(event.get('capacity', 0))})")
        case "resource.waiting":
            return f"{where}waiting for resources{reason}"
        case "resource.assigned":
            return (f"{where}proxy {event.get('proxy')}, repository "
                    f"{event.get('repository')}")
        case "resource.released":
            return None
        case "guest.attempt":
            return (f"{where}guest processor {event.get('processor')}: "
                    f"{event.get('outcome')}{reason}")
        case "guest.frozen":
            return f"{where}guest frozen ({event.get('processor')})"
        case "guest.thawed":
            state = "thawed" if event.get("ok", True) else "thaw failed"
            return f"{where}guest {state} ({event.get('processor')}){reason}"
        case "snapshot.created":
            quiesced = ", quiesced" if event.get("quiesced") else ""
            return f"{where}snapshot {event.get('name')} created{quiesced}"
        case "snapshot.removed":
            orphan = " (left behind earlier)" if event.get("orphan") else ""
            return f"{where}snapshot {event.get('snapshot')} removed{orphan}"
        case "transport.selected":
            skipped = "; ".join(f"{m}: {why}" for m, why in event.get("skipped") or ())
            return (f"{where}transport mode {event.get('mode')}"
                    + (f" (skipped {skipped})" if skipped else ""))
        case "transfer.progress":
            return None
        case "disk.transferred":
            kind = "incremental" if event.get("incremental") else "full"
            return (f"{where}{kind} via {event.get('mode')}: read "
                    f"{human_bytes(event.get('bytes_read', 0))}, transferred "
                    f"{human_bytes(event.get('bytes_sent', 0))}, stored "
                    f"{human_bytes(event.get('bytes_stored', 0))}{reason}")
        case "point.committed":
            return (f"{where}restore point {event.get('point_id')} committed in "
                    f"{event.get('repository')}")
    fields = {k: v for k, v in event.items()
              if k not in ("type", "phase", "session_id", "vm", "disk", "time", "monotonic",
                           "seq")}
    return f"{where}{t} {json.dumps(fields, default=str)}"


@dataclass
class ProgressView:
    """Follows a session's events for a person: lines for steps, a bar for the transfer.

    On a terminal the bar is redrawn in place with ``\\r``; elsewhere (a log, a pipe) a plain
    line is written each time the overall transfer passes another tenth.
    """

    out: TextIO
    tty: bool = False
    width: int = 30
    disks: dict[tuple[str, Any], dict[str, Any]] = field(default_factory=dict)
    _bar_shown: bool = False
    _last_tenth: int = -1

    def handle(self, event: dict[str, Any]) -> None:
        if event.get("type") == "transfer.progress":
            self.disks[(event.get("vm", ""), event.get("disk"))] = event
            self._progress()
            return
        if event.get("type") == "disk.transferred":
            progress = self.disks.get((event.get("vm", ""), event.get("disk")))
            if progress is not None:
                progress["bytes_done"] = progress["bytes_total"]
                progress["rate"] = 0.0
        line = describe(event)
        if line is not None:
            self._line(f"{_local_time(event.get('time'))[11:]} {line}")

    def _line(self, text: str) -> None:
        if self._bar_shown:
            self.out.write("\r\x1b[K")
            self._bar_shown = False
        print(text, file=self.out)
        self.out.flush()

    def _progress(self) -> None:
        done = sum(d.get("bytes_done", 0) for d in self.disks.values())
        total = sum(d.get("bytes_total", 0) for d in self.disks.values())
        rate = sum(d.get("rate", 0.0) for d in self.disks.values())
        bottlenecks = sorted({d["bottleneck"] for d in self.disks.values()
                              if d.get("bottleneck") and d.get("rate")})
        fraction = min(done / total, 1.0) if total else 0.0
        filled = int(fraction * self.width)
        text = (f"[{'#' * filled}{'.' * (self.width - filled)}] {fraction * 100:5.1f}% "
                f"{human_bytes(done)} of {human_bytes(total)} at {human_rate(rate)}")
        if bottlenecks:
            text += f", bottleneck: {', '.join(bottlenecks)}"
        if len(self.disks) > 1:
            text += f" ({len(self.disks)} disks)"
        if self.tty:
            self.out.write(f"\r\x1b[K{text}")
            self.out.flush()
            self._bar_shown = True
        elif (tenth := int(fraction * 10)) != self._last_tenth:
            self._last_tenth = tenth
            print(f"transfer {text}", file=self.out)
            self.out.flush()

    def close(self) -> None:
        if self._bar_shown:
            self.out.write("\n")
            self.out.flush()
            self._bar_shown = False


# --------------------------------------------------------------------------------------------
# commands


@dataclass
class Context:
    client: Client
    json: bool
    out: TextIO
    err: TextIO


async def cmd_jobs(ctx: Context, args: argparse.Namespace) -> int:
    jobs = (await ctx.client.request("GET", "jobs"))["jobs"]
    if ctx.json:
        _print_json(jobs, ctx.out)
        return EXIT_OK
    rows = []
    for j in jobs:
        last = j.get("last_session") or {}
        state = f"running ({j['running_session']})" if j.get("running_session") else (
            f"last: {last.get('status')} {_local_time(last.get('started'))}" if last
            else "never ran")
        rows.append([j["name"], j["transport"], j.get("schedule") or "-",
                     ", ".join(j.get("vms") or []) or "-", state])
    _table(rows, ["JOB", "TRANSPORT", "SCHEDULE", "VMS", "STATE"], ctx.out)
    return EXIT_OK


async def cmd_plugins(ctx: Context, args: argparse.Namespace) -> int:
    report = await ctx.client.request("GET", "plugins")
    if ctx.json:
        _print_json(report, ctx.out)
        return EXIT_OK
    rows = [[p["name"], p.get("version") or "-", p["source"],
             ", ".join(p["transport_modes"] + p["guest_processors"]) or "-",
             ", ".join(h.removeprefix("vbrd_") for h in p["hooks"])]
            for p in report["plugins"]]
    _table(rows, ["PLUGIN", "VERSION", "SOURCE", "PROVIDES", "HOOKS"], ctx.out)
    for failure in report["failures"]:
        print(f"not loaded: {failure['name']} ({failure['source']}): {failure['reason']}",
              file=ctx.out)
    return EXIT_OK


async def cmd_start(ctx: Context, args: argparse.Namespace) -> int:
    started = await ctx.client.request("POST", f"jobs/{_q(args.job)}/start", json_body={})
    session_id = started["session_id"]
    if not args.follow:
        if ctx.json:
            _print_json(started, ctx.out)
        else:
            print(f"started session {session_id}", file=ctx.out)
        return EXIT_OK
    return await _follow(ctx, session_id)


async def _follow(ctx: Context, session_id: str) -> int:
    view = ProgressView(ctx.out, tty=ctx.out.isatty())
    status: str | None = None
    try:
        async for event in ctx.client.events(session_id):
            if ctx.json:
                print(json.dumps(event, default=str), file=ctx.out)
                ctx.out.flush()
            else:
                view.handle(event)
            if event.get("type") == "session.finished":
                status = event.get("status")
    finally:
        view.close()
    if status is None:
        info = await ctx.client.request("GET", f"sessions/{_q(session_id)}")
        status = info.get("status")
        if status == "running":
            print(f"vbrctl: the event stream ended before session {session_id} finished "
                  f"(the daemon is stopping?)", file=ctx.err)
            return EXIT_FAILED
    return STATUS_EXIT.get(str(status), EXIT_FAILED)


async def cmd_sessions(ctx: Context, args: argparse.Namespace) -> int:
    params = {"limit": str(args.limit)}
    if args.job:
        params["job"] = args.job
    sessions = (await ctx.client.request("GET", "sessions", params=params))["sessions"]
    if ctx.json:
        _print_json(sessions, ctx.out)
        return EXIT_OK
    rows = [[s["id"], s["job"], s["trigger"], s["status"], _local_time(s.get("started")),
             _local_time(s.get("finished")), s.get("reason") or ""] for s in sessions]
    _table(rows, ["SESSION", "JOB", "TRIGGER", "STATUS", "STARTED", "FINISHED", "REASON"],
           ctx.out)
    return EXIT_OK


async def cmd_session(ctx: Context, args: argparse.Namespace) -> int:
    info = await ctx.client.request("GET", f"sessions/{_q(args.session)}")
    if ctx.json:
        _print_json(info, ctx.out)
        return EXIT_OK
    out = ctx.out
    print(f"session   {info['id']}", file=out)
    print(f"job       {info['job']} (trigger {info.get('trigger') or '-'})", file=out)
    print(f"status    {info['status']}" + (f": {info['reason']}" if info.get("reason") else ""),
          file=out)
    print(f"started   {_local_time(info.get('started'))}", file=out)
    print(f"finished  {_local_time(info.get('finished'))}", file=out)
    disks = info.get("disks") or []
    if disks:
        print("\ndisks:", file=out)
        rows = [[d.get("vm", ""), str(d.get("disk", "")), d.get("mode", "-"),
                 _bytes_or_dash(d, "bytes_read"), _bytes_or_dash(d, "bytes_sent"),
                 _bytes_or_dash(d, "bytes_stored"),
                 ("incremental" if d["incremental"] else "full") if "incremental" in d
                 else "-"]
                for d in disks]
        _table(rows, ["VM", "DISK", "TRANSPORT", "READ", "TRANSFERRED", "STORED", "KIND"], out)
    events = info.get("events") or []
    progress = sum(1 for e in events if e.get("type") == "transfer.progress")
    print("\nevents:", file=out)
    for event in events:
        line = describe(event)
        if line is not None:
            print(f"  {_local_time(event.get('time'))} {line}", file=out)
    if progress:
        print(f"  ({progress} progress updates not shown)", file=out)
    return EXIT_OK


def _bytes_or_dash(disk: dict[str, Any], key: str) -> str:
    return human_bytes(disk[key]) if isinstance(disk.get(key), int) else "-"


async def cmd_points(ctx: Context, args: argparse.Namespace) -> int:
    params = {"vm": args.vm} if args.vm else None
    points = (await ctx.client.request("GET", "restore-points", params=params))[
        "restore_points"]
    if ctx.json:
        _print_json(points, ctx.out)
        return EXIT_OK
    if not points:
        print("no restore points" + (f" of VM {args.vm}" if args.vm else ""), file=ctx.out)
        return EXIT_OK
    rows = [[p.get("point_id", "-"), p.get("vm", "-"), _local_time(p.get("created")),
             _kind(p),
             ", ".join(str(d.get("key")) for d in p.get("disks") or ()),
             human_bytes(p.get("data_bytes", 0)), human_bytes(p.get("stored_bytes", 0)),
             p.get("repository", "-")] for p in points]
    _table(rows, ["POINT", "VM", "CREATED", "KIND", "DISKS", "DATA", "STORED", "REPOSITORY"],
           ctx.out)
    return EXIT_OK


def _kind(point: dict[str, Any]) -> str:
    if point.get("damaged"):
        return "damaged"
    return str(point.get("kind") or ("incremental" if point.get("parent") else "full"))


async def cmd_restore(ctx: Context, args: argparse.Namespace) -> int:
    dest = Path(args.to).expanduser().absolute()
    result = await ctx.client.request("POST", "restore-points/restore", json_body={
        "point": args.point, "disk": args.disk, "to": str(dest)})
    if ctx.json:
        _print_json(result, ctx.out)
        return EXIT_OK
    line = (f"restored disk {result.get('disk')} of restore point {result.get('point')} to "
            f"{result.get('path')}")
    if "bytes_written" in result:
        line += (f": {human_bytes(result['bytes_written'])} written "
                 f"({result.get('blocks', 0)} data blocks, {result.get('zero_blocks', 0)} "
                 f"zero blocks) in {result.get('seconds', 0):.1f} s")
    print(line, file=ctx.out)
    return EXIT_OK


async def cmd_verify(ctx: Context, args: argparse.Namespace) -> int:
    problems = (await ctx.client.request("POST", "restore-points/verify",
                                         json_body={"point": args.point}))["problems"]
    what = f"restore point {args.point}" if args.point else "all restore points"
    if ctx.json:
        _print_json(problems, ctx.out)
    elif problems:
        print(f"{what}: {len(problems)} problem(s):", file=ctx.out)
        for p in problems:
            print(f"  {_problem_line(p)}", file=ctx.out)
    else:
        print(f"{what}: no problems found", file=ctx.out)
    return EXIT_FAILED if problems else EXIT_OK


def _problem_line(problem: Any) -> str:
    if not isinstance(problem, dict):
        return str(problem)
    where = ", ".join(f"{k} {problem[k]}" for k in ("point", "disk", "offset") if k in problem)
    message = problem.get("message") or problem.get("reason") or ""
    if where and message:
        return f"{where}: {message}"
    return where or message or json.dumps(problem, default=str)


async def cmd_point_delete(ctx: Context, args: argparse.Namespace) -> int:
    answer = await ctx.client.request("DELETE", f"restore-points/{_q(args.point)}")
    if ctx.json:
        _print_json(answer, ctx.out)
    else:
        print(f"deleted restore point {args.point}; its blocks are freed by the next gc "
              f"(vbrctl gc)", file=ctx.out)
    return EXIT_OK


async def cmd_gc(ctx: Context, args: argparse.Namespace) -> int:
    results = (await ctx.client.request("POST", "gc", json_body={
        "repository": args.repository}))["results"]
    if ctx.json:
        _print_json(results, ctx.out)
        return EXIT_OK
    for r in results:
        line = (f"repository {r.get('repository')}: removed {r.get('blocks_removed', 0)} unused "
                f"blocks ({human_bytes(r.get('bytes_freed', 0))}), kept "
                f"{r.get('blocks_kept', 0)} ({human_bytes(r.get('bytes_kept', 0))})")
        if r.get("quarantined"):
            line += f"; quarantined damaged point(s) {', '.join(r['quarantined'])}"
        print(line, file=ctx.out)
    return EXIT_OK


async def cmd_stop(ctx: Context, args: argparse.Namespace) -> int:
    answer = await ctx.client.request("POST", f"sessions/{_q(args.session)}/stop", json_body={})
    if ctx.json:
        _print_json(answer, ctx.out)
    else:
        print(f"asked session {args.session} to stop; it cleans up (thaw, snapshot removal) "
              f"before it ends", file=ctx.out)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# the command line


Command = Callable[[Context, argparse.Namespace], Awaitable[int]]


def make_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print machine-readable JSON")

    parser = argparse.ArgumentParser(
        prog="vbrctl", parents=[common],
        description="Control the vbrd backup daemon over its unix socket.",
        epilog=f"The socket is --socket, else daemon.api_socket of --config, else "
               f"${SOCKET_ENV}, else {DEFAULT_SOCKET}. Exit codes: 0 ok, 1 failed, "
               f"2 bad request, 3 finished with warnings.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", type=Path, metavar="PATH", help="the daemon's unix socket")
    where.add_argument("--config", type=Path, metavar="FILE",
                       help="the daemon's config file (its daemon.api_socket is used)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Command, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    command("jobs", cmd_jobs, "list the jobs and their state")
    command("plugins", cmd_plugins, "list the loaded plugins and the ones that failed")
    p = command("start", cmd_start, "start a job now")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--follow", "-f", action="store_true",
                   help="show the session's progress until it ends; exit 0 success, "
                        "1 failed or stopped, 3 warnings")
    p = command("sessions", cmd_sessions, "list recent sessions")
    p.add_argument("--job", help="only this job's sessions")
    p.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    p = command("session", cmd_session, "show a session: record, disks and events")
    p.add_argument("session", metavar="ID")
    p = command("points", cmd_points, "list restore points")
    p.add_argument("vm", metavar="VM", nargs="?", help="only this VM's restore points")
    p = command("restore", cmd_restore, "restore one disk of a restore point as a raw image")
    p.add_argument("point", metavar="POINT")
    p.add_argument("--disk", type=int, metavar="KEY",
                   help="the disk's device key (needed when the point has several disks)")
    p.add_argument("--to", required=True, metavar="PATH",
                   help="where to write the image (on the daemon's machine)")
    p = command("verify", cmd_verify, "check every block of one restore point, or of all")
    p.add_argument("point", metavar="POINT", nargs="?")
    p = sub.add_parser("point", help="act on one restore point",
                       description="act on one restore point")
    point_sub = p.add_subparsers(dest="point_command", metavar="ACTION", required=True)
    p = point_sub.add_parser("delete", parents=[common], help="delete a restore point (good "
                             "or damaged); its blocks are freed by the next gc",
                             description="delete a restore point (good or damaged); its "
                                         "blocks are freed by the next gc")
    p.set_defaults(func=cmd_point_delete)
    p.add_argument("point", metavar="POINT")
    p = command("gc", cmd_gc, "remove the blocks no restore point names (one repository or "
                              "all); waits a while for running backups")
    p.add_argument("repository", metavar="REPOSITORY", nargs="?")
    p = command("stop", cmd_stop, "ask a running session to stop")
    p.add_argument("session", metavar="SESSION")
    return parser


def socket_path(args: argparse.Namespace, env: Mapping[str, str]) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    if args.config is not None:
        return _socket_of_config(Path(args.config))
    if env.get(SOCKET_ENV):
        return Path(env[SOCKET_ENV])
    return DEFAULT_SOCKET


def _socket_of_config(file: Path) -> Path:
    """``daemon.api_socket`` of the daemon's config.

    An operator may read the config but not the secrets it names (vCenter passwords are
    for the daemon's user only), so when the whole config does not load, the socket is
    still taken from its ``[daemon]`` table if it names one.
    """
    try:
        config = load_config(file)
    except ConfigError as error:
        fallback = None if error.key.startswith("daemon.") else _raw_socket_setting(file)
        if fallback is None:
            raise
        return fallback
    if config.daemon.api_socket is None:
        raise UsageError(f"{config.path} sets no daemon.api_socket; give --socket")
    return config.daemon.api_socket


def _raw_socket_setting(file: Path) -> Path | None:
    try:
        daemon = tomli.loads(file.read_text()).get("daemon", {})
    except (OSError, UnicodeDecodeError, tomli.TOMLDecodeError):
        return None
    value = daemon.get("api_socket") if isinstance(daemon, dict) else None
    if not isinstance(value, str) or not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else file.absolute().parent / path


async def _run(args: argparse.Namespace, path: Path, out: TextIO, err: TextIO) -> int:
    async with Client(path) as client:
        ctx = Context(client, getattr(args, "json", False), out, err)
        result: int = await args.func(ctx, args)
        return result


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    out, err = sys.stdout, sys.stderr
    try:
        path = socket_path(args, os.environ)
        return asyncio.run(_run(args, path, out, err))
    except ApiError as e:
        print(f"vbrctl: {e.message}", file=err)
        return e.exit_code
    except Unreachable as e:
        print(f"vbrctl: {e}", file=err)
        return EXIT_FAILED
    except VbrdError as e:
        print(f"vbrctl: {e}", file=err)
        return e.exit_code
    except KeyboardInterrupt:
        if args.command == "start":
            print("\nvbrctl: stopped following; the session runs on (vbrctl stop SESSION "
                  "ends it)", file=err)
        return 130


if __name__ == "__main__":
    sys.exit(main())
