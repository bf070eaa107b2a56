"""``waterdoctor status`` through the CLI: the JSON numbers are what XINFO and XPENDING say; tables; no Redis."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis

from handoff import keys
from waterdoctor.cli import main
from waterdoctor.embedded import free_port


@pytest.fixture
def sr(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    monkeypatch.setenv("WD_REDIS_URL", redis_url)
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def status_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["status", "--json", *args]) == 0
    doc: dict[str, Any] = orjson.loads(capsys.readouterr().out)
    return doc


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {x["name"]: x for x in items}


def test_status_json_equals_xinfo_and_xpending(sr: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(20):
        sr.xadd(keys.READINGS, {"payload": orjson.dumps({"readings": [], "i": i})})
    sr.xgroup_create(keys.READINGS, keys.GROUP_ANALYTICS, id="0")
    sr.xreadgroup(keys.GROUP_ANALYTICS, "a-1", {keys.READINGS: ">"}, count=5)
    sr.xreadgroup(keys.GROUP_ANALYTICS, "a-2", {keys.READINGS: ">"}, count=3)
    first_ids = [i for i, _ in sr.xrange(keys.READINGS, count=2)]
    sr.xack(keys.READINGS, keys.GROUP_ANALYTICS, *first_ids)
    sr.xadd(keys.ANOMALIES, {"payload": b"{}"})
    sr.xgroup_create(keys.ANOMALIES, keys.GROUP_ALERTING, id="$")

    doc = status_json(capsys, "--memory-samples", "0")

    streams = by_name(doc["streams"])
    assert set(streams) == set(keys.STREAMS)
    for name, s in streams.items():
        if not sr.exists(name):
            assert not s["exists"] and s["length"] == 0
            continue
        info = sr.xinfo_stream(name)
        assert s["length"] == info["length"]
        assert s["first_entry_id"] == info["first-entry"][0].decode()
        assert s["last_entry_id"] == info["last-entry"][0].decode()
        assert s["last_generated_id"] == info["last-generated-id"].decode()
        assert s["entries_added"] == info["entries-added"]
        assert s["memory_bytes"] == sr.memory_usage(name, samples=0)
        groups = by_name(s["groups"])
        raw_groups = {g["name"].decode(): g for g in sr.xinfo_groups(name)}
        assert set(groups) == set(raw_groups)
        for gname, g in groups.items():
            raw = raw_groups[gname]
            assert g["pending"] == raw["pending"]
            assert g["last_delivered_id"] == raw["last-delivered-id"].decode()
            assert g["entries_read"] == raw["entries-read"]
            assert g["server_lag"] == raw["lag"]
            if raw["lag"] is not None:
                assert g["lag"] == raw["lag"]
            assert g["lag"] == len(sr.xrange(name, "(" + g["last_delivered_id"], "+"))
            summary = sr.xpending(name, gname)
            assert g["pending"] == summary["pending"]
            assert g["oldest_pending_id"] == (summary["min"].decode() if summary["min"] else None)
            consumers = by_name(g["consumers"])
            raw_consumers = {c["name"].decode(): c for c in sr.xinfo_consumers(name, gname)}
            assert set(consumers) == set(raw_consumers)
            pending_by_consumer = {c["name"].decode(): c["pending"] for c in summary["consumers"]}
            for cname, c in consumers.items():
                assert c["pending"] == raw_consumers[cname]["pending"] == pending_by_consumer.get(cname, 0)
                assert 0 <= c["idle_ms"] <= raw_consumers[cname]["idle"]  # idle only grows between the reads
    analytics = by_name(streams[keys.READINGS]["groups"])[keys.GROUP_ANALYTICS]
    assert (analytics["pending"], analytics["lag"]) == (6, 12)
    assert {c["name"]: c["pending"] for c in analytics["consumers"]} == {"a-1": 3, "a-2": 3}
    assert doc["server"]["kind"] in ("redis", "valkey")


def test_status_top_reasons_of_dead_letters_and_quarantine(
    sr: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    for reason, n in (("schema", 3), ("clock_skew", 1), ("non_finite", 2)):
        for _ in range(n):
            body = {
                "reason": reason,
                "detail": "x",
                "topic": "wd/p/s/telemetry",
                "received_ms": 1,
                "raw_b64": "",
            }
            sr.xadd(keys.QUARANTINE, {"payload": orjson.dumps(body)})
    for error, n in (("ValueError: bad reading\ntraceback...", 4), ("KeyError: 'ph'", 2)):
        for _ in range(n):
            dead = {
                "stream": keys.READINGS,
                "group": keys.GROUP_ANALYTICS,
                "entry_id": "1-0",
                "deliveries": 5,
                "error": error,
                "payload": "{}",
            }
            sr.xadd(keys.DEAD, {"payload": orjson.dumps(dead)})
    sr.xadd(keys.DEAD, {"payload": b"not json"})

    doc = status_json(capsys, "--top", "2")
    assert doc["quarantine"] == {
        "depth": 6,
        "scanned": 6,
        "top_reasons": [{"reason": "schema", "count": 3}, {"reason": "non_finite", "count": 2}],
    }
    dl = doc["dead_letters"]
    assert dl["depth"] == 7 and dl["scanned"] == 7
    assert dl["top_errors"] == [
        {"error": "ValueError: bad reading", "count": 4},
        {"error": "KeyError: 'ph'", "count": 2},
    ]
    assert dl["by_origin"] == [{"stream": keys.READINGS, "group": keys.GROUP_ANALYTICS, "count": 6}]
    assert status_json(capsys, "--top", "3")["dead_letters"]["top_errors"][2] == {
        "error": "unreadable payload",
        "count": 1,
    }

    # --scan bounds the work: only the latest entries are read.
    assert status_json(capsys, "--scan", "2")["quarantine"]["scanned"] == 2

    capsys.readouterr()
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    for text in (
        keys.READINGS,
        keys.DEAD,
        "schema",
        "ValueError: bad reading",
        "Dead letters and quarantine",
    ):
        assert text in out


def test_status_tables_show_groups_and_consumers(sr: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    sr.xadd(keys.READINGS, {"payload": b"{}"})
    sr.xgroup_create(keys.READINGS, keys.GROUP_ANALYTICS, id="0")
    sr.xreadgroup(keys.GROUP_ANALYTICS, "analytics-host-1", {keys.READINGS: ">"})
    capsys.readouterr()
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "Consumer groups" in out and "analytics-host-1" in out and keys.GROUP_ANALYTICS in out


def test_status_when_redis_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WD_REDIS_URL", f"redis://:secret@127.0.0.1:{free_port()}/0")
    assert main(["status"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("waterdoctor status: cannot reach Redis at")
    assert "secret" not in captured.err and "Traceback" not in captured.err
    assert main(["status", "--json"]) == 2
