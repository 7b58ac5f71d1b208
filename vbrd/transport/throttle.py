"""A token-bucket bandwidth limit for the proxy side of a transfer.

The bucket lends: a sender may take more than the bucket holds (a whole 1 MiB frame when the
bucket holds a tenth of a second's worth) and then waits until the debt is paid back. That keeps
frames whole, costs one sleep per frame at most, and bounds the overshoot over any window to one
burst plus one frame, which is what lets a 20 MB/s limit be honoured within a few per cent over
a few seconds.

The rate may change while a transfer runs (:meth:`TokenBucket.set_rate`): that is how the
Manager will later share one rule's bandwidth fairly between several movers, by handing each its
share as movers start and finish.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# The bucket holds this many seconds of the rate, so an idle sender cannot save up a long burst.
BURST_SECONDS = 0.05
# ... but never less than this, so small rates do not sleep for every small frame.
MIN_BURST_BYTES = 64 * 1024


class TokenBucket:
    """Limits the bytes per second passed through :meth:`consume`; ``None`` means no limit."""

    def __init__(
        self, rate: float | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._rate: float | None = None
        self._tokens = 0.0
        self._stamp = clock()
        self._changed = asyncio.Event()
        self.waited = 0.0  # seconds spent waiting for tokens, for the bottleneck report
        self.set_rate(rate)

    @property
    def rate(self) -> float | None:
        return self._rate

    @property
    def burst(self) -> float:
        if self._rate is None:
            return 0.0
        return max(self._rate * BURST_SECONDS, float(MIN_BURST_BYTES))

    def set_rate(self, rate: float | None) -> None:
        """Change the limit now; a sender waiting under the old rate re-plans its wait."""
        if rate is not None and rate <= 0:
            raise ValueError(f"a bandwidth limit must be positive, not {rate}")
        self._refill()
        self._rate = float(rate) if rate is not None else None
        if self._rate is None:
            self._tokens = 0.0
        else:
            self._tokens = min(self._tokens, self.burst)
        self._changed.set()

    def _refill(self) -> None:
        now = self._clock()
        if self._rate is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    async def consume(self, n: int) -> None:
        """Take ``n`` bytes' worth of tokens, waiting as long as the limit requires."""
        if self._rate is None:
            return
        self._refill()
        self._tokens -= n
        started = self._clock()
        try:
            while self._rate is not None and self._tokens < 0:
                self._changed.clear()
                delay = -self._tokens / self._rate
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=delay)
                except TimeoutError:
                    pass
                self._refill()
        finally:
            self.waited += self._clock() - started
