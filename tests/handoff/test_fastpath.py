"""The hand-off fast paths (pre-packed commands, batched scripts) on Redis 7.0 and Valkey 8: same results as the
plain redis-py calls, whatever the client's settings, and recovery when the server forgets the scripts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
import pytest
import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from handoff import producer as producer_mod
from handoff._wire import RawRedis
from handoff.errors import PayloadTooLarge
from handoff.producer import StreamProducer
from handoff.worker import Ack, Command, ConsumerGroupWorker, Entry, Outcome, Publish, WorkerConfig, XAdd

STREAM = "t:in"


async def test_add_many_returns_ids_in_order_across_chunks(r: aredis.Redis) -> None:
    payloads = [{"n": i} for i in range(producer_mod.CHUNK_ENTRIES * 2 + 7)]
    ids = await StreamProducer(r, STREAM).add_many(payloads)
    rows = await r.xrange(STREAM)
    assert ids == [i.decode() for i, _ in rows]
    assert [orjson.loads(f[b"payload"])["n"] for _, f in rows] == list(range(len(payloads)))
    assert all(list(f) == [b"payload"] for _, f in rows)


async def test_add_many_splits_by_bytes_and_keeps_a_single_large_entry(
    r: aredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(producer_mod, "CHUNK_BYTES", 1000)
    big = b"x" * 5000  # larger than a chunk on its own: still added, alone in its call
    payloads = [b"a" * 400, b"b" * 400, b"c" * 400, big, b"d" * 10]
    calls: list[int] = []
    real_evalsha = RawRedis.evalsha

    async def counting(self: RawRedis, script: Any, keys: Any, chunks: Any, **kw: Any) -> list[Any]:
        calls.extend(len(c) - 2 for c in chunks)  # minus the trim count and the field name
        return await real_evalsha(self, script, keys, chunks, **kw)

    monkeypatch.setattr(RawRedis, "evalsha", counting)
    ids = await StreamProducer(r, STREAM).add_many(payloads)
    assert calls == [2, 1, 1, 1]  # 800 bytes, then 400 (a third would pass 1000), the big one alone, the rest
    assert len(ids) == 5
    assert [f[b"payload"] for _, f in await r.xrange(STREAM)] == payloads


async def test_add_many_refuses_an_oversized_payload_before_writing_anything(r: aredis.Redis) -> None:
    producer = StreamProducer(r, STREAM, limit=100)
    with pytest.raises(PayloadTooLarge):
        await producer.add_many([b"{}", b"x" * 101])
    assert await r.xlen(STREAM) == 0


async def test_add_many_reloads_the_script_after_a_script_flush(r: aredis.Redis) -> None:
    producer = StreamProducer(r, STREAM)
    await producer.add_many([b"1", b"2"])
    await r.script_flush()
    assert len(await producer.add_many([b"3", b"4"])) == 2
    assert await r.xlen(STREAM) == 4


async def test_add_many_trims_by_maxlen(r: aredis.Redis) -> None:
    producer = StreamProducer(r, STREAM, maxlen=10, approx=False)
    await producer.add_many([b"{}"] * 50)
    assert await r.xlen(STREAM) == 10


@pytest.mark.parametrize(
    "options",
    [{"decode_responses": True}, {"single_connection_client": True}, {"protocol": 3}],
    ids=["decode_responses", "single_connection", "resp3"],
)
async def test_producer_works_with_any_client_settings(redis_url: str, options: dict[str, object]) -> None:
    client = aredis.Redis.from_url(redis_url, **options)  # type: ignore[arg-type]
    try:
        producer = StreamProducer(client, STREAM)
        ids = await producer.add_many([{"n": 1}, {"n": 2}])
        one = await producer.add({"n": 3})
        assert all(isinstance(i, str) for i in [*ids, one])
        assert [*ids, one] == [
            i if isinstance(i, str) else i.decode() for i, _ in await client.xrange(STREAM)
        ]
    finally:
        await client.aclose()


async def test_raw_calls_keep_the_connection_in_step_after_an_error_reply(r: aredis.Redis) -> None:
    raw = RawRedis(r)
    await r.set("s", "v")
    replies = await raw.call(
        raw.pack(("XADD", "s", "*", "f", "v")),  # WRONGTYPE
        raw.pack(("GET", "s")),
        raise_on_error=False,
    )
    assert "WRONGTYPE" in str(replies[0])
    assert replies[1] == b"v"
    assert await r.get("s") == b"v"  # the pooled connection still answers in order
    assert (await raw.call(raw.pack(("PING",))))[0] in (True, b"PONG")


async def test_raw_pack_falls_back_to_redis_py_for_arguments_hiredis_refuses(r: aredis.Redis) -> None:
    raw = RawRedis(r)
    await raw.call(raw.pack(("SET", "k", memoryview(b"abc"))))
    assert await r.get("k") == b"abc"
    from redis.exceptions import DataError

    with pytest.raises(DataError):
        raw.pack(("SET", "k", True))


# --- the worker's commit and read paths ---------------------------------------------------------------------------

OUT = "t:out"
GROUP = "g"


async def _run_until(
    worker: ConsumerGroupWorker, cond: Callable[[], Awaitable[bool]], timeout: float = 10
) -> None:
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(timeout):
            while not await cond():
                await asyncio.sleep(0.01)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 5)


async def test_commit_of_mixed_outcomes_and_shapes_writes_each_op_once_in_order(r: aredis.Redis) -> None:
    ids = await StreamProducer(r, STREAM).add_many([{"n": i} for i in range(60)])

    async def handler(entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        out: dict[str, Outcome] = {}
        for e in entries:
            n = e.json()["n"]
            if n % 5 == 0:
                continue  # plain ack, no writes
            if n % 5 == 1:
                out[e.id] = Ack([XAdd(OUT, e.payload)])
            elif n % 5 == 2:
                out[e.id] = Ack([XAdd(OUT, e.payload, max_age_ms=3_600_000), Publish("ch", e.payload)])
            elif n % 5 == 3:
                out[e.id] = Ack([Command(("HSET", "h", f"n{n}", n)), XAdd("t:other", e.payload, maxlen=1000)])
            else:
                # An unhashable argument in the command's prefix gets a template of its own.
                out[e.id] = Ack([Command(("HSET", "h", bytearray(b"b%d" % n), e.payload))])
        return out

    worker = ConsumerGroupWorker(r, STREAM, GROUP, handler, config=WorkerConfig(batch_size=25))

    async def done() -> bool:
        return worker.stats.acked == 60

    await _run_until(worker, done)
    out = [orjson.loads(f[b"payload"])["n"] for _, f in await r.xrange(OUT)]
    assert out == [n for n in range(60) if n % 5 in (1, 2)]
    assert [orjson.loads(f[b"payload"])["n"] for _, f in await r.xrange("t:other")] == list(range(3, 60, 5))
    h = await r.hgetall("h")
    assert {k: v for k, v in h.items() if k.startswith(b"n")} == {
        f"n{n}".encode(): str(n).encode() for n in range(3, 60, 5)
    }
    assert {k for k in h if k.startswith(b"b")} == {b"b%d" % n for n in range(4, 60, 5)}
    assert int((await r.xpending(STREAM, GROUP))["pending"]) == 0
    assert len(ids) == 60


@pytest.mark.parametrize(
    "options",
    [{"decode_responses": True}, {"protocol": 2}, {"protocol": 3}, {"single_connection_client": True}],
    ids=["decode_responses", "resp2", "resp3", "single_connection"],
)
async def test_worker_reads_and_commits_with_any_client_settings(
    redis_url: str, options: dict[str, object]
) -> None:
    client = aredis.Redis.from_url(redis_url, **options)  # type: ignore[arg-type]
    seen: list[Entry] = []

    async def handler(entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        seen.extend(entries)
        return {e.id: Ack([XAdd(OUT, e.payload)]) for e in entries if e.json()["n"] % 2}

    try:
        await StreamProducer(client, STREAM).add_many([{"n": i} for i in range(30)])
        worker = ConsumerGroupWorker(client, STREAM, GROUP, handler, config=WorkerConfig(batch_size=7))

        async def done() -> bool:
            return worker.stats.acked == 30

        await _run_until(worker, done)
        assert [e.json()["n"] for e in seen] == list(range(30))
        assert all(isinstance(e.id, str) and e.deliveries == 1 for e in seen)
        want = str if options.get("decode_responses") else bytes
        assert all(type(e.payload) is want for e in seen)  # as the client hands values over
        assert await client.xlen(OUT) == 15
    finally:
        await client.aclose()


async def test_commit_reloads_its_script_after_a_script_flush(r: aredis.Redis) -> None:
    producer = StreamProducer(r, STREAM)
    await producer.add_many([{"n": 0}])
    flushed = False

    async def handler(entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        nonlocal flushed
        if not flushed:
            await r.script_flush()
            flushed = True
        return {e.id: Ack([XAdd(OUT, e.payload)]) for e in entries}

    worker = ConsumerGroupWorker(r, STREAM, GROUP, handler)

    async def done() -> bool:
        if worker.stats.acked == 1:
            await r.script_flush()
            await producer.add_many([{"n": 1}])
        return worker.stats.acked == 2

    await _run_until(worker, done)
    assert await r.xlen(OUT) == 2


async def test_batch_read_with_the_last_commit_is_handled_before_stopping(r: aredis.Redis) -> None:
    await StreamProducer(r, STREAM).add_many([{"n": i} for i in range(30)])
    batches: list[int] = []
    worker: ConsumerGroupWorker

    async def handler(entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        batches.append(len(entries))
        if len(batches) == 1:
            # The stop lands while the commit (and the read of the next batch riding with it) is in flight.
            asyncio.get_running_loop().call_soon(worker.stop)
        return {e.id: Ack([XAdd(OUT, e.payload)]) for e in entries}

    worker = ConsumerGroupWorker(r, STREAM, GROUP, handler, config=WorkerConfig(batch_size=10))
    await asyncio.wait_for(worker.run(), 5)
    assert batches == [10, 10]  # the batch already read was handled, nothing after it was read
    assert await r.xlen(OUT) == 20
    assert int((await r.xpending(STREAM, GROUP))["pending"]) == 0
    assert (await r.xinfo_groups(STREAM))[0]["entries-read"] == 20


@pytest.mark.parametrize("client_retries", [0, 3], ids=["error_reaches_worker", "client_retries"])
async def test_entries_of_a_read_whose_reply_was_lost_are_handled_without_waiting_for_a_claim(
    redis_url: str, client_retries: int
) -> None:
    # With retries the client sends the read again and the first delivery is stranded in the pending list; without,
    # the error reaches the worker. Either way the worker must collect the entries now, not after claim_idle_ms.
    client = aredis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), client_retries))
    await StreamProducer(client, STREAM).add_many([{"n": i} for i in range(20)])
    seen: list[int] = []

    async def handler(entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        seen.extend(e.json()["n"] for e in entries)
        return {}

    worker = ConsumerGroupWorker(
        client,
        STREAM,
        GROUP,
        handler,
        config=WorkerConfig(batch_size=5, claim_idle_ms=600_000, backoff_base_s=0.01),
    )
    real_send_read = worker._raw._send_read
    lost = 0

    async def lossy_send_read(conn: Any, packed: Sequence[Any], on_sent: Any = None) -> list[Any]:
        nonlocal lost
        replies = await real_send_read(conn, packed, on_sent)
        if lost < 2 and any(b">" in (p if isinstance(p, bytes) else b"".join(p))[-8:] for p in packed):
            lost += 1  # the server delivered the entries, the reply never arrived
            raise RedisConnectionError("connection lost while reading the reply")
        return replies

    worker._raw._send_read = lossy_send_read  # type: ignore[method-assign]

    async def done() -> bool:
        return worker.stats.acked == 20

    try:
        await _run_until(worker, done, timeout=5)
    finally:
        await client.aclose()
    assert lost == 2
    assert sorted(seen) == list(range(20))
    assert worker.stats.reconnects == (2 if client_retries == 0 else 0)
