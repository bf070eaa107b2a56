"""``waterdoctor simulate``: a seeded water-treatment sensor fleet publishing over MQTT QoS 1 (CONTRACT.md section 4).

The fleet's clock is the wall clock: each sensor reports every ``sensors / rate`` seconds, so ``--rate`` is the
nominal readings/s (device quirks make the real rate wobble: silences lower it, repeats raise it). The broker comes
from ``WD_MQTT_URL``. Ctrl-C or SIGTERM stops publishing, waits a few seconds for outstanding PUBACKs, prints the
summary and exits 0 (1 if the broker never acknowledged some messages).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

from handoff.settings import Settings
from simulators.fleet import ANOMALY_CLASSES, Fleet
from simulators.publisher import MAX_BATCH, Publisher, PublishStats

logger = logging.getLogger(__name__)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _batch(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"a gateway batch holds at most {MAX_BATCH} readings")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "simulate",
        help="a simulated sensor fleet publishing over MQTT (WD_MQTT_URL)",
        description=(
            "Publishes a seeded fleet of water-treatment stations (pH, turbidity, free chlorine, flow, pressure, "
            "temperature, conductivity) with daily cycles, rain events, device quirks and labelled anomalies "
            "(spike, drift, stuck, out_of_range, level_shift) over MQTT QoS 1. See docs/fleet.md."
        ),
    )
    p.add_argument("--sites", type=_positive_int, default=3, help="sites (plant-1 ...; default 3)")
    p.add_argument("--sensors", type=_positive_int, default=4, help="sensors per site (default 4)")
    p.add_argument(
        "--rate", type=_rate, default=100.0, help="nominal readings/s for the whole fleet (default 100)"
    )
    p.add_argument(
        "--duration", type=float, default=60.0, help="seconds to run; 0 runs until stopped (default 60)"
    )
    p.add_argument(
        "--batch",
        type=_batch,
        default=1,
        help="readings per gateway message on wd/{site}/{gateway}/batch; 1 publishes each reading on "
        "wd/{site}/{sensor}/telemetry (default 1)",
    )
    p.add_argument(
        "--anomaly-rate",
        type=float,
        default=0.005,
        help="fraction of readings with an anomaly (default 0.005)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="random seed: the same seed gives the same fleet (default 0)"
    )
    p.add_argument(
        "--quirk-rate",
        type=float,
        default=1.0,
        help="scale of device quirks: silences, reconnect bursts, late and repeated readings (0 disables; default 1)",
    )
    p.add_argument(
        "--max-inflight", type=_positive_int, default=1000, help="most unacknowledged messages (default 1000)"
    )
    p.add_argument(
        "--progress-every", type=float, default=5.0, help="seconds between progress log lines (default 5)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    endpoint = settings.require_mqtt()
    now_ms = time.time_ns() // 1_000_000
    fleet = Fleet.for_rate(
        args.rate,
        sites=args.sites,
        sensors_per_site=args.sensors,
        anomaly_rate=args.anomaly_rate,
        seed=args.seed,
        start_ms=now_ms,
        quirk_rate=args.quirk_rate,
        # Time-based first seq (microseconds): a later run against the same pipeline is never taken for repeats.
        seq_start=now_ms * 1000,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # a second Ctrl-C: stop waiting for acknowledgements too
            raise KeyboardInterrupt
        logger.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    publisher = Publisher(endpoint, batch=args.batch, max_inflight=args.max_inflight)
    logger.info(
        "fleet: %d sites x %d sensors, one reading each every %.3fs (%.0f readings/s), batch %d, seed %d -> %s:%d",
        args.sites,
        args.sensors,
        fleet.interval_s,
        fleet.rate,
        args.batch,
        args.seed,
        endpoint.host,
        endpoint.port,
    )
    try:
        publisher.start()
        publisher.run(
            fleet,
            args.duration if args.duration > 0 else None,
            stop,
            on_progress=_progress,
            progress_every_s=args.progress_every,
        )
    finally:
        stats = publisher.close(drain_timeout_s=10.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(summary(stats, fleet, publisher))
    return 0 if stats.messages_unacked == 0 and stats.messages_rejected == 0 else 1


def _progress(stats: PublishStats) -> None:
    logger.info(
        "sent %d readings (%.0f/s), acked %d, in flight %d, disconnects %d",
        stats.readings_sent,
        stats.sent_rate,
        stats.readings_acked,
        stats.messages_unacked,
        stats.disconnects,
    )


def summary(stats: PublishStats, fleet: Fleet, publisher: Publisher) -> str:
    """The end-of-run report: what was sent and acknowledged, the rate, anomalies and quirks."""
    by_class = publisher.log.anomalies_by_class()
    anomalies = ", ".join(f"{c} {by_class.get(c, 0)}" for c in ANOMALY_CLASSES)
    quirks = ", ".join(f"{k} {fleet.quirks.get(k, 0)}" for k in ("late", "repeat", "reconnect", "silent"))
    return "\n".join(
        [
            f"simulate: {stats.readings_sent} readings in {stats.messages_sent} messages over {stats.elapsed_s:.1f}s",
            f"  acked {stats.readings_acked} readings ({stats.messages_acked} messages), "
            f"unacked {stats.messages_unacked} messages, rejected {stats.messages_rejected}, "
            f"disconnects {stats.disconnects}",
            f"  rate: offered {stats.offered_rate:.0f}/s, achieved {stats.achieved_rate:.0f}/s (acked)",
            f"  anomalies injected ({sum(by_class.values())} labelled readings sent): {anomalies}",
            f"  device quirks: {quirks}",
        ]
    )
