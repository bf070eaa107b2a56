"""``waterdoctor ingest``: MQTT sensors and gateways into ``wd:readings:v1``, acknowledged only after the write."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING, Any

from handoff.settings import Settings

if TYPE_CHECKING:
    from ingest.crew import IngestConfig

DEFAULT_METRICS_PORT = 9101


DESCRIPTION = (
    "Subscribes with QoS 1 to $share/ingest/wd/+/+/telemetry and .../batch with a persistent MQTT 5 "
    "session, validates every reading (bad ones go to wd:quarantine:v1 with a reason), stores each reading "
    "once per (site, sensor_id, seq), and acknowledges a message only after its readings are in Redis. "
    "Run several with distinct --client-id (or --instance) values to split the load."
)


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "ingest",
        help="MQTT -> validate -> dedupe -> wd:readings:v1 (PUBACK after the write)",
        description=DESCRIPTION,
    )
    configure_parser(p)


def configure_parser(p: argparse.ArgumentParser) -> None:
    """The ingest flags."""
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT, help="Prometheus port (0: off)")
    p.add_argument(
        "--client-id",
        help="MQTT client id; keep it stable so a restart resumes the session (default wd-ingest-HOST-INSTANCE)",
    )
    p.add_argument("--instance", type=int, default=0, help="instance index for the default client id")
    p.add_argument("--batch-size", type=int, default=500, help="flush after this many messages (default 500)")
    p.add_argument(
        "--flush-ms",
        type=float,
        default=5.0,
        help="a busy ingest waits at most this many ms for a fuller batch (default 5); an idle one writes at once",
    )
    p.add_argument(
        "--flush-kb",
        type=float,
        default=8.0,
        help="write a message of at least this many KiB at once, without waiting for a fuller batch (default 8: "
        "a gateway batch of ~60 readings or more fills a flush by itself); 0: never",
    )
    p.add_argument(
        "--receive-maximum", type=int, default=1000, help="unacknowledged messages the broker may send (1000)"
    )
    p.add_argument(
        "--session-expiry", type=int, default=86_400, help="MQTT session expiry, s (default 1 day)"
    )
    p.add_argument(
        "--device-rate",
        type=float,
        default=1000.0,
        help="readings/s per sensor before dropping (0: no limit)",
    )
    p.add_argument("--device-burst", type=float, default=10_000.0, help="token-bucket burst per sensor")
    p.add_argument(
        "--max-lag",
        type=int,
        default=100_000,
        help="hold intake when group analytics lags more entries than this",
    )
    p.add_argument(
        "--memory-high", type=float, default=0.90, help="hold intake above this share of Redis maxmemory"
    )
    p.add_argument(
        "--waitaof", action="store_true", help="WAITAOF 1 0 before each PUBACK where the server supports it"
    )
    p.add_argument(
        "--quarantine-maxlen", type=int, default=100_000, help="approximate cap of wd:quarantine:v1"
    )
    p.set_defaults(func=run)


def config_from(args: argparse.Namespace, settings: Settings) -> IngestConfig:
    """The crew configuration from settings (URLs) and flags (everything else)."""
    # Crew modules are imported when the command runs, not when the CLI builds its parsers: every process would
    # otherwise load (and export the metrics of) every crew.
    from ingest.crew import IngestConfig
    from ingest.mqtt import default_client_id

    return IngestConfig(
        redis_url=settings.require_redis_url(),
        mqtt=settings.require_mqtt(),
        client_id=args.client_id or default_client_id(args.instance),
        batch_size=max(1, args.batch_size),
        flush_ms=max(0.0, args.flush_ms),
        flush_bytes=max(0, int(args.flush_kb * 1024)),
        receive_maximum=max(1, min(65_535, args.receive_maximum)),
        session_expiry_s=args.session_expiry,
        device_rate=args.device_rate or None,
        device_burst=max(1.0, args.device_burst),
        max_lag=args.max_lag,
        memory_high=args.memory_high,
        waitaof=args.waitaof,
        quarantine_maxlen=args.quarantine_maxlen,
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    from handoff import runloop
    from handoff.metrics import serve_metrics
    from ingest.crew import IngestCrew

    config = config_from(args, settings)
    serve_metrics(args.metrics_port)
    crew = IngestCrew(config)

    async def main(stop: asyncio.Event) -> None:
        await crew.run(stop)

    return runloop.run(main, grace_s=config.stop_grace_s + 5)
