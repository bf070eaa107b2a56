"""The ingest crew in-process against a real Mosquitto and Redis/Valkey: storage, quarantine, dedupe, rate limit,
outages and backpressure."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import orjson
import redis
from prometheus_client import REGISTRY

from handoff import keys
from handoff.models import QuarantineEntry, ReadingsEntry
from handoff.settings import MqttEndpoint
from ingest.crew import IngestConfig, IngestCrew
from tests.ingest.corpus import malformed_corpus, reading, valid_cases
from tests.ingest.mqtt_tools import publish, quarantined, stored_readings
from waterdoctor.embedded import MosquittoBroker, RedisServer


@contextlib.asynccontextmanager
async def running(redis_url: str, mqtt_url: str, **overrides: Any) -> AsyncIterator[IngestCrew]:
    options: dict[str, Any] = {"client_id": "test-ingest", "pressure_check_s": 0.1, **overrides}
    crew = IngestCrew(IngestConfig(redis_url=redis_url, mqtt=MqttEndpoint.parse(mqtt_url), **options))
    stop = asyncio.Event()
    task = asyncio.create_task(crew.run(stop))
    try:
        await asyncio.wait_for(crew.ready.wait(), 15)
        yield crew
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def wait_for(predicate: Any, timeout: float = 15.0, what: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached in {timeout}s" + (f": {what()}" if what else ""))
        await asyncio.sleep(0.05)


def _xlen(url: str, key: str) -> int:
    r = redis.Redis.from_url(url)
    try:
        return int(r.xlen(key))
    finally:
        r.close()


def _metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def _single(sensor: str, seq: int, now_ms: int, site: str = "p1", **over: Any) -> tuple[str, bytes]:
    return f"wd/{site}/{sensor}/telemetry", orjson.dumps(reading(sensor, seq, now_ms, site=site, **over))


async def test_valid_readings_and_batches_land_normalized(redis_url: str, mosquitto: MosquittoBroker) -> None:
    now = int(time.time() * 1000)
    cases = valid_cases(now)
    async with running(redis_url, mosquitto.url) as crew:
        await asyncio.to_thread(publish, mosquitto.url, [(c.topic, c.payload) for c in cases])
        await wait_for(lambda: len(stored_readings(redis_url)) == 103)
        await wait_for(lambda: crew.stats.acked == len(cases))  # acknowledged right after the write
    r = redis.Redis.from_url(redis_url)
    entries = r.xrange(keys.READINGS)
    r.close()
    assert len(entries) == len(cases)  # one entry per accepted MQTT message
    by_sensor = {}
    for _, fields in entries:
        entry = ReadingsEntry.model_validate_json(fields[b"payload"])
        for x in entry.readings:
            by_sensor[x.sensor_id] = x
            assert set(orjson.loads(fields[b"payload"])["readings"][0]) == {
                "site",
                "sensor_id",
                "seq",
                "ts_ms",
                "received_ms",
                "metrics",
            }
    assert by_sensor["v2"].metrics == {"ph": 7.0}  # integer metric as a number, unknown keys dropped
    assert abs(by_sensor["v1"].ts_ms - (now - 1500)) <= 1  # RFC 3339 to epoch ms
    assert by_sensor["v0"].ts_ms == now - 1000
    for x in by_sensor.values():
        assert x.site == "p1" and 0 <= x.received_ms - x.ts_ms < 60_000
    assert _xlen(redis_url, keys.QUARANTINE) == 0


async def test_a_gateway_batch_is_written_at_once_while_single_readings_linger(
    redis_url: str, mosquitto: MosquittoBroker
) -> None:
    now = int(time.time() * 1000)
    batch = orjson.dumps(
        {"gateway_id": "gw-1", "readings": [reading(f"v{i}", 1, now, site="p1") for i in range(100)]}
    )
    assert len(batch) >= 8 * 1024  # IngestConfig.flush_bytes
    # flush_ms far above the test's waits: a lingering message shows as "not stored yet".
    async with running(redis_url, mosquitto.url, flush_ms=3000.0) as crew:
        await asyncio.to_thread(publish, mosquitto.url, [_single("s1", 1, now)])
        await wait_for(lambda: crew.stats.flushes == 1)  # idle: written at once
        started = time.monotonic()
        await asyncio.to_thread(publish, mosquitto.url, [_single("s1", 2, now)])
        await asyncio.sleep(0.3)
        # Busy (the last flush began under flush_ms ago): the single reading waits for company.
        assert len(stored_readings(redis_url)) == 1
        await asyncio.to_thread(publish, mosquitto.url, [("wd/p1/gw-1/batch", batch)])
        # A gateway batch fills a flush by itself: written at once, with the reading held before it.
        await wait_for(lambda: len(stored_readings(redis_url)) == 102, timeout=10)
        assert time.monotonic() - started < 2.0 < crew.config.flush_ms / 1000
        await wait_for(lambda: crew.stats.readings == 102)
        assert crew.stats.flushes == 2  # one flush carried both


async def test_every_malformed_input_is_quarantined_and_ingest_keeps_going(
    redis_url: str, mosquitto: MosquittoBroker
) -> None:
    now = int(time.time() * 1000)
    corpus = malformed_corpus(now)
    expected_q = sum(len(c.reasons) for c in corpus)
    before = _metric("wd_quarantined_total", {"reason": "non_finite"})
    async with running(redis_url, mosquitto.url) as crew:
        await asyncio.to_thread(publish, mosquitto.url, [(c.topic, c.payload) for c in corpus])
        # A valid reading after the whole corpus: stored, so nothing before it broke the crew.
        await asyncio.to_thread(publish, mosquitto.url, [_single("after", 1, now)])
        await wait_for(
            lambda: (
                _xlen(redis_url, keys.QUARANTINE) >= expected_q
                and any(x["sensor_id"] == "after" for x in stored_readings(redis_url))
            )
        )
        await wait_for(lambda: crew.stats.acked == len(corpus) + 1)
    got: dict[str, list[str]] = defaultdict(list)
    for q in quarantined(redis_url):
        entry = QuarantineEntry.model_validate(q)
        assert len(base64.b64decode(entry.raw_b64)) <= 4096
        assert entry.received_ms >= now - 1000
        got[entry.topic].append(entry.reason)
    for case in corpus:
        assert sorted(got[case.topic]) == case.reasons, case.name
    stored = stored_readings(redis_url)
    assert sorted(x["sensor_id"] for x in stored) == ["after", "b0", "b1", "b2"]
    assert len(quarantined(redis_url)) == expected_q
    assert _metric("wd_quarantined_total", {"reason": "non_finite"}) - before == sum(
        c.reasons.count("non_finite") for c in corpus
    )


async def test_duplicates_are_stored_once_and_counted(redis_url: str, mosquitto: MosquittoBroker) -> None:
    now = int(time.time() * 1000)
    batch = {"gateway_id": "gw", "readings": [reading("a", s, now) for s in (1, 2, 3)]}
    before = _metric("wd_ingest_duplicates_total")
    async with running(redis_url, mosquitto.url) as crew:
        msgs = [_single("a", 1, now)] * 3 + [("wd/p1/gw/batch", orjson.dumps(batch))] * 2
        await asyncio.to_thread(publish, mosquitto.url, msgs)
        await wait_for(lambda: crew.stats.acked == 5)
    assert sorted(x["seq"] for x in stored_readings(redis_url)) == [1, 2, 3]
    assert crew.stats.duplicates == 2 + 1 + 3
    assert _metric("wd_ingest_duplicates_total") - before == 6


async def test_a_flooding_device_is_limited_without_starving_others(
    redis_only_url: str, mosquitto: MosquittoBroker
) -> None:
    now = int(time.time() * 1000)
    flood = [_single("flood", s, now) for s in range(200)]
    calm = [_single(f"calm{i}", 1, now) for i in range(30)]
    mixed = [m for pair in zip(flood[:30], calm, strict=True) for m in pair] + flood[30:]
    async with running(redis_only_url, mosquitto.url, device_rate=5.0, device_burst=10.0) as crew:
        await asyncio.to_thread(publish, mosquitto.url, mixed)
        await wait_for(lambda: crew.stats.acked == len(mixed))  # dropped readings are acknowledged too
    stored = stored_readings(redis_only_url)
    assert sum(1 for x in stored if x["sensor_id"].startswith("calm")) == 30
    flooded = sum(1 for x in stored if x["sensor_id"] == "flood")
    assert 10 <= flooded <= 10 + 5 * 15  # the burst, plus at most the rate over the test
    assert crew.stats.rate_limited == 200 - flooded
    samples = [q for q in quarantined(redis_only_url) if q["reason"] == "rate_limited"]
    assert 1 <= len(samples) <= 3  # one sample per device per 10 s, not one per dropped reading
    assert orjson.loads(base64.b64decode(samples[0]["raw_b64"]))["sensor_id"] == "flood"


async def test_redis_outage_holds_acknowledgements_and_loses_nothing(
    private_redis: RedisServer, mosquitto: MosquittoBroker
) -> None:
    now = int(time.time() * 1000)
    url = private_redis.url
    async with running(url, mosquitto.url, receive_maximum=100) as crew:
        await asyncio.to_thread(publish, mosquitto.url, [_single(f"s{i % 10}", i, now) for i in range(200)])
        await wait_for(lambda: crew.stats.acked == 200)
        private_redis.kill()
        await asyncio.to_thread(
            publish, mosquitto.url, [_single(f"s{i % 10}", i, now) for i in range(200, 500)]
        )
        cpu = time.process_time()
        await asyncio.sleep(1.5)
        assert time.process_time() - cpu < 0.5  # backing off, not spinning
        assert crew.stats.acked == 200  # nothing acknowledged while Redis is down
        assert crew.intake is not None and crew.intake.held() <= 100  # the broker keeps the rest
        assert crew.stats.redis_errors >= 1
        private_redis.start()
        await wait_for(lambda: len(stored_readings(url)) >= 500, timeout=30)
        await wait_for(lambda: crew.stats.acked >= 500, timeout=10)
    seqs = [x["seq"] for x in stored_readings(url)]
    assert sorted(seqs) == list(range(500))


async def test_broker_restart_loses_no_acknowledged_reading(redis_only_url: str, tmp_path: Any) -> None:
    now = int(time.time() * 1000)
    broker = MosquittoBroker(data_dir=tmp_path / "mosq").start()
    try:
        async with running(redis_only_url, broker.url) as crew:
            await asyncio.to_thread(publish, broker.url, [_single("s", i, now) for i in range(300)])
            broker.stop()
            await wait_for(lambda: crew.intake is not None and not crew.intake.connected, timeout=10)
            broker.start()
            await wait_for(lambda: crew.intake is not None and crew.intake.connected, timeout=20)
            await asyncio.to_thread(publish, broker.url, [_single("s", i, now) for i in range(300, 600)])
            await wait_for(
                lambda: len(stored_readings(redis_only_url)) >= 600,
                timeout=30,
                what=lambda: (
                    sorted(set(range(600)) - {x["seq"] for x in stored_readings(redis_only_url)})[:20],
                    crew.stats,
                    crew.intake and (crew.intake.connected, crew.intake.held()),
                ),
            )
    finally:
        broker.close()
    assert sorted(x["seq"] for x in stored_readings(redis_only_url)) == list(range(600))


async def test_backpressure_on_analytics_lag_holds_then_resumes(
    redis_only_url: str, mosquitto: MosquittoBroker
) -> None:
    now = int(time.time() * 1000)
    r = redis.Redis.from_url(redis_only_url)
    r.xgroup_create(keys.READINGS, keys.GROUP_ANALYTICS, id="0", mkstream=True)
    try:
        async with running(
            redis_only_url, mosquitto.url, max_lag=20, batch_size=10, receive_maximum=10
        ) as crew:
            # Publish more than the bound, in small steps so the pressure check sees the lag grow.
            for start in range(0, 60, 10):
                await asyncio.to_thread(
                    publish, mosquitto.url, [_single("s", i, now) for i in range(start, start + 10)]
                )
            await wait_for(lambda: crew.backpressure, timeout=10)
            assert _metric("wd_ingest_backpressure") == 1
            held_at = r.xlen(keys.READINGS)
            await asyncio.to_thread(publish, mosquitto.url, [_single("s", i, now) for i in range(60, 200)])
            await asyncio.sleep(1.0)
            assert r.xlen(keys.READINGS) == held_at  # intake holds: the rest waits at the broker
            assert held_at < 200
            # analytics catches up: everything delivered to the group
            r.xreadgroup(keys.GROUP_ANALYTICS, "a1", {keys.READINGS: ">"}, count=10_000)
            await wait_for(lambda: len(stored_readings(redis_only_url)) == 200, timeout=20)
    finally:
        r.close()
    assert sorted(x["seq"] for x in stored_readings(redis_only_url)) == list(range(200))


async def test_backpressure_on_redis_memory(redis_only_url: str, mosquitto: MosquittoBroker) -> None:
    now = int(time.time() * 1000)
    r = redis.Redis.from_url(redis_only_url)
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", str(int(used * 1.02)))
    try:
        async with running(redis_only_url, mosquitto.url) as crew:
            await wait_for(lambda: crew.backpressure, timeout=5)
            assert _metric("wd_ingest_backpressure") == 1
            await asyncio.to_thread(publish, mosquitto.url, [_single("s", i, now) for i in range(50)])
            await asyncio.sleep(0.5)
            assert r.xlen(keys.READINGS) == 0
            r.config_set("maxmemory", "0")
            await wait_for(lambda: not crew.backpressure, timeout=5)
            await wait_for(lambda: len(stored_readings(redis_only_url)) == 50)
            assert _metric("wd_ingest_backpressure") == 0
    finally:
        r.config_set("maxmemory", "0")
        r.close()


async def test_starts_before_the_broker_and_connects_when_it_is_up(
    redis_only_url: str, tmp_path: Any
) -> None:
    now = int(time.time() * 1000)
    broker = MosquittoBroker(data_dir=tmp_path / "mosq")  # port chosen, nothing listening yet
    crew = IngestCrew(
        IngestConfig(redis_url=redis_only_url, mqtt=MqttEndpoint.parse(broker.url), client_id="early")
    )
    stop = asyncio.Event()
    task = asyncio.create_task(crew.run(stop))
    try:
        await asyncio.sleep(1.0)
        assert not task.done() and crew.intake is not None and not crew.intake.connected
        broker.start()
        await asyncio.wait_for(crew.ready.wait(), 20)
        await asyncio.to_thread(publish, broker.url, [_single("s", 1, now)])
        await wait_for(lambda: len(stored_readings(redis_only_url)) == 1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        broker.close()
