"""Send-rate bounds: a token bucket per destination number and an optional one for the whole sender.

Buckets reserve a slot on ``acquire`` (tokens may go negative) and sleep until it comes due, so waiters are served in
arrival order without a polling loop. Two implementations with the same bounds:

* :class:`RedisSendRateLimiter` (what the alerting crew uses): the buckets live in Redis as GCRA "theoretical
  arrival times" (one small key per number, ``wd:_rate:{phone}``, expiring when idle), reserved by one script on
  the server's clock, so every alerting process shares one bound per number and one global bound;
* :class:`SendRateLimiter`: in process memory, per process (tests and single-process tools).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aredis

from handoff import keys


class RateLimiter(Protocol):
    """What the dispatcher needs: reserve a send slot for a number (seconds to wait), or wait for one."""

    async def reserve_async(self, phone: str) -> float: ...

    async def acquire(self, phone: str) -> None: ...


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

    async def reserve_async(self, phone: str) -> float:
        return self.reserve(phone)

    async def acquire(self, phone: str) -> None:
        wait = self.reserve(phone)
        if wait > 0:
            await asyncio.sleep(wait)


# GCRA over any number of buckets at once, as a Lua function other scripts include (the dispatcher's admission
# script reserves the send slot in the same step as the claim): KEYS[k0 .. k0+n-1] are the buckets, ARGV[a0 ..] holds
# (interval_ms, burst) per key. Each bucket's value is its theoretical arrival time (TAT, ms on the server clock); a
# reservation is due at TAT - (burst - 1) * interval and moves the TAT on by one interval, even when it has to wait
# (as the in-process bucket lets its tokens go negative), so waiters are served in order. Returns the wait in ms
# (max over the buckets).
GCRA_LUA = """
local function gcra_reserve(k0, n, a0)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local wait = 0
  local tats = {}
  for i = 0, n - 1 do
    local interval = tonumber(ARGV[a0 + 2 * i])
    local burst = tonumber(ARGV[a0 + 2 * i + 1])
    local tat = tonumber(redis.call('GET', KEYS[k0 + i])) or now
    if tat < now then tat = now end
    local w = tat - (burst - 1) * interval - now
    if w > wait then wait = w end
    tats[i] = tat
  end
  for i = 0, n - 1 do
    local new_tat = tats[i] + tonumber(ARGV[a0 + 2 * i])
    redis.call('SET', KEYS[k0 + i], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1000)
  end
  return math.ceil(wait)
end
"""
_RESERVE_LUA = GCRA_LUA + "return gcra_reserve(1, #KEYS, 1)\n"


class RedisSendRateLimiter:
    """:class:`SendRateLimiter`'s bounds, shared by every alerting process through Redis (see module docstring)."""

    def __init__(
        self,
        redis: aredis.Redis,
        per_number_rate: float = 1.0,
        per_number_burst: float = 5.0,
        *,
        global_rate: float | None = None,
        global_burst: float | None = None,
    ) -> None:
        if per_number_rate <= 0 or per_number_burst < 1 or (global_rate is not None and global_rate <= 0):
            raise ValueError("rates must be > 0 and bursts >= 1")
        self._reserve = redis.register_script(_RESERVE_LUA)
        self._number = (1000.0 / per_number_rate, float(per_number_burst))
        self._global = (
            (1000.0 / global_rate, float(global_burst or max(1.0, global_rate))) if global_rate else None
        )

    def buckets(self, phone: str) -> tuple[list[str], list[float]]:
        """The bucket keys of ``phone`` and their (interval_ms, burst) pairs, for :data:`GCRA_LUA` in any script."""
        bucket_keys = [keys.SMS_RATE_PREFIX + phone]
        args: list[float] = [*self._number]
        if self._global is not None:
            bucket_keys.append(keys.SMS_RATE_PREFIX + "*")
            args.extend(self._global)
        return bucket_keys, args

    async def reserve_async(self, phone: str) -> float:
        """Reserve a slot for ``phone`` (and in the global bucket); seconds to wait before sending."""
        bucket_keys, args = self.buckets(phone)
        wait_ms = await self._reserve(keys=bucket_keys, args=args)
        return max(0, int(wait_ms)) / 1000

    async def acquire(self, phone: str) -> None:
        wait = await self.reserve_async(phone)
        if wait > 0:
            await asyncio.sleep(wait)
