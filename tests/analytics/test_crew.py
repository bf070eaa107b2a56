"""The analytics crew against real Redis/Valkey: anomalies emitted once, models shared and persisted, crashes."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis
import redis.asyncio as aredis

from analytics.crew import AnalyticsConfig, AnalyticsHandler, run_analytics
from analytics.detector import DetectorConfig
from handoff import keys
from handoff.models import Anomaly
from handoff.producer import StreamProducer
from handoff.worker import WorkerConfig
from waterdoctor.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_796_000_000_000


def reading(
    seq: int, ph: float, turbidity: float = 0.4, sensor: str = "s-1", site: str = "plant-1"
) -> dict[str, Any]:
    return {
        "site": site, "sensor_id": sensor, "seq": seq, "ts_ms": T0 + seq * 10_000, "received_ms": T0 + seq * 10_000,
        "metrics": {"ph": ph, "turbidity_ntu": turbidity, "chlorine_mg_l": 1.0},
    }  # fmt: skip


def normal_series(n: int, seed: int = 0, sensor: str = "s-1", start: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [
        reading(start + i, 7.2 + rng.normal(0, 0.03), 0.4 + abs(rng.normal(0, 0.02)), sensor)
        for i in range(n)
    ]


def small_config(warmup: int = 100) -> AnalyticsConfig:
    return AnalyticsConfig(
        worker=WorkerConfig(batch_size=50, block_ms=2, claim_idle_ms=500, claim_interval_s=0.2),
        detector=DetectorConfig(warmup=warmup, window=max(512, warmup), refit_every=4096),
    )


async def push(r: aredis.Redis, readings: list[dict[str, Any]], per_entry: int = 10) -> None:
    producer = StreamProducer(r, keys.READINGS)
    await producer.add_many(
        [{"readings": readings[i : i + per_entry]} for i in range(0, len(readings), per_entry)]
    )


async def anomalies(r: aredis.Redis) -> list[dict[str, Any]]:
    return [orjson.loads(f[b"payload"]) for _, f in await r.xrange(keys.ANOMALIES)]


async def drained(r: aredis.Redis) -> bool:
    try:
        groups = await r.xinfo_groups(keys.READINGS)
    except redis.ResponseError:
        return False
    return bool(groups) and groups[0]["pending"] == 0 and groups[0]["lag"] == 0


async def run_crew_until(
    r: aredis.Redis, config: AnalyticsConfig, cond: Any, timeout: float = 20
) -> AnalyticsHandler:
    stop = asyncio.Event()
    task = asyncio.create_task(run_analytics(r, config, stop, consumer="t1"))
    try:
        async with asyncio.timeout(timeout):
            while not await cond():
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        handler = await asyncio.wait_for(task, 10)
    return handler


async def test_spike_after_warmup_is_emitted_once_with_contract_shape(r: aredis.Redis) -> None:
    pubsub = r.pubsub()
    await pubsub.subscribe(keys.ALERTS_CHANNEL)
    await push(r, normal_series(300))
    config = small_config()

    async def drained_and_fitted() -> bool:
        return await drained(r) and await r.hlen(keys.MODEL_GENERATIONS) == 1

    handler = await run_crew_until(r, config, drained_and_fitted)
    assert handler.bank.sensor("plant-1", "s-1").model is not None
    assert await anomalies(r) == []  # normal data: no alert

    # The model was saved: a fresh crew (a restart) loads it and catches a spike at once, with no warm-up.
    await push(r, [reading(300, 7.21), reading(301, 4.1), reading(302, 7.19)])
    await run_crew_until(r, config, lambda: drained(r))
    found = await anomalies(r)
    assert [a["seq"] for a in found] == [301]
    a = Anomaly.model_validate(found[0])
    assert a.alert_id == "plant-1:s-1:301" and a.score >= a.threshold
    assert a.explanation[0].metric == "ph" and a.explanation[0].direction == "low"
    assert a.reading_entry_id == (await r.xrange(keys.READINGS))[-1][0].decode()
    msg = None
    async with asyncio.timeout(5):
        while msg is None:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
    assert orjson.loads(msg["data"]) == found[0]
    await pubsub.aclose()


async def test_a_starting_crew_loads_every_stored_model_before_any_reading(r: aredis.Redis) -> None:
    for s in range(3):
        await push(r, normal_series(300, seed=s, sensor=f"s-{s}"))
    config = small_config()

    async def fitted() -> bool:
        return await drained(r) and await r.hlen(keys.MODEL_GENERATIONS) == 3

    await run_crew_until(r, config, fitted)
    await r.delete(keys.READINGS)  # nothing left to read: models can only come from the registry
    stop = asyncio.Event()
    stop.set()  # stops at once, after the start-up
    handler = await run_analytics(r, config, stop, consumer="t2")
    loaded = {key for key, d in handler.bank.sensors.items() if d.model is not None}
    assert loaded == {("plant-1", f"s-{s}") for s in range(3)}


async def test_hard_limits_fire_during_warmup_as_critical(r: aredis.Redis) -> None:
    await push(r, [reading(0, 7.0), reading(1, 15.2), reading(2, 7.1, turbidity=-0.5)])
    await run_crew_until(r, small_config(warmup=1000), lambda: drained(r))
    found = {a["seq"]: a for a in await anomalies(r)}
    assert set(found) == {1, 2}
    assert all(a["severity"] == "critical" for a in found.values())
    assert found[1]["explanation"][0] == {"metric": "ph", "value": 15.2, "direction": "high"}
    assert found[2]["explanation"][0]["metric"] == "turbidity_ntu"


async def test_malformed_entries_go_to_dead_letters_and_others_are_scored(r: aredis.Redis) -> None:
    await r.xadd(keys.READINGS, {"payload": b"{not json"})
    await push(r, [reading(0, 16.0)])
    await run_crew_until(r, small_config(), lambda: drained(r))
    assert [a["seq"] for a in await anomalies(r)] == [0]
    dead = [orjson.loads(f[b"payload"]) for _, f in await r.xrange(keys.DEAD)]
    assert len(dead) == 1 and dead[0]["group"] == keys.GROUP_ANALYTICS and "malformed" in dead[0]["error"]


def spawn(url: str, consumer: str, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "waterdoctor.cli", "--log-level", "WARNING", "analytics", "--consumer", consumer,
         "--metrics-port", str(port), "--batch", "20", "--warmup", "100"],
        cwd=ROOT, env={**os.environ, "WD_REDIS_URL": url, "WD_CLAIM_IDLE_MS": "1000"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def acked_by(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("wd_acked_total{"))


def expected_faults(readings: list[dict[str, Any]]) -> set[str]:
    return {f"{x['site']}:{x['sensor_id']}:{x['seq']}" for x in readings if x["metrics"]["ph"] > 14}


def faulty_fleet(n_sensors: int, per_sensor: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for s in range(n_sensors):
        series = normal_series(per_sensor, seed=s, sensor=f"s-{s}")
        for x in series:
            if rng.random() < 0.03:
                x["metrics"]["ph"] = 14.5 + rng.random()  # an out-of-range fault: deterministic ground truth
        out.extend(series)
    rng.shuffle(out)
    return out


@pytest.mark.slow
async def test_two_processes_split_the_stream_and_score_each_reading_once(redis_only_url: str) -> None:
    r = aredis.Redis.from_url(redis_only_url)
    data = faulty_fleet(20, 400, seed=1)
    ports = [free_port(), free_port()]
    procs = [spawn(redis_only_url, f"a-{i}", ports[i]) for i in range(2)]
    try:
        async with asyncio.timeout(60):
            while True:  # both members are up before any work arrives
                try:
                    [acked_by(p) for p in ports]
                    break
                except OSError:
                    await asyncio.sleep(0.2)
            await push(r, data)
            while not await drained(r):
                await asyncio.sleep(0.2)
        shares = [acked_by(p) for p in ports]
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(15) for p in procs]
    assert codes == [0, 0]
    assert all(s > 0 for s in shares) and sum(shares) == len(range(0, len(data), 10))
    ids = Counter(a["alert_id"] for a in await anomalies(r))
    assert max(ids.values()) == 1
    assert expected_faults(data) <= set(ids)
    await r.aclose()


@pytest.mark.slow
async def test_sigkill_during_scoring_leaves_no_reading_unscored_and_no_duplicate(
    redis_only_url: str,
) -> None:
    r = aredis.Redis.from_url(redis_only_url)
    data = faulty_fleet(30, 500, seed=2)
    await push(r, data)
    port = free_port()
    rng = random.Random(3)
    kills = 0
    proc = spawn(redis_only_url, "a-0", port)
    try:
        while kills < 4:
            await asyncio.sleep(rng.uniform(0.8, 1.6))
            if await drained(r):
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            proc = spawn(redis_only_url, "a-0", port)
        async with asyncio.timeout(90):
            while not await drained(r):
                await asyncio.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert kills >= 2
    ids = Counter(a["alert_id"] for a in await anomalies(r))
    assert ids and max(ids.values()) == 1  # no duplicate alert_id in wd:anomalies:v1
    assert expected_faults(data) <= set(ids)  # every out-of-range reading was scored
    assert await r.xlen(keys.DEAD) == 0
    await r.aclose()
