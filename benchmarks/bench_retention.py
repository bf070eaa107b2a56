"""Retention and memory: what trimming costs on a 10-million-entry stream, and what each retained entry costs.

On a private server (never the shared one), measures:

1. **Trimming cost** on a stream of ``--entries`` (10 million) readings entries spread over 47 hours, trimming to a
   24-hour window (about half the stream), three ways: approximate with ``LIMIT 10000`` rounds (what
   ``waterdoctor retention`` does), approximate without a limit (``LIMIT 0``), and exact (``MINID =``). Wall time,
   Redis CPU (``INFO CPU`` user+sys delta) and the longest single command (how long the server is blocked). Also the
   steady state: trimming one minute's worth of entries off the same 10-million-entry stream.
2. **Bytes per retained entry** (``MEMORY USAGE ... SAMPLES 0`` / entries) for readings entries of 1 reading (a
   single MQTT message) and of 100 readings (a gateway batch), and for anomalies, with realistic payloads from the
   simulated fleet (seven metrics), on Redis 7.0 and Valkey 8.
3. **Memory of 30 days of anomalies** at 100, 1,000 and 10,000 sensors (and of the 24-hour readings window),
   extrapolated from (2) and cross-checked by building the 100-sensor case for real.

Usage: .venv/bin/python benchmarks/bench_retention.py [--entries 10000000] [--runs 3] [--kinds redis,valkey]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from typing import Any

import orjson
import redis

from simulators.fleet import Fleet
from waterdoctor.embedded import RedisServer

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
INTERVAL_S = 10  # every sensor reports every 10 s (the simulator's default)
READINGS_PER_SENSOR_DAY = 86_400 // INTERVAL_S
ANOMALY_RATES = (
    0.001,
    0.005,
    0.01,
)  # share of readings that yield an anomaly; 0.5 % is the simulator's default
SENSORS = (100, 1_000, 10_000)

# Builds entries with explicit increasing IDs on the server: far faster than sending 10 million commands.
_BUILD_LUA = """
local first, n, base, step = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tpl = ARGV[5]
for i = first, first + n - 1 do
  local ms = base + i * step
  redis.call('XADD', KEYS[1], string.format('%.0f-0', ms), 'payload', string.format(tpl, i, ms, ms + 3))
end
return n
"""

# A normalized single reading, seq and clocks filled in per entry by the Lua loop above.
_READING_TPL = (
    '{"readings":[{"site":"plant-7","sensor_id":"s-0042","seq":%d,"ts_ms":%.0f,"received_ms":%.0f,'
    '"metrics":{"ph":7.12,"turbidity_ntu":0.412,"chlorine_mg_l":1.08,"flow_m3_h":445.4,"pressure_bar":5.323,'
    '"temperature_c":11.1,"conductivity_us_cm":595.6}}]}'
)


def cpu_seconds(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def build(r: redis.Redis, key: str, n: int, base_ms: int, step_ms: int, chunk: int = 100_000) -> float:
    script = r.register_script(_BUILD_LUA)
    t = time.perf_counter()
    for first in range(0, n, chunk):
        script(keys=[key], args=[first, min(chunk, n - first), base_ms, step_ms, _READING_TPL])
    return time.perf_counter() - t


def timed_trim(r: redis.Redis, key: str, minid: str, mode: str) -> dict[str, float]:
    """Trim ``key`` to ``minid`` by ``mode``; wall seconds, Redis CPU seconds, longest command, entries, rounds."""
    cpu0 = cpu_seconds(r)
    t0 = time.perf_counter()
    calls: list[float] = []
    removed = 0
    while True:
        t = time.perf_counter()
        if mode == "exact":
            n = r.execute_command("XTRIM", key, "MINID", "=", minid)
        elif mode == "approx":
            n = r.execute_command("XTRIM", key, "MINID", "~", minid, "LIMIT", 0)
        else:
            n = r.execute_command("XTRIM", key, "MINID", "~", minid, "LIMIT", 10_000)
        calls.append(time.perf_counter() - t)
        removed += int(n)
        if mode != "approx-limit" or n == 0:
            break
    wall = time.perf_counter() - t0
    calls.sort()
    return {
        "wall_s": wall,
        "cpu_s": cpu_seconds(r) - cpu0,
        "longest_ms": calls[-1] * 1000,
        "median_call_ms": statistics.median(calls) * 1000,
        "removed": removed,
        "rounds": len(calls),
    }


def trimming(kind: str, entries: int, runs: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with RedisServer(kind) as server:
        r = redis.Redis.from_url(server.url, socket_timeout=3600)
        base = int(time.time() * 1000) - 47 * HOUR_MS
        step = max(1, 47 * HOUR_MS // entries)
        built = build(r, "pristine", entries, base, step)
        span_ms = step * (entries - 1)
        mem = int(r.memory_usage("pristine", samples=0) or 0)
        print(f"[{kind}] built {entries:,} entries over {span_ms / HOUR_MS:.1f} h in {built:.1f} s; "
              f"MEMORY USAGE {mem / 2**20:.0f} MiB ({mem / entries:.1f} B/entry)", flush=True)  # fmt: skip
        half = f"{base + span_ms - DAY_MS}-0"  # keep the newest 24 hours
        minute = f"{base + 60_000}-0"  # one minute's worth off the oldest end
        cases = [
            ("24 h window (~half)", half, "approx-limit"),
            ("24 h window (~half)", half, "approx"),
            ("24 h window (~half)", half, "exact"),
            ("1 minute of data", minute, "approx-limit"),
            ("1 minute of data", minute, "exact"),
        ]
        for what, minid, mode in cases:
            samples = []
            for _ in range(runs):
                r.unlink("work")
                t = time.perf_counter()
                r.copy("pristine", "work")
                copy_s = time.perf_counter() - t
                samples.append(timed_trim(r, "work", minid, mode))
            row = {"server": kind, "trim": what, "mode": mode, "entries": entries}
            for k in samples[0]:
                row[k] = statistics.median(s[k] for s in samples)
            row["copy_s"] = copy_s
            results.append(row)
            print(f"[{kind}] {what:20s} {mode:12s} wall {row['wall_s'] * 1000:9.1f} ms  cpu {row['cpu_s'] * 1000:9.1f} ms"
                  f"  longest {row['longest_ms']:8.2f} ms  median call {row['median_call_ms']:7.2f} ms  removed {int(row['removed']):>10,}  rounds {int(row['rounds'])}",
                  flush=True)  # fmt: skip
        r.close()
    return results


# --- Bytes per entry ---------------------------------------------------------------------------------------------


def fleet_readings(n: int, seed: int = 7) -> list[dict[str, Any]]:
    fleet = Fleet(sites=10, sensors_per_site=100, interval_s=INTERVAL_S, seed=seed, quirk_rate=0)
    out: list[dict[str, Any]] = []
    while len(out) < n:
        for rd in fleet.simulate(60):
            out.append({"site": rd.site, "sensor_id": rd.sensor_id, "seq": rd.seq, "ts_ms": rd.ts_ms,
                        "received_ms": rd.ts_ms + random.randint(2, 40), "metrics": rd.metrics})  # fmt: skip
    return out[:n]


def anomaly_of(rd: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    metric, value = rng.choice(list(rd["metrics"].items()))
    score = round(rng.uniform(0.6, 0.9), 4)
    return {
        "alert_id": f"{rd['site']}:{rd['sensor_id']}:{rd['seq']}",
        "site": rd["site"],
        "sensor_id": rd["sensor_id"],
        "seq": rd["seq"],
        "ts_ms": rd["ts_ms"],
        "detected_ms": rd["received_ms"] + rng.randint(3, 30),
        "score": score,
        "threshold": 0.62,
        "severity": "critical" if score > 0.8 else "warning",
        "model_version": f"{rd['site']}:{rd['sensor_id']}:{rng.randint(1, 40)}",
        "reading_entry_id": f"{rd['received_ms']}-0",
        "metrics": rd["metrics"],
        "explanation": [{"metric": metric, "value": value, "direction": rng.choice(["high", "low"])}],
    }


def bytes_per_entry(
    r: redis.Redis, key: str, payloads: list[bytes], per_entry_items: int
) -> dict[str, float]:
    r.delete(key)
    for i in range(0, len(payloads), 1000):
        with r.pipeline(transaction=False) as pipe:
            for p in payloads[i : i + 1000]:
                pipe.xadd(key, {"payload": p})
            pipe.execute()
    mem = int(r.memory_usage(key, samples=0) or 0)
    n = len(payloads)
    return {
        "entries": n,
        "payload_bytes": statistics.mean(len(p) for p in payloads),
        "bytes_per_entry": mem / n,
        "bytes_per_item": mem / (n * per_entry_items),
    }


def memory(kind: str, n: int) -> dict[str, dict[str, float]]:
    rng = random.Random(11)
    readings = fleet_readings(n * 2)
    singles = [orjson.dumps({"readings": [rd]}) for rd in readings[:n]]
    batches = [orjson.dumps({"readings": readings[i : i + 100]}) for i in range(0, n * 2 - 99, 100)][
        : n // 50
    ]
    anomalies = [orjson.dumps(anomaly_of(rd, rng)) for rd in readings[:n]]
    out: dict[str, dict[str, float]] = {}
    with RedisServer(kind) as server:
        r = redis.Redis.from_url(server.url, socket_timeout=3600)
        out["reading entry, 1 reading"] = bytes_per_entry(r, "m:single", singles, 1)
        out["reading entry, 100 readings (per reading)"] = bytes_per_entry(r, "m:batch", batches, 100)
        out["anomaly"] = bytes_per_entry(r, "m:anomaly", anomalies, 1)
        # Cross-check of the extrapolation: 30 days of anomalies of 100 sensors at 0.5 %, for real.
        count = round(100 * READINGS_PER_SENSOR_DAY * 30 * 0.005)
        more = [orjson.dumps(anomaly_of(rd, rng)) for rd in fleet_readings(count, seed=3)]
        real = bytes_per_entry(r, "m:month", more, 1)
        out["30 days, 100 sensors, 0.5 % (built)"] = {**real, "total_bytes": real["bytes_per_entry"] * count}
        r.close()
    return out


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def tables(mem: dict[str, dict[str, dict[str, float]]]) -> None:
    print("\n| server | entry | payload bytes (mean) | bytes per entry | bytes per reading/anomaly |")
    print("|---|---|---:|---:|---:|")
    for kind, rows in mem.items():
        for what, m in rows.items():
            if what.startswith("30 days"):
                continue
            print(
                f"| {kind} | {what} | {m['payload_bytes']:.0f} | {m['bytes_per_entry']:.0f} | {m['bytes_per_item']:.0f} |"
            )
    for kind, rows in mem.items():
        per_anomaly = rows["anomaly"]["bytes_per_item"]
        print(
            f"\n30 days of anomalies on {kind} ({per_anomaly:.0f} B each; a reading every {INTERVAL_S} s per sensor):\n"
        )
        print("| sensors | " + " | ".join(f"{r * 100:g} % of readings" for r in ANOMALY_RATES) + " |")
        print("|---:|" + "---:|" * len(ANOMALY_RATES))
        for s in SENSORS:
            cells = []
            for rate in ANOMALY_RATES:
                count = s * READINGS_PER_SENSOR_DAY * 30 * rate
                cells.append(f"{fmt_bytes(count * per_anomaly)} ({count / 1e6:.2f} M)")
            print(f"| {s:,} | " + " | ".join(cells) + " |")
        built = rows["30 days, 100 sensors, 0.5 % (built)"]
        predicted = 100 * READINGS_PER_SENSOR_DAY * 30 * 0.005 * per_anomaly
        print(f"\nbuilt for real: 100 sensors, 0.5 %: {int(built['entries']):,} anomalies, "
              f"{fmt_bytes(built['total_bytes'])} (extrapolated {fmt_bytes(predicted)})")  # fmt: skip
        single = rows["reading entry, 1 reading"]["bytes_per_item"]
        batched = rows["reading entry, 100 readings (per reading)"]["bytes_per_item"]
        print(f"\n24 h of readings on {kind}:\n")
        print("| sensors | readings/day | one reading per entry | gateway batches of 100 |")
        print("|---:|---:|---:|---:|")
        for s in SENSORS:
            n = s * READINGS_PER_SENSOR_DAY
            print(f"| {s:,} | {n / 1e6:.2f} M | {fmt_bytes(n * single)} | {fmt_bytes(n * batched)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--entries", type=int, default=10_000_000, help="stream length for the trimming benchmark"
    )
    ap.add_argument("--runs", type=int, default=3, help="runs per trimming case (median reported)")
    ap.add_argument("--kinds", default="redis,valkey", help="servers: redis (7.0), valkey (8)")
    ap.add_argument(
        "--memory-entries", type=int, default=100_000, help="entries per bytes-per-entry measurement"
    )
    ap.add_argument("--skip-trim", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--json", help="also write all results to this file")
    args = ap.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    print(f"# {platform.platform()}, {platform.python_version()}, kinds {kinds}", flush=True)
    started = time.perf_counter()
    trim: list[dict[str, Any]] = []
    if not args.skip_trim:
        for kind in kinds:
            trim += trimming(kind, args.entries, args.runs)
        print(
            "\n| server | trim | mode | wall ms | Redis CPU ms | longest command ms | median command ms | removed | rounds |"
        )
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for row in trim:
            print(f"| {row['server']} | {row['trim']} | {row['mode']} | {row['wall_s'] * 1000:.1f} | "
                  f"{row['cpu_s'] * 1000:.1f} | {row['longest_ms']:.2f} | {row['median_call_ms']:.2f} | {int(row['removed']):,} | {int(row['rounds'])} |")  # fmt: skip
    mem = {} if args.skip_memory else {kind: memory(kind, args.memory_entries) for kind in kinds}
    if mem:
        tables(mem)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "wb") as f:
            f.write(orjson.dumps({"trim": trim, "memory": mem}, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
