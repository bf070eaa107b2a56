"""The hand-off fast paths (pre-packed commands, batched scripts) on Redis 7.0 and Valkey 8: same results as the
plain redis-py calls, whatever the client's settings, and recovery when the server forgets the scripts."""

from __future__ import annotations

import orjson
import pytest
import redis.asyncio as aredis

from handoff import producer as producer_mod
from handoff._wire import RawRedis
from handoff.errors import PayloadTooLarge
from handoff.producer import StreamProducer

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
    ids = await StreamProducer(r, STREAM).add_many(payloads)
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
