"""Alerting benchmark: SMS path latency and backfill rate against the Twilio fake in its own process.

    .venv/bin/python benchmarks/bench_alerting.py [--runs 3] [--quick]

What it measures (private embedded Redis 7, the fake as a subprocess, the real ``twilio`` package over HTTP):

1. sender: async ``TwilioSender`` (aiohttp transport) vs the stock sync twilio client in threads, sends/s.
2. max sustained dispatch rate: closed loop, 64 alerts in flight, one phone per alert, no folding/throttling.
3. latency from publishing the anomaly on ``wd:alerts:v1`` (Pub/Sub) to the fake's acceptance of the SMS, at light
   load and at half the maximum sustained rate (open loop: publications on a fixed schedule), p50/p99.
4. backfill: 10,000 alerts handed to the dispatcher at once (what the stream consumer does after an outage),
   with a configured global send rate, and unbounded.

The latency here is the alerting crew's share (Pub/Sub hop + dispatcher + ledger + Twilio call), not ingest and
analytics. Medians of ``--runs`` runs are printed as a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alerting.dispatcher import DispatchConfig, Dispatcher  # noqa: E402
from alerting.ratelimit import RateLimiter, RedisSendRateLimiter, SendRateLimiter  # noqa: E402
from alerting.routing import parse_routing  # noqa: E402
from alerting.sms import TwilioSender  # noqa: E402
from handoff import keys  # noqa: E402
from simulators.twilio_fake import TwilioFakeProcess  # noqa: E402
from waterdoctor.embedded import RedisServer  # noqa: E402

SID, TOKEN, FROM, PHONE = "AC" + "0" * 32, "bench-token", "+15550000000", "+15551230001"
ROUTING = parse_routing(f'[[route]]\nsites = ["*"]\nphones = ["{PHONE}"]\n')
PLAIN = DispatchConfig(fold_window_s=0, throttle_max=0)
#: The configured global send rate of the backfill run (an account's messages per second).
BACKFILL_RATE = 200.0


def anomaly(site: str, seq: int, ts_ms: int) -> dict[str, Any]:
    return {
        "alert_id": f"{site}:s-1:{seq}", "site": site, "sensor_id": "s-1", "seq": seq, "ts_ms": ts_ms,
        "detected_ms": ts_ms, "score": 0.8, "threshold": 0.6, "severity": "warning", "model_version": "m",
        "reading_entry_id": "0-0", "metrics": {"ph": 4.1}, "explanation": [{"metric": "ph", "value": 4.1,
        "direction": "low"}],
    }  # fmt: skip


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def bench_senders(base_url: str, n: int) -> dict[str, float]:
    """Async aiohttp transport vs the stock sync twilio client (requests) in a thread pool, 32 in flight."""
    from twilio.rest import Client

    out: dict[str, float] = {}
    sender = TwilioSender(SID, TOKEN, FROM, base_url=base_url)
    sem = asyncio.Semaphore(32)

    async def one_async(i: int) -> None:
        async with sem:
            r = await sender.send(PHONE, f"bench id sender:a:{i}")
            assert r.outcome.value == "accepted", r

    t0 = time.perf_counter()
    await asyncio.gather(*(one_async(i) for i in range(n)))
    out["async_sends_per_s"] = n / (time.perf_counter() - t0)
    await sender.aclose()

    from twilio.http.http_client import TwilioHttpClient

    class _Rebased(TwilioHttpClient):  # type: ignore[misc]
        def request(self, method: str, url: str, *a: Any, **kw: Any) -> Any:
            return super().request(method, url.replace("https://api.twilio.com", base_url), *a, **kw)

    client = Client(
        SID, TOKEN, http_client=_Rebased(pool_connections=True, timeout=10), environment={"WD": "1"}
    )

    def sync_send(i: int) -> None:
        client.messages.create(to=PHONE, from_=FROM, body=f"bench id sender:s:{i}")

    loop = asyncio.get_running_loop()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(32) as pool:
        t0 = time.perf_counter()
        await asyncio.gather(*(loop.run_in_executor(pool, sync_send, i) for i in range(n)))
        out["sync_thread_sends_per_s"] = n / (time.perf_counter() - t0)
    return out


async def bench_max_rate(r: aredis.Redis, base_url: str, n: int, site: str) -> float:
    sender = TwilioSender(SID, TOKEN, FROM, base_url=base_url)
    d = Dispatcher(r, sender, ROUTING, config=PLAIN, limiter=limiter(r))
    sem = asyncio.Semaphore(64)
    now = int(time.time() * 1000)

    async def one(i: int) -> None:
        async with sem:
            assert await d.dispatch(anomaly(site, i, now))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    rate = n / (time.perf_counter() - t0)
    await d.aclose()
    return rate


async def bench_latency(
    r: aredis.Redis, redis_url: str, fake: TwilioFakeProcess, rate: float, seconds: float, site: str
) -> dict[str, float]:
    """Open loop: publish on wd:alerts:v1 at ``rate``/s; a subscriber dispatches; latency to the fake's accept."""
    sender = TwilioSender(SID, TOKEN, FROM, base_url=fake.base_url)
    d = Dispatcher(r, sender, ROUTING, config=PLAIN, limiter=limiter(r))
    sub_client = aredis.Redis.from_url(redis_url)
    pub_client = aredis.Redis.from_url(redis_url)
    pubsub = sub_client.pubsub()
    await pubsub.subscribe(keys.ALERTS_CHANNEL)
    published: dict[str, float] = {}
    tasks: set[asyncio.Task[bool]] = set()
    n = int(rate * seconds)
    done = asyncio.Event()

    async def subscriber() -> None:
        got = 0
        async for msg in pubsub.listen():
            if msg["type"] != "message":
                continue
            t = asyncio.create_task(d.dispatch(orjson.loads(msg["data"])))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            got += 1
            if got == n:
                done.set()
                return

    sub_task = asyncio.create_task(subscriber())
    start = time.perf_counter() + 0.05
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        wall = time.time()
        a = anomaly(site, i, int(wall * 1000))
        published[a["alert_id"]] = wall
        await pub_client.publish(keys.ALERTS_CHANNEL, orjson.dumps(a))
    await asyncio.wait_for(done.wait(), 60)
    await sub_task
    while tasks:
        await asyncio.gather(*list(tasks))
    await asyncio.sleep(0.2)  # the record file is flushed per message; let the last lines land
    accepted = {m.alert_id: m.at for m in fake.accepted() if m.alert_id}
    lat = [(accepted[k] - v) * 1000 for k, v in published.items() if k in accepted]
    assert len(lat) == n, (len(lat), n)
    await pubsub.aclose()
    await sub_client.aclose()
    await pub_client.aclose()
    await d.aclose()
    return {"p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "n": float(n)}


async def bench_backfill(r: aredis.Redis, base_url: str, n: int, send_rate: float | None, site: str) -> float:
    sender = TwilioSender(SID, TOKEN, FROM, base_url=base_url)
    bound = limiter(r, global_rate=send_rate, global_burst=1) if send_rate else limiter(r)
    d = Dispatcher(r, sender, ROUTING, config=PLAIN, limiter=bound)
    sem = asyncio.Semaphore(64)
    ts = int(time.time() * 1000) - 600_000  # ten minutes old: the outage

    async def one(i: int) -> None:
        async with sem:
            assert await d.dispatch(anomaly(site, i, ts + i))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    rate = n / (time.perf_counter() - t0)
    await d.aclose()
    return rate


#: Which send-rate limiter the dispatchers use: in-process buckets, or the Redis-shared ones the crew uses
#: (``--shared-limiter``: one more script call per SMS). Limits far above the load unless a global rate is given.
SHARED_LIMITER = False


def limiter(r: aredis.Redis, **global_bound: float) -> RateLimiter:
    if SHARED_LIMITER:
        return RedisSendRateLimiter(r, 1e9, 1e9, **global_bound)
    return SendRateLimiter(1e9, 1e9, **global_bound)


async def one_run(run: int, quick: bool) -> dict[str, float]:
    res: dict[str, float] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        RedisServer("redis", data_dir=tmp) as server,
        TwilioFakeProcess(Path(tmp), SID, TOKEN) as fake,
    ):
        base_url = fake.base_url
        r = aredis.Redis.from_url(server.url)
        res.update(await bench_senders(base_url, 500 if quick else 2000))
        res["max_dispatch_per_s"] = await bench_max_rate(r, base_url, 1000 if quick else 5000, f"max{run}")
        light = await bench_latency(r, server.url, fake, 20, 3 if quick else 10, f"light{run}")
        res["light_rate"] = 20
        res["light_p50_ms"], res["light_p99_ms"] = light["p50_ms"], light["p99_ms"]
        half = res["max_dispatch_per_s"] / 2
        heavy = await bench_latency(r, server.url, fake, half, 3 if quick else 10, f"half{run}")
        res["half_rate"] = half
        res["half_p50_ms"], res["half_p99_ms"] = heavy["p50_ms"], heavy["p99_ms"]
        n_back = 2000 if quick else 10_000
        res["backfill_configured_rate"] = BACKFILL_RATE
        res["backfill_achieved_per_s"] = await bench_backfill(r, base_url, n_back, BACKFILL_RATE, f"bf{run}")
        res["backfill_unbounded_per_s"] = await bench_backfill(r, base_url, n_back, None, f"bfu{run}")
        await r.aclose()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    p.add_argument(
        "--shared-limiter",
        action="store_true",
        help="the Redis-shared send-rate limiter (the crew's default)",
    )
    args = p.parse_args()
    global SHARED_LIMITER
    SHARED_LIMITER = args.shared_limiter
    runs = []
    for i in range(args.runs):
        load_before = os.getloadavg()[0]
        res = asyncio.run(one_run(i, args.quick))
        # Other work on the machine skews everything here; keep the 1-minute load next to each run.
        res["loadavg_1m_before"], res["loadavg_1m_after"] = load_before, os.getloadavg()[0]
        print(f"run {i + 1}: " + ", ".join(f"{k}={v:.1f}" for k, v in res.items()), flush=True)
        runs.append(res)
    print(
        f"\nmedians of {args.runs} run(s) on {platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}:"
    )
    print("| measure | median |\n|---|---|")
    for k in runs[0]:
        print(f"| {k} | {statistics.median(r[k] for r in runs):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
