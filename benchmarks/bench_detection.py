"""Detection quality on the simulated fleet's labelled anomalies: our detector against a fixed-threshold baseline.

Readings come from :class:`simulators.fleet.Fleet` (seeded, with rain, daily cycles, silences, reconnect bursts and
late readings), in emission order, in micro-batches of ``--batch-s`` seconds, with repeated sends removed (ingest
stores a repeat once). The detector never sees a label. One run per anomaly class (``anomaly_mix`` of that class
only) gives a per-class precision; a run with every class mixed and a clean run (no anomalies) complete the table.
The first ``--warm-days`` are warm-up for both methods and are not scored; the next ``--days`` are.

Reading-level: TP = an alert on a reading labelled with the class, FP = an alert on an unlabelled reading, FN = a
labelled reading without an alert. Event recall: share of anomaly episodes with at least one alerted reading.

Baseline ("fixed thresholds"): per sensor and metric, alert when a value leaves ``mean +- k * std`` of that
sensor's warm-up period, plus the same physical limits the detector uses; ``k`` is ``--baseline-k``.

Refits run synchronously between batches here (the crew runs them in an executor; the model swap is the same).

    .venv/bin/python benchmarks/bench_detection.py --seed 7
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analytics.detector import HARD_LIMITS, DetectorBank, DetectorConfig
from simulators.fleet import ANOMALY_CLASSES, METRICS, Fleet, LabelledReading

DAY_S = 86_400


@dataclass
class Tally:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    events: int = 0
    events_hit: int = 0
    rules: Counter[str] = field(default_factory=Counter)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else float("nan")

    @property
    def event_recall(self) -> float:
        return self.events_hit / self.events if self.events else float("nan")


class FixedThresholds:
    """The plain baseline: per sensor and metric, ``mean +- k std`` of its warm-up readings, plus physical limits."""

    def __init__(self, k: float) -> None:
        self.k = k
        self.sums: dict[tuple[str, str], np.ndarray] = {}
        self.squares: dict[tuple[str, str], np.ndarray] = {}
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self.limits: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        lims = [HARD_LIMITS.get(m, (None, None)) for m in METRICS]
        self._lo = np.array([-np.inf if lo is None else lo for lo, _ in lims])
        self._hi = np.array([np.inf if hi is None else hi for _, hi in lims])

    def learn(self, r: LabelledReading) -> None:
        key = (r.site, r.sensor_id)
        v = np.array([r.metrics[m] for m in METRICS])
        if key not in self.sums:
            self.sums[key] = np.zeros(len(METRICS))
            self.squares[key] = np.zeros(len(METRICS))
        self.sums[key] += v
        self.squares[key] += v * v
        self.counts[key] += 1

    def freeze(self) -> None:
        for key, s in self.sums.items():
            n = self.counts[key]
            mean = s / n
            std = np.sqrt(np.maximum(self.squares[key] / n - mean * mean, 0.0))
            self.limits[key] = (mean - self.k * std, mean + self.k * std)

    def alert(self, r: LabelledReading) -> bool:
        v = np.array([r.metrics[m] for m in METRICS])
        if ((v < self._lo) | (v > self._hi)).any():
            return True
        lim = self.limits.get((r.site, r.sensor_id))
        return lim is not None and bool(((v < lim[0]) | (v > lim[1])).any())


def batches(fleet: Fleet, duration_s: float, batch_s: float) -> Iterator[list[LabelledReading]]:
    """Emitted readings in micro-batches of ``batch_s`` of emission time; repeats dropped (ingest dedupes)."""
    end = fleet.now_ms + round(duration_s * 1000)
    step = round(batch_s * 1000)
    while fleet.now_ms < end:
        out = [r for r in fleet.step(min(end, fleet.now_ms + step)) if not r.repeat]
        if out:
            yield out


def as_normalized(r: LabelledReading) -> dict[str, Any]:
    return {
        "site": r.site,
        "sensor_id": r.sensor_id,
        "seq": r.seq,
        "ts_ms": r.ts_ms,
        "received_ms": r.emit_ms,
        "metrics": r.metrics,
    }


def run_scenario(args: argparse.Namespace, mix: dict[str, float] | None, rate: float) -> dict[str, Any]:
    fleet = Fleet(
        sites=args.sites,
        sensors_per_site=args.sensors,
        interval_s=args.interval,
        anomaly_rate=rate,
        seed=args.seed,
        anomaly_mix=mix,  # type: ignore[arg-type]
    )
    bank = DetectorBank(DetectorConfig(model_params={"random_state": 0, **args.model_params}))
    bases = [FixedThresholds(k) for k in args.baseline_k]
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    scored = 0
    for batch in batches(fleet, args.warm_days * DAY_S, args.batch_s):
        bank.process([as_normalized(r) for r in batch])
        bank.refit_due_now()
        for r in batch:
            if r.label is None:
                for base in bases:
                    base.learn(r)
    for base in bases:
        base.freeze()
    start_ms = fleet.now_ms
    ours: dict[str, Tally] = defaultdict(Tally)
    others: list[dict[str, Tally]] = [defaultdict(Tally) for _ in bases]
    episode_hits: dict[tuple[str, str, int], list[bool]] = {}
    for batch in batches(fleet, args.days * DAY_S, args.batch_s):
        alerts = {
            (a["site"], a["sensor_id"], a["seq"]): a for a in bank.process([as_normalized(r) for r in batch])
        }
        bank.refit_due_now()
        scored += len(batch)
        for r in batch:
            a = alerts.get(r.key)
            hits = [a is not None] + [base.alert(r) for base in bases]
            for tally, hit in zip([ours, *others], hits, strict=True):
                cls = r.label or "normal"
                t = tally[cls]
                if r.label is None:
                    t.fp += hit
                else:
                    t.tp += hit
                    t.fn += not hit
            if a is not None:
                ours[r.label or "normal"].rules[a["rule"]] += 1
            if r.label is not None:
                seen = episode_hits.setdefault(_episode_key(fleet, r), [False] * len(hits))
                for i, hit in enumerate(hits):
                    seen[i] |= hit
    # Event recall: episodes of the scored period.
    for (cls, _, _), seen in episode_hits.items():
        for tally, hit in zip([ours, *others], seen, strict=True):
            tally[cls].events += 1
            tally[cls].events_hit += hit
    sensor_days = len(fleet.sensors) * args.days
    return {
        "ours": ours,
        "baseline": others[0],
        "baselines": others,
        "sensor_days": sensor_days,
        "readings": scored,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - cpu0,
        "start_ms": start_ms,
    }


def _episode_key(fleet: Fleet, r: LabelledReading) -> tuple[str, str, int]:
    """(class, sensor, episode start) of the episode a labelled reading belongs to."""
    eps = fleet.episodes
    interval_ms = fleet.interval_s * 1000
    for e in reversed(eps):  # recent episodes last; a sensor has one episode at a time
        same = e.site == r.site and e.sensor_id == r.sensor_id and e.kind == r.label
        if same and e.start_ts_ms <= r.ts_ms < e.start_ts_ms + (e.length + 1) * interval_ms:
            return (e.kind, f"{e.site}:{e.sensor_id}", e.start_ts_ms)
    return (str(r.label), f"{r.site}:{r.sensor_id}", r.ts_ms)


def fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.3f}"


def total(tallies: dict[str, Tally]) -> Tally:
    """Every labelled class together, with the run's false alerts."""
    labelled = [t for c, t in tallies.items() if c != "normal"]
    return Tally(
        tp=sum(t.tp for t in labelled),
        fp=tallies["normal"].fp,
        fn=sum(t.fn for t in labelled),
        events=sum(t.events for t in labelled),
        events_hit=sum(t.events_hit for t in labelled),
    )


def for_class(tallies: dict[str, Tally], cls: str) -> Tally:
    """The class's tally with the run's false alerts counted against its precision."""
    t = tallies[cls]
    return Tally(tp=t.tp, fp=tallies["normal"].fp, fn=t.fn, events=t.events, events_hit=t.events_hit)


def _run(job: tuple[argparse.Namespace, str, dict[str, float] | None, float]) -> tuple[str, dict[str, Any]]:
    args, name, mix, rate = job
    return name, run_scenario(args, mix, rate)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--sensors", type=int, default=3, help="sensors per site")
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.01, help="anomaly rate of the per-class runs")
    parser.add_argument("--warm-days", type=float, default=1.0)
    parser.add_argument("--days", type=float, default=2.0)
    parser.add_argument("--batch-s", type=float, default=10.0)
    parser.add_argument(
        "--baseline-k",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[4.0, 6.0, 10.0],
        help="comma-separated k values; the first is the baseline of the main table",
    )
    parser.add_argument(
        "--model-params", type=json.loads, default={}, help='JSON, e.g. {"slow_alpha": 0.005}'
    )
    parser.add_argument("--classes", default=",".join(ANOMALY_CLASSES))
    parser.add_argument("--jobs", type=int, default=1, help="scenarios run in parallel processes")
    parser.add_argument("--json", help="also write the raw numbers here")
    args = parser.parse_args(argv)

    classes = [c for c in args.classes.split(",") if c]
    print(
        f"fleet seed {args.seed}: {args.sites} sites x {args.sensors} sensors, one reading per {args.interval:g} s, "
        f"{args.warm_days:g} warm-up day(s) then {args.days:g} scored day(s), batches of {args.batch_s:g} s, "
        f"anomaly rate {args.rate} per run; baseline k = {args.baseline_k[0]:g}; model params {args.model_params}"
    )
    jobs = [(args, c, {c: 1.0}, args.rate) for c in classes]
    jobs += [(args, "mixed", None, args.rate), (args, "clean", None, 0.0)]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = dict(pool.map(_run, jobs))
    else:
        results = dict(map(_run, jobs))
    for name, res in results.items():
        print(
            f"  run {name}: {res['readings']:,} scored readings, {res['wall_s']:.0f} s wall, {res['cpu_s']:.0f} s CPU"
        )

    print()
    print(
        "| run | labelled readings | ours P | ours R | ours F1 | ours event R | baseline P | baseline R | "
        "baseline F1 | baseline event R | false alerts / sensor / day, ours / baseline |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, res in results.items():
        days = res["sensor_days"]
        ours, base = res["ours"], res["baseline"]
        if name in ANOMALY_CLASSES:
            o, b, label = for_class(ours, name), for_class(base, name), name
        else:
            o, b = total(ours), total(base)
            label = "mixed (all classes)" if name == "mixed" else "clean (no anomalies)"
        print(
            f"| {label} | {o.tp + o.fn:,} | {fmt(o.precision)} | {fmt(o.recall)} | {fmt(o.f1)} "
            f"| {fmt(o.event_recall)} | {fmt(b.precision)} | {fmt(b.recall)} | {fmt(b.f1)} | {fmt(b.event_recall)} "
            f"| {ours['normal'].fp / days:.2f} / {base['normal'].fp / days:.2f} |"
        )
    print()
    print(
        "Baseline at other k (same runs): F1 per class run, and false alerts / sensor / day in the clean run"
    )
    print()
    shown = [c for c in classes if c in results]
    print("| k | " + " | ".join(f"F1 {c}" for c in shown) + " | false alerts / sensor / day |")
    print("|---:|" + "---:|" * (len(shown) + 1))
    for i, k in enumerate(args.baseline_k):
        f1s = [fmt(for_class(results[c]["baselines"][i], c).f1) for c in shown]
        clean = results["clean"]
        fpd = clean["baselines"][i]["normal"].fp / clean["sensor_days"]
        print(f"| {k:g} | " + " | ".join(f1s) + f" | {fpd:.2f} |")
    print()
    for name, res in results.items():
        rules: Counter[str] = Counter()
        for c, t in res["ours"].items():
            rules.update({f"{c}:{rule}": n for rule, n in t.rules.items()})
        print(f"what fired in run {name} (label:rule): {dict(rules)}")
    if args.json:
        raw = {
            name: {
                "sensor_days": res["sensor_days"],
                "readings": res["readings"],
                "ours": {c: vars(t) | {"rules": dict(t.rules)} for c, t in res["ours"].items()},
                "baselines": [{c: vars(t) | {"rules": {}} for c, t in b.items()} for b in res["baselines"]],
            }
            for name, res in results.items()
        }
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
