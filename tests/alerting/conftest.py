"""Fixtures of the alerting tests: the Twilio fake over HTTP, the real twilio package, real Redis/Valkey."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aredis

from alerting.dispatcher import DispatchConfig, Dispatcher
from alerting.ratelimit import RateLimiter, RedisSendRateLimiter, SendRateLimiter
from alerting.routing import Routing, parse_routing
from alerting.sms import SendResult, SmsSender, TwilioSender
from simulators.twilio_fake import Faults, TwilioFake

FROM = "+15550000000"
PHONE_A = "+15551230001"
PHONE_B = "+15551230002"
PHONE_ESC = "+15551239999"

BASIC_ROUTING = f"""
[[route]]
sites = ["plant-*"]
phones = ["{PHONE_A}", "{PHONE_B}"]
"""


class FakeClock:
    """Epoch seconds under test control (quiet hours, escalation, staleness)."""

    def __init__(self, now: float = 1_767_312_000.0) -> None:  # 2026-01-02T00:00:00Z
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def anomaly(
    seq: int,
    *,
    site: str = "plant-7",
    sensor: str = "s-0042",
    severity: str = "warning",
    metric: str = "ph",
    value: float = 4.1,
    direction: str = "low",
    ts_ms: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    ts = 1_767_312_000_000 + seq * 1000 if ts_ms is None else ts_ms
    return {
        "alert_id": f"{site}:{sensor}:{seq}",
        "site": site,
        "sensor_id": sensor,
        "seq": seq,
        "ts_ms": ts,
        "detected_ms": ts + 8,
        "score": 0.71,
        "threshold": 0.62,
        "severity": severity,
        "model_version": f"{site}:{sensor}:3",
        "reading_entry_id": f"{ts}-0",
        "metrics": {metric: value, "turbidity_ntu": 0.4},
        "explanation": [{"metric": metric, "value": value, "direction": direction}],
        **extra,
    }


#: No folding or throttling: every anomaly is its own alert (most tests count SMS per alert).
PLAIN = DispatchConfig(fold_window_s=0, throttle_max=0, send_timeout_s=2.0, inflight_wait_s=5.0)


class HangingSender:
    """A sender whose requests never return (a provider that stopped answering, or a process about to die)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def send(self, to: str, body: str) -> SendResult:
        self.started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        return None


def fast_limiter() -> SendRateLimiter:
    return SendRateLimiter(per_number_rate=100_000, per_number_burst=100_000)


@pytest.fixture
async def fake() -> AsyncIterator[TwilioFake]:
    async with TwilioFake(faults=Faults(hang_s=3.0)) as f:
        yield f


@pytest.fixture
async def sender(fake: TwilioFake) -> AsyncIterator[TwilioSender]:
    s = TwilioSender(fake.account_sid, fake.auth_token, FROM, base_url=fake.base_url, read_timeout=1.0)
    yield s
    await s.aclose()


@pytest.fixture
def routing() -> Routing:
    return parse_routing(BASIC_ROUTING)


DispatcherFactory = Callable[..., Dispatcher]


@pytest.fixture
async def make_dispatcher(r: aredis.Redis, redis_url: str) -> AsyncIterator[DispatcherFactory]:
    """Build dispatchers on the test's Redis; ``own_client=True`` gives one its own connection (another process)."""
    clients: list[aredis.Redis] = []

    def build(
        sender: SmsSender,
        routing: Routing,
        *,
        config: DispatchConfig = PLAIN,
        clock: Callable[[], float] | None = None,
        limiter: RateLimiter | None = None,
        own_client: bool = False,
    ) -> Dispatcher:
        client = r
        if own_client:
            client = aredis.Redis.from_url(redis_url)
            clients.append(client)
        # By default the crew's limiter (shared through Redis, reserved in the admission step), with bounds that
        # never hold an SMS back; tests of the in-process limiter pass fast_limiter().
        limiter = limiter or RedisSendRateLimiter(client, 100_000, 100_000)
        kwargs: dict[str, Any] = {"config": config, "limiter": limiter}
        if clock is not None:
            kwargs["clock"] = clock
        return Dispatcher(client, sender, routing, **kwargs)

    yield build
    for c in clients:
        await c.aclose()
