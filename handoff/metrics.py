"""Prometheus metrics shared by every crew (CONTRACT.md section 7), and the HTTP endpoint that serves them.

Crew-specific metrics live in each crew's own module; everything about streams and groups is defined here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

STREAM_LAG = Gauge(
    "wd_stream_lag", "Entries in the stream not yet delivered to the group", ["stream", "group"]
)
STREAM_PENDING = Gauge(
    "wd_stream_pending", "Entries delivered to the group but not yet acknowledged", ["stream", "group"]
)
STREAM_OLDEST_PENDING = Gauge(
    "wd_stream_oldest_pending_seconds", "Age of the group's oldest pending entry", ["stream", "group"]
)
STREAM_LENGTH = Gauge("wd_stream_length", "Entries in the stream", ["stream"])
ACKED = Counter("wd_acked_total", "Entries acknowledged by this process", ["stream", "group"])
DEAD_LETTERS = Counter(
    "wd_dead_letters_total", "Entries moved to the dead-letter stream by this process", ["stream", "group"]
)
HANDLED_SECONDS = Histogram(
    "wd_batch_handle_seconds",
    "Time a crew's handler spent on one batch",
    ["stream", "group"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


def init_group_metrics(stream: str, group: str) -> None:
    """Export a group's counters at 0 from the start: ``increase()`` cannot see a series' first sample, so a
    counter that appears only at its first dead letter would never fire the dead-letter alert."""
    ACKED.labels(stream, group)
    DEAD_LETTERS.labels(stream, group)


GC_PAUSE = Histogram(
    "wd_gc_pause_seconds",
    "Time this process stood still in Python's cyclic garbage collector, per collection",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
#: A collection that takes longer than this is logged (INFO).
SLOW_GC_S = 0.05
_gc_watched = False


def watch_gc() -> None:
    """Time every garbage collection into ``wd_gc_pause_seconds`` and log the slow ones (idempotent).

    A full collection walks every container object the process holds: with a thousand sensors' models that is
    over 100 ms in which a crew reads, scores and acknowledges nothing.
    """
    global _gc_watched
    if _gc_watched:
        return
    _gc_watched = True
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        GC_PAUSE.labels(str(info["generation"])).observe(took)
        if took > SLOW_GC_S:
            logger.info("garbage collection (generation %d) took %.0f ms", info["generation"], took * 1000)

    gc.callbacks.append(callback)


def serve_metrics(port: int | None, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` (``None`` or 0: do not serve); also starts :func:`watch_gc`."""
    watch_gc()
    if not port:
        return
    start_http_server(port, addr=addr)
    logger.info("metrics on http://%s:%d/metrics", addr, port)


async def refresh_stream_metrics(redis: Any, stream: str, group: str | None = None) -> None:
    """Set the stream and group gauges from :func:`handoff.stats.stream_stats` (one round trip or two)."""
    from handoff.stats import stream_stats

    stats = await stream_stats(redis, stream, memory_samples=1, lag_count_cap=10_000)
    STREAM_LENGTH.labels(stream).set(stats.length)
    for g in stats.groups:
        if group is not None and g.name != group:
            continue
        STREAM_LAG.labels(stream, g.name).set(g.lag)
        STREAM_PENDING.labels(stream, g.name).set(g.pending)
        STREAM_OLDEST_PENDING.labels(stream, g.name).set((g.oldest_pending_age_ms or 0) / 1000)


async def stream_metrics_loop(
    redis: Any, targets: list[tuple[str, str | None]], stop: asyncio.Event, interval_s: float = 2.0
) -> None:
    """Refresh the gauges of ``(stream, group)`` pairs every ``interval_s`` until ``stop``; errors are logged."""
    while not stop.is_set():
        for stream, group in targets:
            try:
                await refresh_stream_metrics(redis, stream, group)
            except Exception as exc:  # a metrics refresh must never take a crew down
                logger.debug("metrics refresh of %s failed: %s", stream, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
