"""Hand-off layer throughput: entries/s through producer -> consumer group -> ack, by batch size.

Compares, in the same run and on the same private Redis 7.0 server:
  * raw ``redis-benchmark`` XADD, unpipelined and pipelined (-P 100): the server's ceiling;
  * our producer (``StreamProducer.add_many``);
  * the consumer-group worker, plain acks, at batch sizes 1, 10, 100, 1000;
  * the worker with an atomic emit-and-ack (one XADD output per entry through the commit script).

Usage: .venv/bin/python benchmarks/bench_handoff.py [--entries 100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence

import redis.asyncio as aredis

from handoff.producer import StreamProducer
from handoff.worker import Ack, ConsumerGroupWorker, Entry, Outcome, WorkerConfig, XAdd
from waterdoctor.embedded import RedisServer

PAYLOAD = b'{"readings":[{"site":"plant-7","sensor_id":"s-0042","seq":1,"ts_ms":1,"received_ms":1,"metrics":{"ph":7.1}}]}'


def redis_benchmark(port: int, n: int, pipeline: int) -> float:
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-n", str(n), "-P", str(pipeline), "-q",
         "XADD", "rb:bench", "*", "payload", PAYLOAD.decode()],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    m = re.findall(r"([\d.]+) requests per second", out)
    return float(m[-1])


async def produce(r: aredis.Redis, n: int, stream: str = "b:in") -> float:
    producer = StreamProducer(r, stream)
    t = time.perf_counter()
    for i in range(0, n, 1000):
        await producer.add_many([PAYLOAD] * min(1000, n - i))
    return n / (time.perf_counter() - t)


async def consume(r: aredis.Redis, n: int, batch: int, emit: bool, stream: str = "b:in") -> float:
    async def handler(entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        if not emit:
            return {}
        return {e.id: Ack([XAdd("b:out", e.payload)]) for e in entries}

    worker = ConsumerGroupWorker(r, stream, "g", handler, config=WorkerConfig(batch_size=batch, block_ms=1))
    await worker.ensure_group()
    t = time.perf_counter()
    task = asyncio.create_task(worker.run())
    while worker.stats.acked < n:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t
    worker.stop()
    await task
    return n / elapsed


async def one_run(url: str, n: int) -> dict[str, float]:
    r = aredis.Redis.from_url(url)
    res: dict[str, float] = {}
    await r.flushall()
    res["producer add_many"] = await produce(r, n)
    for batch in (1, 10, 100, 1000):
        for emit in (False, True):
            await r.flushall()
            m = n if batch >= 100 else n // (10 if batch == 10 else 50)
            await produce(r, m)
            res[f"worker batch={batch} {'emit+ack' if emit else 'ack'}"] = await consume(r, m, batch, emit)
    await r.aclose()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, list[float]] = {}
    with RedisServer("redis") as server:
        for _ in range(args.runs):
            results.setdefault("redis-benchmark XADD (no pipeline)", []).append(
                redis_benchmark(server.port, args.entries // 2, 1)
            )
            results.setdefault("redis-benchmark XADD -P 100", []).append(
                redis_benchmark(server.port, args.entries * 2, 100)
            )
            for k, v in asyncio.run(one_run(server.url, args.entries)).items():
                results.setdefault(k, []).append(v)
    print(f"machine: {platform.machine()} {platform.processor() or ''} cores={__import__('os').cpu_count()}")
    print(f"| path | entries/s (median of {args.runs}) | runs |")
    print("|---|---:|---|")
    for k, v in results.items():
        print(f"| {k} | {statistics.median(v):,.0f} | {', '.join(f'{x:,.0f}' for x in v)} |")


if __name__ == "__main__":
    main()
