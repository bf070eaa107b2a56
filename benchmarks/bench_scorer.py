"""Scoring throughput: the compiled forest (analytics.forest) against scikit-learn's ``score_samples``.

Same forest, same rows, same process: for each batch size, readings/s when the whole batch is scored in one call
(ours and sklearn's) and when each reading is scored by its own call (ours and sklearn's), medians of ``--runs``
runs. Per-reading sklearn calls cost milliseconds each, so that column times at most ``--per-reading-cap`` readings
per run and reports the rate. Also: the latency of one reading, and the detector's pure-compute throughput
(``DetectorBank.process``: grouping, baselines, scoring, explanations) over a fleet of ``--sensors`` sensors.

    .venv/bin/python benchmarks/bench_scorer.py            # prints a markdown table
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import sklearn
from sklearn.ensemble import IsolationForest

from analytics.detector import DetectorBank, DetectorConfig
from analytics.forest import CompiledForest

BATCHES = (1, 10, 100, 1000, 10000)


CLOCK = time.perf_counter  # --clock cpu switches to time.process_time (robust to other load on the machine)


def median_time(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times)


def bench_scorer(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    X_train = rng.normal(size=(4096, args.features))
    est = IsolationForest(n_estimators=args.trees, random_state=0).fit(X_train)
    forest = CompiledForest.from_sklearn(est)
    rows = []
    for n in BATCHES:
        X = rng.normal(size=(n, args.features)) * 1.5
        assert np.allclose(forest.score(X), -est.score_samples(X), atol=1e-9)
        ours = median_time(lambda X=X: forest.score(X), args.runs)
        skl = median_time(lambda X=X: est.score_samples(X), args.runs)
        k = min(n, args.per_reading_cap)
        ours_1 = median_time(lambda X=X, k=k: [forest.score(X[i : i + 1]) for i in range(k)], args.runs) / k
        skl_1 = (
            median_time(lambda X=X, k=k: [est.score_samples(X[i : i + 1]) for i in range(k)], args.runs) / k
        )
        rows.append(
            {
                "batch": n,
                "ours_batch_rps": n / ours,
                "ours_batch_ms": ours * 1e3,
                "sklearn_batch_rps": n / skl,
                "sklearn_batch_ms": skl * 1e3,
                "ours_per_reading_rps": 1 / ours_1,
                "sklearn_per_reading_rps": 1 / skl_1,
            }
        )
    return rows


def bench_single(args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(1)
    est = IsolationForest(n_estimators=args.trees, random_state=0).fit(rng.normal(size=(4096, args.features)))
    forest = CompiledForest.from_sklearn(est)
    x = rng.normal(size=(1, args.features))
    lat = []
    for _ in range(2000):
        t0 = time.perf_counter()  # latency is wall time by definition
        forest.score(x)
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return {"p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6}


def bench_detector(args: argparse.Namespace) -> list[dict[str, Any]]:
    """DetectorBank.process (pure compute) on a warmed fleet: readings/s per batch size."""
    rng = np.random.default_rng(2)
    n_sensors = args.sensors
    bank = DetectorBank(DetectorConfig(model_params={"random_state": 0}))
    names = (
        "ph",
        "turbidity_ntu",
        "chlorine_mg_l",
        "flow_m3_h",
        "pressure_bar",
        "temperature_c",
        "conductivity_us_cm",
    )
    level = np.array([7.4, 0.3, 1.2, 400.0, 5.0, 15.0, 500.0])
    noise = level * 0.005
    seq = [0] * n_sensors

    def readings(n: int) -> list[dict[str, Any]]:
        out = []
        values = level + rng.normal(size=(n, len(names))) * noise
        for i in range(n):
            s = i % n_sensors
            out.append(
                {
                    "site": "plant-1",
                    "sensor_id": f"s-{s:04d}",
                    "seq": seq[s],
                    "ts_ms": 1_767_225_600_000 + seq[s] * 10_000,
                    "received_ms": 1_767_225_600_000 + seq[s] * 10_000 + 5,
                    "metrics": dict(zip(names, values[i].tolist(), strict=True)),
                }
            )
            seq[s] += 1
        return out

    for _ in range(3):  # past warm-up: every sensor has a model
        bank.process(readings(n_sensors * 150))
        bank.refit_due_now()
    out = []
    for n in BATCHES:
        batches = [readings(n) for _ in range(args.runs)]
        times = []
        for b in batches:
            t0 = CLOCK()
            bank.process(b)
            times.append(CLOCK() - t0)
        bank.refit_due_now()
        t = statistics.median(times)
        out.append({"batch": n, "rps": n / t, "ms": t * 1e3})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--trees", type=int, default=100)
    parser.add_argument("--features", type=int, default=7)
    parser.add_argument("--per-reading-cap", type=int, default=200)
    parser.add_argument("--sensors", type=int, default=100)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    print(
        f"python {platform.python_version()}, numpy {np.__version__}, scikit-learn {sklearn.__version__}, ",
        end="",
    )
    print(
        f"{os.cpu_count()} CPUs, {args.trees} trees, max_samples 256, {args.features} features, runs {args.runs}, "
        f"{args.clock} clock, load average {os.getloadavg()[0]:.1f} at start"
    )
    print()
    print(
        "| batch | ours, one call per batch | sklearn, one call per batch | ours, one call per reading | ",
        end="",
    )
    print("sklearn, one call per reading | speed-up per batch |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in bench_scorer(args):
        print(
            f"| {r['batch']:,} | {r['ours_batch_rps']:,.0f}/s ({r['ours_batch_ms']:.3f} ms) "
            f"| {r['sklearn_batch_rps']:,.0f}/s ({r['sklearn_batch_ms']:.2f} ms) "
            f"| {r['ours_per_reading_rps']:,.0f}/s | {r['sklearn_per_reading_rps']:,.0f}/s "
            f"| {r['ours_batch_rps'] / r['sklearn_batch_rps']:.1f}x |"
        )
    single = bench_single(args)
    print()
    print(f"one reading, ours: p50 {single['p50_us']:.1f} us, p99 {single['p99_us']:.1f} us (2000 calls)")
    print()
    print(f"DetectorBank.process, {args.sensors} sensors, 7 metrics (pure compute, no Redis):")
    print()
    print("| batch | readings/s | ms per batch |")
    print("|---:|---:|---:|")
    for r in bench_detector(args):
        print(f"| {r['batch']:,} | {r['rps']:,.0f} | {r['ms']:.2f} |")


if __name__ == "__main__":
    main()
