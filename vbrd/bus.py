"""The event bus: notifies, never decides (that is what hooks are for).

Publishing is synchronous and cheap: listeners are called in order, a failing listener is
logged and never stops the others nor the session. Consumers that do slow work (the catalog's
writer thread, the API's SSE streams) take events off their own queues, so the data path is
never held up by them.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from vbrd.events import Event, SessionFinished

log = logging.getLogger(__name__)

Listener = Callable[[Event], None]


class EventBus:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Add a listener; returns the callable that removes it."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def publish(self, event: Event) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event listener %r failed on %s", listener, event.type)

    async def follow(self, session_id: str) -> AsyncIterator[Event]:
        """Events of one session as they happen, until its ``session.finished``."""
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(event: Event) -> None:
            if event.session_id == session_id:
                queue.put_nowait(event)

        unsubscribe = self.subscribe(on_event)
        try:
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, SessionFinished):
                    return
        finally:
            unsubscribe()
