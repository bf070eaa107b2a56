"""``waterdoctor load``: a load run against the configured pipeline (or a private one with --self-contained)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from handoff.settings import Settings


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "load", help="drive the pipeline at a rate and prove loss, duplicates, latency, detection"
    )
    p.add_argument("--rate", type=float, default=1000.0, help="offered readings/s")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of publishing")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--sensors", type=int, default=25, help="sensors per site")
    p.add_argument("--batch", type=int, default=10, help="readings per gateway message (1: single readings)")
    p.add_argument("--anomaly-rate", type=float, default=0.002)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--drain-timeout", type=float, default=60.0)
    p.add_argument("--report", type=Path, help="also write the JSON report here")
    p.add_argument("--self-contained", action="store_true", help="start private servers and every crew")
    p.add_argument("--server", choices=("redis", "valkey"), default="redis", help="with --self-contained")
    p.add_argument("--warmup", type=int, default=300, help="readings per sensor before measuring (0: none)")
    p.add_argument("--strict", action="store_true", help="also fail on duplicated readings or alert ids")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from simulators.load import LoadConfig, run_load, verdict  # numpy and paho: only when this command runs

    cfg = LoadConfig(
        rate=args.rate, duration_s=args.duration, sites=args.sites, sensors=args.sensors, batch=args.batch,
        anomaly_rate=args.anomaly_rate, seed=args.seed, drain_timeout_s=args.drain_timeout, redis_kind=args.server,
        warmup_readings=args.warmup,
    )  # fmt: skip
    report = run_load(
        cfg,
        redis_url=settings.redis_url,
        mqtt_url=settings.mqtt_url,
        self_contained=args.self_contained,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    problems = verdict(report, cfg, strict=args.strict)
    report["passed"] = not problems
    report["problems"] = problems
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    print(text)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text + "\n")
    for p in problems:
        print(f"load: FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0
