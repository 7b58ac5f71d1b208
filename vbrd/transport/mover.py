"""The data mover process: ``python -m vbrd.transport.mover {source,target}``.

One process per task and side, so the disks of a session are read, hashed and compressed in
parallel on every core, and a transport mode plugin that crashes takes one task down, not the
daemon.

On stdin, first the task's configuration (secrets travel here, never on the command line) as
one length-prefixed JSON document (:func:`vbrd.transport.spec.encode_task`: it holds every
area to read, which a line-length limit would cap), then commands, one JSON line each:
``{"command": "rate", "bps": N}`` and, for a source started before its target listened,
``{"command": "connect", "host": H, "port": P}`` (it loads its plugins and opens its
transport mode meanwhile). Stdin closing means the parent
is gone, and the mover stops. On stdout, events::

    {"event": "listening", "host": H, "port": P}        target, once it accepts connections
    {"event": "refused", "peer": P, "reason": R}         target, a stray connection turned away
    {"event": "mode", "mode": M, "fallbacks": [...]}     source, the transport mode it uses
    {"event": "progress", ...}                           source, a few times per second
    {"event": "result", "result": {...}}                 then exit status 0
    {"event": "error", "message": M, "kind": K}          then exit status 1

Logs go to stderr.

Its parent starts it isolated (:func:`vbrd.transport.movers.mover_command`: ``python -I``,
in ``/``, with the parent's import path given explicitly), so a module planted in whatever
directory the daemon or agent runs from is never imported.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import resource
import signal
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vbrd.errors import VbrdError
from vbrd.transport.spec import (
    MAX_TASK_BYTES,
    TASK_HEADER,
    rules_from_json,
    source_from_json,
)

log = logging.getLogger("vbrd.transport.mover")

_PR_SET_PDEATHSIG = 1
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Larger than any buffer of the data path (8 MiB reads, 1 MiB blocks), so they come from the
# heap and are reused instead of being mapped, faulted in and unmapped again each time.
_MMAP_THRESHOLD = 32 << 20
_TRIM_THRESHOLD = 256 << 20


def _die_with_parent() -> None:
    """Have the kernel kill this process when the parent dies, however it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _keep_freed_buffers() -> None:
    """Have glibc's malloc reuse the data path's freed buffers instead of giving them back.

    By default buffers of a MiB and more are mmapped and unmapped one by one, so every chunk
    read and every compressed block costs page faults and zeroed pages again; on a virtual
    machine whose host backs memory lazily that was a second of system time per GiB moved.
    The queues bound how much the process holds, so its footprint stays flat either way.
    No-op where malloc is not glibc's.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


class _Stdout:
    """JSON lines on stdout without blocking the event loop when stdout is a pipe."""

    def __init__(self) -> None:
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        if not stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode):
            return
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(os.dup(sys.stdout.fileno()), "wb")
        )
        self._writer = asyncio.StreamWriter(transport, protocol, None, loop)

    def emit(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, separators=(",", ":")) + "\n"
        if self._writer is not None:
            self._writer.write(line.encode())
        else:
            sys.stdout.write(line)
            sys.stdout.flush()

    async def close(self) -> None:
        if self._writer is not None:
            try:
                await self._writer.drain()
            except ConnectionError:
                pass
            self._writer.close()


async def _stdin() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _read_task(stdin: asyncio.StreamReader) -> dict[str, Any]:
    """The task configuration: its length, checked against the bound before it is read."""
    try:
        head = await stdin.readexactly(TASK_HEADER.size)
        (length,) = TASK_HEADER.unpack(head)
        if length > MAX_TASK_BYTES:
            raise VbrdError(f"the task configuration announces {length} bytes, more than "
                            f"the {MAX_TASK_BYTES} a data mover accepts")
        body = await stdin.readexactly(length)
    except asyncio.IncompleteReadError as e:
        raise VbrdError("no task configuration on stdin" if not e.partial else
                        "the task configuration on stdin ends early") from None
    try:
        config = json.loads(body)
    except ValueError as e:
        raise VbrdError(f"the task configuration is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise VbrdError("the task configuration is not a JSON object")
    return config


async def _control(
    stdin: asyncio.StreamReader,
    main: asyncio.Future[Any],
    on_rate: Callable[[float | None], None],
    address: asyncio.Future[tuple[str, int]],
) -> None:
    """Commands from the parent; end of stdin stops the mover."""
    while line := await stdin.readline():
        try:
            command = json.loads(line)
            if command.get("command") == "rate":
                bps = command.get("bps")
                on_rate(None if bps is None else float(bps))
            elif command.get("command") == "connect" and not address.done():
                address.set_result((str(command["host"]), int(command["port"])))
        except (ValueError, AttributeError, KeyError) as e:
            log.warning("ignored a command the mover does not understand: %s", e)
    main.cancel("the process that started this data mover went away")


async def _run(role: str) -> int:
    out = _Stdout()
    await out.open()
    stdin = await _stdin()
    try:
        config = await _read_task(stdin)
        rules = rules_from_json(config["rules"])
        address: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        if "port" in config:
            address.set_result((config.get("host", "127.0.0.1"), int(config["port"])))
        mover: Any
        on_rate: Callable[[float | None], None]
        if role == "target":
            from vbrd.transport.target import TargetMover

            mover = TargetMover(
                config["repository"], rules, token=config["token"],
                index_out=config["index_out"], emit=out.emit,
                host=config.get("host", "127.0.0.1"), port=int(config.get("port", 0)),
                parent=((str(config["parent_point"]), int(config["disk_key"]))
                        if config.get("parent_point") else None),
            )
            on_rate = _ignore_rate
        else:
            from vbrd.transport.source import SourceMover

            mover = SourceMover(
                source_from_json(config["spec"]), rules, address=address,
                token=config["token"], emit=out.emit, patch=bool(config.get("patch")),
            )
            on_rate = mover.set_bandwidth_limit
        main = asyncio.ensure_future(mover.run())
        control = asyncio.create_task(_control(stdin, main, on_rate, address))
        try:
            result = await main
        except asyncio.CancelledError:
            if main.cancelled() and control.done():
                raise VbrdError("the process that started this data mover went away") from None
            raise
        finally:
            control.cancel()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result["peak_rss"] = _peak_rss(usage)
        log.info("%s mover done: cpu user %.2f s, system %.2f s, peak RSS %d MiB", role,
                 usage.ru_utime, usage.ru_stime, usage.ru_maxrss >> 10)
        out.emit({"event": "result", "result": result})
        return 0
    except VbrdError as e:
        out.emit({"event": "error", "message": e.message, "kind": type(e).__name__})
        return 1
    except Exception as e:
        log.exception("the %s data mover failed", role)
        out.emit({"event": "error", "message": f"{type(e).__name__}: {e}",
                  "kind": type(e).__name__})
        return 1
    finally:
        await out.close()


def _peak_rss(usage: resource.struct_rusage) -> int:
    """This process's own peak resident memory, in bytes.

    ``ru_maxrss`` also counts the parent's memory at the moment it forked this process (a
    daemon's size shows up as the mover's); the kernel's high-water mark of our own address
    space (VmHWM) does not.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return usage.ru_maxrss * 1024


def _ignore_rate(_: float | None) -> None:
    """The repository side does not send data, so it has nothing to throttle."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vbrd.transport.mover",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=("source", "target"))
    args = parser.parse_args(argv)
    _die_with_parent()
    _keep_freed_buffers()
    logging.basicConfig(
        stream=sys.stderr, level=os.environ.get("VBRD_MOVER_LOG", "WARNING"),
        format=f"%(asctime)s {args.role}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_run(args.role))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_run(args.role))


if __name__ == "__main__":
    sys.exit(main())
