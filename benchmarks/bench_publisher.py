"""Simulator publisher: offered vs achieved publish rate, single and batched: ``python benchmarks/bench_publisher.py``.

Every run gets a fresh private Mosquitto. Scenarios:

* ``generate``: the fleet model alone, 50 sensors x 1 day at a 10 s interval (432k readings), as numpy columns and
  as ``LabelledReading`` objects;
* ``flat out``: pre-generated readings published as fast as the in-flight window allows (the ceiling);
* ``paced``: ``Publisher.run`` on a live fleet (500 sensors, no quirks, so the offered rate is exact) for
  ``--duration`` seconds at each offered rate.

``achieved`` is readings the broker acknowledged (PUBACK) per second, from the first publish to the last PUBACK.
With ``--subscriber``, a paho QoS 1 subscriber process on ``wd/#`` also receives everything (as ingest would), so the
broker and the publisher share the two cores with a consumer; it reports how many readings it received.
Medians of ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handoff.settings import MqttEndpoint  # noqa: E402
from simulators.fleet import Fleet  # noqa: E402
from simulators.publisher import Publisher  # noqa: E402
from waterdoctor.embedded import MosquittoBroker  # noqa: E402


def subscriber_main(url: str) -> None:
    """Child process: count messages and readings on ``wd/#`` until SIGTERM, then print them as JSON."""
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    ep = MqttEndpoint.parse(url)
    counts = {"messages": 0, "readings": 0}
    ready = threading.Event()
    done = threading.Event()

    def on_connect(client: mqtt.Client, *_: Any) -> None:
        client.subscribe("wd/#", qos=1)

    def on_subscribe(*_: Any) -> None:
        ready.set()
        print("ready", flush=True)

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        counts["messages"] += 1
        # Count readings without parsing JSON: a batch holds one "seq" per reading.
        counts["readings"] += msg.payload.count(b'"seq"')

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    client.connect(ep.host, ep.port)
    client.loop_start()
    while not done.wait(0.2):
        print(json.dumps(counts), flush=True)
    client.disconnect()
    client.loop_stop()


class Subscriber:
    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--subscriber-child", url], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def wait_for(self, readings: int, timeout: float = 30.0) -> dict[str, int]:
        """Read the child's running counts until ``readings`` arrived or ``timeout``; then stop it."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        counts: dict[str, int] = {"messages": 0, "readings": 0}
        while counts["readings"] < readings and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            counts = json.loads(line)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=10)
        return counts


def bench_generate() -> dict[str, float]:
    fleet = Fleet(sites=5, sensors_per_site=10, interval_s=10.0, anomaly_rate=0.01, seed=7)
    t = time.perf_counter()
    batch = fleet.simulate_arrays(86_400)
    t_arrays = time.perf_counter() - t
    t = time.perf_counter()
    batch.to_readings()
    t_objects = time.perf_counter() - t
    return {"readings": len(batch), "arrays_s": t_arrays, "objects_s": t_objects}


def bench_flat_out(batch: int, readings: int, subscriber: bool) -> dict[str, float]:
    with MosquittoBroker() as broker:
        fleet = Fleet(sites=10, sensors_per_site=50, interval_s=1.0, quirk_rate=0.0, anomaly_rate=0.01,
                      start_ms=time.time_ns() // 1_000_000 - 600_000)  # fmt: skip
        items = fleet.simulate(readings / fleet.rate)
        sub = Subscriber(broker.url) if subscriber else None
        with Publisher(MqttEndpoint.parse(broker.url), batch=batch) as pub:
            t = time.perf_counter()
            pub.publish(items)
            pub.flush()
            pub.drain(60)
            elapsed = time.perf_counter() - t
            stats = pub.stats()
        received = sub.wait_for(stats.readings_sent)["readings"] if sub else -1
    return {
        "offered": float("inf"),
        "sent": stats.readings_sent,
        "acked": stats.readings_acked,
        "achieved": stats.readings_acked / elapsed,
        "msg_rate": stats.messages_acked / elapsed,
        "received": received,
    }


def bench_paced(batch: int, rate: float, duration: float, subscriber: bool) -> dict[str, float]:
    with MosquittoBroker() as broker:
        sub = Subscriber(broker.url) if subscriber else None
        with Publisher(MqttEndpoint.parse(broker.url), batch=batch) as pub:
            fleet = Fleet.for_rate(rate, sites=10, sensors_per_site=50, quirk_rate=0.0, anomaly_rate=0.01,
                                   start_ms=time.time_ns() // 1_000_000)  # fmt: skip
            t = time.perf_counter()
            pub.run(fleet, duration)
            pub.drain(60)
            elapsed = time.perf_counter() - t
            stats = pub.stats()
        received = sub.wait_for(stats.readings_sent)["readings"] if sub else -1
    return {
        "offered": rate,
        "sent": stats.readings_sent,
        "acked": stats.readings_acked,
        "achieved": stats.readings_acked / elapsed,
        "msg_rate": stats.messages_acked / elapsed,
        "received": received,
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per paced run")
    parser.add_argument(
        "--subscriber", action="store_true", help="also run a paho subscriber process on wd/#"
    )
    parser.add_argument("--subscriber-child", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.subscriber_child:
        subscriber_main(args.subscriber_child)
        return 0

    print(f"# bench_publisher: {os.cpu_count()} CPUs, runs={args.runs}, subscriber={args.subscriber}")
    gen = median_of([bench_generate() for _ in range(args.runs)])
    print(
        f"generate: {gen['readings']:.0f} readings (50 sensors x 1 day at 10 s): columns {gen['arrays_s']:.2f} s, "
        f"LabelledReading objects +{gen['objects_s']:.2f} s"
    )
    print(
        "| mode | batch | offered readings/s | sent | acked | achieved readings/s | messages/s | received |"
    )
    print("|---|---|---|---|---|---|---|---|")
    scenarios: list[tuple[str, int, float]] = [
        ("flat out", 1, 40_000),
        ("flat out", 100, 400_000),
        ("paced", 1, 2_000),
        ("paced", 1, 8_000),
        ("paced", 1, 10_000),
        ("paced", 10, 30_000),
        ("paced", 100, 30_000),
        ("paced", 100, 60_000),
    ]
    for mode, batch, n in scenarios:
        runs = []
        for _ in range(args.runs):
            if mode == "flat out":
                runs.append(bench_flat_out(batch, int(n), args.subscriber))
            else:
                runs.append(bench_paced(batch, n, args.duration, args.subscriber))
        m = median_of(runs)
        offered = "max" if mode == "flat out" else f"{m['offered']:,.0f}"
        received = f"{m['received']:,.0f}" if m["received"] >= 0 else "-"
        print(
            f"| {mode} | {batch} | {offered} | {m['sent']:,.0f} | {m['acked']:,.0f} | {m['achieved']:,.0f} "
            f"| {m['msg_rate']:,.0f} | {received} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
