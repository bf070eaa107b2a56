"""``waterdoctor alerting``: SMS to field operators, at most once per alert and phone, backfilled after outages."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from handoff.settings import Settings

DEFAULT_METRICS_PORT = 9103


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "alerting", help="dispatch SMS for anomalies (Pub/Sub + group 'alerting' on wd:anomalies:v1)"
    )
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT, help="0 disables (default 9103)")
    p.add_argument("--consumer", help="consumer name (default host-pid); keep it stable across restarts")
    p.add_argument(
        "--webhook-port", type=int, default=0, help="serve Twilio's inbound webhook (/twilio/inbound)"
    )
    p.add_argument("--webhook-host", default="0.0.0.0")
    p.add_argument("--webhook-public-url", help="the URL Twilio calls (for signature checks behind a proxy)")
    p.add_argument("--no-pubsub", action="store_true", help="stream path only (testing the backfill)")
    p.add_argument(
        "--per-number-rate",
        type=float,
        default=1.0,
        help="SMS per second to one phone, shared by every alerting process (default 1: a Twilio long code)",
    )
    p.add_argument(
        "--per-number-burst", type=float, default=5.0, help="SMS a phone may get at once (default 5)"
    )
    p.add_argument(
        "--send-rate",
        type=float,
        help="SMS per second for the whole account, all processes (default: unbounded)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    # Heavy imports (twilio, aiohttp) only when this command runs: the CLI builds every parser on each start.
    from alerting.crew import AlertingConfig, run_alerting
    from alerting.dispatcher import DispatchConfig, Dispatcher
    from alerting.ratelimit import RedisSendRateLimiter
    from alerting.routing import load_routing
    from alerting.sms import make_sender
    from alerting.webhook import make_webhook_app, start_webhook
    from handoff import keys, runloop
    from handoff.connection import connect
    from handoff.metrics import init_group_metrics, serve_metrics, stream_metrics_loop
    from handoff.worker import WorkerConfig

    if (
        args.per_number_rate <= 0
        or args.per_number_burst < 1
        or (args.send_rate is not None and args.send_rate <= 0)
    ):
        print(
            "waterdoctor alerting: --per-number-rate and --send-rate must be > 0, --per-number-burst >= 1",
            file=sys.stderr,
        )
        return 2
    url = settings.require_redis_url()
    routing = load_routing(settings.routing_file)  # validated before anything starts
    sender = make_sender(settings)
    config = AlertingConfig(
        worker=WorkerConfig(
            batch_size=100,
            block_ms=200,
            retry_ms=2_000,
            max_deliveries=max(20, settings.max_deliveries),
            claim_idle_ms=settings.claim_idle_ms,
        ),
        use_pubsub=not args.no_pubsub,
    )

    async def main(stop: asyncio.Event) -> None:
        redis = await connect(url, name="alerting")
        limiter = RedisSendRateLimiter(
            redis, args.per_number_rate, args.per_number_burst, global_rate=args.send_rate
        )
        dispatcher = Dispatcher(
            redis,
            sender,
            routing,
            config=DispatchConfig(retention_days=settings.anomaly_retention_days),
            limiter=limiter,
        )
        init_group_metrics(keys.ANOMALIES, keys.GROUP_ALERTING)
        serve_metrics(args.metrics_port)
        runner = None
        if args.webhook_port:
            if settings.twilio_auth_token is None:
                raise SystemExit("--webhook-port needs TWILIO_AUTH_TOKEN to check X-Twilio-Signature")
            app = make_webhook_app(dispatcher, settings.twilio_auth_token, public_url=args.webhook_public_url)
            runner = await start_webhook(app, args.webhook_host, args.webhook_port)
        metrics = asyncio.create_task(
            stream_metrics_loop(redis, [(keys.ANOMALIES, keys.GROUP_ALERTING)], stop), name="stream-metrics"
        )
        try:
            await run_alerting(redis, dispatcher, stop, config, consumer=args.consumer)
        finally:
            stop.set()
            await metrics
            if runner is not None:
                await runner.cleanup()
            await dispatcher.aclose()
            await redis.aclose()

    return runloop.run(main)
