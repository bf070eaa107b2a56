"""Per-device token buckets."""

from __future__ import annotations

import pytest

from ingest.ratelimit import DeviceLimiter


def test_flood_is_limited_to_burst_plus_rate() -> None:
    limiter = DeviceLimiter(rate=10, burst=20)
    now = 1000.0
    allowed = sum(
        limiter.allow(("p", "s"), now + i * 0.001, now) for i in range(1000)
    )  # 1000 readings in 1 s
    assert 20 <= allowed <= 20 + 10 * 1 + 1


def test_devices_do_not_share_buckets() -> None:
    limiter = DeviceLimiter(rate=1, burst=1)
    assert limiter.allow(("p", "a"), 0.0, 0.0)
    assert not limiter.allow(("p", "a"), 0.0, 0.0)
    assert limiter.allow(("p", "b"), 0.0, 0.0)
    assert limiter.allow(("q", "a"), 0.0, 0.0)


def test_a_backlog_measured_over_time_drains_without_drops() -> None:
    # 600 readings taken one per 100 ms (60 s of the device's clock) that waited at the broker and arrive at once.
    limiter = DeviceLimiter(rate=10, burst=20)
    arrival = 5000.0
    allowed = sum(limiter.allow(("p", "s"), arrival, 4000.0 + i * 0.1) for i in range(600))
    assert allowed == 600


def test_one_sample_per_interval() -> None:
    limiter = DeviceLimiter(rate=1, burst=1, sample_interval_s=10)
    limiter.allow(("p", "s"), 100.0, 100.0)
    assert limiter.should_sample(("p", "s"), 100.0)
    assert not limiter.should_sample(("p", "s"), 105.0)
    assert limiter.should_sample(("p", "s"), 110.5)
    assert not limiter.should_sample(("p", "unknown"), 110.5)


def test_idle_devices_are_forgotten_when_the_table_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    import ingest.ratelimit as rl

    monkeypatch.setattr(rl, "_MAX_DEVICES", 10)
    limiter = DeviceLimiter(rate=1, burst=5)
    for i in range(10):
        limiter.allow(("p", f"s{i}"), 0.0, 0.0)
    assert len(limiter) == 10
    limiter.allow(("p", "new"), 100.0, 100.0)  # the others have been idle long enough to be full again
    assert len(limiter) == 1
