"""The consumer-group worker on Redis 7.0 and Valkey 8: delivery, atomic commit, recovery, claims, dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import orjson
import pytest
import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError

from handoff import keys
from handoff.models import DeadLetter
from handoff.producer import StreamProducer
from handoff.worker import (
    Ack,
    ConsumerGroupWorker,
    Entry,
    Fail,
    Hold,
    Outcome,
    Publish,
    WorkerConfig,
    XAdd,
)

STREAM = "t:in"
OUT = "t:out"
GROUP = "g"


class Recorder:
    """A handler that copies each entry to OUT atomically with its ack and remembers what it saw."""

    def __init__(self, fail_on: set[int] | None = None, raise_on: set[int] | None = None) -> None:
        self.seen: list[int] = []
        self.fail_on = fail_on or set()
        self.raise_on = raise_on or set()

    async def __call__(self, entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        out: dict[str, Outcome] = {}
        for e in entries:
            n = e.json()["n"]
            if n in self.raise_on:
                raise RuntimeError(f"boom on {n}")
            self.seen.append(n)
            out[e.id] = Fail(f"bad {n}") if n in self.fail_on else Ack([XAdd(OUT, e.payload)])
        return out


async def fill(r: aredis.Redis, n: int, start: int = 0) -> list[str]:
    return await StreamProducer(r, STREAM).add_many([{"n": i} for i in range(start, start + n)])


async def run_until(worker: ConsumerGroupWorker, cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(timeout):
            while not await cond():
                await asyncio.sleep(0.01)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 5)


async def out_ns(r: aredis.Redis) -> list[int]:
    return [orjson.loads(f[b"payload"])["n"] for _, f in await r.xrange(OUT)]


async def pending(r: aredis.Redis) -> int:
    return int((await r.xpending(STREAM, GROUP))["pending"])


async def test_every_entry_handled_once_and_acked(r: aredis.Redis) -> None:
    await fill(r, 1234)
    handler = Recorder()
    worker = ConsumerGroupWorker(r, STREAM, GROUP, handler, config=WorkerConfig(batch_size=100))

    async def done() -> bool:
        return await r.xlen(OUT) == 1234

    await run_until(worker, done)
    assert sorted(await out_ns(r)) == list(range(1234))
    assert await pending(r) == 0
    assert worker.stats.acked == 1234


async def test_restart_drains_own_pending_before_new_entries(r: aredis.Redis) -> None:
    await r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    await fill(r, 5)
    # A previous life of consumer "c1" read five entries and died before acking them.
    await r.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=5)
    await fill(r, 5, start=5)
    handler = Recorder()
    worker = ConsumerGroupWorker(r, STREAM, GROUP, handler, consumer="c1")

    async def done() -> bool:
        return await r.xlen(OUT) == 10

    await run_until(worker, done)
    assert handler.seen == list(range(10))  # pending first, then new, in order
    assert await pending(r) == 0


async def test_commit_is_skipped_for_an_entry_someone_else_already_acked(r: aredis.Redis) -> None:
    await r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ids = await fill(r, 3)
    seen = asyncio.Event()

    async def slow(entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        # While this consumer works, another one (that claimed the entry) commits it first.
        await r.xack(STREAM, GROUP, ids[1])
        seen.set()
        return {e.id: Ack([XAdd(OUT, e.payload)]) for e in entries}

    worker = ConsumerGroupWorker(r, STREAM, GROUP, slow)

    async def done() -> bool:
        return seen.is_set() and await pending(r) == 0

    await run_until(worker, done)
    assert sorted(await out_ns(r)) == [0, 2]  # no second output for the entry committed elsewhere


async def test_stale_entries_of_a_dead_consumer_are_claimed_and_trimmed_ones_dropped(r: aredis.Redis) -> None:
    await r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ids = await fill(r, 20)
    await r.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=20)
    await r.xdel(STREAM, ids[0], ids[1])  # trimmed away while pending
    await asyncio.sleep(0.15)
    handler = Recorder()
    worker = ConsumerGroupWorker(
        r, STREAM, GROUP, handler, consumer="alive", config=WorkerConfig(claim_idle_ms=100, batch_size=7)
    )

    async def done() -> bool:
        return await r.xlen(OUT) == 18 and await pending(r) == 0

    await run_until(worker, done)
    assert sorted(await out_ns(r)) == list(range(2, 20))
    assert worker.stats.claimed == 18
    assert worker.stats.deleted_dropped == 2


async def test_poison_entry_goes_to_dead_letters_and_does_not_block_others(r: aredis.Redis) -> None:
    await fill(r, 10)
    handler = Recorder(raise_on={3}, fail_on={6})
    worker = ConsumerGroupWorker(
        r, STREAM, GROUP, handler, config=WorkerConfig(max_deliveries=3, retry_ms=20)
    )

    async def done() -> bool:
        return await r.xlen(keys.DEAD) == 2

    await run_until(worker, done)
    assert sorted(await out_ns(r)) == [0, 1, 2, 4, 5, 7, 8, 9]
    assert await pending(r) == 0
    dead = [DeadLetter.model_validate_json(f[b"payload"]) for _, f in await r.xrange(keys.DEAD)]
    by_n = {orjson.loads(d.payload)["n"]: d for d in dead}
    assert set(by_n) == {3, 6}
    assert by_n[3].deliveries == 3 and "boom on 3" in by_n[3].error
    assert by_n[6].error == "bad 6" and by_n[6].stream == STREAM and by_n[6].group == GROUP


async def test_permanent_failure_is_dead_lettered_at_once(r: aredis.Redis) -> None:
    await fill(r, 1)

    async def reject(entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        return {e.id: Fail("unparseable", permanent=True) for e in entries}

    worker = ConsumerGroupWorker(r, STREAM, GROUP, reject)

    async def done() -> bool:
        return await r.xlen(keys.DEAD) == 1

    await run_until(worker, done)
    assert worker.stats.dead == 1 and await pending(r) == 0


async def test_held_entries_stay_pending_and_come_back(r: aredis.Redis) -> None:
    await fill(r, 2)
    calls: list[int] = []

    async def hold_first_time(entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        out: dict[str, Outcome] = {}
        for e in entries:
            calls.append(e.json()["n"])
            out[e.id] = (
                Hold("not yet") if calls.count(e.json()["n"]) == 1 else Ack([Publish("ch", e.payload)])
            )
        return out

    worker = ConsumerGroupWorker(r, STREAM, GROUP, hold_first_time, config=WorkerConfig(retry_ms=20))

    async def done() -> bool:
        return len(calls) == 4 and await pending(r) == 0

    await run_until(worker, done)
    assert sorted(calls) == [0, 0, 1, 1]


async def test_worker_survives_a_redis_restart(private_redis) -> None:  # type: ignore[no-untyped-def]
    r = aredis.Redis.from_url(private_redis.url, socket_connect_timeout=1)
    await fill(r, 100)
    handler = Recorder()
    worker = ConsumerGroupWorker(r, STREAM, GROUP, handler, config=WorkerConfig(backoff_cap_s=0.5))
    task = asyncio.create_task(worker.run())
    async with asyncio.timeout(10):
        while await r.xlen(OUT) < 100:
            await asyncio.sleep(0.01)
    private_redis.kill()
    await asyncio.sleep(1.5)
    # Backoff, not a hot loop: a handful of attempts in 1.5 s.
    assert 1 <= worker.stats.reconnects <= 15
    await asyncio.to_thread(private_redis.start)
    r2 = aredis.Redis.from_url(private_redis.url)  # a producer that reconnects after the restart
    await fill(r2, 100, start=100)
    async with asyncio.timeout(15):
        while await r2.xlen(OUT) < 200:
            await asyncio.sleep(0.02)
    worker.stop()
    await asyncio.wait_for(task, 5)
    assert sorted(set(await out_ns(r2))) == list(range(200))
    await r.aclose()
    await r2.aclose()


async def test_stop_finishes_the_batch_in_hand(r: aredis.Redis) -> None:
    await fill(r, 50)
    started = asyncio.Event()
    worker: ConsumerGroupWorker

    async def slow(entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        started.set()
        worker.stop()  # a stop arrives mid-batch
        await asyncio.sleep(0.1)
        return {e.id: Ack([XAdd(OUT, e.payload)]) for e in entries}

    worker = ConsumerGroupWorker(r, STREAM, GROUP, slow, config=WorkerConfig(batch_size=20))
    await asyncio.wait_for(worker.run(), 5)
    assert started.is_set()
    assert await r.xlen(OUT) == 20  # the batch in hand was committed, nothing after it was read
    assert await pending(r) == 0
    info = await r.xinfo_groups(STREAM)
    assert info[0]["entries-read"] == 20


async def test_a_batch_is_handled_and_committed_in_chunks_oldest_first(r: aredis.Redis) -> None:
    # Payloads of ~1 KiB; chunks of at most 3 KiB: a read of 20 entries goes out as 7 commits.
    await StreamProducer(r, STREAM).add_many([{"n": i, "pad": "x" * 1000} for i in range(20)])
    calls: list[list[int]] = []
    acked_before: list[int] = []
    worker: ConsumerGroupWorker

    async def handler(entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        # No await in here: what the worker has seen acknowledged when a chunk starts is exact.
        acked_before.append(worker.stats.acked)
        calls.append([e.json()["n"] for e in entries])
        return {e.id: Ack([XAdd(OUT, e.payload)]) for e in entries}

    worker = ConsumerGroupWorker(
        r, STREAM, GROUP, handler, config=WorkerConfig(batch_size=20, chunk_bytes=3 * 1024)
    )

    async def done() -> bool:
        return await r.xlen(OUT) == 20

    await run_until(worker, done)
    assert [n for c in calls for n in c] == list(range(20))  # in order, each once
    assert [len(c) for c in calls] == [3, 3, 3, 3, 3, 3, 2]
    # Chunk k is handled once every chunk before k - 1 is acknowledged; the commit of chunk k - 1 may still be
    # in flight (it was sent first; its reply is read after). Never two commits in flight; they land in order.
    assert acked_before[0] == 0
    assert all(3 * (k - 1) <= acked_before[k] <= 3 * k for k in range(1, 7)), acked_before
    assert await out_ns(r) == list(range(20))
    assert await pending(r) == 0


@pytest.mark.parametrize(
    ("chunk_max_kb", "sizes"), [(12, [3, 6, 11]), (6, [3, 6, 6, 5]), (2, [3, 3, 3, 3, 3, 3, 2])]
)
async def test_each_further_chunk_may_double_up_to_the_maximum(
    r: aredis.Redis, chunk_max_kb: int, sizes: list[int]
) -> None:
    # Payloads of ~1 KiB; the first chunk at most 3 KiB, then 6, 12...: the oldest entries still go out first, in a
    # small chunk, and the rest of the backlog in a few calls. A maximum below the first size changes nothing.
    await StreamProducer(r, STREAM).add_many([{"n": i, "pad": "x" * 1000} for i in range(20)])
    calls: list[list[int]] = []

    async def handler(entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        calls.append([e.json()["n"] for e in entries])
        return {e.id: Ack([XAdd(OUT, e.payload)]) for e in entries}

    config = WorkerConfig(batch_size=20, chunk_bytes=3 * 1024, chunk_bytes_max=chunk_max_kb * 1024)
    worker = ConsumerGroupWorker(r, STREAM, GROUP, handler, config=config)

    async def done() -> bool:
        return await r.xlen(OUT) == 20

    await run_until(worker, done)
    assert [len(c) for c in calls] == sizes
    assert [n for c in calls for n in c] == list(range(20))
    assert await out_ns(r) == list(range(20))
    assert await pending(r) == 0


async def test_an_entry_larger_than_a_chunk_is_handled_alone(r: aredis.Redis) -> None:
    await StreamProducer(r, STREAM).add_many([{"n": 0}, {"n": 1, "pad": "x" * 5000}, {"n": 2}, {"n": 3}])
    calls: list[list[int]] = []

    async def handler(entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        calls.append([e.json()["n"] for e in entries])
        return {e.id: Ack([XAdd(OUT, e.payload)]) for e in entries}

    worker = ConsumerGroupWorker(
        r, STREAM, GROUP, handler, config=WorkerConfig(batch_size=10, chunk_bytes=1024)
    )

    async def done() -> bool:
        return await r.xlen(OUT) == 4

    await run_until(worker, done)
    assert calls == [[0], [1], [2, 3]]


async def test_a_redis_error_mid_batch_keeps_the_committed_chunks_and_redelivers_the_rest(
    r: aredis.Redis,
) -> None:
    await StreamProducer(r, STREAM).add_many([{"n": i, "pad": "x" * 1000} for i in range(9)])
    seen: list[int] = []
    failed = False

    async def handler(entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        nonlocal failed
        ns = [e.json()["n"] for e in entries]
        if ns[0] == 3 and not failed:
            failed = True
            raise RedisConnectionError("lost Redis mid-batch")
        seen.extend(ns)
        return {e.id: Ack([XAdd(OUT, e.payload)]) for e in entries}

    worker = ConsumerGroupWorker(
        r,
        STREAM,
        GROUP,
        handler,
        config=WorkerConfig(batch_size=9, chunk_bytes=3 * 1024, backoff_base_s=0.01, backoff_cap_s=0.02),
    )

    async def done() -> bool:
        return await r.xlen(OUT) == 9 and await pending(r) == 0

    await run_until(worker, done)
    assert failed
    assert seen == list(range(9))  # the first chunk once; the rest (left pending) re-drained, in order
    assert sorted(await out_ns(r)) == list(range(9))


@pytest.mark.parametrize("approx", [True, False])
async def test_producer_trims_by_age(r: aredis.Redis, approx: bool) -> None:
    import time

    now = int(time.time() * 1000)
    for age_s in (100, 50, 5):
        await r.xadd(STREAM, {"payload": b"{}"}, id=f"{now - age_s * 1000}-0")
    producer = StreamProducer(r, STREAM, max_age_ms=30_000, approx=approx)
    await producer.add({"n": 1})
    length = await r.xlen(STREAM)
    if approx:
        assert 2 <= length <= 4  # approximate trimming never removes more than asked
    else:
        assert length == 2


async def test_producer_refuses_oversized_payloads(r: aredis.Redis) -> None:
    from handoff.errors import PayloadTooLarge

    producer = StreamProducer(r, STREAM)
    with pytest.raises(PayloadTooLarge, match="store_blob"):
        await producer.add({"blob": "x" * 600_000})
    assert await r.xlen(STREAM) == 0


class FlakyRedisHandler(Recorder):
    """Raises a Redis error the first ``times`` calls (as a handler's own Redis call would), then works."""

    def __init__(self, exc: Exception, times: int) -> None:
        super().__init__()
        self.exc, self.times = exc, times

    async def __call__(self, entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        if self.times > 0:
            self.times -= 1
            raise self.exc
        return await super().__call__(entries)


async def test_a_handler_losing_redis_is_retried_not_failed(r: aredis.Redis) -> None:
    await fill(r, 5)
    handler = FlakyRedisHandler(RedisConnectionError("connection reset"), times=3)
    worker = ConsumerGroupWorker(
        r, STREAM, GROUP, handler, config=WorkerConfig(max_deliveries=2, backoff_base_s=0.01, retry_ms=20)
    )

    async def done() -> bool:
        return len(await out_ns(r)) == 5

    await run_until(worker, done)
    assert sorted(await out_ns(r)) == list(range(5))
    assert (
        await r.xlen(keys.DEAD) == 0
    )  # three failed attempts with max_deliveries=2, yet nothing dead-lettered


async def test_a_permission_error_in_the_handler_stops_the_worker_and_dead_letters_nothing(
    r: aredis.Redis,
) -> None:
    await fill(r, 3)
    handler = FlakyRedisHandler(NoPermissionError("NOPERM this user has no permissions"), times=100)
    worker = ConsumerGroupWorker(r, STREAM, GROUP, handler, config=WorkerConfig(max_deliveries=1))
    with pytest.raises(NoPermissionError):
        await asyncio.wait_for(worker.run(), 10)
    assert await r.xlen(keys.DEAD) == 0
    assert await pending(r) == 3  # still owed: handled once the deployment is fixed
