"""``waterdoctor dlq`` round trips: dead letters made by the real worker, listed, retried through the group, purged."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aredis

from handoff import keys
from handoff.models import DeadLetter
from handoff.worker import Ack, ConsumerGroupWorker, Entry, Fail, Outcome, WorkerConfig
from waterdoctor.cli import main

DAY = 86_400_000


@pytest.fixture
def sr(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    monkeypatch.setenv("WD_REDIS_URL", redis_url)
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def answer(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))


def run_worker(url: str, *, accept: bool, until: str, n: int) -> list[int]:
    """Run the analytics group's worker on wd:readings:v1 until ``until`` holds ``n`` (dead letters or acks).

    With ``accept=False`` every entry fails permanently (straight to the dead letters); otherwise each is acked.
    Returns the ``n`` values the handler saw.
    """

    async def go() -> list[int]:
        r = aredis.Redis.from_url(url)
        seen: list[int] = []

        async def handler(entries: Sequence[Entry]) -> Mapping[str, Outcome]:
            seen.extend(orjson.loads(e.payload)["n"] for e in entries)
            return {
                e.id: Ack() if accept else Fail(f"ValueError: bad {e.json()['n']}", permanent=True)
                for e in entries
            }

        worker = ConsumerGroupWorker(
            r, keys.READINGS, keys.GROUP_ANALYTICS, handler, consumer="a-1", config=WorkerConfig(block_ms=5)
        )
        task = asyncio.create_task(worker.run())
        try:
            async with asyncio.timeout(10):
                while True:
                    if until == "dead" and await r.xlen(keys.DEAD) >= n:
                        break
                    if until == "acked" and worker.stats.acked >= n:
                        break
                    await asyncio.sleep(0.01)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 5)
            await r.aclose()
        return seen

    return asyncio.run(go())


def readings(sr: redis.Redis, *ns: int) -> list[bytes]:
    bodies = [orjson.dumps({"n": n, "readings": []}) for n in ns]
    for b in bodies:
        sr.xadd(keys.READINGS, {"payload": b})
    return bodies


def dead_ids(sr: redis.Redis) -> list[str]:
    return [i.decode() for i, _ in sr.xrange(keys.DEAD)]


def add_dead(sr: redis.Redis, entry_id: str, **over: Any) -> None:
    body = {
        "stream": keys.READINGS,
        "group": keys.GROUP_ANALYTICS,
        "entry_id": "1-0",
        "deliveries": 5,
        "error": "boom",
        "payload": '{"n":0}',
        **over,
    }
    sr.xadd(keys.DEAD, {"payload": orjson.dumps(body)}, id=entry_id)


def test_list_shows_what_the_worker_dead_lettered(
    redis_url: str, sr: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    readings(sr, 1, 2, 3)
    run_worker(redis_url, accept=False, until="dead", n=3)
    capsys.readouterr()
    assert main(["dlq", "list", "--json"]) == 0
    rows = [orjson.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [orjson.loads(x["payload"])["n"] for x in rows] == [3, 2, 1]  # newest first
    originals = [i.decode() for i, _ in sr.xrange(keys.READINGS)]
    stored = [DeadLetter.model_validate_json(f[b"payload"]) for _, f in sr.xrevrange(keys.DEAD)]
    assert [d.entry_id for d in stored] == [x["entry_id"] for x in rows]
    for row in rows:
        assert row["stream"] == keys.READINGS and row["group"] == keys.GROUP_ANALYTICS
        assert row["entry_id"] in originals
        assert row["error"].startswith("ValueError: bad ") and row["deliveries"] >= 1
        assert 0 <= row["age_ms"] < 10_000
    assert main(["dlq", "list", "--count", "1", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["dlq", "list", "--group", "nobody", "--json"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["dlq", "list"]) == 0
    out = capsys.readouterr().out
    assert "3 dead letters" in out and "ValueError: bad 2" in out


def test_retry_puts_the_payload_back_for_the_group_after_confirmation(
    redis_url: str, sr: redis.Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bodies = readings(sr, 7, 8)
    run_worker(redis_url, accept=False, until="dead", n=2)
    first, second = dead_ids(sr)
    length = sr.xlen(keys.READINGS)

    answer(monkeypatch, "n\n")
    assert main(["dlq", "retry", "--id", first]) == 1
    assert "aborted" in capsys.readouterr().out
    assert dead_ids(sr) == [first, second] and sr.xlen(keys.READINGS) == length

    answer(monkeypatch, "")  # no answer at all (EOF) is a no
    assert main(["dlq", "retry", "--all"]) == 1
    assert dead_ids(sr) == [first, second]

    answer(monkeypatch, "y\n")
    assert main(["dlq", "retry", "--id", first]) == 0
    out = capsys.readouterr().out
    assert "Retry 1 dead letter(s)" in out and f"retried {first} -> {keys.READINGS}" in out
    assert dead_ids(sr) == [second]
    new_id, fields = sr.xrevrange(keys.READINGS, count=1)[0]
    assert fields[b"payload"] == bodies[0]  # byte for byte
    assert f"{keys.READINGS} {new_id.decode()}" in out
    # The group delivers it anew and this time the crew accepts it.
    assert run_worker(redis_url, accept=True, until="acked", n=1) == [7]
    assert sr.xpending(keys.READINGS, keys.GROUP_ANALYTICS)["pending"] == 0

    # Retrying the same dead letter again finds nothing: one retry only.
    assert main(["dlq", "retry", "--id", first, "--yes"]) == 1
    assert f"no dead letter {first}" in capsys.readouterr().err


def test_retry_all_with_filters_and_a_missing_stream(
    sr: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    sr.xadd(keys.READINGS, {"payload": b"{}"})
    add_dead(sr, "1000-0", payload='{"n":1}')
    add_dead(sr, "2000-0", stream=keys.ANOMALIES, group=keys.GROUP_ALERTING, payload='{"n":2}')
    add_dead(sr, "3000-0", stream="wd:gone:v1", payload='{"n":3}')
    assert main(["dlq", "retry", "--all", "--stream", keys.READINGS, "--yes"]) == 0
    assert dead_ids(sr) == ["2000-0", "3000-0"]
    assert sr.xrevrange(keys.READINGS, count=1)[0][1][b"payload"] == b'{"n":1}'
    # An origin stream that no longer exists is not recreated; its dead letter stays.
    assert main(["dlq", "retry", "--id", "3000-0", "--yes"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not sr.exists("wd:gone:v1") and dead_ids(sr) == ["2000-0", "3000-0"]


def test_purge_older_than_with_prompt(
    sr: redis.Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sec, usec = sr.time()
    now = sec * 1000 + usec // 1000
    for i, age in enumerate((40 * DAY, 31 * DAY, 10 * DAY, 3_600_000)):
        add_dead(sr, f"{now - age}-{i}")
    answer(monkeypatch, "no\n")
    assert main(["dlq", "purge", "--older-than", "7d"]) == 1
    assert len(dead_ids(sr)) == 4
    assert "Purge 3 dead letter(s) older than 7d?" in capsys.readouterr().out
    answer(monkeypatch, "yes\n")
    assert main(["dlq", "purge", "--older-than", "30d"]) == 0
    assert "purged 2 dead letter(s)" in capsys.readouterr().out
    assert dead_ids(sr) == [f"{now - 10 * DAY}-2", f"{now - 3_600_000}-3"]
    assert main(["dlq", "purge", "--older-than", "30d"]) == 0  # nothing left that old: no question asked
    assert "no dead letters older than" in capsys.readouterr().out
    assert main(["dlq", "purge", "--older-than", "soon"]) == 2


def test_purge_by_id(
    sr: redis.Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in (1, 2, 3):
        add_dead(sr, f"{i}000-0")
    assert main(["dlq", "purge", "--id", "1000-0", "--id", "3000-0", "--yes"]) == 0
    assert dead_ids(sr) == ["2000-0"]
    answer(monkeypatch, "y\n")
    assert main(["dlq", "purge", "--id", "2000-0", "--id", "9000-0"]) == 1  # one unknown id: reported, exit 1
    err = capsys.readouterr().err
    assert "no dead letter 9000-0" in err
    assert dead_ids(sr) == []


def test_unreadable_dead_letters_are_listed_not_retried(
    sr: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    sr.xadd(keys.DEAD, {"payload": b"garbage"}, id="5-0")
    assert main(["dlq", "list", "--json"]) == 0
    (row,) = [orjson.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert row["id"] == "5-0" and row["unreadable"] == "garbage"
    assert main(["dlq", "retry", "--id", "5-0", "--yes"]) == 1
    assert "not a dead letter" in capsys.readouterr().err
    assert dead_ids(sr) == ["5-0"]
