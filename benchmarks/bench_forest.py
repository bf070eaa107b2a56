"""Tree walks with a cold cache and whole model fits, for this checkout and others, runs alternating.

Walks: one fitted forest (100 trees, depth 8, 7 features, as the crew's) copied 600 times, so that every call
misses the cache as it does in the crew (one forest per sensor); a call per copy with 1, 2 or 8 rows (microseconds
per row), and one call on a whole 8,640-row training window (what a fit scores for its threshold). Fits: what the
fit process does per refit (:func:`analytics.crew._fit_in_worker`: fit and serialize) on the training windows of 10
sensors of the load fleet, CPU milliseconds per fit, median of 5 passes. Also ``CompiledForest.from_sklearn``, and
loading and saving those 10 models (``SensorModel.from_bytes`` / ``to_bytes``: what a restarted crew does per stored
model, and a fit process per fit), CPU milliseconds per model, median of 5 passes.

``--code DIR`` adds another checkout (``git worktree add /tmp/base <commit>``) measured in the same session.

    .venv/bin/python benchmarks/bench_forest.py --runs 3 --code /tmp/base
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
import json, statistics, sys, time
code = sys.argv[1]
sys.path.insert(0, code)
sys.path.insert(1, ROOT)
import numpy as np
from sklearn.ensemble import IsolationForest
from analytics._jit import complete_path_sums
from analytics.crew import _fit_in_worker
from analytics.detector import DetectorBank, DetectorConfig
from analytics.forest import CompiledForest
from simulators.fleet import Fleet

def median_s(fn, n=7):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

rng = np.random.default_rng(0)
Z = rng.normal(size=(8640, 7))
est = IsolationForest(n_estimators=100, random_state=1).fit(Z)
forest = CompiledForest.from_sklearn(est)
fe, th, nr, lv, T, D, _ = forest.complete_arrays()
x32 = np.ascontiguousarray(Z, dtype=np.float32)
out = {"window_8640_rows_ms": median_s(lambda: complete_path_sums(x32, fe, th, nr, lv, T, D)) * 1e3,
       "from_sklearn_ms": median_s(lambda: CompiledForest.from_sklearn(est)) * 1e3}
copies = [(fe.copy(), th.copy(), nr.copy(), lv.copy()) for _ in range(600)]
for n in (1, 2, 8):
    xs = [np.ascontiguousarray(x32[i * n : (i + 1) * n]) for i in range(600)]
    def cold():
        for c, x in zip(copies, xs):
            complete_path_sums(x, c[0], c[1], c[2], c[3], T, D)
    out[f"cold_{n}_rows_us_per_row"] = median_s(cold) / 600 / n * 1e6

start = 1_767_225_600_000
fleet = Fleet.for_rate(100, sites=1, sensors_per_site=10, anomaly_rate=0.0, seed=1, start_ms=start)
bank = DetectorBank(DetectorConfig())
rows = [{"site": r.site, "sensor_id": r.sensor_id, "seq": r.seq, "ts_ms": r.ts_ms, "received_ms": r.emit_ms,
         "metrics": r.metrics} for r in fleet.step(start + 9000 * 10_000)]
for i in range(0, len(rows), 1000):
    bank.process(rows[i : i + 1000])
windows = [det.training_window() for det in bank.sensors.values()]
_fit_in_worker(windows[0])
passes = []
for _ in range(5):
    t0 = time.process_time()
    for w in windows:
        _fit_in_worker(w)
    passes.append((time.process_time() - t0) / len(windows) * 1e3)
out["fit_cpu_ms"] = statistics.median(passes)
from analytics.model import SensorModel
fitted = [_fit_in_worker(w) for w in windows]
def cpu_ms_per_model(fn):
    ts = []
    for _ in range(5):
        t0 = time.process_time()
        for model, blob, _err in fitted:
            fn(model, blob)
        ts.append((time.process_time() - t0) / len(fitted) * 1e3)
    return statistics.median(ts)
out["model_load_ms"] = cpu_ms_per_model(lambda model, blob: SensorModel.from_bytes(blob))
out["model_save_ms"] = cpu_ms_per_model(lambda model, blob: model.to_bytes())
out["model_kb"] = statistics.mean(len(blob) for _m, blob, _e in fitted) / 1024
out["window_shape"] = list(windows[0].values.shape)
print(json.dumps(out))
""".replace("ROOT", repr(str(ROOT)))

KEYS = [
    ("window_8640_rows_ms", "8,640-row window ms"),
    ("cold_1_rows_us_per_row", "1 row cold us"),
    ("cold_2_rows_us_per_row", "2 rows cold us/row"),
    ("cold_8_rows_us_per_row", "8 rows cold us/row"),
    ("from_sklearn_ms", "from_sklearn ms"),
    ("fit_cpu_ms", "fit + serialize CPU ms"),
    ("model_load_ms", "model load CPU ms"),
    ("model_save_ms", "model save CPU ms"),
    ("model_kb", "model KiB"),
]


def one_run(code: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(code)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=code,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--code", type=Path, action="append", default=[], help="another checkout (baseline)")
    args = parser.parse_args()
    codes = [ROOT, *args.code]
    results: dict[Path, list[dict[str, Any]]] = {c: [] for c in codes}
    load = os.getloadavg()[0]
    for i in range(args.runs):
        for code in codes:
            r = one_run(code)
            results[code].append(r)
            print(f"run {i + 1} {code}: {json.dumps(r)}", file=sys.stderr, flush=True)
    print(
        f"\nload before {load:.1f}, after {os.getloadavg()[0]:.1f}; {time.strftime('%H:%M', time.gmtime())} UTC"
    )
    print("| code | " + " | ".join(label for _, label in KEYS) + " |")
    print("|---|" + "---:|" * len(KEYS))
    for code, runs in results.items():
        cells = [f"{statistics.median(r[k] for r in runs):.2f}" for k, _ in KEYS]
        print(f"| {code} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
