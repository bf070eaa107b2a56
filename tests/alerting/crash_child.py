"""Child process of the SIGKILL test: dispatches alerts until it is killed (``python -m tests.alerting.crash_child``)."""

from __future__ import annotations

import asyncio
import sys

import redis.asyncio as aredis

from alerting.dispatcher import DispatchConfig, Dispatcher
from alerting.ratelimit import SendRateLimiter
from alerting.routing import parse_routing
from alerting.sms import TwilioSender
from tests.alerting.conftest import BASIC_ROUTING, FROM, anomaly


async def main(redis_url: str, base_url: str, sid: str, token: str, n: int) -> None:
    r = aredis.Redis.from_url(redis_url)
    sender = TwilioSender(sid, token, FROM, base_url=base_url, read_timeout=60)
    d = Dispatcher(
        r,
        sender,
        parse_routing(BASIC_ROUTING),
        config=DispatchConfig(fold_window_s=0, throttle_max=0, send_timeout_s=2.0),
        limiter=SendRateLimiter(per_number_rate=200, per_number_burst=20),
    )
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with sem:
            await d.dispatch(anomaly(i))

    print("STARTED", flush=True)
    await asyncio.gather(*(one(i) for i in range(n)))
    print("DONE", flush=True)
    await asyncio.sleep(3600)  # the parent kills us


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
