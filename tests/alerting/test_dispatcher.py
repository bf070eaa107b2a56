"""The dispatcher against real Redis/Valkey and the real twilio package talking HTTP to the Twilio fake."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis

from alerting import dispatcher as dispatcher_module
from alerting import metrics
from alerting.dispatcher import DispatchConfig, Dispatcher
from alerting.errors import InvalidAnomaly
from alerting.ledger import DUE_KEY, alert_key, phone_field, send_member
from alerting.ratelimit import RedisSendRateLimiter
from alerting.routing import CONSOLE, Routing, parse_routing
from alerting.sms import DryRunSender, SendResult, TwilioSender
from handoff import keys
from simulators.twilio_fake import Faults, TwilioFake
from tests.alerting.conftest import (
    BASIC_ROUTING,
    FROM,
    PHONE_A,
    PHONE_B,
    PLAIN,
    DispatcherFactory,
    FakeClock,
    HangingSender,
    anomaly,
    fast_limiter,
)

ACL_FILE = Path(__file__).resolve().parents[2] / "deploy" / "redis-users.acl"


def _count(counter: object, *labels: str) -> float:
    c = counter.labels(*labels) if labels else counter  # type: ignore[attr-defined]
    return float(c._value.get())


#: The crew's Redis-shared limiter (slot and claim taken in the admission step) and the in-process one (slot taken
#: in this process, then a separate claim): both ways must give one SMS per alert and phone.
LIMITERS = pytest.mark.parametrize(
    "in_process_limiter", [False, True], ids=["shared-limiter", "local-limiter"]
)


@LIMITERS
async def test_one_sms_per_phone_when_both_inputs_deliver_at_once(
    fake: TwilioFake,
    sender: TwilioSender,
    routing: Routing,
    make_dispatcher: DispatcherFactory,
    in_process_limiter: bool,
) -> None:
    d = make_dispatcher(sender, routing, limiter=fast_limiter() if in_process_limiter else None)
    a = anomaly(1)
    # The Pub/Sub message and the stream entry of the same anomaly, concurrently.
    assert await asyncio.gather(d.dispatch(a), d.dispatch(dict(a))) == [True, True]
    assert await d.dispatch(a) is True  # and again later (a redelivery)
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_A) == 1
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_B) == 1
    assert len(fake.accepted) == 2
    recs = await d.ledger.phone_records("plant-7:s-0042:1")
    assert {k: v["s"] for k, v in recs.items()} == {
        phone_field("", PHONE_A): "accepted",
        phone_field("", PHONE_B): "accepted",
    }
    assert all(v["sid"].startswith("SM") for v in recs.values())


@LIMITERS
async def test_two_dispatcher_instances_send_once(
    fake: TwilioFake,
    sender: TwilioSender,
    routing: Routing,
    make_dispatcher: DispatcherFactory,
    in_process_limiter: bool,
) -> None:
    # Two alerting processes: separate Redis connections, separate senders, separate in-process locks.
    sender2 = TwilioSender(fake.account_sid, fake.auth_token, FROM, base_url=fake.base_url, read_timeout=1.0)
    d1 = make_dispatcher(sender, routing, limiter=fast_limiter() if in_process_limiter else None)
    d2 = make_dispatcher(
        sender2, routing, own_client=True, limiter=fast_limiter() if in_process_limiter else None
    )
    alerts = [anomaly(i) for i in range(50)]
    try:
        results = await asyncio.gather(*(d.dispatch(a) for a in alerts for d in (d1, d2)))
    finally:
        await sender2.aclose()
    assert all(results)
    per_key = fake.accepted_by_key()
    assert len(per_key) == 100  # 50 alerts x 2 phones
    assert set(per_key.values()) == {1}


@LIMITERS
async def test_random_429_500_timeouts_over_1000_alerts(
    r: aredis.Redis,
    make_dispatcher: DispatcherFactory,
    in_process_limiter: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    faults = Faults(
        p429=0.15, p500=0.03, p503=0.03, ptimeout=0.02, preset=0.01, retry_after=0.01, hang_s=3.0, seed=7
    )
    routing = parse_routing(f'[[route]]\nsites = ["*"]\nphones = ["{PHONE_A}"]\n')
    caplog.set_level(logging.WARNING, logger="alerting.dispatcher")
    async with TwilioFake(faults=faults) as fake:
        sender = TwilioSender(
            fake.account_sid, fake.auth_token, FROM, base_url=fake.base_url, read_timeout=1.0
        )
        d = make_dispatcher(
            sender,
            routing,
            # Two 429s are waited for inline; the third hands the retry to the durable scheduler, which runs
            # beside the dispatches as in the crew. (With the default budget of eight, whether one alert of the
            # thousand met eight 429s in a row depended on timing, and nothing ran the scheduler.)
            config=DispatchConfig(
                fold_window_s=0,
                throttle_max=0,
                backoff_base_s=0.01,
                max_inline_attempts=3,
                scheduler_interval_s=0.02,
                scheduler_concurrency=16,
            ),
            limiter=fast_limiter() if in_process_limiter else None,
        )
        alerts = [anomaly(i, sensor=f"s-{i % 40}") for i in range(1000)]
        sem = asyncio.Semaphore(64)  # with the scheduler's 16, within the client's pool of 100 connections

        async def one(a: dict[str, object]) -> bool:
            async with sem:
                return await d.dispatch(a)

        stop = asyncio.Event()
        scheduler = asyncio.create_task(d.run_scheduler(stop))
        try:
            results = await asyncio.gather(*(one(a) for a in alerts))
            deadline = time.monotonic() + 30
            while await r.zcard(DUE_KEY) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await scheduler
            await sender.aclose()
        assert all(results)
        assert await r.zcard(DUE_KEY) == 0  # nothing left waiting

        # Never two accepted SMS for one alert and phone.
        accepted = fake.accepted_by_key()
        assert max(accepted.values()) == 1
        # What each (alert, phone) saw from Twilio, in order.
        history: dict[str | None, list[str]] = {}
        for alert_id, _to, what in fake.log:
            history.setdefault(alert_id, []).append(what)
        assert len(history) == 1000
        saw_429 = 0
        for a in alerts:
            aid = str(a["alert_id"])
            seen = history[aid]
            rec = (await d.ledger.phone_records(aid))[phone_field("", PHONE_A)]
            # Only 429s are retried; the attempt after the last 429 decides the outcome.
            assert all(x == "429" for x in seen[:-1]), (aid, seen)
            last = seen[-1]
            expected = {
                "201": "accepted",
                "500": "unknown",
                "503": "unknown",
                "timeout": "unknown",
                "reset": "unknown",
            }
            assert last in expected and rec["s"] == expected[last], (aid, seen, rec)
            assert rec["n"] == len(seen)
            if "429" in seen:
                saw_429 += 1
                if last == "201":
                    assert accepted[(aid, PHONE_A)] == 1
        assert saw_429 > 100  # the fault mix really exercised retries
        # Runs of three or more 429s went through the scheduler, and still ended like the rest.
        deferred = {m.split()[1] for m in caplog.messages if "by the scheduler" in m}
        assert deferred and deferred == {aid for aid, seen in history.items() if seen.count("429") >= 3}
        # Every unknown outcome is recorded, and none of them was resent.
        unknown = [aid for aid, seen in history.items() if seen[-1] != "201"]
        assert unknown and all(len([x for x in history[aid] if x != "429"]) == 1 for aid in unknown)


async def test_every_429_ends_accepted(
    fake: TwilioFake, sender: TwilioSender, routing: Routing, make_dispatcher: DispatcherFactory
) -> None:
    fake.faults.retry_after = 0.02
    fake.script(["429", "429", "429", "ok"])
    d = make_dispatcher(
        sender,
        parse_routing(f'[[route]]\nsites = ["*"]\nphones = ["{PHONE_A}"]\n'),
        config=DispatchConfig(fold_window_s=0, throttle_max=0, backoff_base_s=0.01),
    )
    before = _count(metrics.SMS_RETRIES, "429")
    assert await d.dispatch(anomaly(1))
    rec = (await d.ledger.phone_records("plant-7:s-0042:1"))[phone_field("", PHONE_A)]
    assert rec["s"] == "accepted" and rec["n"] == 4
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_A) == 1
    assert _count(metrics.SMS_RETRIES, "429") - before == 3


async def test_long_retry_after_is_deferred_durably_and_sent_by_the_scheduler(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    clock = FakeClock()
    fake.faults.retry_after = 120  # longer than we wait inline
    fake.script(["429"])
    routing = parse_routing(f'[[route]]\nsites = ["*"]\nphones = ["{PHONE_A}"]\n')
    d = make_dispatcher(sender, routing, clock=clock)
    assert await d.dispatch(anomaly(1)) is True  # settled: the retry is durable
    rec = (await d.ledger.phone_records("plant-7:s-0042:1"))[phone_field("", PHONE_A)]
    assert rec["s"] == "retry_wait"
    assert len(fake.accepted) == 0

    clock.advance(60)
    assert await d.run_due_once() == 0  # Retry-After honoured: not yet
    clock.advance(61)
    # A restarted process (new dispatcher) picks the durable retry up.
    d2 = make_dispatcher(sender, routing, clock=clock)
    assert await d2.run_due_once() == 1
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_A) == 1
    rec = (await d.ledger.phone_records("plant-7:s-0042:1"))[phone_field("", PHONE_A)]
    assert rec["s"] == "accepted" and rec["n"] == 2
    assert await d2.run_due_once() == 0


async def test_a_retry_the_scheduler_meets_another_long_429_with_stays_scheduled(
    r: aredis.Redis, fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    # Twilio keeps refusing with a long Retry-After (an incident storm): each retry the scheduler makes that is
    # refused again must stay durably scheduled. Before the fix the scheduler's pass removed the item it had
    # just rescheduled, and the SMS sat in retry_wait for ever: never sent, never recorded unknown.
    clock = FakeClock()
    fake.faults.retry_after = 120
    fake.script(["429", "429", "429"])
    routing = parse_routing(f'[[route]]\nsites = ["*"]\nphones = ["{PHONE_A}"]\n')
    d = make_dispatcher(sender, routing, clock=clock)
    assert await d.dispatch(anomaly(1)) is True
    member = send_member("plant-7:s-0042:1", "", PHONE_A)
    for attempt in (2, 3):
        clock.advance(121)
        assert await d.run_due_once() == 1
        rec = (await d.ledger.phone_records("plant-7:s-0042:1"))[phone_field("", PHONE_A)]
        assert rec["s"] == "retry_wait" and rec["n"] == attempt
        assert await r.zscore(DUE_KEY, member) == rec["due"]  # still scheduled, at the new Retry-After
    assert len(fake.accepted) == 0
    clock.advance(121)
    assert await d.run_due_once() == 1
    rec = (await d.ledger.phone_records("plant-7:s-0042:1"))[phone_field("", PHONE_A)]
    assert rec["s"] == "accepted" and rec["n"] == 4
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_A) == 1
    assert await r.zcard(DUE_KEY) == 0


async def test_a_redis_blip_recording_a_429_retry_does_not_strand_the_claim(
    fake: TwilioFake,
    sender: TwilioSender,
    make_dispatcher: DispatcherFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Twilio refused (nothing went out) and the write of the retry failed once. Before, the error left the
    # dispatch holding its `sending` claim: the redelivery found it, waited for it to go stale and recorded the
    # SMS unknown though Twilio had never accepted it. The write rides the blip out, as the final outcome's does.
    fake.faults.retry_after = 0.02
    fake.script(["429"])
    routing = parse_routing(f'[[route]]\nsites = ["*"]\nphones = ["{PHONE_A}"]\n')
    d = make_dispatcher(sender, routing)
    put = d.ledger.put
    failed: list[str] = []

    async def flaky_put(alert_id: str, field: str, record: Any, **kw: Any) -> None:
        if record.get("s") == "retry_wait" and not failed:
            failed.append(alert_id)
            raise aredis.ConnectionError("Connection reset by peer")
        await put(alert_id, field, record, **kw)

    monkeypatch.setattr(d.ledger, "put", flaky_put)
    assert await d.dispatch(anomaly(1)) is True
    assert failed == ["plant-7:s-0042:1"]
    rec = (await d.ledger.phone_records("plant-7:s-0042:1"))[phone_field("", PHONE_A)]
    assert rec["s"] == "accepted" and rec["n"] == 2
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_A) == 1


async def test_unknown_outcomes_are_recorded_and_never_resent(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    routing = parse_routing(f'[[route]]\nsites = ["*"]\nphones = ["{PHONE_A}"]\n')
    d = make_dispatcher(sender, routing)
    fake.script(["500", "503", "timeout", "reset"])
    before = _count(metrics.SMS_TOTAL, "unknown")
    for i in range(4):
        assert await d.dispatch(anomaly(i))
    for i in range(4):  # redelivered: nothing resent
        assert await d.dispatch(anomaly(i))
    recs = [(await d.ledger.phone_records(f"plant-7:s-0042:{i}"))[phone_field("", PHONE_A)] for i in range(4)]
    assert [rec["s"] for rec in recs] == ["unknown"] * 4
    assert [x for x in fake.responses] == ["500", "503", "timeout", "reset"]
    # The timeout and the reset really went out (the fake accepted them): exactly once each.
    assert fake.accepted_count("plant-7:s-0042:2", PHONE_A) == 1
    assert fake.accepted_count("plant-7:s-0042:3", PHONE_A) == 1
    assert _count(metrics.SMS_TOTAL, "unknown") - before == 4


async def test_rejected_number_is_final(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    routing = parse_routing('[[route]]\nsites = ["*"]\nphones = ["+15005550001", "+15551230001"]\n')
    d = make_dispatcher(sender, routing)
    assert await d.dispatch(anomaly(1))
    recs = await d.ledger.phone_records("plant-7:s-0042:1")
    assert recs[phone_field("", "+15005550001")]["s"] == "rejected"
    assert recs[phone_field("", "+15005550001")]["code"] == 21211
    assert recs[phone_field("", "+15551230001")]["s"] == "accepted"


async def test_crash_after_claim_is_unknown_and_not_resent(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    clock = FakeClock()
    routing = parse_routing(f'[[route]]\nsites = ["*"]\nphones = ["{PHONE_A}"]\n')
    hang = HangingSender()
    dying = make_dispatcher(hang, routing, clock=clock)
    task = asyncio.create_task(dying.dispatch(anomaly(1)))
    await asyncio.wait_for(hang.started.wait(), 5)
    task.cancel()  # the process is gone with the request in flight
    with pytest.raises(asyncio.CancelledError):
        await task
    rec = (await dying.ledger.phone_records("plant-7:s-0042:1"))[phone_field("", PHONE_A)]
    assert rec["s"] == "sending"

    # A restarted process gets the stream entry again.
    restarted = make_dispatcher(sender, routing, clock=clock, own_client=True)
    clock.advance(PLAIN.send_timeout_s + 1)
    before = _count(metrics.SMS_UNKNOWN, "stale_claim")
    assert await restarted.dispatch(anomaly(1)) is True
    rec = (await restarted.ledger.phone_records("plant-7:s-0042:1"))[phone_field("", PHONE_A)]
    assert rec["s"] == "unknown" and rec["why"] == "stale_claim"
    assert fake.responses == []  # never resent
    assert _count(metrics.SMS_UNKNOWN, "stale_claim") - before == 1


async def test_fresh_claim_elsewhere_is_waited_for_not_duplicated(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    routing = parse_routing(f'[[route]]\nsites = ["*"]\nphones = ["{PHONE_A}"]\n')
    hang = HangingSender()
    holder = make_dispatcher(hang, routing)
    task = asyncio.create_task(holder.dispatch(anomaly(1)))
    await asyncio.wait_for(hang.started.wait(), 5)
    other = make_dispatcher(
        sender,
        routing,
        config=DispatchConfig(fold_window_s=0, throttle_max=0, inflight_wait_s=0.2),
        own_client=True,
    )
    # Still in flight in another process and not stale: not settled (the stream entry stays pending).
    assert await other.dispatch(anomaly(1)) is False
    assert fake.responses == []
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_replayed_alerts_are_not_resent_unless_asked(
    fake: TwilioFake, sender: TwilioSender, routing: Routing, make_dispatcher: DispatcherFactory
) -> None:
    d = make_dispatcher(sender, routing)
    assert await d.dispatch(anomaly(1))
    assert await d.dispatch(anomaly(1, replayed=True))
    assert len(fake.accepted) == 2  # one per phone, nothing new
    replay = anomaly(1, replayed=True, resend=True, replay_id="op-1")
    assert all(await asyncio.gather(d.dispatch(replay), d.dispatch(dict(replay))))
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_A) == 2
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_B) == 2
    assert "RESENT" in fake.accepted[-1].body
    # The same resend delivered again (stream after Pub/Sub) goes nowhere.
    assert await d.dispatch(replay)
    assert len(fake.accepted) == 4


async def test_folding_and_throttling(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    clock = FakeClock()
    routing = parse_routing(f'[[route]]\nsites = ["*"]\nphones = ["{PHONE_A}"]\n')
    cfg = DispatchConfig(fold_window_s=600, fold_settle_s=30, throttle_max=2, throttle_window_s=3600)
    d = make_dispatcher(sender, routing, config=cfg, clock=clock)
    folded_before = _count(metrics.ALERTS_FOLDED)
    # Five pH anomalies within ten minutes (reading time): one SMS now, the rest folded.
    for i in range(5):
        assert await d.dispatch(anomaly(i, ts_ms=1_767_312_000_000 + i * 60_000, value=4.0 - i / 10))
    assert len(fake.accepted) == 1
    assert _count(metrics.ALERTS_FOLDED) - folded_before == 4
    assert (await d.ledger.alert("plant-7:s-0042:3"))["d"] == "folded:plant-7:s-0042:0"
    # Dispatching a folded one again changes nothing and is not counted twice.
    assert await d.dispatch(anomaly(3, ts_ms=1_767_312_000_000 + 3 * 60_000))
    assert _count(metrics.ALERTS_FOLDED) - folded_before == 4

    # The summary goes when the fold window ends: one SMS with the count, naming the latest alert.
    clock.advance(601)
    assert await d.run_due_once() == 1
    assert len(fake.accepted) == 2
    summary = fake.accepted[-1].body
    assert "+4 more" in summary and "id plant-7:s-0042:4" in summary and "pH low (3.6)" in summary
    assert await d.run_due_once() == 0

    # Another metric of the same sensor is a new lead; the third lead within the hour is throttled.
    assert await d.dispatch(anomaly(10, metric="chlorine_mg_l", direction="high", value=3.0))
    assert len(fake.accepted) == 3
    thr_before = _count(metrics.ALERTS_THROTTLED)
    assert await d.dispatch(anomaly(11, metric="flow_m3_h", direction="high", value=99.0))
    assert len(fake.accepted) == 3
    assert _count(metrics.ALERTS_THROTTLED) - thr_before == 1
    assert (await d.ledger.alert("plant-7:s-0042:11"))["d"] == "throttled"

    # A critical anomaly is neither folded into a warning lead nor throttled by the warnings' budget.
    assert await d.dispatch(anomaly(12, severity="critical", ts_ms=1_767_312_000_000 + 5 * 60_000))
    assert "CRITICAL" in fake.accepted[-1].body


async def test_unrouted_alerts_are_counted(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    routing = parse_routing(f'[[route]]\nsites = ["reservoir-*"]\nphones = ["{PHONE_A}"]\n')
    d = make_dispatcher(sender, routing)
    before = _count(metrics.ALERTS_UNROUTED)
    assert await d.dispatch(anomaly(1))
    assert await d.dispatch(anomaly(1))
    assert _count(metrics.ALERTS_UNROUTED) - before == 1
    # An operator's resend of it is unrouted too, and counted.
    assert await d.dispatch(anomaly(1, replayed=True, resend=True, replay_id="op-1"))
    assert _count(metrics.ALERTS_UNROUTED) - before == 2
    assert fake.responses == []


async def test_invalid_payload_raises(
    sender: TwilioSender, routing: Routing, make_dispatcher: DispatcherFactory
) -> None:
    d = make_dispatcher(sender, routing)
    bad = anomaly(1)
    bad["severity"] = "meh"
    with pytest.raises(InvalidAnomaly):
        await d.dispatch(bad)


async def test_dry_run_prints_masked_and_records(make_dispatcher: DispatcherFactory) -> None:
    out = io.StringIO()
    dry = DryRunSender(out)
    d = make_dispatcher(dry, Routing.console())
    before = _count(metrics.SMS_TOTAL, "dry_run")
    assert await asyncio.gather(d.dispatch(anomaly(1)), d.dispatch(anomaly(1))) == [True, True]
    assert dry.sent == Counter({CONSOLE: 1})
    assert "id plant-7:s-0042:1" in out.getvalue()
    assert (await d.ledger.phone_records("plant-7:s-0042:1"))[phone_field("", CONSOLE)]["s"] == "dry_run"
    assert _count(metrics.SMS_TOTAL, "dry_run") - before == 1

    masked = io.StringIO()
    d2 = make_dispatcher(
        DryRunSender(masked), parse_routing(f'[[route]]\nsites = ["*"]\nphones = ["{PHONE_A}"]\n')
    )
    assert await d2.dispatch(anomaly(2))
    assert PHONE_A not in masked.getvalue() and "+1555***0001" in masked.getvalue()


async def test_ledger_records_expire_with_retention(
    r: aredis.Redis, sender: TwilioSender, routing: Routing, make_dispatcher: DispatcherFactory
) -> None:
    d = make_dispatcher(
        sender, routing, config=DispatchConfig(retention_days=2, fold_window_s=0, throttle_max=0)
    )
    assert await d.dispatch(anomaly(1))
    ttl = await r.ttl(alert_key("plant-7:s-0042:1"))
    assert 2 * 86400 - 60 < ttl <= 2 * 86400


async def test_works_with_a_decoding_redis_client(
    fake: TwilioFake, sender: TwilioSender, redis_url: str
) -> None:
    client = aredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        clock = FakeClock()
        d = Dispatcher(
            client,
            sender,
            parse_routing(f'[[route]]\nsites = ["*"]\nphones = ["{PHONE_A}"]\n'),
            config=PLAIN,
            limiter=RedisSendRateLimiter(
                client, 100_000, 100_000
            ),  # the admission step's replies decoded too
            clock=clock,
        )
        fake.faults.retry_after = 100
        fake.script(["429"])
        assert await d.dispatch(anomaly(1))
        assert await d.dispatch(anomaly(2))
        clock.advance(101)
        assert await d.run_due_once() == 1
        assert fake.accepted_count("plant-7:s-0042:1", PHONE_A) == 1
        assert (await d.acknowledge("plant-7:s-0042:1", PHONE_A))[0].value == "acked"
    finally:
        await client.aclose()


async def test_redis_rate_limiter_reserves_in_order_across_instances(r: aredis.Redis, redis_url: str) -> None:
    other = aredis.Redis.from_url(redis_url)  # a second process: its own connection and its own limiter
    try:
        a = RedisSendRateLimiter(r, per_number_rate=10, per_number_burst=2)
        b = RedisSendRateLimiter(other, per_number_rate=10, per_number_burst=2)
        waits = [await lim.reserve_async(PHONE_A) for lim in (a, b, a, b, a)]
        # burst 2 free, then one slot per 100 ms, whichever instance asks
        assert waits[:2] == [0.0, 0.0]
        for got, want in zip(waits[2:], (0.1, 0.2, 0.3), strict=True):
            assert want - 0.02 <= got <= want + 0.005, waits
        assert await a.reserve_async(PHONE_B) == 0.0  # per number
        ttl = await r.pttl(keys.SMS_RATE_PREFIX + PHONE_A)
        assert 0 < ttl <= 1500  # idle buckets expire
        g = RedisSendRateLimiter(r, 1e6, 1e6, global_rate=10, global_burst=1)
        assert await g.reserve_async("+15550000001") == 0.0
        g2 = RedisSendRateLimiter(other, 1e6, 1e6, global_rate=10, global_burst=1)
        assert 0.08 <= await g2.reserve_async("+15550000002") <= 0.105  # the global bucket is shared too
    finally:
        await other.aclose()


async def test_a_redelivered_alert_takes_no_send_slot(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory, r: aredis.Redis
) -> None:
    # 1 SMS/s per number, burst 2: the first alert takes one slot; its redeliveries (the stream after Pub/Sub, a
    # restart) find its record in the admission step and must not take the second.
    routing = parse_routing(f'[[route]]\nsites = ["*"]\nphones = ["{PHONE_A}"]\n')
    d = make_dispatcher(
        sender, routing, limiter=RedisSendRateLimiter(r, per_number_rate=1, per_number_burst=2)
    )
    a = anomaly(1)
    assert await d.dispatch(a) is True
    for _ in range(3):
        assert await d.dispatch(dict(a)) is True
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_A) == 1
    probe = RedisSendRateLimiter(r, per_number_rate=1, per_number_burst=2)
    assert await probe.reserve_async(PHONE_A) == 0.0  # the second slot of the burst is still free
    assert await probe.reserve_async(PHONE_A) > 0.5  # and then the bucket is empty: one slot was taken before


async def test_two_alerting_processes_share_the_per_number_rate(
    fake: TwilioFake,
    sender: TwilioSender,
    routing: Routing,
    make_dispatcher: DispatcherFactory,
    redis_url: str,
) -> None:
    # Two dispatchers as two processes would run them (own connections, own limiters over the same Redis), 20 SMS/s
    # per number: 24 alerts to each phone take 23 / 20 s; with a bucket per process (12 each at 20/s) they took 0.55.
    sender2 = TwilioSender(fake.account_sid, fake.auth_token, FROM, base_url=fake.base_url, read_timeout=1.0)
    d1 = make_dispatcher(sender, routing, limiter=None)
    d1.limiter = RedisSendRateLimiter(d1.ledger.redis, per_number_rate=20, per_number_burst=1)
    d2 = make_dispatcher(sender2, routing, own_client=True)
    d2.limiter = RedisSendRateLimiter(d2.ledger.redis, per_number_rate=20, per_number_burst=1)
    try:
        alerts = [anomaly(i) for i in range(24)]
        assert all(await asyncio.gather(*(d.dispatch(a) for a, d in zip(alerts, [d1, d2] * 12, strict=True))))
    finally:
        await sender2.aclose()
    for phone in (PHONE_A, PHONE_B):
        times = sorted(m.at for m in fake.accepted if m.to == phone)
        assert len(times) == 24
        assert times[-1] - times[0] >= 0.85, (
            phone,
            times[-1] - times[0],
        )  # HTTP jitter on the first and last


async def test_dispatch_works_with_the_deployed_acl_user(
    fake: TwilioFake, sender: TwilioSender, routing: Routing, r: aredis.Redis, redis_url: str
) -> None:
    """The least-privilege ``alerting`` user of deploy/redis-users.acl can claim, rate-limit and record sends."""
    acl = ACL_FILE
    line = next(x for x in acl.read_text().splitlines() if x.startswith("user alerting "))
    rules = [">pw" if rule.startswith(">") else rule for rule in line.split()[2:]]
    await r.execute_command("ACL", "SETUSER", "alerting", "reset", *rules)
    limited = aredis.Redis.from_url(redis_url, username="alerting", password="pw")
    try:
        d = Dispatcher(limited, sender, routing, config=PLAIN)  # the default, Redis-shared rate limiter
        assert await d.dispatch(anomaly(1)) is True
        assert fake.accepted_count("plant-7:s-0042:1", PHONE_A) == 1
        assert fake.accepted_count("plant-7:s-0042:1", PHONE_B) == 1
        assert await r.exists(keys.SMS_RATE_PREFIX + PHONE_A)
    finally:
        await limited.aclose()
        await r.execute_command("ACL", "DELUSER", "alerting")


class _SlowAnswer:
    """The real Twilio sender, answering ``delay_s`` late (a provider or a host that is slow for a moment)."""

    def __init__(self, inner: TwilioSender, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s

    async def send(self, to: str, body: str) -> SendResult:
        result = await self.inner.send(to, body)
        await asyncio.sleep(self.delay_s)
        return result

    async def aclose(self) -> None:
        return None


async def test_a_slow_sms_is_logged_with_where_its_time_went(
    sender: TwilioSender,
    make_dispatcher: DispatcherFactory,
    routing: Routing,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="alerting.dispatcher")

    def slow_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "slow SMS" in r.getMessage()]

    fast = make_dispatcher(sender, routing)
    assert await fast.dispatch(anomaly(1, severity="critical"), received=time.perf_counter())
    assert not slow_lines()

    monkeypatch.setattr(dispatcher_module, "SLOW_SMS_LOG_EVERY_S", 0.3)
    slow = make_dispatcher(_SlowAnswer(sender, 0.06), routing)
    # Arrived 30 ms before the dispatcher could start on it (a busy input), then Twilio answered 60 ms late.
    assert await slow.dispatch(anomaly(2, severity="critical"), received=time.perf_counter() - 0.03)
    (line,) = slow_lines()  # two phones, one line: at most one per SLOW_SMS_LOG_EVERY_S
    assert "plant-7:s-0042:2" in line and "more slow SMS" not in line
    waiting, admission, slot, twilio = (
        float(x) for x in re.findall(r"(?:waiting|admission|claim|Twilio) ([\d.]+)", line)
    )
    assert waiting >= 29.0 and twilio >= 59.0 and admission < 60 and slot < 60
    total = float(re.search(r"accepted ([\d.]+) ms", line).group(1))  # type: ignore[union-attr]
    assert total >= waiting + twilio

    # Not a live alert (the stream path, a backfill waiting for the send rate): never timed.
    await asyncio.sleep(0.35)
    assert await slow.dispatch(anomaly(3, severity="critical"))
    assert len(slow_lines()) == 1
    # The next line counts the slow SMS left out since the last one (the second phone of alert 2).
    assert await slow.dispatch(anomaly(4, severity="critical"), received=time.perf_counter())
    assert len(slow_lines()) == 2 and slow_lines()[1].endswith("; 1 more slow SMS since the last such line")


class _TaskRecorder:
    """The real Twilio sender, noting which asyncio task makes each request."""

    def __init__(self, inner: TwilioSender) -> None:
        self.inner = inner
        self.tasks: list[asyncio.Task[object] | None] = []

    async def send(self, to: str, body: str) -> SendResult:
        self.tasks.append(asyncio.current_task())
        return await self.inner.send(to, body)

    async def aclose(self) -> None:
        return None


async def test_a_single_phone_is_sent_to_from_the_dispatching_task(
    sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    """No task hop between admission and the request: a new task would queue behind every other dispatch of a
    burst (a gateway's backlog of one sensor: dozens of alerts at once, most of them about to fold)."""
    one_phone = parse_routing(f'[[route]]\nsites = ["*"]\nphones = ["{PHONE_A}"]\n')
    recorder = _TaskRecorder(sender)
    d = make_dispatcher(recorder, one_phone)
    task = asyncio.create_task(d.dispatch(anomaly(1, severity="critical")))
    assert await task
    assert recorder.tasks == [task]

    two_phones = make_dispatcher(recorder, parse_routing(BASIC_ROUTING))
    recorder.tasks.clear()
    task = asyncio.create_task(two_phones.dispatch(anomaly(2, severity="critical")))
    assert await task
    assert len(recorder.tasks) == 2 and task not in recorder.tasks  # several phones: sent side by side
