"""Work that must run to its end even when the session's task is cancelled.

``daemon.stop_timeout`` after a stop request, the daemon cancels the sessions that are still
running. Some of their work must not be cut short by that: a snapshot vCenter is creating
(cut short, it would be made after nobody waits for it, and never removed), a snapshot
removal, a hot-add attach or detach, a guest's thaw. :func:`to_the_end` waits for such work
through cancellations and raises the cancellation once the work is over, so that everything
after it in the ``finally`` chain (the snapshot removal after a thaw, the vCenter logout after
the snapshot removal) still runs in order. Work that might not end carries its own deadline.
"""
from __future__ import annotations

import asyncio
from typing import TypeVar

T = TypeVar("T")


async def to_the_end(task: asyncio.Future[T]) -> T:
    """Await ``task`` to its end even when this coroutine is cancelled meanwhile (then the
    cancellation is raised afterwards, and the caller may look at the task itself)."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the caller looks at the task itself
        raise asyncio.CancelledError
    return task.result()


__all__ = ["to_the_end"]
