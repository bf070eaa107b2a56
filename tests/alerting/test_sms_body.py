"""SMS body formatting (one GSM-7 segment), senders against the Twilio fake, and the rate limiter."""

from __future__ import annotations

import io
from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alerting.body import SEGMENT, ack_code, format_body, gsm7_length, gsm7_safe
from alerting.ratelimit import SendRateLimiter, TokenBucket
from alerting.sms import DryRunSender, Outcome, RebasedHttpClient, TwilioSender, parse_retry_after
from simulators.twilio_fake import TwilioFake
from tests.alerting.conftest import FROM, PHONE_A, anomaly


def test_body_names_everything_the_contract_asks_for() -> None:
    body = format_body(anomaly(1234), code=ack_code("plant-7:s-0042:1234"))
    assert body.startswith("WD WARNING plant-7/s-0042: pH low (4.1)")
    assert " id plant-7:s-0042:1234 " in body
    assert body.endswith(f"Reply ACK {ack_code('plant-7:s-0042:1234')}")
    assert gsm7_length(body) is not None and len(body) <= SEGMENT


def test_several_findings_and_critical() -> None:
    a = anomaly(1, severity="critical")
    a["explanation"] = [
        {"metric": "ph", "value": 4.1, "direction": "low"},
        {"metric": "turbidity_ntu", "value": 12.345678, "direction": "high"},
        {"metric": "chlorine_mg_l", "value": 0.01, "direction": "low"},
    ]
    body = format_body(a, code="ABC123")
    assert "WD CRITICAL" in body and "pH low (4.1), turbidity high (12.35), chlorine low (0.01)" in body


def test_no_explanation_shows_the_score() -> None:
    a = anomaly(1)
    a["explanation"] = []
    assert "score 0.71>0.62" in format_body(a, code="ABC123")


def test_long_identifiers_are_cut_but_never_the_alert_id() -> None:
    site, sensor = "s" * 60, "x" * 60
    a = anomaly(7, site=site, sensor=sensor)
    a["explanation"] = [
        {"metric": f"m{i}_long_metric_name", "value": i, "direction": "high"} for i in range(6)
    ]
    body = format_body(a, code="ABC123")
    assert f"id {site}:{sensor}:7" in body and "ACK ABC123" in body
    assert len(body) <= SEGMENT or body.count("..") == 1  # trimmed as far as it goes


@settings(max_examples=300, deadline=None)
@given(
    site=st.from_regex(r"[A-Za-z0-9_-]{1,30}", fullmatch=True),
    sensor=st.from_regex(r"[A-Za-z0-9_-]{1,30}", fullmatch=True),
    seq=st.integers(0, 2**63 - 1),
    n=st.integers(0, 8),
    value=st.floats(allow_nan=False, allow_infinity=False),
    severity=st.sampled_from(["warning", "critical"]),
    folded=st.integers(0, 10_000),
    escalated=st.booleans(),
)
def test_bodies_fit_one_segment_and_are_gsm7(
    site: str, sensor: str, seq: int, n: int, value: float, severity: str, folded: int, escalated: bool
) -> None:
    a = anomaly(seq, site=site, sensor=sensor, severity=severity)
    a["explanation"] = [{"metric": f"metric_{i}", "value": value, "direction": "high"} for i in range(n)]
    aid = f"{site}:{sensor}:{seq}"
    body = format_body(a, code=ack_code(aid), folded=folded, escalated=escalated)
    length = gsm7_length(body)
    assert length is not None and length <= SEGMENT
    assert f" id {aid} " in body and ack_code(aid) in body and severity.upper() in body


def test_gsm7_helpers() -> None:
    assert gsm7_length("abc") == 3
    assert gsm7_length("a[b]") == 6  # extension characters take two septets
    assert gsm7_length("naïve ✓") is None
    assert gsm7_safe("temp 4°C ✓") == "temp 4?C ?"
    assert ack_code("a:b:1") == ack_code("a:b:1") != ack_code("a:b:2")
    assert len(ack_code("a:b:1")) == 6 and not set(ack_code("a:b:1")) & set("ILOU")


# ---- senders -----------------------------------------------------------------------------------------------


async def test_twilio_sender_outcomes(fake: TwilioFake, sender: TwilioSender) -> None:
    ok = await sender.send(PHONE_A, "hello id a:b:1")
    assert ok.outcome is Outcome.ACCEPTED and ok.sid and ok.sid.startswith("SM") and ok.status == 201
    fake.faults.retry_after = 7
    fake.script(["429", "500", "503", "timeout", "reset"])
    r429 = await sender.send(PHONE_A, "x id a:b:2")
    assert (r429.outcome, r429.retry_after, r429.reason) == (Outcome.RETRYABLE, 7.0, "429")
    for status in ("http:500", "http:503"):
        r = await sender.send(PHONE_A, "x id a:b:3")
        assert (r.outcome, r.reason) == (Outcome.UNKNOWN, status)
    r = await sender.send(PHONE_A, "x id a:b:4")
    assert (r.outcome, r.reason) == (Outcome.UNKNOWN, "transport:SocketTimeoutError")
    r = await sender.send(PHONE_A, "x id a:b:5")
    assert r.outcome is Outcome.UNKNOWN and r.reason.startswith("transport:")
    r = await sender.send("+15005550001", "x id a:b:6")
    assert (r.outcome, r.code) == (Outcome.REJECTED, 21211)
    # Auth header, form fields and From reached the fake as Twilio expects them.
    assert fake.accepted[0].from_ == FROM and fake.accepted[0].to == PHONE_A


async def test_bad_credentials_and_refused_connection_are_retryable(fake: TwilioFake) -> None:
    bad = TwilioSender(fake.account_sid, "wrong", FROM, base_url=fake.base_url)
    closed = TwilioSender(fake.account_sid, fake.auth_token, FROM, base_url="http://127.0.0.1:9")
    try:
        r = await bad.send(PHONE_A, "x")
        assert (r.outcome, r.status, r.reason) == (Outcome.RETRYABLE, 401, "auth")
        r = await closed.send(PHONE_A, "x")
        assert r.outcome is Outcome.RETRYABLE and r.reason.startswith("connect:")
    finally:
        await bad.aclose()
        await closed.aclose()
    assert fake.accepted == []


def test_base_url_rewrite_keeps_path_and_query() -> None:
    c = RebasedHttpClient("http://127.0.0.1:8080/prefix/")
    url = "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json?x=1"
    assert c.rebase(url) == "http://127.0.0.1:8080/prefix/2010-04-01/Accounts/AC1/Messages.json?x=1"


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after(formatdate(1000.0 + 30, usegmt=True), now=1000.0) == pytest.approx(30.0)


async def test_dry_run_sender_masks_phones() -> None:
    out = io.StringIO()
    s = DryRunSender(out)
    r = await s.send(PHONE_A, "hello")
    assert r.outcome is Outcome.DRY_RUN and s.sent[PHONE_A] == 1
    assert "+1555***0001" in out.getvalue() and PHONE_A not in out.getvalue()


def test_token_bucket_and_per_number_limiter() -> None:
    t = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: t[0])
    assert [bucket.reserve() for _ in range(5)] == [0.0, 0.0, 0.0, 0.5, 1.0]
    t[0] = 10.0
    assert bucket.reserve() == 0.0

    lim = SendRateLimiter(
        per_number_rate=1.0, per_number_burst=1, global_rate=10.0, global_burst=2, clock=lambda: t[0]
    )
    assert lim.reserve("+1") == 0.0
    assert lim.reserve("+1") == pytest.approx(1.0)  # per-number bound
    assert lim.reserve("+2") == pytest.approx(0.1)  # global bound (burst of 2 used up)
