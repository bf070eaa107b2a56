"""Ingest throughput against a bare paho subscriber, and validation cost: ``python benchmarks/bench_ingest.py``.

Throughput (``throughput``, the default): for each run, a fresh Mosquitto and Redis (or Valkey); the publisher is a
raw-socket QoS 1 publisher in this process (pre-encoded packets; paho itself publishes only ~5k msg/s here, which
would measure the publisher). Each run measures, on the same broker and the same messages:

* ``bare``: a paho-mqtt 2 subscriber process (MQTT 5, manual ack, shared subscription, persistent session) that
  only counts and acknowledges, i.e. the ceiling for any paho-based consumer;
* ``ingest``: ``waterdoctor ingest`` as a subprocess, timed until every reading is in ``wd:readings:v1``.

Time runs from the first publish to the last message counted (bare) or stored (ingest). Medians of ``--runs``.

Validation (``validate``): microseconds per reading for the reference pydantic models, a hand-written validator
and the hybrid ingest uses, on one realistic reading and on a gateway batch of 100.

Script (``script``): server time of the dedupe-and-append script per reading (``INFO commandstats``) on Redis 7.0
and Valkey 8, and the client CPU spent packing and sending it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import redis  # noqa: E402

from handoff import keys  # noqa: E402
from tests.ingest.mqtt_tools import FastPublisher, packets_for  # noqa: E402
from waterdoctor.embedded import MosquittoBroker, RedisServer  # noqa: E402

SITES = 10
SENSORS_PER_SITE = 100


def make_messages(count: int, batch: int, now_s: float) -> list[tuple[str, bytes]]:
    """``count`` messages: single readings (batch 1) or gateway batches of ``batch`` readings.

    Each sensor's ``seq`` goes up by one per reading, as real counters do.
    """
    metrics = {"ph": 7.12, "turbidity_ntu": 0.41, "chlorine_mg_l": 1.08, "flow_m3_h": 33.2}
    out = []
    seqs: dict[tuple[str, str], int] = {}

    def body(site: str, sensor: str) -> dict[str, Any]:
        seq = seqs[(site, sensor)] = seqs.get((site, sensor), -1) + 1
        return {"site": site, "sensor_id": sensor, "seq": seq, "ts": now_s, "metrics": metrics}

    for i in range(count):
        site = f"plant-{i % SITES}"
        if batch == 1:
            sensor = f"s-{(i // SITES) % SENSORS_PER_SITE:04d}"
            out.append((f"wd/{site}/{sensor}/telemetry", orjson.dumps(body(site, sensor))))
        else:
            gw = f"gw-{i % 7}"
            readings = [body(site, f"s-{j:04d}") for j in range(batch)]
            out.append((f"wd/{site}/{gw}/batch", orjson.dumps({"gateway_id": gw, "readings": readings})))
    return out


# --- the bare subscriber (runs as a child process) -----------------------------------------------------------


def bare_main(url: str, count: int) -> None:
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from handoff.settings import MqttEndpoint

    ep = MqttEndpoint.parse(url)
    done = threading.Event()
    got = 0
    last = 0.0

    def on_connect(client: mqtt.Client, *_: Any) -> None:
        client.subscribe([("$share/bench/wd/+/+/telemetry", 1), ("$share/bench/wd/+/+/batch", 1)])

    cpu0 = 0.0

    def on_subscribe(*_: Any) -> None:
        nonlocal cpu0
        cpu0 = time.process_time()
        print("ready", flush=True)

    def on_message(client: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        nonlocal got, last
        got += 1
        client.ack(message.mid, message.qos)
        if got >= count:
            last = time.time()
            done.set()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=mqtt.MQTTv5, manual_ack=True
    )
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = 1000
    client.connect(ep.host, ep.port, clean_start=False, properties=props)
    client.loop_start()
    done.wait(600)
    print(f"done {got} {last:.6f} {time.process_time() - cpu0:.6f}", flush=True)
    client.disconnect()
    client.loop_stop()


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu_s(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run_bare(broker: MosquittoBroker, messages: list[tuple[str, bytes]]) -> tuple[float, float]:
    """(seconds from first publish to last message received, subscriber CPU seconds)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "_bare", broker.url, str(len(messages))], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("bare subscriber did not start")
    packets = packets_for(messages)
    pub = FastPublisher(broker.url, "bench-pub-bare")
    start = time.time()
    pub.publish_all(packets)
    pub.close()
    line = proc.stdout.readline().split()
    proc.wait(30)
    return float(line[2]) - start, float(line[3])


def run_ingest(
    broker: MosquittoBroker,
    server: RedisServer,
    messages: list[tuple[str, bytes]],
    readings: int,
    extra: list[str],
) -> tuple[float, dict[str, Any]]:
    """(seconds from first publish to last reading stored, CPU seconds of ingest, Redis and the broker)."""
    env = {**os.environ, "WD_REDIS_URL": server.url, "WD_MQTT_URL": broker.url}
    log = open(server.data_dir / "ingest.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "waterdoctor.cli", "--log-level", "INFO", "ingest", "--metrics-port", "0",
         "--client-id", "bench-ingest", *extra],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    r = redis.Redis.from_url(server.url)
    assert broker.proc is not None
    try:
        deadline = time.monotonic() + 60
        while "connected to mqtt" not in (server.data_dir / "ingest.log").read_text():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("ingest did not connect")
            time.sleep(0.05)
        time.sleep(0.3)  # SUBACK
        packets = packets_for(messages)
        pub = FastPublisher(broker.url, "bench-pub-ingest")
        cpu0 = (proc_cpu_s(proc.pid), redis_cpu_s(r), proc_cpu_s(broker.proc.pid))
        start = time.time()
        pub.publish_all(packets)
        pub.close()
        per_entry = readings // len(messages)
        while r.xlen(keys.READINGS) * per_entry < readings:
            if time.time() - start > 600:
                raise RuntimeError("ingest did not store everything")
            time.sleep(0.005)
        elapsed = time.time() - start
        cpu1 = (proc_cpu_s(proc.pid), redis_cpu_s(r), proc_cpu_s(broker.proc.pid))
        info = {
            "entries": r.xlen(keys.READINGS),
            "quarantine": r.xlen(keys.QUARANTINE),
            "cpu_ingest": cpu1[0] - cpu0[0],
            "cpu_redis": cpu1[1] - cpu0[1],
            "cpu_broker": cpu1[2] - cpu0[2],
        }
    finally:
        proc.terminate()
        proc.wait(30)
        r.close()
        log.close()
    return elapsed, info


def throughput(args: argparse.Namespace) -> None:
    rows = []
    for label, count, batch in (("single", args.single, 1), ("batch100", args.batches, 100)):
        if label not in args.modes:
            continue
        runs: list[dict[str, float]] = []
        for run in range(args.runs):
            messages = make_messages(count, batch, time.time())
            load = os.getloadavg()[0]
            with MosquittoBroker() as broker, RedisServer(args.server) as server:
                bare_s, bare_cpu = run_bare(broker, messages)
                ingest_s, info = run_ingest(broker, server, messages, count * batch, args.ingest_args)
            n = count * batch
            runs.append({
                "bare": count / bare_s, "ingest": count / ingest_s, "load": load,
                "bare_cpu_us": bare_cpu / count * 1e6,
                "ingest_cpu_us": info["cpu_ingest"] / n * 1e6,
                "redis_cpu_us": info["cpu_redis"] / n * 1e6,
                "broker_cpu_us": info["cpu_broker"] / n * 1e6,
            })  # fmt: skip
            print(
                f"{label} run {run + 1} (load {load:.1f}): bare {count / bare_s:,.0f} msg/s "
                f"({bare_cpu / count * 1e6:.1f} us CPU/msg); ingest {count / ingest_s:,.0f} msg/s = "
                f"{n / ingest_s:,.0f} readings/s; CPU us/reading: ingest {runs[-1]['ingest_cpu_us']:.1f}, "
                f"redis {runs[-1]['redis_cpu_us']:.1f}, broker {runs[-1]['broker_cpu_us']:.1f} "
                f"(entries {info['entries']}, quarantine {info['quarantine']})",
                flush=True,
            )
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append((label, count, batch, med))
    print()
    print(f"server: {args.server}; runs: {args.runs}; medians")
    print(
        "| messages | count | bare paho msg/s | ingest msg/s | ingest readings/s | bare / ingest | "
        "ingest CPU us/reading | readings per ingest CPU-second | Redis CPU us/reading | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, count, batch, m in rows:
        print(
            f"| {label} | {count:,} | {m['bare']:,.0f} | {m['ingest']:,.0f} | {m['ingest'] * batch:,.0f} | "
            f"{m['bare'] / m['ingest']:.2f}x | {m['ingest_cpu_us']:.1f} | {1e6 / m['ingest_cpu_us']:,.0f} | "
            f"{m['redis_cpu_us']:.1f} | {m['load']:.1f} |"
        )


# --- validation cost -----------------------------------------------------------------------------------------


def validate(args: argparse.Namespace) -> None:
    import math
    import re
    import timeit
    from datetime import UTC, datetime

    from handoff.models import GatewayBatch, SensorReading
    from ingest import validate as v

    now_ms = int(time.time() * 1000)
    if args.ts == "rfc3339":
        ts: Any = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    else:
        ts = time.time()
    metrics = {"ph": 7.12, "turbidity_ntu": 0.41, "chlorine_mg_l": 1.08, "flow_m3_h": 33.2}
    single = orjson.dumps(
        {"site": "plant-7", "sensor_id": "s-0042", "seq": 1234, "ts": ts, "metrics": metrics}
    )
    batch = orjson.dumps(
        {"gateway_id": "gw-3", "readings": [
            {"site": "plant-7", "sensor_id": f"s-{i:04d}", "seq": i, "ts": ts, "metrics": metrics}
            for i in range(100)
        ]}
    )  # fmt: skip

    def normalize(site: str, sensor: str, seq: int, ts_value: Any, metrics: dict[str, float]) -> bytes:
        return orjson.dumps({"site": site, "sensor_id": sensor, "seq": seq, "ts_ms": v._ts_ms(ts_value),
                             "received_ms": now_ms, "metrics": metrics})  # fmt: skip

    def pydantic_single() -> bytes:
        m = SensorReading.model_validate_json(single, strict=True)
        return normalize(m.site, m.sensor_id, m.seq, m.ts, m.metrics)

    def pydantic_batch() -> list[bytes]:
        b = GatewayBatch.model_validate_json(batch, strict=True)
        return [normalize(m.site, m.sensor_id, m.seq, m.ts, m.metrics) for m in b.readings]

    ident = re.compile(r"[A-Za-z0-9_-]{1,64}")
    name = re.compile(r"[a-z][a-z0-9_]{0,31}")

    def hand_reading(d: dict[str, Any]) -> bytes:
        # the plain hand-written validator: every check in Python, nothing cached
        site, sensor, seq, mets = d["site"], d["sensor_id"], d["seq"], d["metrics"]
        if not (
            type(site) is str and ident.fullmatch(site) and type(sensor) is str and ident.fullmatch(sensor)
        ):
            raise ValueError
        if type(seq) is not int or not 0 <= seq < 2**63:
            raise ValueError
        out = {}
        for k, x in mets.items():
            if not name.fullmatch(k) or type(x) not in (int, float) or not math.isfinite(x):
                raise ValueError
            out[k] = float(x)
        return normalize(site, sensor, seq, d["ts"], out)

    def hand_single() -> bytes:
        return hand_reading(orjson.loads(single))

    def hand_batch() -> list[bytes]:
        return [hand_reading(d) for d in orjson.loads(batch)["readings"]]

    def hybrid_single() -> Any:
        return v.validate_message("wd/plant-7/s-0042/telemetry", single, now_ms)

    def hybrid_batch() -> Any:
        return v.validate_message("wd/plant-7/gw-3/batch", batch, now_ms)

    def slow_path_batch() -> Any:
        # the reason finder the hybrid falls back to when pydantic refuses a message
        result = v.MessageResult("wd/plant-7/gw-3/batch", now_ms, site="plant-7", device="gw-3")
        v._slow(result, batch, "batch", "plant-7", "gw-3")
        return result

    assert len(hybrid_batch().readings) == 100 and len(slow_path_batch().readings) == 100

    def best_us(fn: Any, per: int) -> float:
        # CPU time, not wall time: the figure survives other work on the machine better.
        times = timeit.repeat(fn, number=args.number, repeat=5, timer=time.process_time)
        return min(times) / args.number / per * 1e6

    rows = [
        ("pydantic SensorReading / GatewayBatch (strict) + normalize", pydantic_single, pydantic_batch),
        ("hand-written (orjson + Python checks) + normalize", hand_single, hand_batch),
        ("ingest: pydantic-core TypedDict + Python rules (validate_message)", hybrid_single, hybrid_batch),
    ]
    print(f"ts as {args.ts}; CPU microseconds, best of 5 x {args.number}")
    print("| validator | us per single message | us per reading in a batch of 100 |")
    print("|---|---|---|")
    for label, fs, fb in rows:
        print(f"| {label} | {best_us(fs, 1):.2f} | {best_us(fb, 100):.2f} |")
    print(f"| ingest reason finder (only for refused messages) | - | {best_us(slow_path_batch, 100):.2f} |")


# --- server-side cost of the dedupe-and-append script ---------------------------------------------------------


def script(args: argparse.Namespace) -> None:
    import asyncio

    import redis.asyncio as aredis

    from ingest.store import MessageWrite, ReadingStore
    from ingest.validate import validate_message

    now_ms = int(time.time() * 1000)
    print(
        "| server | readings per message | us per reading (server, EVALSHA usec / readings) | client us per reading |"
    )
    print("|---|---|---|---|")
    for kind in ("redis", "valkey"):
        for batch, count in ((1, 20_000), (100, 400)):
            results = [validate_message(t, p, now_ms) for t, p in make_messages(count, batch, time.time())]

            async def run(url: str, results: list[Any] = results) -> tuple[float, float]:
                r = aredis.Redis.from_url(url)
                store = ReadingStore(r)
                await store.prepare()
                await r.config_resetstat()
                cpu = 0.0
                for i in range(0, len(results), 500):
                    writes = [MessageWrite(x.topic, now_ms, x.readings) for x in results[i : i + 500]]
                    started = time.process_time()
                    await store.write(writes, [])
                    cpu += time.process_time() - started
                stats = await r.info("commandstats")
                await r.aclose()
                readings = sum(len(x.readings) for x in results)
                return stats["cmdstat_evalsha"]["usec"] / readings, cpu * 1e6 / readings

            best = None
            for _ in range(args.runs):
                with RedisServer(kind) as server:
                    got = asyncio.run(run(server.url))
                best = got if best is None or got[0] < best[0] else best
            assert best is not None
            print(f"| {kind} | {batch} | {best[0]:.2f} | {best[1]:.2f} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_bare":
        bare_main(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what")
    t = sub.add_parser("throughput")
    t.add_argument("--runs", type=int, default=3)
    t.add_argument("--single", type=int, default=60_000, help="single-reading messages per run")
    t.add_argument("--batches", type=int, default=3_000, help="gateway batches of 100 per run")
    t.add_argument("--server", choices=("redis", "valkey"), default="redis")
    t.add_argument("--modes", nargs="+", default=["single", "batch100"])
    t.add_argument(
        "--ingest-args", nargs=argparse.REMAINDER, default=[], help="extra flags for waterdoctor ingest"
    )
    va = sub.add_parser("validate")
    va.add_argument("--number", type=int, default=2000)
    va.add_argument(
        "--ts", choices=("rfc3339", "epoch"), default="rfc3339", help="form of ts in the payloads"
    )
    sc = sub.add_parser("script")
    sc.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(sys.argv[1:] or ["throughput"])
    if args.what == "validate":
        validate(args)
    elif args.what == "script":
        script(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
