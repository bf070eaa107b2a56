"""Send-rate bounds: a token bucket per destination number and an optional one for the whole sender.

Buckets reserve a slot on ``acquire`` (tokens may go negative) and sleep until it comes due, so waiters are served in
arrival order without a polling loop. The bound is per process; two alerting processes each keep their own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def _refill(self) -> float:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        return now

    def reserve(self) -> float:
        """Take one token now, returning how many seconds to wait before using it (0 when one was available)."""
        self._refill()
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def idle_full(self) -> bool:
        """True when the bucket is full again (it can be dropped and recreated without changing behaviour)."""
        self._refill()
        return self._tokens >= self.burst

    async def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)


class SendRateLimiter:
    """Per-number buckets (``per_number_rate`` SMS/s, burst ``per_number_burst``) and an optional global bucket."""

    def __init__(
        self,
        per_number_rate: float = 1.0,
        per_number_burst: float = 5.0,
        *,
        global_rate: float | None = None,
        global_burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_number_rate = per_number_rate
        self.per_number_burst = per_number_burst
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._global = (
            TokenBucket(global_rate, global_burst or max(1.0, global_rate), clock=clock)
            if global_rate
            else None
        )

    def reserve(self, phone: str) -> float:
        """Reserve a slot for ``phone``; seconds to wait before sending."""
        bucket = self._buckets.get(phone)
        if bucket is None:
            if len(self._buckets) > 10_000:
                # Bound memory: a full bucket carries no state worth keeping.
                for key in [k for k, b in self._buckets.items() if b.idle_full()]:
                    del self._buckets[key]
            bucket = self._buckets[phone] = TokenBucket(
                self.per_number_rate, self.per_number_burst, clock=self._clock
            )
        wait = bucket.reserve()
        if self._global is not None:
            wait = max(wait, self._global.reserve())
        return wait

    async def acquire(self, phone: str) -> None:
        wait = self.reserve(phone)
        if wait > 0:
            await asyncio.sleep(wait)
