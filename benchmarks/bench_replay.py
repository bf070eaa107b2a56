"""The detector alone, on the load test's fleet: CPU per reading and time per micro-batch, no Redis, no broker.

The fleet of ``waterdoctor load`` (``--sites`` x ``--sensors`` sensors at ``--rate`` readings/s, seed 1, quirks on:
silences, reconnect bursts, late readings, stuck sensors) warms up ``--warmup`` readings per sensor, every sensor
with enough readings gets a model (fitted in two processes), then ``--duration`` seconds of fleet time (after
``--settle`` unmeasured ones) go through :meth:`DetectorBank.process` in ``--step-ms`` micro-batches, as the
analytics crew sees them. Reported: microseconds per reading, batch p50 / p99 / max in milliseconds, anomalies.

``--code DIR`` imports ``analytics`` from another checkout (``git worktree add /tmp/base <commit>``): the baseline
of a change, run on the same machine in the same session. Runs alternate between the checkouts.

    .venv/bin/python benchmarks/bench_replay.py --runs 3 --code /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
from concurrent.futures import ProcessPoolExecutor
import numpy as np
code, rate, sites, sensors, warmup, settle_s, duration_s, step = sys.argv[1:9]
sys.path.insert(0, code)
sys.path.insert(1, ROOT)
from analytics.detector import DetectorBank, DetectorConfig, fit_model
from simulators.fleet import Fleet

rate, sites, sensors, warmup, step = float(rate), int(sites), int(sensors), int(warmup), int(step)
start = 1_767_225_600_000
fleet = Fleet.for_rate(rate, sites=sites, sensors_per_site=sensors, anomaly_rate=0.002, seed=1, start_ms=start)

def norm(r):
    return {"site": r.site, "sensor_id": r.sensor_id, "seq": r.seq, "ts_ms": r.ts_ms,
            "received_ms": r.emit_ms, "metrics": r.metrics}

bank = DetectorBank(DetectorConfig())
t = start + int(warmup * sites * sensors / rate * 1000)
warm = [norm(r) for r in fleet.step(t)]
for i in range(0, len(warm), 1000):
    bank.process(warm[i : i + 1000])
windows = bank.due_refits()
with ProcessPoolExecutor(2) as pool:
    for w, m in zip(windows, pool.map(fit_model, windows, chunksize=20)):
        bank.install(m, w)
for _ in range(int(float(settle_s) * 1000) // step):
    t += step
    bank.process([norm(r) for r in fleet.step(t)])
times, n, anomalies = [], 0, 0
for _ in range(int(float(duration_s) * 1000) // step):
    t += step
    batch = [norm(r) for r in fleet.step(t)]
    t0 = time.perf_counter()
    anomalies += len(bank.process(batch))
    times.append(time.perf_counter() - t0)
    n += len(batch)
ms = np.array(times) * 1000
print(json.dumps({"models": len(windows), "readings": n, "anomalies": anomalies,
                  "us_per_reading": sum(times) / n * 1e6, "batch_p50_ms": float(np.percentile(ms, 50)),
                  "batch_p99_ms": float(np.percentile(ms, 99)), "batch_max_ms": float(ms.max())}))
""".replace("ROOT", repr(str(ROOT)))


def one_run(code: Path, args: argparse.Namespace) -> dict[str, Any]:
    argv = [str(code), str(args.rate), str(args.sites), str(args.sensors), str(args.warmup)]
    argv += [str(args.settle), str(args.duration), str(args.step_ms)]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], check=True, capture_output=True, text=True, env=env, cwd=code
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=7000.0)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--sensors", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--step-ms", type=int, default=10)
    parser.add_argument("--code", type=Path, action="append", default=[], help="another checkout (baseline)")
    args = parser.parse_args()
    checkouts = [ROOT, *args.code]
    results: dict[Path, list[dict[str, Any]]] = {c: [] for c in checkouts}
    load = os.getloadavg()
    for i in range(args.runs):
        for code in checkouts:
            r = one_run(code, args)
            results[code].append(r)
            print(f"run {i + 1} {code}: {json.dumps(r)}", flush=True)
    print(
        f"\nload before {load[0]:.1f}, after {os.getloadavg()[0]:.1f}; {time.strftime('%H:%M UTC', time.gmtime())}"
    )
    print("| code | models | readings | anomalies | us per reading | batch p50 / p99 / max ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for code, rs in results.items():

        def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        print(
            f"| {code} | {rs[0]['models']} | {rs[0]['readings']} | {rs[0]['anomalies']} | "
            f"{med('us_per_reading'):.1f} | {med('batch_p50_ms'):.2f} / {med('batch_p99_ms'):.2f} / "
            f"{med('batch_max_ms'):.2f} |"
        )


if __name__ == "__main__":
    main()
