"""Per-device token buckets: a sensor that floods cannot starve the others.

One bucket per ``(site, sensor_id)`` (the device that produced the reading, whichever topic carried it), refilled at
``rate`` readings per second up to ``burst``. A reading that finds the bucket empty is dropped and counted.

Refill time is the larger of two clocks: the ingest clock since the device's last reading, and the advance of the
device's own ``ts``. A backlog that waited at the broker while ingest was down (or held back by backpressure)
arrives in a burst but carries the timestamps it was measured at, so it drains without drops; a device that really
floods (many readings per second of its own clock) is limited. A device cannot gain more than the 5 minutes of
future ``ts`` that validation allows, plus its real rate.

Each ingest process keeps its own buckets: with N processes on the shared subscription a device's effective limit is
up to N times ``rate``.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DeviceLimiter"]

_TOKENS, _NOW, _TS, _SAMPLED = 0, 1, 2, 3
_MAX_DEVICES: Final = 500_000


class DeviceLimiter:
    """Token buckets keyed by device; ``rate`` readings/s, ``burst`` readings of credit."""

    def __init__(self, rate: float, burst: float, *, sample_interval_s: float = 10.0) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.sample_interval_s = sample_interval_s
        self._buckets: dict[tuple[str, str], list[float]] = {}

    def allow(self, device: tuple[str, str], now_s: float, ts_s: float) -> bool:
        """Take one token for a reading of ``device`` measured at ``ts_s``, arriving at ``now_s``."""
        bucket = self._buckets.get(device)
        if bucket is None:
            if len(self._buckets) >= _MAX_DEVICES:
                self._evict(now_s)
            self._buckets[device] = [self.burst - 1.0, now_s, ts_s, 0.0]
            return True
        elapsed = now_s - bucket[_NOW]
        advance = ts_s - bucket[_TS]
        if advance > elapsed:
            elapsed = advance
        tokens = bucket[_TOKENS]
        if elapsed > 0:
            tokens += elapsed * self.rate
            if tokens > self.burst:
                tokens = self.burst
        bucket[_NOW] = now_s
        if ts_s > bucket[_TS]:
            bucket[_TS] = ts_s
        if tokens >= 1.0:
            bucket[_TOKENS] = tokens - 1.0
            return True
        bucket[_TOKENS] = tokens
        return False

    def should_sample(self, device: tuple[str, str], now_s: float) -> bool:
        """Whether a dropped reading of ``device`` should be quarantined as a sample (one per interval)."""
        bucket = self._buckets.get(device)
        if bucket is None or now_s - bucket[_SAMPLED] < self.sample_interval_s:
            return False
        bucket[_SAMPLED] = now_s
        return True

    def _evict(self, now_s: float) -> None:
        # Forget devices whose bucket would be full again anyway: dropping them changes nothing.
        full_after = self.burst / self.rate
        self._buckets = {k: b for k, b in self._buckets.items() if now_s - b[_NOW] < full_after}

    def __len__(self) -> int:
        return len(self._buckets)
