"""The repositories' own maintenance: garbage collection, outside every VM's backup.

gc needs a repository to itself (its exclusive lock), so it cannot be a step of a VM's
backup without making that VM wait for — or fail because of — every other writer. Instead a
backup only *asks* for it (retention deleted points, so blocks may be unused now), and the
engine runs what was asked at the end of each session if no writer holds the repository at
that moment (another session's, another process's); otherwise it stays asked for, and the
next session's end tries again. An administrator runs it at any time (``vbrctl gc``), then
waiting for writers up to :data:`GC_WAIT` seconds. A gc that fails is reported as that —
never as the outcome of a VM whose point was committed.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import Any

from vbrd.errors import RepositoryError
from vbrd.repository import Repository

log = logging.getLogger(__name__)

GC_WAIT = 60.0
"""How long an on-demand gc waits for the repository's writers before it gives up."""


async def collect_garbage(repo: Repository, name: str, *, wait: bool) -> dict[str, Any]:
    """gc of one repository: ``{"repository", "ran", …GcStats}`` or ``ran: false`` and why.

    With ``wait`` it waits for writers (up to :data:`GC_WAIT`, then RepositoryError);
    without, it only runs if the repository is free right now.
    """
    if wait:
        stats = await asyncio.to_thread(repo.gc, timeout=GC_WAIT)
    else:
        found = await asyncio.to_thread(repo.try_gc)
        if found is None:
            return {"repository": name, "ran": False,
                    "reason": "the repository is in use by a writer"}
        stats = found
    return {"repository": name, "ran": True, **dataclasses.asdict(stats)}


class Maintenance:
    """Which repositories want a gc, and running it when they are free."""

    def __init__(self) -> None:
        self._wanted: set[str] = set()
        self._mutex = threading.Lock()

    def request(self, repository: str) -> None:
        """Blocks may be unused in ``repository`` now (points were deleted)."""
        with self._mutex:
            self._wanted.add(repository)

    def wanted(self) -> set[str]:
        with self._mutex:
            return set(self._wanted)

    async def run_wanted(self, open_repository: Any) -> list[dict[str, Any]]:
        """gc every repository that asked for one and is free now; the others stay asked
        for. ``open_repository(name)`` opens one. Never raises: a failure is in the result
        (``error``) and in the daemon's log."""
        results = []
        for name in sorted(self.wanted()):
            try:
                repo = await asyncio.to_thread(open_repository, name)
                result = await collect_garbage(repo, name, wait=False)
            except (RepositoryError, OSError) as e:
                log.warning("gc of repository %s failed: %s", name, e)
                results.append({"repository": name, "ran": False, "error": str(e)})
                continue
            if result["ran"]:
                with self._mutex:
                    self._wanted.discard(name)
            results.append(result)
        return results
