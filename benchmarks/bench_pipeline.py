"""End-to-end throughput and latency of the whole pipeline on this machine.

Each run is ``waterdoctor load --self-contained``: private Redis 7.0 and Mosquitto, the ingest, analytics and
alerting crews as processes (SMS through the official twilio package to the local Twilio fake), and a publisher
process... in this same process (paho in a thread), all on the same 2 cores. A configuration passes when nothing is
lost or duplicated and the achieved rate is within 5 % of the offered one.

Usage: .venv/bin/python benchmarks/bench_pipeline.py [--runs 3] [--duration 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

from simulators.load import LoadConfig, run_load, verdict

CONFIGS = [
    # (label, rate, sites, sensors per site, batch, warm-up readings per sensor)
    ("light: 1k/s, gateway batches of 10", 1_000, 4, 25, 10, 300),
    ("medium: 10k/s, batches of 100", 10_000, 10, 100, 100, 0),
    ("heavy: 30k/s, batches of 100", 30_000, 10, 100, 100, 0),
    ("heavier: 50k/s, batches of 100", 50_000, 10, 100, 100, 0),
]


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def say(msg: str) -> None:
    print(time.strftime("%H:%M:%S", time.gmtime()), msg, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--only", help="substring of a configuration label")
    ap.add_argument(
        "--rate",
        type=float,
        action="append",
        help="instead of the fixed configurations: 1,000 sensors in gateway batches of 100 at this nominal "
        "readings/s (repeatable)",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="with --rate: readings per sensor published first, so every sensor has a model when measuring starts",
    )
    ap.add_argument(
        "--lead-in",
        type=float,
        default=1.0,
        help="with --warmup: seconds of live publishing after the warm-up that are not measured (default 1)",
    )
    ap.add_argument(
        "--analytics-args",
        default="",
        help="extra arguments for the analytics crew's measured run, e.g. '--refit-in-thread' (an A/B baseline)",
    )
    ap.add_argument(
        "--progress", action="store_true", help="print each phase of a run with the time (UTC) to stderr"
    )
    args = ap.parse_args()
    configs = CONFIGS
    if args.rate:
        configs = [(f"{r:,.0f}/s nominal, batches of 100", r, 10, 100, 100, args.warmup) for r in args.rate]
    cpu = subprocess.run(
        ["sh", "-c", "lscpu | grep 'Model name'"], capture_output=True, text=True
    ).stdout.strip()
    print(f"machine: {platform.machine()} {cpu} cores={os.cpu_count()}; load before: {loadavg()}")
    rows = []
    for label, rate, sites, sensors, batch, warm in configs:
        if args.only and args.only not in label:
            continue
        runs: list[dict[str, Any]] = []
        for _ in range(args.runs):
            cfg = LoadConfig(
                rate=rate, duration_s=args.duration, sites=sites, sensors=sensors, batch=batch,
                warmup_readings=warm, anomaly_rate=0.002, seed=len(runs) + 1, model_wait_s=300, lead_in_s=args.lead_in,
                # One phone per site gets every alert of its site: the default bound of 1 SMS/s per number
                # would make this a measurement of that policy (queued SMS), not of the pipeline's latency.
                crew_args={
                    "alerting": ["--per-number-rate", "100", "--per-number-burst", "100"],
                    **({"analytics": args.analytics_args.split()} if args.analytics_args else {}),
                },
            )  # fmt: skip
            t = time.monotonic()
            report = run_load(
                cfg,
                redis_url=None,
                mqtt_url=None,
                self_contained=True,
                progress=say if args.progress else None,
            )
            report["problems"] = verdict(report, cfg, strict=True)
            report["wall_s"] = round(time.monotonic() - t, 1)
            report["load"] = loadavg()
            runs.append(report)
            shown = (
                "achieved_rate",
                "lost",
                "duplicated",
                "drain_s",
                "drain_counted_s",
                "publisher_stalls",
                "received_ms",
                "stored_ms",
                "latency_ms",
                "stages_ms",
                "slowest",
                "model_fits",
                "redis_stalls",
                "slow_commands",
                "aof_rewrites",
                "host_speed",
            )
            sms = report.get("sms", {})
            print(
                label,
                {k: report[k] for k in shown if k in report},
                "sms:",
                sms.get("latency_ms"),
                sms.get("alerting_hop_ms"),
                sms.get("slowest"),
            )
        rows.append((label, runs))

    def med(runs: list[dict[str, Any]], *path: str, digits: int = 0) -> str:
        vals = []
        for r in runs:
            v: Any = r
            for p in path:
                v = v.get(p) if isinstance(v, dict) else None
            if isinstance(v, int | float):
                vals.append(float(v))
        return f"{statistics.median(vals):,.{digits}f}" if vals else "-"

    print()
    print(
        "| configuration | offered/s | achieved/s | lost | duplicated | drain s | publish-to-anomaly p50 / p99 ms | "
        "publish-to-SMS p50 / p99 ms | SMS duplicates | passed |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for label, runs in rows:
        passed = sum(1 for r in runs if not r["problems"])
        print(
            f"| {label} | {med(runs, 'offered_rate')} | {med(runs, 'achieved_rate')} | "
            f"{sum(r['lost'] for r in runs)} | {sum(r['duplicated'] for r in runs)} | {med(runs, 'drain_s', digits=1)} | "
            f"{med(runs, 'latency_ms', 'p50')} / {med(runs, 'latency_ms', 'p99')} | "
            f"{med(runs, 'sms', 'latency_ms', 'p50')} / {med(runs, 'sms', 'latency_ms', 'p99')} | "
            f"{sum(r.get('sms', {}).get('duplicates', 0) for r in runs)} | {passed}/{len(runs)} |"
        )
    print(f"\nload after: {loadavg()}")


if __name__ == "__main__":
    main()
