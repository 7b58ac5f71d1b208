"""The Manager's handle on the two data mover processes of one disk's transfer.

:func:`run_transfer` starts the repository side first (it listens and tells its port), then
the proxy side with that address and a per-task token, relays progress, and returns the
result once both have finished. Any failure, a stop request or the caller's cancellation
kills both processes before :class:`TransportError` is raised, so a transfer never outlives
its session.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import vbrd
from vbrd.errors import TransportError
from vbrd.transport.blockmap import partial_path, read_block_map
from vbrd.transport.spec import (
    Progress,
    SourceSpec,
    TransferResult,
    TransferRules,
    encode_task,
    progress_from_json,
    result_from_json,
    rules_to_json,
    source_to_json,
)
from vbrd.transport.wire import describe

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 60.0
ERROR_GRACE = 3.0  # how long to wait for the other side's account of a failure
PROGRESS_MIN_INTERVAL = 0.2
STDERR_LINES = 40
STALL_TIMEOUT = 300.0  # seconds without progress after which a transfer is ended


__all__ = [
    "LOCAL_MOVERS",
    "Mover",
    "MoverHost",
    "MoverLost",
    "MoverProcess",
    "Progress",
    "SourceSpec",
    "TransferControl",
    "TransferResult",
    "TransferRules",
    "TransferStalled",
    "TransferStopped",
    "Watchdog",
    "read_block_map",
    "run_transfer",
]


class TransferStopped(TransportError):
    """The transfer was stopped on request; both data movers are gone."""


class TransferStalled(TransportError):
    """The transfer made no progress for the watchdog's timeout; both data movers are gone.
    ``mode`` is the transport mode the proxy side was reading with ("" if it had none yet),
    so the Manager can try another mode or proxy."""

    def __init__(self, message: str, mode: str = "") -> None:
        super().__init__(message)
        self.mode = mode


class Watchdog:
    """Notices a transfer that stopped moving.

    Progress is anything a mover says that differs from what it said before: a new event
    kind (listening, the mode chosen, the result) or a progress report whose byte counts
    moved. The proxy side reports every quarter second whether or not bytes moved, so a
    stopped proxy side (no reports at all) and a stopped repository side, network or read
    (reports whose counts stand still) both show. ``clock`` is injected so tests need not
    wait; ``poll`` is how often (real seconds) the supervisor looks.
    """

    def __init__(self, timeout: float = STALL_TIMEOUT, *,
                 clock: Callable[[], float] = time.monotonic, poll: float | None = None) -> None:
        if timeout <= 0:
            raise ValueError(f"a stall timeout must be positive, not {timeout}")
        self.timeout = timeout
        self.clock = clock
        self.poll = poll if poll is not None else min(1.0, timeout / 4)
        self._last = clock()
        self._seen: tuple[Any, ...] | None = None

    def start(self) -> None:
        self._last = self.clock()
        self._seen = None

    def saw(self, event: dict[str, Any]) -> None:
        """Count ``event`` as progress if it says something new."""
        kind = event.get("event")
        if kind in ("heartbeat", "refused"):  # a stray connection is no progress either
            return
        if kind == "progress":
            mark = (event.get("bytes_read"), event.get("bytes_sent"),
                    event.get("bytes_done_of_total"))
            if mark == self._seen:
                return
            self._seen = mark
        self._last = self.clock()

    @property
    def idle(self) -> float:
        """Seconds since the last progress."""
        return self.clock() - self._last

    @property
    def stalled(self) -> bool:
        return self.idle >= self.timeout


class MoverLost(TransportError):
    """One side's data mover is gone without an account of its own: its host's agent could
    not be reached or went away, or the process was killed. ``role`` names the side, so the
    Manager can give a proxy's task to another proxy."""

    def __init__(self, role: str, message: str) -> None:
        super().__init__(message)
        self.role = role


class MoverHost(Protocol):
    """Where a data mover runs: this machine (:data:`LOCAL_MOVERS`) or an agent's host."""

    async def start(self, role: str, config: dict[str, Any]) -> Mover: ...


class Mover(Protocol):
    """A running data mover, local or remote, as :func:`run_transfer` drives it."""

    role: str
    pid: int
    result: dict[str, Any] | None
    error: str | None
    on_event: Callable[[dict[str, Any]], None]

    @property
    def finished(self) -> asyncio.Future[int]: ...
    def send(self, obj: dict[str, Any]) -> None: ...
    async def listening(self, timeout: float) -> dict[str, Any]: ...
    def failure(self) -> str: ...
    @property
    def succeeded(self) -> bool: ...
    @property
    def lost(self) -> bool: ...
    async def kill(self) -> None: ...


class MoverProcess:
    """One data mover child: JSON lines in (commands) and out (events)."""

    def __init__(self, role: str, proc: asyncio.subprocess.Process) -> None:
        self.role = role
        self.proc = proc
        self.pid = proc.pid
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.stderr: deque[str] = deque(maxlen=STDERR_LINES)
        self.on_event: Callable[[dict[str, Any]], None] = lambda _: None
        self._listening: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pumps = [
            asyncio.create_task(self._pump_stdout()),
            asyncio.create_task(self._pump_stderr()),
        ]
        self.finished = asyncio.ensure_future(self._finish())

    @classmethod
    async def start(cls, role: str, config: dict[str, Any], *,
                    tmpdir: Path | None = None) -> MoverProcess:
        """Start one mover, isolated from where it is started (:func:`mover_command`);
        ``tmpdir`` is where its temporary files go (``TMPDIR``), the caller's otherwise."""
        env = _child_env()
        if tmpdir is not None:
            env["TMPDIR"] = str(tmpdir)
        proc = await asyncio.create_subprocess_exec(
            *mover_command(role),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, cwd="/", limit=1 << 20,
        )
        mover = cls(role, proc)
        assert proc.stdin is not None
        proc.stdin.write(encode_task(config))
        return mover

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        if not self.proc.stdin.is_closing():
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())

    async def listening(self, timeout: float) -> dict[str, Any]:
        """The target's address, once it accepts connections."""
        waits: set[asyncio.Future[Any]] = {self._listening, self.finished}
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._listening.done():
            return self._listening.result()
        if self.finished in done:
            raise TransportError(self.failure())
        raise TransportError(
            f"the {self.role} data mover did not start within {timeout:g} s"
        )

    async def _pump_stdout(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                log.warning("%s mover %d printed: %s", self.role, self.pid, raw.decode(
                    errors="replace").rstrip())
                continue
            kind = event.get("event")
            if kind == "listening" and not self._listening.done():
                self._listening.set_result(event)
            elif kind == "result":
                self.result = event["result"]
            elif kind == "error":
                self.error = str(event.get("message", ""))
            elif kind == "mode":
                log.info("transport mode %s chosen (passed over: %s)", event.get("mode"),
                         event.get("fallbacks") or "none")
            elif kind == "refused":
                log.warning("the repository's data mover refused a connection from %s: %s",
                            event.get("peer"), event.get("reason"))
            try:
                self.on_event(event)
            except Exception:
                log.exception("a transfer event listener failed")

    async def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.stderr.append(line)
            log.info("%s mover %d: %s", self.role, self.pid, line)

    async def _finish(self) -> int:
        code = await self.proc.wait()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        return code

    def failure(self) -> str:
        """Why this mover failed, in its own words when it gave them."""
        if self.error:
            return self.error
        code = self.proc.returncode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else (
            f"exited with status {code}")
        tail = "; ".join(line for line in list(self.stderr)[-3:] if line)
        return f"the {self.role} data mover {how}" + (f": {tail}" if tail else "")

    @property
    def succeeded(self) -> bool:
        return self.finished.done() and self.finished.result() == 0 and self.result is not None

    @property
    def lost(self) -> bool:
        """Killed by a signal before it could say anything."""
        code = self.proc.returncode
        return self.finished.done() and code is not None and code < 0 and not self.error

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(Exception):
            await self.finished
        if self.proc.stdin is not None:
            self.proc.stdin.close()


class LocalMovers:
    """Data movers as child processes of this process (the daemon or an agent)."""

    async def start(self, role: str, config: dict[str, Any]) -> Mover:
        return await MoverProcess.start(role, config)


LOCAL_MOVERS = LocalMovers()


async def run_transfer(
    spec: SourceSpec,
    repository_path: str,
    rules: TransferRules,
    *,
    on_progress: Callable[[Progress], None],
    stop: asyncio.Event | None = None,
    index_out: str,
    control: TransferControl | None = None,
    source_host: MoverHost = LOCAL_MOVERS,
    target_host: MoverHost = LOCAL_MOVERS,
    parent_point: str | None = None,
    watchdog: Watchdog | None = None,
) -> TransferResult:
    """Move one disk from the proxy to the repository; see the module docstring.

    ``index_out`` is where the block map ends up on this machine. ``control``, when given,
    is bound to the running transfer (e.g. to change its bandwidth limit). ``source_host``
    and ``target_host`` say where each side runs (an agent's host, see
    :mod:`vbrd.transport.remote`); a remote repository side is named by ``repository_path``
    as its agent knows it. :class:`MoverLost` says which side's host failed.
    ``parent_point`` is the restore point an incremental's ``spec.areas`` are the changes
    since: then only those areas are read, and the repository side rebuilds each block they
    touch from the parent's (the block map names those; the rest is the parent's).
    ``watchdog`` (default: :data:`STALL_TIMEOUT` on the real clock) ends a transfer without
    progress with :class:`TransferStalled`.
    """
    patch = parent_point is not None and spec.areas is not None
    watchdog = watchdog if watchdog is not None else Watchdog()
    watchdog.start()
    started = time.monotonic()
    token = secrets.token_urlsafe(32)
    movers: list[Mover] = []
    finished = False
    disk = f"{spec.task.label} of VM {spec.task.vm.name}"
    try:
        # both start at once: the source loads its plugins and opens its transport mode
        # while the target opens the repository; it learns the target's port when it listens
        started_movers = await asyncio.gather(
            target_host.start("target", {
                "repository": repository_path, "rules": rules_to_json(rules), "token": token,
                "index_out": index_out, "host": "127.0.0.1", "port": 0,
                "parent_point": parent_point if patch else None,
                "disk_key": spec.task.disk_key,
            }),
            source_host.start("source", {
                "spec": source_to_json(spec), "rules": rules_to_json(rules), "token": token,
                "patch": patch,
            }),
            return_exceptions=True,
        )
        movers.extend(m for m in started_movers if not isinstance(m, BaseException))
        for failed in started_movers:
            if isinstance(failed, MoverLost):
                raise failed
            if isinstance(failed, BaseException):
                raise TransportError(f"cannot start a data mover for {disk}: "
                                     f"{describe(failed)}") from failed
        target, source = movers
        relay = _progress_relay(on_progress)
        mode = ""

        def on_source(event: dict[str, Any]) -> None:
            nonlocal mode
            watchdog.saw(event)
            if event.get("event") == "mode":
                mode = str(event.get("mode", ""))
            relay(event)

        source.on_event = on_source
        target.on_event = watchdog.saw
        if control is not None:
            control._bind(source, target)
        address = await target.listening(STARTUP_TIMEOUT)
        source.send({"command": "connect", "host": address["host"], "port": address["port"]})
        await _supervise(source, target, stop, disk, watchdog, lambda: mode)
        assert source.result is not None and target.result is not None
        result = result_from_json(source.result)
        result = replace(
            result,
            duration=time.monotonic() - started,
            peak_rss=max(result.peak_rss, int(target.result.get("peak_rss", 0))),
        )
        log.info("%s: %d blocks, %d sent, %d bytes stored in %.1f s, peak RSS %d MiB", disk,
                 result.blocks_total, result.blocks_sent, result.bytes_stored, result.duration,
                 result.peak_rss >> 20)
        finished = True
        return result
    finally:
        if control is not None:
            control._bind(None, None)
        await asyncio.shield(asyncio.gather(*(m.kill() for m in movers)))
        if not finished:
            # a killed repository side cannot clean up after itself
            with contextlib.suppress(OSError):
                os.unlink(partial_path(index_out))


async def _supervise(
    source: Mover, target: Mover, stop: asyncio.Event | None, disk: str,
    watchdog: Watchdog, mode: Callable[[], str],
) -> None:
    stopping = asyncio.ensure_future(stop.wait()) if stop is not None else None
    waits: set[asyncio.Future[Any]] = {source.finished, target.finished}
    if stopping is not None:
        waits.add(stopping)
    try:
        while True:
            done, _ = await asyncio.wait(waits, timeout=watchdog.poll,
                                         return_when=asyncio.FIRST_COMPLETED)
            if stopping is not None and stopping in done:
                raise TransferStopped(f"the transfer of {disk} was stopped on request")
            if not done:
                if watchdog.stalled:
                    reading = f" (reading with {mode()})" if mode() else ""
                    raise TransferStalled(
                        f"the transfer of {disk}{reading} made no progress for "
                        f"{watchdog.idle:.0f} s (the stall timeout is {watchdog.timeout:g} s); "
                        f"both data movers were stopped", mode())
                continue
            if source.succeeded and target.succeeded:
                return
            failed = [m for m in (source, target) if m.finished.done() and not m.succeeded]
            if failed:
                # the proxy side relays the repository side's errors, so its account is the
                # fuller one: wait a moment for it unless we have it; the repository side
                # speaks when the proxy side died without a word
                if not source.error and not source.finished.done():
                    await asyncio.wait({source.finished}, timeout=ERROR_GRACE)
                if not source.error and not target.finished.done():
                    await asyncio.wait({target.finished}, timeout=ERROR_GRACE)
                for side in (source, target):
                    if side.lost:
                        raise MoverLost(side.role, _account(source, target))
                raise TransportError(_account(source, target))
            waits = {f for f in waits if not f.done()}
    finally:
        if stopping is not None:
            stopping.cancel()


def _account(source: Mover, target: Mover) -> str:
    """One message for a failed transfer: the side that knows the cause first, and a side
    that died without a word named beside it."""
    def silent(m: Mover) -> bool:
        return m.finished.done() and not m.succeeded and not m.error

    if source.error or silent(source):
        primary, other = source, target
    elif target.error or silent(target):
        primary, other = target, source
    else:
        return source.failure()
    message = primary.failure()
    if other is not primary and silent(other):
        message += f" (and {other.failure()})"
    return message


def _progress_relay(on_progress: Callable[[Progress], None]) -> Callable[[dict[str, Any]], None]:
    last = 0.0

    def relay(event: dict[str, Any]) -> None:
        nonlocal last
        if event.get("event") != "progress":
            return
        now = time.monotonic()
        complete = event.get("bytes_done_of_total") == event.get("total_bytes")
        if now - last < PROGRESS_MIN_INTERVAL and not complete:
            return
        last = now
        fields = {k: v for k, v in event.items() if k != "event"}
        on_progress(progress_from_json(fields))

    return relay


class TransferControl:
    """Changes a running transfer: today its bandwidth limit.

    The Manager holds one per transfer and, to share one rule's bandwidth fairly between the
    movers running under it, hands each its share as transfers start and end.
    """

    def __init__(self) -> None:
        self._source: Mover | None = None
        self._rate: float | None | bool = False  # False: nothing set yet
        self.pids: dict[str, int] = {}  # role -> pid of the movers of the running transfer

    def _bind(self, source: Mover | None, target: Mover | None) -> None:
        self._source = source
        if source is not None and target is not None:
            self.pids = {"source": source.pid, "target": target.pid}
        if source is not None and self._rate is not False:
            source.send({"command": "rate", "bps": self._rate})

    def set_bandwidth_limit(self, bps: float | None) -> None:
        if bps is not None and bps <= 0:
            raise ValueError(f"a bandwidth limit must be positive, not {bps}")
        self._rate = bps
        if self._source is not None:
            self._source.send({"command": "rate", "bps": bps})


#: Run by ``python -I -c``: the import path comes from the parent, as JSON in argv[1].
_BOOTSTRAP = ("import json, sys; sys.path[:0] = json.loads(sys.argv.pop(1)); "
              "from vbrd.transport.mover import main; sys.exit(main())")


def mover_command(role: str) -> list[str]:
    """The command line of a data mover: isolated (``-I``: neither the working directory,
    which Python would put first on the import path, nor ``PYTHON*`` variables nor the user's
    site-packages), started in ``/``, with the parent's import path given explicitly, so it
    imports the same code and plugin modules as the process that starts it and nothing a
    directory it happens to be started from holds."""
    return [sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(import_path()), role]


def import_path() -> list[str]:
    """The directories the mover imports from: vbrd's own first, then the parent's import
    path, absolute directories only, less the parent's working directory (unless vbrd lives
    there)."""
    here = str(Path(vbrd.__file__).resolve().parent.parent)
    cwd = os.path.realpath(os.getcwd())
    paths = [here] + [p for p in sys.path
                      if os.path.isabs(p) and os.path.isdir(p)
                      and os.path.realpath(p) != cwd]
    return list(dict.fromkeys(paths))


def _child_env() -> dict[str, str]:
    """The parent's environment (the mover ignores its ``PYTHON*`` variables)."""
    return dict(os.environ)
