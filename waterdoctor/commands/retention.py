"""``waterdoctor retention``: the crew that trims every stream by age, never past what a live group still owes."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from handoff.settings import Settings
from retention.policy import (
    DEFAULT_DEAD_WINDOW_MS,
    DEFAULT_QUARANTINE_WINDOW_MS,
    DEFAULT_READINGS_WINDOW_MS,
    default_policies,
    format_duration,
    parse_duration,
)

logger = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9104


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _cap(text: str) -> int | None:
    return None if text.strip().lower() in ("none", "never", "off") else _duration(text)


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "retention",
        help="trim every stream by age (never past work a live consumer group still owes)",
        description=(
            "Trims wd:readings:v1, wd:anomalies:v1, wd:quarantine:v1 and wd:dead:v1 by MINID on a schedule. "
            "Entries a live consumer group has pending or has not yet been delivered are kept; a group whose "
            "consumers are all idle past --idle-cap stops holding trimming back (warning log and the "
            "wd_retention_group_ignored gauge). Durations: 90s, 15m, 2h, 7d, 1h30m."
        ),
    )
    p.add_argument("--interval", type=_duration, default=60_000, help="time between passes (default 60s)")
    p.add_argument(
        "--readings-window",
        type=_duration,
        default=DEFAULT_READINGS_WINDOW_MS,
        help=f"keep readings this long (default {format_duration(DEFAULT_READINGS_WINDOW_MS)})",
    )
    p.add_argument(
        "--anomalies-window",
        type=_duration,
        default=None,
        help="keep anomalies this long (default WD_ANOMALY_RETENTION_DAYS, 30 days)",
    )
    p.add_argument(
        "--quarantine-window",
        type=_duration,
        default=DEFAULT_QUARANTINE_WINDOW_MS,
        help=f"keep quarantined messages this long (default {format_duration(DEFAULT_QUARANTINE_WINDOW_MS)})",
    )
    p.add_argument(
        "--dead-window",
        type=_duration,
        default=DEFAULT_DEAD_WINDOW_MS,
        help=f"keep dead letters this long (default {format_duration(DEFAULT_DEAD_WINDOW_MS)})",
    )
    p.add_argument(
        "--idle-cap",
        type=_cap,
        default=6 * 3_600_000,
        help="a group idle longer than this stops holding trimming back (default 6h; 'none': never)",
    )
    p.add_argument("--exact", action="store_true", help="trim to the exact entry (MINID =) instead of ~")
    p.add_argument(
        "--limit", type=int, default=10_000, help="LIMIT per approximate XTRIM round (default 10000)"
    )
    p.add_argument("--once", action="store_true", help="one pass, print what was trimmed as JSON lines, exit")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"serve Prometheus metrics on this port (default {DEFAULT_METRICS_PORT}; 0: off)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    # Heavy imports only when this command runs: the CLI builds every parser on each start.
    import orjson

    from handoff import runloop
    from handoff.connection import connect
    from handoff.metrics import serve_metrics
    from retention.trimmer import Retention, RetentionConfig

    url = settings.require_redis_url()
    policies = default_policies(
        settings,
        readings_ms=args.readings_window,
        anomalies_ms=args.anomalies_window,
        quarantine_ms=args.quarantine_window,
        dead_ms=args.dead_window,
    )
    config = RetentionConfig(
        interval_s=args.interval / 1000,
        idle_cap_ms=args.idle_cap,
        exact=args.exact,
        limit=args.limit,
    )

    if args.once:

        async def once() -> None:
            r = await connect(url, name="retention", attempts=3)
            try:
                for report in await Retention(r, policies, config).run_once():
                    sys.stdout.write(orjson.dumps(report.to_json()).decode() + "\n")
            finally:
                await r.aclose()

        asyncio.run(once())
        return 0

    async def main(stop: asyncio.Event) -> None:
        r = await connect(url, name="retention")
        try:
            serve_metrics(args.metrics_port)
            await Retention(r, policies, config).run(stop)
        finally:
            await r.aclose()

    return runloop.run(main)
