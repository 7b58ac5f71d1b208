"""The Backup Service's resource scheduler: which proxy and repository slot a task gets, and when.

A *task* is one disk of one VM; proxies and repositories have *slots* (``max_tasks``). Every
running task holds one slot of its proxy and one of its repository, through a :class:`Lease`.
One scheduler serves every session of the daemon, so two jobs share the same slots.

How a task is placed:

1. **Candidates** (:func:`disk_candidates`): the proxies the job may use that offer one of
   its transport modes, each with a *tier*, the best mode it can likely use for that disk —
   ``san`` when it sees the disk's datastore (``san_paths``), ``hotadd`` when it has a proxy
   VM, ``nbd`` otherwise. A proxy that offers the job's modes but none of them likely works
   stays a candidate of the last tier, so its data mover can say why.
2. **Affinity**: only candidates of the best tier among those in rotation are eligible. A
   task waits for a proxy that reads its disk from storage rather than take one that would
   pull it through the ESXi host's management network.
3. **Least loaded among equals**: of the eligible proxies with a free slot, the one with the
   smallest share of its slots busy (then the fewest tasks given so far, then the name).
4. **Fair order**: waiting tasks are served round-robin across sessions — of the sessions'
   first waiting tasks, the session served longest ago goes first — and first come, first
   served within a session. A task that cannot be placed does not hold back those behind it
   whose proxies are free; it cannot starve either, since every grant to another session
   moves its own session up.
5. **Release on every end**: a lease is released by ``async with`` on success, failure and
   cancellation alike (releasing twice is harmless); a task cancelled while waiting leaves
   the queue.
6. **Failed proxies**: :meth:`ResourceScheduler.mark_down` takes a proxy out of rotation for
   :data:`DOWN_SECONDS`; a waiting task whose candidates are all out fails with their reasons.

The scheduler is plain asyncio and knows nothing of events: callers report waits and
decisions (``resource.*``) from the ``on_wait`` callback and the lease's ``reason``.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

from vbrd.config import AUTO_ORDER
from vbrd.errors import TransportError

if TYPE_CHECKING:
    from vbrd.config import Config, JobSettings, ProxySettings, RepositorySettings

#: How long a failed proxy stays out of rotation before tasks are given to it again.
DOWN_SECONDS = 60.0
#: The tier of a proxy that offers the job's modes but is unlikely to read the disk.
UNLIKELY = len(AUTO_ORDER)


class NoProxyAvailable(TransportError):
    """No proxy can take this task: none is configured for it, or all of them failed."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A proxy that may read one disk; lower ``tier`` is better (see the module docstring)."""

    proxy: str
    tier: int
    mode: str


def disk_candidates(job: JobSettings, proxies: Mapping[str, ProxySettings],
                    repository: RepositorySettings,
                    datastore: str) -> tuple[list[Candidate], list[str]]:
    """The candidate proxies for a disk on ``datastore``, and why the others are not."""
    names = list(job.proxies) or list(proxies)
    candidates: list[Candidate] = []
    passed_over: list[str] = []
    for name in names:
        proxy = proxies.get(name)
        if proxy is None:
            passed_over.append(f"proxy {name} is not configured")
            continue
        offered = [m for m in job.transport_order if proxy.offers(m)]
        if not offered:
            passed_over.append(f"proxy {name} offers {', '.join(proxy.transport_modes)}, the "
                               f"job asks for {job.transport}")
            continue
        if proxy.agent.remote and not repository.agent.remote:
            passed_over.append(
                f"proxy {name} runs on another host and repository {repository.name} is "
                f"local to the backup server, where no agent accepts its data movers; run "
                f"`vbrd agent` next to the repository and give it an address")
            continue
        likely = [m for m in offered if _likely(m, proxy, datastore)]
        mode = likely[0] if likely else offered[0]
        candidates.append(Candidate(name, _rank(mode) if likely else UNLIKELY, mode))
    return candidates, passed_over


def _rank(mode: str) -> int:
    """Built-in modes in ``auto``'s order; a mode a job names that is not built in is read
    as likely to work as the network mode."""
    return AUTO_ORDER.index(mode) if mode in AUTO_ORDER else len(AUTO_ORDER) - 1


def _likely(mode: str, proxy: ProxySettings, datastore: str) -> bool:
    if mode == "san":
        return datastore in proxy.san_paths
    if mode == "hotadd":
        return bool(proxy.vm)
    return True


@dataclass(eq=False)
class _Resource:
    kind: str
    name: str
    max_tasks: int
    busy: int = 0
    given: int = 0
    down_until: float = 0.0
    down_reason: str = ""
    removed: bool = False

    @property
    def free(self) -> bool:
        return self.busy < self.max_tasks

    @property
    def load(self) -> float:
        return self.busy / self.max_tasks if self.max_tasks else 1.0

    def usage(self) -> str:
        return f"{self.busy} of {self.max_tasks} slots busy"


@dataclass(eq=False)
class _Request:
    group: str
    seq: int
    candidates: tuple[Candidate, ...]
    repository: str
    label: str
    since: float
    future: asyncio.Future[Lease] = field(repr=False)


class Lease:
    """One task's proxy slot and repository slot, held until :meth:`release`."""

    def __init__(self, scheduler: ResourceScheduler, candidate: Candidate, repository: str,
                 reason: str, waited: float) -> None:
        self._scheduler = scheduler
        self.proxy = candidate.proxy
        self.mode = candidate.mode
        self.tier = candidate.tier
        self.repository = repository
        self.reason = reason
        self.waited = waited
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._scheduler._release(self)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<Lease {self.proxy}/{self.repository} {state}>"


class ResourceScheduler:
    def __init__(self, proxies: Mapping[str, int], repositories: Mapping[str, int], *,
                 clock: Callable[[], float] = time.monotonic,
                 down_seconds: float = DOWN_SECONDS) -> None:
        self._clock = clock
        self.down_seconds = down_seconds
        self._proxies: dict[str, _Resource] = {}
        self._repositories: dict[str, _Resource] = {}
        self._waiting: list[_Request] = []
        self._served: dict[str, int] = {}  # session -> stamp of its latest grant
        self._stamps = itertools.count(1)
        self._seq = itertools.count()
        self.configure(proxies, repositories)

    @classmethod
    def from_config(cls, config: Config) -> ResourceScheduler:
        return cls({p.name: p.max_tasks for p in config.proxies.values()},
                   {r.name: r.max_tasks for r in config.repositories.values()})

    def configure(self, proxies: Mapping[str, int], repositories: Mapping[str, int]) -> None:
        """Apply (new) slot counts. Running leases stay valid; a resource that is gone gets
        no new task, and tasks that wait for nothing else fail."""
        for table, wanted, kind in ((self._proxies, proxies, "proxy"),
                                    (self._repositories, repositories, "repository")):
            for name, slots in wanted.items():
                if slots <= 0:
                    raise ValueError(f"{kind} {name}: max_tasks must be positive, not {slots}")
                resource = table.setdefault(name, _Resource(kind, name, slots))
                resource.max_tasks, resource.removed = slots, False
            for name, resource in table.items():
                if name not in wanted:
                    resource.removed = True
        self._dispatch()

    # ---- asking and giving back ------------------------------------------------------------

    async def acquire(self, group: str, candidates: Iterable[Candidate], repository: str, *,
                      label: str = "", on_wait: Callable[[str], None] | None = None) -> Lease:
        """Wait for a slot on one of ``candidates`` and on ``repository``.

        ``group`` is the fairness unit (the session). ``on_wait`` is called once, with the
        reason, when the task cannot start at once. Raises :class:`NoProxyAvailable` when no
        candidate is (or stays) in rotation.
        """
        options = tuple(candidates)
        what = label or "this task"
        if not options:
            raise NoProxyAvailable(f"no proxy can take {what}")
        if repository not in self._repositories or self._repositories[repository].removed:
            raise NoProxyAvailable(f"{what}: repository {repository} is not configured")
        request = _Request(group, next(self._seq), options, repository, label, self._clock(),
                           asyncio.get_running_loop().create_future())
        self._waiting.append(request)
        self._dispatch()
        if not request.future.done() and on_wait is not None:
            on_wait(self._why_waiting(request))
        try:
            return await request.future
        except asyncio.CancelledError:
            future = request.future
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().release()  # granted in the same instant as the cancellation
            raise
        finally:
            if request in self._waiting:
                self._waiting.remove(request)
                self._dispatch()

    def _release(self, lease: Lease) -> None:
        self._proxies[lease.proxy].busy -= 1
        self._repositories[lease.repository].busy -= 1
        self._dispatch()

    # ---- failed proxies --------------------------------------------------------------------

    def mark_down(self, proxy: str, reason: str) -> None:
        """Take ``proxy`` out of rotation for :attr:`down_seconds` (running leases stay)."""
        resource = self._proxies.get(proxy)
        if resource is None:
            return
        resource.down_until = self._clock() + self.down_seconds
        resource.down_reason = reason
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            loop.call_later(self.down_seconds + 0.01, self._dispatch)
        self._dispatch()

    def in_rotation(self, proxy: str) -> bool:
        resource = self._proxies.get(proxy)
        return resource is not None and not self._out(resource)

    def _out(self, resource: _Resource) -> str:
        """Why a proxy takes no new task now; empty when it does."""
        if resource.removed:
            return f"proxy {resource.name} was removed from the configuration"
        if resource.down_until > self._clock():
            return f"proxy {resource.name} failed: {resource.down_reason}"
        return ""

    # ---- the decisions ---------------------------------------------------------------------

    def _ordered(self) -> list[_Request]:
        rank: dict[str, int] = {}
        keyed = []
        for r in sorted(self._waiting, key=lambda r: r.seq):
            position = rank.get(r.group, 0)
            rank[r.group] = position + 1
            keyed.append(((position, self._served.get(r.group, 0), r.seq), r))
        return [r for _, r in sorted(keyed, key=lambda item: item[0])]

    def _eligible(self, request: _Request) -> tuple[list[Candidate], list[str]]:
        """The best-tier candidates in rotation, and the reasons of those out of it."""
        up, out = [], []
        for c in request.candidates:
            resource = self._proxies.get(c.proxy)
            if resource is None:
                out.append(f"proxy {c.proxy} is not configured")
            elif why := self._out(resource):
                out.append(why)
            else:
                up.append(c)
        if not up:
            return [], out
        best = min(c.tier for c in up)
        return [c for c in up if c.tier == best], out

    def _dispatch(self) -> None:
        for request in self._ordered():
            if request.future.done():
                continue
            eligible, out = self._eligible(request)
            if not eligible:
                self._waiting.remove(request)
                request.future.set_exception(NoProxyAvailable(
                    f"no proxy is left for {request.label or 'this task'}: " + "; ".join(out)))
                continue
            repository = self._repositories[request.repository]
            if not repository.free:
                continue
            free = [c for c in eligible if self._proxies[c.proxy].free]
            if not free:
                continue
            chosen = min(free, key=lambda c: (self._proxies[c.proxy].load,
                                              self._proxies[c.proxy].given, c.proxy))
            self._grant(request, chosen, eligible)

    def _grant(self, request: _Request, chosen: Candidate, eligible: list[Candidate]) -> None:
        proxy = self._proxies[chosen.proxy]
        repository = self._repositories[request.repository]
        others = [f"{c.proxy} ({self._proxies[c.proxy].usage()})" for c in eligible
                  if c.proxy != chosen.proxy]
        reason = (f"best transport here: {chosen.mode}; {chosen.proxy} had "
                  f"{proxy.usage()}" + (f", the other candidates: {', '.join(others)}"
                                        if others else ""))
        proxy.busy += 1
        proxy.given += 1
        repository.busy += 1
        self._served[request.group] = next(self._stamps)
        self._waiting.remove(request)
        request.future.set_result(Lease(self, chosen, request.repository, reason,
                                        self._clock() - request.since))

    def _why_waiting(self, request: _Request) -> str:
        repository = self._repositories[request.repository]
        if not repository.free:
            return (f"waiting for a repository slot ({repository.name}: "
                    f"{repository.usage()})")
        eligible, _ = self._eligible(request)
        busy = ", ".join(f"{c.proxy}: {self._proxies[c.proxy].usage()}" for c in eligible)
        return f"waiting for a proxy slot ({busy})"

    # ---- for status and tests --------------------------------------------------------------

    def usage(self) -> dict[str, dict[str, tuple[int, int]]]:
        """``{"proxies": {name: (busy, max)}, "repositories": {...}}``."""
        return {"proxies": {n: (r.busy, r.max_tasks) for n, r in self._proxies.items()},
                "repositories": {n: (r.busy, r.max_tasks)
                                 for n, r in self._repositories.items()}}

    @property
    def waiting(self) -> Sequence[str]:
        return [r.label for r in self._ordered()]
