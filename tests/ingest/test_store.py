"""The dedupe-and-append script and quarantine writes, on Redis 7.0 and Valkey 8."""

from __future__ import annotations

import base64
import random
import time

import orjson
import pytest
import redis.asyncio as aredis

from handoff import keys
from handoff.models import QuarantineEntry, ReadingsEntry
from ingest.store import MessageWrite, Quarantine, ReadingStore, StoreError, seen_key
from ingest.validate import Reading

NOW_MS = int(time.time() * 1000)


def _reading(seq: int, sensor: str = "s1", site: str = "p1") -> Reading:
    body = {
        "site": site,
        "sensor_id": sensor,
        "seq": seq,
        "ts_ms": NOW_MS,
        "received_ms": NOW_MS,
        "metrics": {"ph": 7.0},
    }
    return Reading(site, sensor, seq, NOW_MS, orjson.dumps(body))


def _msg(*readings: Reading) -> MessageWrite:
    return MessageWrite("wd/p1/gw/batch", NOW_MS, list(readings))


async def _stored(r: aredis.Redis) -> list[tuple[str, str, int]]:
    out = []
    for _, fields in await r.xrange(keys.READINGS):
        entry = ReadingsEntry.model_validate_json(fields[keys.PAYLOAD_FIELD.encode()])
        out += [(x.site, x.sensor_id, x.seq) for x in entry.readings]
    return out


class _Model:
    """Reference semantics of the dedupe state: a set of stored seqs per sensor and a window below the maximum."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.seen: dict[str, set[int]] = {}

    def classify(self, sensor: str, seq: int) -> str:
        seen = self.seen.setdefault(sensor, set())
        if not seen or seq > max(seen):
            seen.add(seq)
            return "new"
        if seq == max(seen):
            return "dup"
        if max(seen) - seq >= self.window:
            return "stale"
        if seq in seen:
            return "dup"
        seen.add(seq)
        return "new"


async def test_new_duplicate_and_stale_readings(r: aredis.Redis) -> None:
    store = ReadingStore(r, window=64)
    first = _msg(*[_reading(s) for s in (1, 2, 3)])
    await store.write([first], [])
    assert (first.stored, first.duplicates, first.stale) == (3, 0, [])
    assert first.entry_id is not None

    again = _msg(*[_reading(s) for s in (2, 3, 4)])
    await store.write([again], [])
    assert (again.stored, again.duplicates) == (1, 2)

    all_dups = _msg(_reading(1), _reading(4))
    await store.write([all_dups], [])
    assert (all_dups.stored, all_dups.duplicates, all_dups.entry_id) == (0, 2, None)

    jump = _msg(_reading(200), _reading(136), _reading(137))  # window is (136, 200]
    await store.write([jump], [])
    assert (jump.stored, [x.seq for x in jump.stale]) == (2, [136])

    assert await _stored(r) == [("p1", "s1", s) for s in (1, 2, 3, 4, 200, 137)]
    assert await r.xlen(keys.READINGS) == 3  # one entry per message with new readings
    (entry,) = await r.xrange(keys.QUARANTINE)
    q = QuarantineEntry.model_validate_json(entry[1][b"payload"])
    assert q.reason == "stale_seq" and q.topic == "wd/p1/gw/batch" and q.received_ms == NOW_MS
    assert orjson.loads(base64.b64decode(q.raw_b64))["seq"] == 136
    ttl = await r.pttl(seen_key("p1", "s1"))
    assert 7 * 86_400_000 < ttl <= 8 * 86_400_000


@pytest.mark.parametrize("seed", range(8))
async def test_matches_reference_semantics_on_random_sequences(r: aredis.Redis, seed: int) -> None:
    rng = random.Random(seed)
    window = 64
    store = ReadingStore(r, window=window)
    model = _Model(window)
    # around the edges: doubles (2^53), the 10-digit halves (1e10), the top of the range (2^63-1)
    base = [0, 2**53 - 100, 10**10 - 50, 2**63 - 1 - 400][seed % 4]
    expected: list[tuple[str, str, int]] = []
    for _ in range(30):
        messages = []
        for _ in range(rng.randint(1, 4)):
            readings = []
            for _ in range(rng.randint(1, 12)):
                sensor = rng.choice(["a", "b"])
                seq = base + rng.choice([rng.randint(0, 400), rng.randint(0, 40)])
                readings.append(_reading(seq, sensor))
            messages.append(_msg(*readings))
        await store.write(messages, [])
        for m in messages:
            outcome = [model.classify(x.sensor_id, x.seq) for x in m.readings]
            new = [x for x, o in zip(m.readings, outcome, strict=True) if o == "new"]
            assert m.stored == len(new)
            assert m.duplicates == outcome.count("dup")
            assert [x.seq for x in m.stale] == [
                x.seq for x, o in zip(m.readings, outcome, strict=True) if o == "stale"
            ]
            expected += [(x.site, x.sensor_id, x.seq) for x in new]
    assert await _stored(r) == expected
    assert len(set(expected)) == len(expected)


async def test_sensors_and_sites_are_independent(r: aredis.Redis) -> None:
    store = ReadingStore(r)
    msgs = [_msg(_reading(5, "s1", "p1")), _msg(_reading(5, "s2", "p1")), _msg(_reading(5, "s1", "p2"))]
    await store.write(msgs, [])
    assert [m.stored for m in msgs] == [1, 1, 1]
    assert await r.exists(seen_key("p2", "s1")) == 1
    assert seen_key("p2", "s1") == "wd:_seen:{p2}:s1"


async def test_quarantine_entries_follow_the_contract(r: aredis.Redis) -> None:
    store = ReadingStore(r, quarantine_maxlen=10)
    big = b"x" * 10_000
    pending = [Quarantine("schema", "missing seq", "wd/p1/s1/telemetry", NOW_MS, big) for _ in range(3)]
    await store.write([], pending)
    assert pending == []
    entries = await r.xrange(keys.QUARANTINE)
    assert len(entries) == 3
    q = QuarantineEntry.model_validate_json(entries[0][1][b"payload"])
    assert base64.b64decode(q.raw_b64) == big[:4096]


async def test_script_reloaded_after_script_flush(r: aredis.Redis) -> None:
    store = ReadingStore(r)
    await store.write([_msg(_reading(1))], [])
    await r.script_flush()
    retry = _msg(_reading(2))
    with pytest.raises(StoreError):
        await store.write([retry], [])
    await store.write([retry], [])  # the same objects: resumes
    assert retry.stored == 1
    assert len(await _stored(r)) == 2


async def test_waitaof_detected(redis_url: str) -> None:
    r = aredis.Redis.from_url(redis_url)
    try:
        store = ReadingStore(r, waitaof=True)
        await store.prepare()
        # Neither test server runs with AOF (and Redis 7.0 has no WAITAOF): the store must notice, not fail.
        assert store.waitaof is False
        m = _msg(_reading(1))
        await store.write([m], [])
        assert m.stored == 1
    finally:
        await r.aclose()


async def test_waitaof_used_with_aof() -> None:
    from waterdoctor.embedded import RedisServer

    with RedisServer("valkey", appendonly=True) as server:
        r = aredis.Redis.from_url(server.url)
        try:
            store = ReadingStore(r, waitaof=True)
            await store.prepare()
            assert store.waitaof is True
            m = _msg(_reading(1))
            await store.write([m], [])
            assert m.stored == 1
        finally:
            await r.aclose()
