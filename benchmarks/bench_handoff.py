"""Hand-off layer throughput: entries/s through producer -> consumer group -> ack, by batch size.

Compares, in the same run and on the same private Redis 7.0 server (never the shared one):
  * raw ``redis-benchmark`` XADD, unpipelined and pipelined (-P 100): the server's ceiling;
  * our producer (``StreamProducer.add_many``, 1,000 entries per call);
  * the consumer-group worker with plain acks (the handler writes nothing), batch sizes 1, 10, 100, 1000;
  * the worker with an atomic emit-and-ack: one XADD output per entry through the commit script.

Every path reports, as the median of ``--runs`` runs:
  * entries/s of wall time (what a crew sees; noisy when other processes share the machine);
  * client CPU per entry (``time.process_time`` of this single-threaded process: the worker loop's own cost);
  * Redis CPU per entry (``INFO CPU`` user+sys delta of the server).
CPU figures are much steadier than wall time on a shared machine. The worker loop is strictly sequential (read,
handle, commit, read...), so "CPU-bound entries/s" = 1 / (client + Redis CPU per entry) is what one worker reaches
when neither process ever waits for a core; the wall rate falls short of it by round-trip latency and by whatever
else runs on the machine. The load average before and after the run is printed for that reason.

Usage: .venv/bin/python benchmarks/bench_handoff.py [--entries 200000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import redis.asyncio as aredis

import handoff
from handoff.producer import StreamProducer
from handoff.worker import Ack, ConsumerGroupWorker, Entry, Outcome, WorkerConfig, XAdd
from waterdoctor.embedded import RedisServer

PAYLOAD = b'{"readings":[{"site":"plant-7","sensor_id":"s-0042","seq":1,"ts_ms":1,"received_ms":1,"metrics":{"ph":7.1}}]}'
BATCHES = (1, 10, 100, 1000)


@dataclass
class Sample:
    """One measurement of one path."""

    entries: int
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float

    @property
    def rate(self) -> float:
        return self.entries / self.wall_s

    @property
    def client_us(self) -> float:
        return self.client_cpu_s / self.entries * 1e6

    @property
    def server_us(self) -> float:
        return self.server_cpu_s / self.entries * 1e6


async def server_cpu(r: aredis.Redis) -> float:
    info = await r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def measure(r: aredis.Redis, n: int, work: Callable[[], Awaitable[None]]) -> Sample:
    s0 = await server_cpu(r)
    c0, t0 = time.process_time(), time.perf_counter()
    await work()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return Sample(n, wall, cpu, await server_cpu(r) - s0)


def redis_benchmark(port: int, n: int, pipeline: int) -> float:
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-n", str(n), "-P", str(pipeline), "-q",
         "XADD", "rb:bench", "*", "payload", PAYLOAD.decode()],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    m = re.findall(r"([\d.]+) requests per second", out)
    return float(m[-1])


async def baseline(url: str, port: int, n: int, pipeline: int) -> Sample:
    """redis-benchmark's rate, with the server's CPU per XADD (its own client CPU is not ours to count)."""
    r = aredis.Redis.from_url(url)
    await r.flushall()
    s0 = await server_cpu(r)
    rate = await asyncio.to_thread(redis_benchmark, port, n, pipeline)
    sample = Sample(n, n / rate, float("nan"), await server_cpu(r) - s0)
    await r.aclose()
    return sample


async def fill(r: aredis.Redis, n: int, stream: str = "b:in") -> None:
    producer = StreamProducer(r, stream)
    for i in range(0, n, 1000):
        await producer.add_many([PAYLOAD] * min(1000, n - i))


async def consume(r: aredis.Redis, n: int, batch: int, emit: bool, stream: str = "b:in") -> None:
    async def handler(entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        if not emit:
            return {}
        return {e.id: Ack([XAdd("b:out", e.payload)]) for e in entries}

    worker = ConsumerGroupWorker(r, stream, "g", handler, config=WorkerConfig(batch_size=batch, block_ms=1))
    task = asyncio.create_task(worker.run())
    while worker.stats.acked < n:
        await asyncio.sleep(0.002)
    worker.stop()
    await task


async def one_run(url: str, n: int) -> dict[str, Sample]:
    r = aredis.Redis.from_url(url)
    res: dict[str, Sample] = {}
    await r.flushall()
    res["producer add_many (1000 per call)"] = await measure(r, n, functools.partial(fill, r, n))
    for batch in BATCHES:
        for emit in (False, True):
            await r.flushall()
            m = n if batch >= 100 else n // (10 if batch == 10 else 50)
            await fill(r, m)
            await r.xgroup_create("b:in", "g", id="0")
            name = f"worker batch={batch} {'emit+ack' if emit else 'ack'}"
            res[name] = await measure(r, m, functools.partial(consume, r, m, batch, emit))
    await r.aclose()
    return res


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    m = re.search(r"Model name:\s*(.+)", out)
    return m.group(1).strip() if m else platform.machine()


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def versions(url: str) -> str:
    import hiredis
    import redis as redis_py

    async def server_version() -> str:
        r = aredis.Redis.from_url(url)
        info = await r.info("server")
        await r.aclose()
        return str(info["redis_version"])

    return (
        f"Redis {asyncio.run(server_version())}, Python {platform.python_version()}, "
        f"redis-py {redis_py.__version__}, hiredis {hiredis.__version__}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=200_000, help="entries per path (batch 1 and 10: fewer)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    load_before = load_average()
    results: dict[str, list[Sample]] = {}
    with RedisServer("redis") as server:
        about = versions(server.url)
        for _ in range(args.runs):
            for name, n, pipeline in (
                ("redis-benchmark XADD (no pipeline)", args.entries // 4, 1),
                ("redis-benchmark XADD -P 100", args.entries * 2, 100),
            ):
                results.setdefault(name, []).append(
                    asyncio.run(baseline(server.url, server.port, n, pipeline))
                )
            for k, v in asyncio.run(one_run(server.url, args.entries)).items():
                results.setdefault(k, []).append(v)
    load_after = load_average()

    print(f"command: .venv/bin/python {shlex.join(sys.argv)}")
    print(f"machine: {lscpu_model()}, {os.cpu_count()} cores; {about}; handoff from {handoff.__path__[0]}")
    print(f"load average (1/5/15 min) before: {load_before}; after: {load_after}")
    print()
    print(
        f"| path | entries/s, wall (median of {args.runs}) | runs | client CPU us/entry | Redis CPU us/entry "
        "| CPU-bound entries/s |"
    )
    print("|---|---:|---|---:|---:|---:|")
    for name, samples in results.items():
        rate = statistics.median(s.rate for s in samples)
        client = statistics.median(s.client_us for s in samples)
        server_us = statistics.median(s.server_us for s in samples)
        runs = ", ".join(f"{s.rate:,.0f}" for s in samples)
        client_txt = "-" if client != client else f"{client:.2f}"  # NaN: redis-benchmark's client is not ours
        capacity = "-" if client != client else f"{1e6 / (client + server_us):,.0f}"
        print(f"| {name} | {rate:,.0f} | {runs} | {client_txt} | {server_us:.2f} | {capacity} |")


if __name__ == "__main__":
    main()
