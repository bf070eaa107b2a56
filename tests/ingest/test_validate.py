"""Validation: the malformed corpus, normalization, and a hypothesis cross-check against the reference models."""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pydantic
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from handoff.models import GatewayBatch, NormalizedReading, ReadingsEntry, SensorReading
from ingest.validate import MAX_FUTURE_MS, MAX_PAST_MS, validate_message
from tests.ingest.corpus import malformed_corpus, reading, valid_cases

NOW_MS = int(time.time() * 1000)
CORPUS = malformed_corpus(NOW_MS)


def test_corpus_is_big_enough() -> None:
    assert len(CORPUS) >= 40
    assert {r for c in CORPUS for r in c.reasons} == {
        "invalid_json",
        "schema",
        "non_finite",
        "too_large",
        "topic_mismatch",
        "bad_identifier",
        "clock_skew",
    }


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_malformed_input_gets_its_reason(case: Any) -> None:
    result = validate_message(case.topic, case.payload, NOW_MS)
    assert sorted(r.reason for r in result.rejected) == case.reasons, [r.detail for r in result.rejected]
    assert len(result.readings) == case.stored
    for rejected in result.rejected:
        assert rejected.detail
        assert rejected.raw or case.payload == b""


@pytest.mark.parametrize("case", valid_cases(NOW_MS), ids=lambda c: c.name)
def test_valid_input_is_normalized(case: Any) -> None:
    result = validate_message(case.topic, case.payload, NOW_MS)
    assert result.rejected == []
    assert len(result.readings) == case.stored
    entry = ReadingsEntry.model_validate_json(
        b'{"readings":[' + b",".join(r.json for r in result.readings) + b"]}"
    )
    for normalized in entry.readings:
        assert normalized.received_ms == NOW_MS
        assert NOW_MS - 2000 <= normalized.ts_ms <= NOW_MS
        assert all(isinstance(v, float) for v in normalized.metrics.values())


def test_normalized_form_is_exact() -> None:
    body = reading(
        "s-0042", 1234, NOW_MS, ts="2026-12-01T08:00:00.123+01:00", metrics={"ph": 7, "flow_m3_h": 33.2}
    )
    now = 1_796_108_400_000 + 60_000  # one minute after that ts
    result = validate_message("wd/p1/s-0042/telemetry", orjson.dumps(body), now)
    assert orjson.loads(result.readings[0].json) == {
        "site": "p1",
        "sensor_id": "s-0042",
        "seq": 1234,
        "ts_ms": 1_796_108_400_123,
        "received_ms": now,
        "metrics": {"ph": 7.0, "flow_m3_h": 33.2},
    }


def test_clock_window_edges() -> None:
    def reasons(ts_ms: int) -> list[str]:
        body = reading("s", 1, NOW_MS, ts=ts_ms / 1000)
        return [r.reason for r in validate_message("wd/p1/s/telemetry", orjson.dumps(body), NOW_MS).rejected]

    assert reasons(NOW_MS - MAX_PAST_MS) == []
    assert reasons(NOW_MS + MAX_FUTURE_MS) == []
    assert reasons(NOW_MS - MAX_PAST_MS - 1) == ["clock_skew"]
    assert reasons(NOW_MS + MAX_FUTURE_MS + 1) == ["clock_skew"]


def test_batch_keeps_good_readings_and_quarantines_each_bad_one_alone() -> None:
    case = next(c for c in CORPUS if c.name == "batch with some bad readings")
    result = validate_message(case.topic, case.payload, NOW_MS)
    assert [r.sensor_id for r in result.readings] == ["b0", "b1", "b2"]
    bad = {r.reason: r for r in result.rejected}
    assert "batch reading 3" in bad["non_finite"].detail
    assert json.loads(bad["topic_mismatch"].raw)["sensor_id"] == "b10"  # the reading alone, not the batch
    assert json.loads(bad["non_finite"].raw)["sensor_id"] == "b9"


# --- cross-check with the reference models -------------------------------------------------------------------

_ID_CHARS = "abcXYZ019_-"
_GOOD_NAMES = ["ph", "turbidity_ntu", "chlorine_mg_l", "flow_m3_h", "t", "a" * 32, "m_9"]
_ids = st.one_of(
    st.text(alphabet=_ID_CHARS, min_size=1, max_size=64),
    st.text(max_size=70),
    st.integers(),
    st.none(),
)
_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.text(max_size=5),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
_metric_names = st.one_of(
    st.sampled_from(_GOOD_NAMES), st.sampled_from(["PH", "1a", "a" * 33, "a.b", "", "é"]), st.text(max_size=4)
)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="milliseconds")


_ts = st.one_of(
    st.integers(min_value=-MAX_PAST_MS - 10_000, max_value=MAX_FUTURE_MS + 10_000).map(
        lambda d: _iso(NOW_MS + d)
    ),
    st.integers(min_value=-MAX_PAST_MS - 10_000, max_value=MAX_FUTURE_MS + 10_000).map(
        lambda d: (NOW_MS + d) / 1000
    ),
    st.integers(min_value=NOW_MS // 1000 - 10, max_value=NOW_MS // 1000 + 10),
    _numbers,
    st.sampled_from(["2026-12-01", "yesterday", "2026-12-01T07:00:00", "2026-13-01T00:00:00Z"]),
)
_MISSING = object()


_valid_metrics = st.dictionaries(
    st.sampled_from(_GOOD_NAMES),
    st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**53), 2**53)),
    min_size=1,
    max_size=len(_GOOD_NAMES),
)
_valid_ts = st.one_of(
    st.integers(min_value=-MAX_PAST_MS, max_value=MAX_FUTURE_MS).map(lambda d: _iso(NOW_MS + d)),
    st.integers(min_value=-MAX_PAST_MS, max_value=MAX_FUTURE_MS).map(lambda d: (NOW_MS + d) / 1000),
)


@st.composite
def _readings(draw: st.DrawFn, site: str = "p1", sensor: str = "s1") -> dict[str, Any]:
    """Half the time a valid reading with at most one field broken, else anything goes."""
    body: dict[str, Any] = {
        "site": site,
        "sensor_id": sensor,
        "seq": draw(st.integers(min_value=0, max_value=2**63 - 1)),
        "ts": draw(_valid_ts),
        "metrics": draw(_valid_metrics),
    }
    broken = list(body) if draw(st.booleans()) else draw(st.sets(st.sampled_from(list(body)), max_size=1))
    anything = {
        "site": _ids,
        "sensor_id": _ids,
        "seq": st.one_of(st.integers(), _numbers),
        "ts": _ts,
        "metrics": st.one_of(
            st.dictionaries(_metric_names, st.one_of(st.floats(width=64), _numbers), max_size=5),
            st.dictionaries(
                st.text(alphabet="abc", min_size=1, max_size=8), st.just(1.0), min_size=33, max_size=34
            ),
            _numbers,
        ),
    }
    for name in broken:
        body[name] = draw(anything[name])
        if draw(st.integers(0, 15)) == 0:
            del body[name]
    if draw(st.booleans()):
        body["extra"] = draw(st.one_of(_numbers, st.dictionaries(st.text(max_size=3), _numbers, max_size=2)))
    return body


_REASON_OF_TYPE = {"finite_number": "non_finite", "string_pattern_mismatch": "bad_identifier"}


def _allowed_reasons(exc: pydantic.ValidationError) -> set[str]:
    allowed = {"topic_mismatch"}  # checked right after the identifiers, before the other fields
    for error in exc.errors():
        reason = _REASON_OF_TYPE.get(error["type"], "schema")
        if reason == "bad_identifier" and error["loc"][-1] not in ("site", "sensor_id", "gateway_id"):
            reason = "schema"  # a metric name pattern
        allowed.add(reason)
    return allowed


def _check_against_reference(result_reading: Any, ref: SensorReading) -> None:
    normalized = NormalizedReading.model_validate_json(result_reading.json)
    assert (normalized.site, normalized.sensor_id, normalized.seq) == (ref.site, ref.sensor_id, ref.seq)
    assert normalized.metrics == ref.metrics
    assert normalized.received_ms == NOW_MS
    if isinstance(ref.ts, str):
        expected = int(datetime.fromisoformat(ref.ts.upper()).timestamp() * 1000 // 1)
        assert abs(normalized.ts_ms - expected) <= 1
    else:
        assert normalized.ts_ms == math.floor(ref.ts * 1000 + 0.5)


#: A float ts whose milliseconds overflow to infinity (found by hypothesis in CI): once an OverflowError out of the
#: inline fast path, now a clock_skew rejection like any ts outside the window.
HUGE_TS = {"site": "p1", "sensor_id": "s1", "seq": 0, "ts": 1.797693134862316e305, "metrics": {"ph": 0.0}}


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_readings())
@example(HUGE_TS)
def test_single_reading_agrees_with_reference_models(body: dict[str, Any]) -> None:
    raw = json.dumps(body, allow_nan=True).encode()
    result = validate_message("wd/p1/s1/telemetry", raw, NOW_MS)
    try:
        ref = SensorReading.model_validate_json(raw, strict=True)
    except pydantic.ValidationError as exc:
        assert result.readings == [], "accepted what the reference model refuses"
        (rejected,) = result.rejected
        assert rejected.reason in _allowed_reasons(exc), (rejected, exc.errors())
        return
    if result.readings:
        _check_against_reference(result.readings[0], ref)
        event("accepted")
    else:
        (rejected,) = result.rejected
        # the rules the models do not express
        assert rejected.reason in ("topic_mismatch", "clock_skew") or rejected.detail.startswith("ts "), (
            rejected
        )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_readings(), min_size=1, max_size=4))
@example([HUGE_TS])
def test_batch_agrees_with_reference_models(bodies: list[dict[str, Any]]) -> None:
    raw = json.dumps({"gateway_id": "gw", "readings": bodies}, allow_nan=True).encode()
    result = validate_message("wd/p1/gw/batch", raw, NOW_MS)
    assert len(result.readings) + len(result.rejected) == len(bodies)
    try:
        GatewayBatch.model_validate_json(raw, strict=True)
        whole_ok = True
    except pydantic.ValidationError:
        whole_ok = False
    # Accepted readings come out in payload order: walk both lists, matching each to a body the model accepts.
    j = 0
    good = 0
    for body in bodies:
        try:
            ref = SensorReading.model_validate_json(json.dumps(body, allow_nan=True), strict=True)
        except pydantic.ValidationError:
            continue
        good += 1
        if j < len(result.readings):
            candidate = NormalizedReading.model_validate_json(result.readings[j].json)
            if (candidate.sensor_id, candidate.seq, candidate.metrics) == (
                ref.sensor_id,
                ref.seq,
                ref.metrics,
            ):
                _check_against_reference(result.readings[j], ref)
                j += 1
    assert j == len(result.readings), "accepted a reading the reference model refuses"
    assert whole_ok == (good == len(bodies))


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 12, 31)),
    st.sampled_from([0, 1, 2, 3, 6, 9]),
    st.sampled_from(["Z", "+00:00", "-07:30", "+14:00"]),
)
def test_rfc3339_forms_convert_exactly(moment: datetime, digits: int, suffix: str) -> None:
    from datetime import timedelta

    from ingest.validate import _ts_ms

    # strftime pads years below 1000 inconsistently across platforms; the strategy starts at 1900.
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + f"{moment.microsecond:06d}{moment.microsecond % 1000:03d}"[:digits]
    text += suffix
    aware = datetime.fromisoformat(text.replace("Z", "+00:00"))
    expected = (aware - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    assert _ts_ms(text) == expected
    assert _ts_ms(text) == expected  # again, now through the cached-date path for Z
