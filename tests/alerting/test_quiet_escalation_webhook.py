"""Quiet hours, escalation and acknowledgement by SMS reply (signed Twilio webhooks over real HTTP)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError
from twilio.request_validator import RequestValidator

from alerting.dispatcher import AckResult, Dispatcher
from alerting.ledger import phone_field
from alerting.ratelimit import SendRateLimiter
from alerting.routing import parse_routing
from alerting.sms import SendResult, TwilioSender
from alerting.webhook import DEFAULT_PATH, make_webhook_app, start_webhook
from simulators.twilio_fake import TwilioFake
from tests.alerting.conftest import (
    PHONE_A,
    PHONE_B,
    PHONE_ESC,
    PLAIN,
    DispatcherFactory,
    FakeClock,
    HangingSender,
    anomaly,
    fast_limiter,
)

# 2026-01-02T00:00:00Z is 00:00 in London (winter): inside 22:00-06:00.
NIGHT = 1_767_312_000.0
QUIET_END = NIGHT + 6 * 3600

ROUTING = f"""
[[route]]
sites = ["plant-*"]
phones = ["{PHONE_A}"]
quiet_hours = {{ start = "22:00", end = "06:00", tz = "Europe/London" }}
escalation = {{ after_minutes = 10, phones = ["{PHONE_ESC}"] }}
"""


async def test_warning_waits_for_quiet_hours_to_end_critical_goes_through(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    clock = FakeClock(NIGHT)
    routing = parse_routing(ROUTING.split("escalation")[0])
    d = make_dispatcher(sender, routing, clock=clock)
    assert await d.dispatch(anomaly(1, severity="warning")) is True  # settled: deferred durably
    assert await d.dispatch(anomaly(2, severity="critical")) is True
    assert [a.alert_id for a in fake.accepted] == ["plant-7:s-0042:2"]
    rec = (await d.ledger.phone_records("plant-7:s-0042:1"))[phone_field("", PHONE_A)]
    assert rec["s"] == "deferred" and rec["due"] == int(QUIET_END * 1000)

    clock.now = QUIET_END - 1
    assert await d.run_due_once() == 0
    # A restart during the night loses nothing: a new dispatcher sends it when the quiet hours end.
    clock.now = QUIET_END + 1
    d2 = make_dispatcher(sender, routing, clock=clock, own_client=True)
    assert await d2.run_due_once() >= 1
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_A) == 1
    assert await d.dispatch(anomaly(1))  # redelivered afterwards: nothing new
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_A) == 1


async def test_unacknowledged_alert_escalates_once(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    clock = FakeClock(NIGHT)
    d = make_dispatcher(sender, parse_routing(ROUTING), clock=clock)
    assert await d.dispatch(anomaly(1, severity="critical"))
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_A) == 1
    clock.advance(9 * 60)
    await d.run_due_once()
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_ESC) == 0
    clock.advance(61)
    await d.run_due_once()
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_ESC) == 1
    assert "ESCALATED" in fake.accepted[-1].body
    clock.advance(3600)
    await d.run_due_once()
    assert await d.dispatch(anomaly(1, severity="critical"))
    assert len(fake.accepted) == 2


async def test_an_escalation_two_processes_pick_up_is_sent_and_counted_once(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    clock = FakeClock(NIGHT)
    routing = parse_routing(ROUTING)
    d1 = make_dispatcher(sender, routing, clock=clock)
    d2 = make_dispatcher(sender, routing, clock=clock, own_client=True)
    assert await d1.dispatch(anomaly(1, severity="critical"))
    before = REGISTRY.get_sample_value("wd_escalations_total") or 0.0
    clock.advance(11 * 60)
    # Both pick the due escalation up at once: one sends, the other finds the claim and comes back to it later,
    # when it finds the SMS accepted. Before, both counted the escalation.
    await asyncio.gather(d1.run_due_once(), d2.run_due_once())
    clock.advance(PLAIN.postpone_s + 1)
    await asyncio.gather(d1.run_due_once(), d2.run_due_once())
    assert await d1.ledger.due_count() == 0
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_ESC) == 1
    assert (REGISTRY.get_sample_value("wd_escalations_total") or 0.0) - before == 1


async def test_an_escalation_whose_one_send_fails_lets_the_others_finish_first(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    # An escalation to two numbers: reserving one number's send slot fails (a Redis error in a shared limiter)
    # while the other's send waits 0.3 s for its slot. The item fails and is retried later; the other send must
    # have run to its end by then, not be left running untracked (before, it went on after the item had failed).
    class FailingForB(SendRateLimiter):
        def reserve(self, phone: str) -> float:
            if phone == PHONE_B:
                raise RedisConnectionError("connection lost")
            return 0.3 if phone == PHONE_ESC else 0.0

    routing = parse_routing(
        ROUTING.replace(f'phones = ["{PHONE_ESC}"]', f'phones = ["{PHONE_ESC}", "{PHONE_B}"]')
    )
    clock = FakeClock(NIGHT)
    d = make_dispatcher(sender, routing, clock=clock, limiter=FailingForB())
    assert await d.dispatch(anomaly(1, severity="critical"))
    clock.advance(11 * 60)
    assert await d.run_due_once() == 1  # the item failed: logged, postponed
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_ESC) == 1  # finished before the failure was reported
    assert await d.ledger.due_count() == 1


async def test_an_escalation_looked_at_again_takes_no_send_slot_for_a_number_it_has_sent_to(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    # An escalation to two numbers, one of them held by another process's in-flight send: the item is looked at
    # again a moment later. Its SMS to the other number went out the first time; the second look must not reserve
    # that number's send slot again (each spare reservation pushed its next real SMS back by a slot).
    class Counting(SendRateLimiter):
        def __init__(self) -> None:
            super().__init__(per_number_rate=1000, per_number_burst=1000)
            self.reserved: list[str] = []

        def reserve(self, phone: str) -> float:
            self.reserved.append(phone)
            return super().reserve(phone)

    routing = parse_routing(
        ROUTING.replace(f'phones = ["{PHONE_ESC}"]', f'phones = ["{PHONE_ESC}", "{PHONE_B}"]')
    )
    clock = FakeClock(NIGHT)
    limiter = Counting()
    d = make_dispatcher(sender, routing, clock=clock, limiter=limiter)
    assert await d.dispatch(anomaly(1, severity="critical"))
    clock.advance(11 * 60)
    held, _ = d._claim({"body": "x", "ts": 0, "n": 0}, clock.now + 3600)  # in flight elsewhere, not stale
    ok, _ = await d.ledger.cas("plant-7:s-0042:1", phone_field("", PHONE_B), held, allowed=("",), now_ms=0)
    assert ok
    limiter.reserved.clear()
    assert (
        await d.run_due_once() == 1
    )  # the SMS to PHONE_ESC goes out; PHONE_B's is not settled: looked at later
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_ESC) == 1
    clock.advance(PLAIN.postpone_s + 1)
    assert await d.run_due_once() == 1
    assert limiter.reserved.count(PHONE_ESC) == 1
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_ESC) == 1


async def test_escalation_of_a_deferred_warning_starts_after_the_quiet_hours(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    clock = FakeClock(NIGHT)
    d = make_dispatcher(sender, parse_routing(ROUTING), clock=clock)
    assert await d.dispatch(anomaly(1))
    clock.now = QUIET_END + 5 * 60
    await d.run_due_once()
    assert [a.to for a in fake.accepted] == [PHONE_A]
    clock.now = QUIET_END + 11 * 60
    await d.run_due_once()
    assert [a.to for a in fake.accepted] == [PHONE_A, PHONE_ESC]


async def test_an_ack_while_a_deferred_sms_waits_for_its_send_slot_cancels_it(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    # When quiet hours end, the deferred SMS of one number queue behind its rate bound; an acknowledgement that
    # arrives meanwhile cancels those of the acknowledged alert (before, only one already past at the start).
    clock = FakeClock(NIGHT)
    limiter = SendRateLimiter(per_number_rate=2, per_number_burst=1)
    d = make_dispatcher(sender, parse_routing(ROUTING.split("escalation")[0]), clock=clock, limiter=limiter)
    assert await d.dispatch(anomaly(1))  # a warning at night: deferred
    clock.now = QUIET_END + 1
    limiter.reserve(PHONE_A)  # the number's slot was just used: this SMS waits ~0.5 s for the next
    due = asyncio.create_task(d.run_due_once())
    await asyncio.sleep(0.1)
    assert not due.done()
    assert await d.acknowledge("plant-7:s-0042:1", PHONE_A) == (AckResult.ACKED, "plant-7:s-0042:1")
    assert await due == 1
    assert fake.accepted == []
    rec = (await d.ledger.phone_records("plant-7:s-0042:1"))[phone_field("", PHONE_A)]
    assert rec["s"] == "cancelled" and rec["why"] == "acknowledged"
    assert await d.ledger.due_count() == 0


def _two_numbers_at_night(
    make_dispatcher: DispatcherFactory, sender: TwilioSender, b_quiet_end: str, **config: Any
) -> tuple[Dispatcher, FakeClock, SendRateLimiter]:
    """A dispatcher at night: plant-7 to PHONE_A, quiet until 06:00; plant-8 to PHONE_B, quiet until
    ``b_quiet_end`` (London); one SMS every 2 s per number; the scheduler polling every 20 ms."""
    routing = parse_routing(
        f"""
[[route]]
sites = ["plant-7"]
phones = ["{PHONE_A}"]
quiet_hours = {{ start = "22:00", end = "06:00", tz = "Europe/London" }}

[[route]]
sites = ["plant-8"]
phones = ["{PHONE_B}"]
quiet_hours = {{ start = "22:00", end = "{b_quiet_end}", tz = "Europe/London" }}
"""
    )
    clock = FakeClock(NIGHT)
    limiter = SendRateLimiter(per_number_rate=0.5, per_number_burst=1)
    settings = dataclasses.replace(PLAIN, scheduler_interval_s=0.02, **config)
    return make_dispatcher(sender, routing, clock=clock, limiter=limiter, config=settings), clock, limiter


async def test_work_that_falls_due_while_an_item_waits_goes_out_without_waiting_for_it(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    # Two sites' warnings deferred by quiet hours ending at 06:00 and 07:00. The first waits 2 s for its number's
    # send slot; the second falls due meanwhile and must not wait behind it (a poll used to wait for every item it
    # had started before looking again).
    d, clock, limiter = _two_numbers_at_night(make_dispatcher, sender, b_quiet_end="07:00")
    assert await d.dispatch(anomaly(1))
    assert await d.dispatch(anomaly(2, site="plant-8"))
    assert fake.accepted == []
    clock.now = QUIET_END + 1
    limiter.reserve(PHONE_A)  # the first SMS waits ~2 s for its number's next slot
    stop = asyncio.Event()
    scheduler = asyncio.create_task(d.run_scheduler(stop))
    try:
        await asyncio.sleep(0.2)
        clock.now = QUIET_END + 3600 + 1
        async with asyncio.timeout(1.0):
            while fake.accepted_count("plant-8:s-0042:2", PHONE_B) == 0:
                await asyncio.sleep(0.01)
        assert fake.accepted_count("plant-7:s-0042:1", PHONE_A) == 0  # still waiting for its slot
    finally:
        stop.set()
        await asyncio.wait_for(scheduler, 10)  # the item in hand is finished, not dropped
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_A) == 1
    assert fake.accepted_count("plant-8:s-0042:2", PHONE_B) == 1
    assert await d.ledger.due_count() == 0


async def test_a_backlog_of_one_numbers_sms_does_not_hold_every_scheduler_slot(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    # Quiet hours end on three deferred warnings to one number (one send slot every 2 s) and one to another
    # number. With two scheduler slots, two of the first number's SMS used to take both, asleep for their slots,
    # and the other number's SMS waited behind them; one SMS item per number is in hand now.
    d, clock, limiter = _two_numbers_at_night(
        make_dispatcher, sender, b_quiet_end="06:00", scheduler_concurrency=2
    )
    for seq in (1, 2, 3):
        assert await d.dispatch(anomaly(seq, sensor=f"s-000{seq}"))
    # All four are due at 06:00; the first number's come first in the scheduler's order (members sort by name).
    assert await d.dispatch(anomaly(4, site="plant-8"))
    clock.now = QUIET_END + 1
    limiter.reserve(PHONE_A)  # the first number's next slot is 2 s away
    stop = asyncio.Event()
    scheduler = asyncio.create_task(d.run_scheduler(stop))
    try:
        async with asyncio.timeout(1.0):
            while fake.accepted_count("plant-8:s-0042:4", PHONE_B) == 0:
                await asyncio.sleep(0.01)
        assert [a.to for a in fake.accepted] == [PHONE_B]
        async with asyncio.timeout(15):
            while len(fake.accepted) < 4:
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(scheduler, 10)
    assert [a.alert_id for a in fake.accepted if a.to == PHONE_A] == [
        "plant-7:s-0001:1",
        "plant-7:s-0002:2",
        "plant-7:s-0003:3",
    ]
    assert await d.ledger.due_count() == 0


async def test_an_item_that_finishes_while_a_poll_reads_is_not_picked_again(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    # The scheduler polls while items run. The poll's read can list an item that is running; if the item finishes
    # (and leaves the busy set) before the reply is handled, the poll must still not start it again.
    clock = FakeClock(NIGHT)
    d = make_dispatcher(sender, parse_routing(ROUTING.split("escalation")[0]), clock=clock)
    assert await d.dispatch(anomaly(1))
    clock.now = QUIET_END + 1
    [(member, _)] = await d.ledger.due(int(clock.now * 1000), 10)
    d._due_busy.add(member)  # running
    real_due = d.ledger.due

    async def due_then_finish(now_ms: int, limit: int) -> list[tuple[str, int]]:
        listed = await real_due(now_ms, limit)
        d._due_busy.discard(member)  # it finished while the reply was on its way
        return listed

    d.ledger.due = due_then_finish  # type: ignore[method-assign]
    assert await d._due_items(5, one_per_phone=True) == []
    d._due_busy.add(member)  # running again
    assert await d._due_items(5) == []


async def test_a_stopped_scheduler_gives_its_items_a_bounded_drain_and_leaves_the_rest_scheduled(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    # An item asleep for its number's send slot (10 s away) when the crew stops must not hold the stop past the
    # run loop's grace (which would cancel the whole crew, live dispatches with it): after the drain it is
    # cancelled, still scheduled, and the next start sends it.
    clock = FakeClock(NIGHT)
    limiter = SendRateLimiter(per_number_rate=0.1, per_number_burst=1)
    config = dataclasses.replace(PLAIN, scheduler_interval_s=0.02, scheduler_drain_s=0.3)
    routing = parse_routing(ROUTING.split("escalation")[0])
    d = make_dispatcher(sender, routing, clock=clock, limiter=limiter, config=config)
    assert await d.dispatch(anomaly(1))
    clock.now = QUIET_END + 1
    limiter.reserve(PHONE_A)
    stop = asyncio.Event()
    scheduler = asyncio.create_task(d.run_scheduler(stop))
    await asyncio.sleep(0.2)
    stop.set()
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(scheduler, 5)
    assert asyncio.get_running_loop().time() - started < 2.0
    assert fake.accepted == []
    assert await d.ledger.due_count() == 1
    # The next start (its own rate bound) sends it.
    d2 = make_dispatcher(sender, routing, clock=clock, limiter=fast_limiter(), config=config, own_client=True)
    assert await d2.run_due_once() == 1
    assert [a.to for a in fake.accepted] == [PHONE_A]


async def test_a_cancelled_scheduler_cancels_the_items_in_hand(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    clock = FakeClock(NIGHT)
    limiter = SendRateLimiter(per_number_rate=0.1, per_number_burst=1)
    d = make_dispatcher(sender, parse_routing(ROUTING.split("escalation")[0]), clock=clock, limiter=limiter)
    assert await d.dispatch(anomaly(1))
    clock.now = QUIET_END + 1
    limiter.reserve(PHONE_A)  # waits ~10 s for its slot
    scheduler = asyncio.create_task(d.run_scheduler(asyncio.Event()))
    await asyncio.sleep(0.2)
    assert [t for t in asyncio.all_tasks() if t.get_name() == "alerts-due"]
    scheduler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(scheduler, 2)
    assert [t for t in asyncio.all_tasks() if t.get_name() == "alerts-due"] == []
    assert fake.accepted == []
    assert await d.ledger.due_count() == 1  # still scheduled: the next start sends it


async def test_an_ack_while_an_escalation_waits_for_its_send_slot_cancels_it(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    clock = FakeClock(NIGHT)
    limiter = SendRateLimiter(per_number_rate=2, per_number_burst=1)
    d = make_dispatcher(sender, parse_routing(ROUTING), clock=clock, limiter=limiter)
    assert await d.dispatch(anomaly(1, severity="critical"))
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_A) == 1
    clock.advance(11 * 60)
    limiter.reserve(PHONE_ESC)  # the on-call number's slot was just used
    due = asyncio.create_task(d.run_due_once())
    await asyncio.sleep(0.1)
    assert not due.done()
    assert (await d.acknowledge("plant-7:s-0042:1", PHONE_A))[0] is AckResult.ACKED
    await due
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_ESC) == 0
    rec = (await d.ledger.phone_records("plant-7:s-0042:1"))[phone_field("", PHONE_ESC)]
    assert rec["s"] == "cancelled" and rec["why"] == "acknowledged"
    assert await d.ledger.due_count() == 0


async def test_a_due_item_that_fails_is_retried_later_not_ahead_of_the_rest(
    fake: TwilioFake,
    sender: TwilioSender,
    make_dispatcher: DispatcherFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An item whose processing raises stays scheduled, but later: kept at its old time, items that keep failing
    # came first in every pass (they are the earliest) and, a batch of them, starved all other due work.
    clock = FakeClock(NIGHT)
    config = dataclasses.replace(PLAIN, scheduler_batch=1, postpone_s=30.0)
    d = make_dispatcher(sender, parse_routing(ROUTING.split("escalation")[0]), clock=clock, config=config)
    assert await d.dispatch(anomaly(1)) and await d.dispatch(anomaly(2))  # both deferred to QUIET_END
    process = d._process_due

    async def broken_for_alert_1(member: str) -> bool:
        if "plant-7:s-0042:1|" in member:
            raise RuntimeError("corrupt item")
        return await process(member)

    monkeypatch.setattr(d, "_process_due", broken_for_alert_1)
    clock.now = QUIET_END + 1
    assert await d.run_due_once() == 1  # the first in order fails...
    assert await d.run_due_once() == 1  # ...and the next pass gets to the other one
    assert [a.alert_id for a in fake.accepted] == ["plant-7:s-0042:2"]
    assert await d.run_due_once() == 0  # the failed one comes back after postpone_s
    clock.advance(31)
    monkeypatch.setattr(d, "_process_due", process)
    assert await d.run_due_once() == 1
    assert sorted(a.alert_id or "" for a in fake.accepted) == ["plant-7:s-0042:1", "plant-7:s-0042:2"]


async def test_an_escalation_cut_mid_send_and_then_acknowledged_is_settled_not_left_sending(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    # The scheduler claimed the on-call phone and died before Twilio answered; then the alert was acknowledged.
    # Acknowledging used to drop the escalation's due item, the only thing that would look at that claim again:
    # the SMS stayed "sending" for ever (never recorded unknown, never counted).
    hang = HangingSender()

    class Split:
        async def send(self, to: str, body: str) -> SendResult:
            return await (hang if to == PHONE_ESC else sender).send(to, body)

        async def aclose(self) -> None:
            await sender.aclose()

    clock = FakeClock(NIGHT)
    d = make_dispatcher(Split(), parse_routing(ROUTING), clock=clock)
    assert await d.dispatch(anomaly(1, severity="critical"))
    clock.advance(11 * 60)
    due = asyncio.create_task(d.run_due_once())
    await asyncio.wait_for(hang.started.wait(), 5)
    due.cancel()  # the process dies mid-send: its claim stays
    with pytest.raises(asyncio.CancelledError):
        await due
    rec = (await d.ledger.phone_records("plant-7:s-0042:1"))[phone_field("", PHONE_ESC)]
    assert rec["s"] == "sending"
    assert (await d.acknowledge("plant-7:s-0042:1", PHONE_A))[0] is AckResult.ACKED
    assert await d.ledger.due_count() == 1  # kept: it has a claim to settle
    clock.advance(PLAIN.send_timeout_s + 1)
    assert await d.run_due_once() == 1
    rec = (await d.ledger.phone_records("plant-7:s-0042:1"))[phone_field("", PHONE_ESC)]
    assert rec["s"] == "unknown" and rec["why"] == "stale_claim"
    assert await d.ledger.due_count() == 0
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_ESC) == 0


# ---- webhook ----------------------------------------------------------------------------------------------


@pytest.fixture
async def webhook(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> AsyncIterator[Any]:
    clock = FakeClock(NIGHT)
    d = make_dispatcher(sender, parse_routing(ROUTING), clock=clock)
    runner = await start_webhook(make_webhook_app(d, fake.auth_token), "127.0.0.1", 0)
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}{DEFAULT_PATH}"
    async with aiohttp.ClientSession() as http:
        yield d, clock, http, url
    await runner.cleanup()


def _sign(token: str, url: str, params: dict[str, str]) -> str:
    return str(RequestValidator(token).compute_signature(url, params))


def _inbound(from_: str, body: str) -> dict[str, str]:
    return {
        "MessageSid": "SM" + "1" * 32,
        "AccountSid": "AC" + "0" * 32,
        "From": from_,
        "To": "+15550000000",
        "Body": body,
        "NumMedia": "0",
    }


async def test_forged_and_tampered_webhooks_get_403(fake: TwilioFake, webhook: Any) -> None:
    d, _clock, http, url = webhook
    assert await d.dispatch(anomaly(1, severity="critical"))
    params = _inbound(PHONE_A, "ACK plant-7:s-0042:1")
    # No signature.
    async with http.post(url, data=params) as resp:
        assert resp.status == 403
    # Signed with the wrong token (forged).
    async with http.post(
        url, data=params, headers={"X-Twilio-Signature": _sign("not-the-token", url, params)}
    ) as resp:
        assert resp.status == 403
    # Genuinely signed, then a parameter altered on the way (tampered).
    good = _sign(fake.auth_token, url, params)
    tampered = {**params, "From": PHONE_B}
    async with http.post(url, data=tampered, headers={"X-Twilio-Signature": good}) as resp:
        assert resp.status == 403
    # Signed for another URL.
    other = _sign(fake.auth_token, url + "x", params)
    async with http.post(url, data=params, headers={"X-Twilio-Signature": other}) as resp:
        assert resp.status == 403
    assert "ack" not in await d.ledger.alert("plant-7:s-0042:1")


async def test_valid_ack_stops_escalation(fake: TwilioFake, webhook: Any) -> None:
    d, clock, http, url = webhook
    assert await d.dispatch(anomaly(1, severity="critical"))
    body = fake.accepted[-1].body
    code = body.rsplit("ACK ", 1)[1]
    params = _inbound(PHONE_A, f"ack {code.lower()}")
    async with http.post(
        url, data=params, headers={"X-Twilio-Signature": _sign(fake.auth_token, url, params)}
    ) as r:
        assert r.status == 200
        reply = await r.text()
    assert "Acknowledged plant-7:s-0042:1" in reply
    ack = await d.ledger.alert("plant-7:s-0042:1")
    assert PHONE_A in ack["ack"]

    clock.advance(3600)
    await d.run_due_once()
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_ESC) == 0  # escalation stopped
    assert len(fake.accepted) == 1


async def test_ack_from_a_stranger_or_with_unknown_code_changes_nothing(
    fake: TwilioFake, webhook: Any
) -> None:
    d, clock, http, url = webhook
    assert await d.dispatch(anomaly(1, severity="critical"))
    for params in (
        _inbound(PHONE_B, "ACK plant-7:s-0042:1"),
        _inbound(PHONE_A, "ACK ZZZZZZ"),
        _inbound(PHONE_A, "hello"),
    ):
        async with http.post(
            url, data=params, headers={"X-Twilio-Signature": _sign(fake.auth_token, url, params)}
        ) as resp:
            assert resp.status == 200
    assert "ack" not in await d.ledger.alert("plant-7:s-0042:1")
    clock.advance(11 * 60)
    await d.run_due_once()
    assert fake.accepted_count("plant-7:s-0042:1", PHONE_ESC) == 1


async def test_acknowledge_by_escalation_phone_and_twice(fake: TwilioFake, webhook: Any) -> None:
    d, _clock, _http, _url = webhook
    assert isinstance(d, Dispatcher)
    assert await d.dispatch(anomaly(1, severity="critical"))
    # The escalation phone may acknowledge too (it is a recipient once the escalation is planned).
    result, alert_id = await d.acknowledge("plant-7:s-0042:1", PHONE_ESC)
    assert (result.value, alert_id) == ("acked", "plant-7:s-0042:1")
    result, _ = await d.acknowledge("plant-7:s-0042:1", PHONE_A)
    assert result.value == "already_acked"


async def test_scheduler_does_not_block_on_a_send_in_flight_elsewhere(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:

    clock = FakeClock(NIGHT)
    routing = parse_routing(ROUTING.split("escalation")[0])
    hang = HangingSender()
    d1 = make_dispatcher(hang, routing, clock=clock)
    assert await d1.dispatch(anomaly(1))
    clock.now = QUIET_END + 1
    holder = asyncio.create_task(d1.run_due_once())
    await asyncio.wait_for(hang.started.wait(), 5)
    d2 = make_dispatcher(sender, routing, clock=clock, own_client=True)
    assert await asyncio.wait_for(d2.run_due_once(), 2) == 1  # looked at, not settled, postponed
    assert await d2.ledger.due_count() == 1
    holder.cancel()  # the process holding it dies
    with pytest.raises(asyncio.CancelledError):
        await holder
    clock.advance(60)
    assert await d2.run_due_once() == 1
    rec = (await d2.ledger.phone_records("plant-7:s-0042:1"))[phone_field("", PHONE_A)]
    assert rec["s"] == "unknown" and rec["why"] == "stale_claim"
    assert await d2.ledger.due_count() == 0
    assert fake.responses == []


async def test_redelivery_after_escalation_does_not_escalate_again(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    clock = FakeClock(NIGHT)
    d = make_dispatcher(sender, parse_routing(ROUTING), clock=clock)
    assert await d.dispatch(anomaly(1, severity="critical"))
    clock.advance(11 * 60)
    assert await d.run_due_once() == 1
    assert await d.ledger.due_count() == 0
    assert await d.dispatch(anomaly(1, severity="critical"))  # the stream entry again, late
    assert await d.ledger.due_count() == 0
    assert len(fake.accepted) == 2


async def test_webhook_behind_a_proxy_validates_against_the_public_url(
    fake: TwilioFake, sender: TwilioSender, make_dispatcher: DispatcherFactory
) -> None:
    d = make_dispatcher(sender, parse_routing(ROUTING), clock=FakeClock(NIGHT))
    public = "https://alerts.example.com/twilio/inbound"
    runner = await start_webhook(make_webhook_app(d, fake.auth_token, public_url=public), "127.0.0.1", 0)
    local = f"http://127.0.0.1:{runner.addresses[0][1]}{DEFAULT_PATH}"
    params = _inbound(PHONE_A, "hello")
    try:
        async with aiohttp.ClientSession() as http:
            for signed_for, status in ((public, 200), (local, 403)):
                sig = _sign(fake.auth_token, signed_for, params)
                async with http.post(local, data=params, headers={"X-Twilio-Signature": sig}) as resp:
                    assert resp.status == status
    finally:
        await runner.cleanup()
