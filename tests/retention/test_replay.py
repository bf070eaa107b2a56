"""``waterdoctor replay`` round trips: subscribe to wd:alerts:v1, replay, receive the stored payload marked replayed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis

from handoff import keys
from handoff.models import Anomaly, alert_id
from waterdoctor.cli import main
from waterdoctor.commands.replay import mark_replayed, parse_when

HOUR = 3_600_000


def anomaly(seq: int, ts_ms: int) -> dict[str, Any]:
    return {
        "alert_id": alert_id("plant-7", "s-0042", seq),
        "site": "plant-7",
        "sensor_id": "s-0042",
        "seq": seq,
        "ts_ms": ts_ms,
        "detected_ms": ts_ms + 8,
        "score": 0.7100000000000001,
        "threshold": 0.62,
        "severity": "warning",
        "model_version": "plant-7:s-0042:3",
        "reading_entry_id": f"{ts_ms + 2}-0",
        "metrics": {"ph": 4.1, "turbidity_ntu": 0.4},
        "explanation": [{"metric": "ph", "value": 4.1, "direction": "low"}],
    }


@pytest.fixture
def sr(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    monkeypatch.setenv("WD_REDIS_URL", redis_url)
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def alerts(sr: redis.Redis) -> Iterator[redis.client.PubSub]:
    sub = sr.pubsub()
    sub.subscribe(keys.ALERTS_CHANNEL)
    assert sub.get_message(timeout=2)["type"] == "subscribe"  # type: ignore[index]
    yield sub
    sub.close()


def received(sub: redis.client.PubSub, timeout: float = 1.0) -> list[bytes]:
    out = []
    while (msg := sub.get_message(timeout=timeout)) is not None:
        out.append(msg["data"])
        timeout = 0.2
    return out


def store(sr: redis.Redis, *ages_ms: int) -> list[bytes]:
    """Anomalies stored ``age`` ms ago (by their IDs), oldest first; returns the verbatim payloads."""
    sec, usec = sr.time()
    now = sec * 1000 + usec // 1000
    payloads = []
    for i, age in enumerate(sorted(ages_ms, reverse=True)):
        # A payload with spaces, as another language's encoder might write it: replay must keep it byte for byte.
        body = orjson.dumps(anomaly(1000 + i, now - age)).replace(b'","', b'", "')
        sr.xadd(keys.ANOMALIES, {"payload": body}, id=f"{now - age}-0")
        payloads.append(body)
    return payloads


def test_replay_by_alert_id_publishes_the_exact_stored_payload_marked_replayed(
    sr: redis.Redis, alerts: redis.client.PubSub, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = store(sr, 3 * HOUR, 2 * HOUR, HOUR)
    target = orjson.loads(stored[1])
    assert main(["replay", "--alert-id", target["alert_id"]]) == 0
    (msg,) = received(alerts)
    assert msg == stored[1][:-1] + b',"replayed":true}'
    assert orjson.loads(msg) == {**target, "replayed": True}
    assert Anomaly.model_validate_json(msg).model_extra == {"replayed": True}
    out = capsys.readouterr().out
    assert target["alert_id"] in out and "receivers=1" in out and "1 anomaly replayed" in out


def test_replay_several_ids_with_resend(
    sr: redis.Redis, alerts: redis.client.PubSub, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = store(sr, 3 * HOUR, 2 * HOUR, HOUR)
    ids = [orjson.loads(p)["alert_id"] for p in (stored[0], stored[2])]
    assert main(["replay", "--alert-id", ids[1], "--alert-id", ids[0], "--resend"]) == 0
    msgs = [orjson.loads(m) for m in received(alerts)]
    assert [m["alert_id"] for m in msgs] == ids  # stream order
    assert all(m["replayed"] is True and m["resend"] is True for m in msgs)
    assert {k: v for k, v in msgs[0].items() if k not in ("replayed", "resend")} == orjson.loads(stored[0])


def test_replay_since_a_duration_and_an_iso_time(
    sr: redis.Redis, alerts: redis.client.PubSub, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = store(sr, 5 * HOUR, 90 * 60_000, 10 * 60_000)
    assert main(["replay", "--since", "2h"]) == 0
    assert received(alerts) == [p[:-1] + b',"replayed":true}' for p in stored[1:]]
    ts = orjson.loads(stored[0])["ts_ms"]
    from datetime import UTC, datetime

    iso = datetime.fromtimestamp((ts - 1000) / 1000, UTC).isoformat()
    until = datetime.fromtimestamp((ts + 60_000) / 1000, UTC).isoformat()
    assert main(["replay", "--since", iso, "--until", until, "--json"]) == 0
    assert [orjson.loads(m)["seq"] for m in received(alerts)] == [1000]
    lines = [orjson.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert lines[-1]["alert_id"] == orjson.loads(stored[0])["alert_id"] and lines[-1]["receivers"] == 1


def test_replay_dry_run_and_limit_publish_nothing_extra(
    sr: redis.Redis, alerts: redis.client.PubSub, capsys: pytest.CaptureFixture[str]
) -> None:
    store(sr, 3 * HOUR, 2 * HOUR, HOUR)
    assert main(["replay", "--since", "1d", "--dry-run"]) == 0
    assert received(alerts, 0.3) == []
    assert "3 anomalies would replay" in capsys.readouterr().out
    assert main(["replay", "--since", "1d", "--limit", "2"]) == 0
    assert len(received(alerts)) == 2
    assert "stopped at --limit 2" in capsys.readouterr().err


def test_replay_unknown_alert_id_fails_and_publishes_nothing(
    sr: redis.Redis, alerts: redis.client.PubSub, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = store(sr, HOUR)
    known = orjson.loads(stored[0])["alert_id"]
    # A prefix of a real id must not match it.
    assert main(["replay", "--alert-id", known[:-1]]) == 1
    assert received(alerts, 0.3) == []
    assert "not found" in capsys.readouterr().err
    assert main(["replay"]) == 2
    assert main(["replay", "--since", "yesterday-ish"]) == 2


def test_mark_replayed_and_parse_when() -> None:
    assert mark_replayed(b'{"a": 1.50} \n') == b'{"a": 1.50,"replayed":true}'
    assert mark_replayed(b"{}", resend=True) == b'{"replayed":true,"resend":true}'
    assert orjson.loads(mark_replayed(b'{"replayed":false,"a":1}')) == {"replayed": True, "a": 1}
    with pytest.raises(ValueError):
        mark_replayed(b"[1]")
    assert parse_when("2h", 10 * HOUR) == 8 * HOUR
    assert parse_when("1970-01-01T01:00:00Z", 0) == HOUR
    assert parse_when("1970-01-01T02:00:00+01:00", 0) == HOUR
    assert parse_when("1970-01-01T01:00:00", 0) == HOUR
