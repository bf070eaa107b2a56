"""Backlog drain through the consumer-group worker in chunks (what analytics does after a stall).

A stream holds ``--entries`` entries of ~15 KiB (a gateway batch of 100 readings); the worker reads them 500 at a
time and handles and commits them in chunks of 16 KiB (one entry), each further chunk of a batch up to twice the one
before until ``--chunk-max-kb`` (default 128, as the analytics crew; ``--chunk-max-kb 16``: every chunk one entry). The handler spins
for ``--work-us`` per entry (scoring 100 readings costs ~0.9 ms) and emits one anomaly (XADD and PUBLISH) per entry.
Reported: wall time per entry from the first read until nothing is pending, median of ``--runs`` runs, on a
private ``redis-server`` (never the shared one). With ``--hogs N``, N busy processes share the cores (the pipeline
under load: every sleep of the worker costs a wait for a core when it wakes).

The code measured is whatever ``handoff`` imports: run it twice, once with ``PYTHONPATH`` pointing at a checkout of
the baseline (``git worktree add --detach /tmp/base <commit>``), for a side-by-side comparison from the same session.

Usage: .venv/bin/python benchmarks/bench_backlog.py [--entries 1000] [--runs 7] [--work-us 900] [--hogs 0]
       [--chunk-max-kb 128]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Mapping, Sequence

import redis.asyncio as aredis

import handoff
from handoff.producer import StreamProducer
from handoff.worker import Ack, ConsumerGroupWorker, Entry, Outcome, Publish, WorkerConfig, XAdd
from waterdoctor.embedded import RedisServer


def _spin() -> None:  # pragma: no cover - a CPU hog in a child process
    while True:
        pass


async def drain_once(url: str, run: int, entries: int, work_s: float, chunk_max: int) -> float:
    r = aredis.Redis.from_url(url)
    stream, out = f"bench:in:{run}", f"bench:out:{run}"
    await StreamProducer(r, stream).add_many([{"n": i, "pad": "x" * 15_000} for i in range(entries)])
    done = asyncio.Event()
    seen = 0

    async def handler(batch: Sequence[Entry]) -> Mapping[str, Outcome]:
        nonlocal seen
        end = time.perf_counter() + work_s * len(batch)
        while time.perf_counter() < end:
            pass
        seen += len(batch)
        if seen >= entries:
            done.set()
        return {e.id: Ack([XAdd(out, b'{"a":1}'), Publish("bench:alerts", b'{"a":1}')]) for e in batch}

    worker = ConsumerGroupWorker(
        r,
        stream,
        "g",
        handler,
        config=WorkerConfig(batch_size=500, block_ms=5, chunk_bytes=16 * 1024, chunk_bytes_max=chunk_max),
    )
    await worker.ensure_group()
    t0 = time.perf_counter()
    task = asyncio.create_task(worker.run())
    await done.wait()
    while (await r.xinfo_groups(stream))[0]["pending"]:
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - t0
    worker.stop()
    await task
    await r.aclose()
    return elapsed


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--work-us", type=float, default=900.0)
    ap.add_argument("--hogs", type=int, default=0)
    ap.add_argument("--chunk-max-kb", type=int, default=128)
    args = ap.parse_args()
    hogs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.hogs)]
    for h in hogs:
        h.start()
    try:
        with RedisServer("redis") as server:
            times = [
                await drain_once(server.url, i, args.entries, args.work_us / 1e6, args.chunk_max_kb * 1024)
                for i in range(args.runs)
            ]
    finally:
        for h in hogs:
            h.terminate()
    per = [t / args.entries * 1e6 for t in times]
    print(
        f"handoff from {os.path.dirname(handoff.__file__)}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {args.entries} entries, work {args.work_us:.0f} us, "
        f"hogs {args.hogs}, chunks 16 KiB growing to {args.chunk_max_kb} KiB"
    )
    print(f"drain us/entry: median {statistics.median(per):.0f} (runs: {', '.join(f'{x:.0f}' for x in per)})")


if __name__ == "__main__":
    asyncio.run(main())
