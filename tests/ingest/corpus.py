"""Malformed (and a few valid) MQTT inputs with the quarantine reasons the contract requires for each.

Every case has its own topic (``c{n}`` / ``g{n}`` in it), so an end-to-end test can match quarantine entries back to
cases by topic. Timestamps are relative to ``now_ms`` so the corpus stays valid whenever it runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

SITE = "p1"


_DROP = object()


@dataclass(frozen=True)
class Case:
    name: str
    topic: str
    payload: bytes
    reasons: list[str]  # sorted quarantine reasons expected for this message
    stored: int = 0  # readings of it expected in wd:readings:v1
    meta: dict[str, Any] = field(default_factory=dict)


def reading(sensor: str, seq: int, now_ms: int, /, **over: Any) -> dict[str, Any]:
    """A valid reading, with fields replaced (or dropped with ``_DROP``) by keyword."""
    body: dict[str, Any] = {
        "site": SITE,
        "sensor_id": sensor,
        "seq": seq,
        "ts": now_ms / 1000 - 1,
        "metrics": {"ph": 7.12, "turbidity_ntu": 0.41, "chlorine_mg_l": 1.08, "flow_m3_h": 33.2},
    }
    for key, value in over.items():
        if value is _DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def _j(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def malformed_corpus(now_ms: int) -> list[Case]:
    """At least 40 refused inputs, each with the reason(s) it must be quarantined with."""
    cases: list[Case] = []

    def single(
        name: str,
        reasons: list[str],
        payload: bytes | None = None,
        topic_sensor: str | None = None,
        **over: Any,
    ) -> None:
        n = len(cases)
        sensor = f"c{n}"
        tsensor = topic_sensor if topic_sensor is not None else sensor
        body = payload if payload is not None else _j(reading(sensor, 1, now_ms, **over))
        cases.append(Case(name, f"wd/{SITE}/{tsensor}/telemetry", body, sorted(reasons)))

    def single_id(name: str, bad: str, where: str) -> None:
        n = len(cases)
        sensor = f"c{n}{bad}" if where == "sensor" else f"c{n}"
        site = f"p{n}{bad}" if where == "site" else SITE
        body = _j(reading(sensor, 1, now_ms, site=site))
        cases.append(Case(name, f"wd/{site}/{sensor}/telemetry", body, ["bad_identifier"]))

    def batch(
        name: str,
        readings: Any,
        reasons: list[str],
        stored: int = 0,
        gateway: str | None = None,
        raw: bytes | None = None,
    ) -> None:
        n = len(cases)
        gw = f"g{n}"
        body = raw if raw is not None else _j({"gateway_id": gateway or gw, "readings": readings})
        cases.append(Case(name, f"wd/{SITE}/{gw}/batch", body, sorted(reasons), stored))

    # invalid_json
    single("truncated JSON", ["invalid_json"], _j(reading("x", 1, now_ms))[:25])
    single("empty payload", ["invalid_json"], b"")
    single("plain text", ["invalid_json"], b"hello sensor")
    single("trailing garbage", ["invalid_json"], _j(reading("x", 1, now_ms)) + b" }")
    single("invalid UTF-8", ["invalid_json"], b'{"site": "p1", "sensor_id": "\xff\xfe"}')
    single("byte order mark", ["invalid_json"], b"\xef\xbb\xbf" + _j(reading("x", 1, now_ms)))
    single("lone surrogate", ["invalid_json"], b'{"site": "\\ud800"}')
    single("single quotes", ["invalid_json"], b"{'site': 'p1'}")
    single("deeply nested", ["invalid_json"], b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    single("NaN inside truncated JSON", ["invalid_json"], b'{"metrics": {"ph": NaN')
    # non_finite
    single("NaN metric", ["non_finite"], metrics={"ph": float("nan")})
    single("Infinity metric", ["non_finite"], metrics={"ph": float("inf")})
    single("-Infinity metric", ["non_finite"], metrics={"ph": float("-inf")})
    n = len(cases)
    single("1e309 metric", ["non_finite"], _j(reading(f"c{n}", 1, now_ms)).replace(b"33.2", b"1e309"))
    single("NaN ts", ["non_finite"], ts=float("nan"))
    # schema
    single("string for a number", ["schema"], metrics={"ph": "7.12"})
    single("seq as string", ["schema"], seq="12")
    single("seq as float", ["schema"], seq=12.0)
    single("negative seq", ["schema"], seq=-1)
    single("seq past 2^63-1", ["schema"], seq=2**63)
    single("missing site", ["schema"], site=_DROP)
    single("missing sensor_id", ["schema"], sensor_id=_DROP)
    single("missing seq", ["schema"], seq=_DROP)
    single("missing ts", ["schema"], ts=_DROP)
    single("missing metrics", ["schema"], metrics=_DROP)
    single("no metrics", ["schema"], metrics={})
    single("33 metrics", ["schema"], metrics={f"m{i}": 1.0 for i in range(33)})
    single("upper-case metric name", ["schema"], metrics={"PH": 7.0})
    single("metric name starting with a digit", ["schema"], metrics={"1ph": 7.0})
    single("metric name of 33 characters", ["schema"], metrics={"m" * 33: 7.0})
    single("metric name with a dot", ["schema"], metrics={"ph.raw": 7.0})
    single("boolean metric", ["schema"], metrics={"ph": True})
    single("boolean seq", ["schema"], seq=True)
    single("boolean ts", ["schema"], ts=False)
    single("null metric", ["schema"], metrics={"ph": None})
    single("nested junk metric", ["schema"], metrics={"ph": {"v": [1, 2]}})
    single("metrics as a list", ["schema"], metrics=[7.12])
    single("payload is an array", ["schema"], b"[1, 2, 3]")
    single("payload is a number", ["schema"], b"42")
    single("site as a number", ["schema"], site=7)
    single("ts in words", ["schema"], ts="yesterday")
    single("ts without offset", ["schema"], ts="2026-12-01T07:00:00")
    single("ts date only", ["schema"], ts="2026-12-01")
    single("ts with leap second", ["schema"], ts="2026-12-31T23:59:60Z")
    # clock_skew
    single("ts in 1970", ["clock_skew"], ts=0)
    single("ts in 1970 as RFC 3339", ["clock_skew"], ts="1970-01-01T00:00:01Z")
    single("ts in 2100", ["clock_skew"], ts="2100-01-01T00:00:00Z")
    single("ts 10 minutes ahead", ["clock_skew"], ts=now_ms / 1000 + 600)
    single("ts 8 days old", ["clock_skew"], ts=now_ms / 1000 - 8 * 86400)
    # too_large
    single("single over 64 KiB", ["too_large"], metrics={"ph": 7.0}, pad="x" * (64 * 1024))
    # topic_mismatch
    single("site differs from topic", ["topic_mismatch"], site="p2")
    single("sensor differs from topic", ["topic_mismatch"], topic_sensor=f"c{len(cases)}x")
    # bad_identifier
    single_id("sensor id with *", "*", "sensor")
    single_id("sensor id with :", ":x", "sensor")
    single_id("sensor id with {", "{a}", "sensor")
    single_id("sensor id with ..", "..", "sensor")
    single_id("non-ASCII sensor id", "é", "sensor")
    single_id("site with *", "*", "site")
    single_id("1 KB sensor id", "a" * 1024, "sensor")
    single_id("65-character site", "a" * 63, "site")
    single("bad id in payload only", ["bad_identifier"], sensor_id="c*")
    single("empty sensor id in payload", ["bad_identifier"], sensor_id="")
    # gateway batches
    good = [reading(f"b{i}", 1, now_ms) for i in range(3)]
    batch("batch over 512 KiB", [reading("b", i, now_ms, pad="x" * 600) for i in range(1000)], ["too_large"])
    batch("batch without readings", [], ["schema"])
    batch("batch of 1001 readings", [reading("b", i, now_ms) for i in range(1001)], ["schema"])
    batch("readings not a list", {"a": 1}, ["schema"])
    batch("gateway id differs from topic", good, ["topic_mismatch"], gateway="gw-other")
    batch("batch without gateway id", None, ["schema"], raw=_j({"readings": good}))
    batch("truncated batch", None, ["invalid_json"], raw=_j({"gateway_id": "g", "readings": good})[:-9])
    batch(
        "batch with some bad readings",
        [
            *good,
            reading("b9", 1, now_ms, metrics={"ph": float("nan")}),
            reading("b10", 1, now_ms, site="p2"),
            reading("b11*", 1, now_ms),
            reading("b12", 1, now_ms, ts=0),
            reading("b13", 1, now_ms, seq="1"),
            "not a reading",
        ],
        ["non_finite", "topic_mismatch", "bad_identifier", "clock_skew", "schema", "schema"],
        stored=3,
    )
    return cases


def valid_cases(now_ms: int) -> list[Case]:
    """Valid inputs in every accepted shape, with the number of readings each stores."""
    iso = _iso(now_ms - 1500)
    return [
        Case("epoch seconds", f"wd/{SITE}/v0/telemetry", _j(reading("v0", 1, now_ms)), [], 1),
        Case("RFC 3339 Z", f"wd/{SITE}/v1/telemetry", _j(reading("v1", 1, now_ms, ts=iso)), [], 1),
        Case(
            "integer metric, unknown keys",
            f"wd/{SITE}/v2/telemetry",
            _j(reading("v2", 1, now_ms, metrics={"ph": 7}, firmware="1.2", extra={"a": [1]})),
            [],
            1,
        ),
        Case(
            "gateway batch",
            f"wd/{SITE}/gw-1/batch",
            _j({"gateway_id": "gw-1", "readings": [reading(f"v{i}", 5, now_ms) for i in range(3, 103)]}),
            [],
            100,
        ),
    ]


def _iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
