"""``waterdoctor analytics``: score readings with per-sensor isolation forests, emit anomalies."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from handoff.settings import Settings

DEFAULT_METRICS_PORT = 9102


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "analytics", help="score readings (group 'analytics' on wd:readings:v1) and emit anomalies"
    )
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT, help="0 disables (default 9102)")
    p.add_argument("--consumer", help="consumer name (default host-pid); keep it stable across restarts")
    p.add_argument("--batch", type=int, default=500, help="entries per read (default 500)")
    p.add_argument("--block-ms", type=int, default=5, help="longest wait for a batch to fill (default 5)")
    p.add_argument(
        "--chunk-kb",
        type=int,
        default=16,
        help="score and commit a batch in chunks of this many KiB of entries, oldest first, so a backlog's "
        "oldest anomalies go out first (default 16: one gateway batch of 100 readings; 0: whole batches)",
    )
    p.add_argument(
        "--chunk-max-kb",
        type=int,
        default=128,
        help="each further chunk of a batch may hold twice as much as the one before, up to this many KiB, so a "
        "long backlog is scored in a few calls (default 128; at most --chunk-kb: every chunk the same)",
    )
    p.add_argument("--warmup", type=int, default=200, help="readings per sensor before its first model")
    p.add_argument("--window", type=int, default=4096, help="training window per sensor")
    p.add_argument("--refit-every", type=int, default=2048, help="accepted readings between refits")
    p.add_argument("--fits-per-s", type=float, default=2.0, help="model fits started per second at most")
    p.add_argument("--refit-workers", type=int, default=1, help="processes that fit models (default 1)")
    p.add_argument(
        "--refit-nice",
        type=int,
        default=10,
        help="nice increment of the fit processes, so scoring wins the CPU (default 10; 0: same priority)",
    )
    p.add_argument(
        "--refit-in-thread",
        action="store_true",
        help="fit models in a thread of this process instead of child processes",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here, not at module level: every command's parser is built on each start, and scikit-learn
    # alone takes a second or more to import.
    from analytics.crew import AnalyticsConfig, run_analytics
    from analytics.detector import DetectorConfig
    from handoff import keys, runloop
    from handoff.connection import connect
    from handoff.metrics import init_group_metrics, serve_metrics, stream_metrics_loop
    from handoff.worker import WorkerConfig

    if args.refit_workers < 1 or not 0 <= args.refit_nice <= 19:
        print("analytics: --refit-workers must be >= 1 and --refit-nice between 0 and 19", file=sys.stderr)
        return 2
    if args.chunk_kb < 0 or args.chunk_max_kb < 0:
        print("analytics: --chunk-kb and --chunk-max-kb must be >= 0", file=sys.stderr)
        return 2
    url = settings.require_redis_url()
    config = AnalyticsConfig(
        retention_days=settings.anomaly_retention_days,
        worker=WorkerConfig(
            batch_size=args.batch,
            block_ms=args.block_ms,
            max_deliveries=settings.max_deliveries,
            claim_idle_ms=settings.claim_idle_ms,
            chunk_bytes=args.chunk_kb * 1024,
            chunk_bytes_max=args.chunk_max_kb * 1024,
        ),
        detector=DetectorConfig(warmup=args.warmup, window=args.window, refit_every=args.refit_every),
        max_fits_per_s=args.fits_per_s,
        refit_in="thread" if args.refit_in_thread else "process",
        refit_workers=args.refit_workers,
        refit_nice=args.refit_nice,
        freeze_after_preload=True,
    )

    async def main(stop: asyncio.Event) -> None:
        redis = await connect(url, name="analytics")
        init_group_metrics(keys.READINGS, keys.GROUP_ANALYTICS)
        serve_metrics(args.metrics_port)
        metrics = asyncio.create_task(
            stream_metrics_loop(redis, [(keys.READINGS, keys.GROUP_ANALYTICS)], stop), name="stream-metrics"
        )
        try:
            await run_analytics(redis, config, stop, consumer=args.consumer)
        finally:
            stop.set()
            await metrics
            await redis.aclose()

    return runloop.run(main)
