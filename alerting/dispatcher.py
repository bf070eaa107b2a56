"""The one dispatcher both inputs call: Pub/Sub messages and ``alerting`` group stream entries.

``await dispatcher.dispatch(anomaly)`` returns True when the alert is *settled*: every SMS it calls for has a final
outcome (accepted, unknown, rejected, dry run) or is deferred durably in Redis (quiet hours, a long 429 backoff),
and its escalations and fold summaries are scheduled durably. The stream consumer acks the entry only then; the
Pub/Sub path can ignore the result (the stream brings the alert again if it was not settled).

At most once per alert and phone (CONTRACT.md section 6): before any request, the ledger moves the (alert, phone)
record into ``sending`` atomically (for an alert's first SMS in the admission script, which also decides folding and
throttling and reserves the send slot: one round trip before the request; otherwise a compare-and-set); only the
winner sends, whoever else arrives (the other input, another alerting process, a restart) waits for its outcome
or, when the claim was abandoned (crash mid-send), records the outcome as ``unknown`` and never resends it. A claim
carries an owner token, so a claim whose reply was lost (the server ran it, the connection dropped, the client sent
it again and found the record claimed) is recognised as the sender's own and goes out. 429 is
retried with backoff honouring ``Retry-After``; a 5xx, a timeout or a reset after sending is ``unknown``.

Background work (deferred warnings after quiet hours, 429 retries too long to wait for inline, escalations, fold
summaries) lives in a Redis sorted set, so it survives restarts; :meth:`Dispatcher.run_scheduler` polls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pydantic
import redis.asyncio as aredis

from alerting import metrics
from alerting.body import ack_code, format_body
from alerting.errors import InvalidAnomaly
from alerting.ledger import (
    DURABLE_STATES,
    FINAL_STATES,
    EscalationPlan,
    Ledger,
    PhoneAdmission,
    PhoneRequest,
    esc_member,
    loads,
    phone_field,
    send_member,
)
from alerting.ratelimit import RateLimiter, RedisSendRateLimiter
from alerting.routing import SEVERITY_RANK, QuietHours, Routing
from alerting.sms import Outcome, SendResult, SmsSender
from handoff.models import Anomaly
from handoff.settings import mask_phone

logger = logging.getLogger(__name__)

# How long to wait for another party's in-flight send; None = the configured default (set per task).
_INFLIGHT_WAIT: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "wd_inflight_wait", default=None
)

# Where one dispatch's time went (``time.perf_counter()`` marks), for the "slow SMS" log line; shared by the
# dispatch's per-phone tasks, which only read it.
_TRACE: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "wd_dispatch_trace", default=None
)

#: A live alert's SMS accepted more than this long after the alert arrived is logged (INFO) with where the time
#: went: waiting in the input, the admission round trip, the send slot and claim, Twilio's answer. At most one such
#: line per SLOW_SMS_LOG_EVERY_S; the next one counts those left out.
SLOW_SMS_S = 0.025
SLOW_SMS_LOG_EVERY_S = 1.0

__all__ = ["AckResult", "DispatchConfig", "Dispatcher"]


@dataclass(frozen=True, slots=True)
class DispatchConfig:
    """Tunables of the dispatcher; the defaults suit production."""

    #: Ledger records live as long as the anomalies they belong to (``WD_ANOMALY_RETENTION_DAYS``).
    retention_days: float = 30.0
    #: Anomalies of one sensor and metric within this many seconds (reading time) of a lead fold into it.
    fold_window_s: float = 600.0
    #: A fold summary waits at least this long after the first fold, so a backfill burst yields one summary.
    fold_settle_s: float = 30.0
    #: At most this many leads (SMS-worthy alerts) per sensor and severity per throttle window (0: no limit);
    #: a separate budget for critical, so a sensor flooding warnings cannot hold a critical back.
    throttle_max: int = 6
    throttle_window_s: float = 3600.0
    #: 429 handling: retries waited for inline before the SMS is handed to the durable scheduler.
    max_inline_attempts: int = 8
    max_inline_wait_s: float = 10.0
    backoff_base_s: float = 0.25
    backoff_cap_s: float = 30.0
    #: A ``sending`` claim older than this counts as abandoned (must exceed the sender's connect + read timeout).
    send_timeout_s: float = 20.0
    #: The scheduler takes over a 429 retry only this long after the inline waiter should have retried.
    takeover_grace_s: float = 5.0
    #: How long a dispatch waits for someone else's in-flight send before reporting "not settled".
    inflight_wait_s: float = 25.0
    scheduler_interval_s: float = 0.25
    scheduler_batch: int = 200
    scheduler_concurrency: int = 32
    #: On stop, how long the scheduler's items in hand may take to finish before they are cancelled (within the
    #: run loop's 10-s grace, like the Pub/Sub dispatches' drain).
    scheduler_drain_s: float = 8.0
    #: A due item that could not be settled yet (in flight elsewhere) is looked at again this much later.
    postpone_s: float = 1.0

    @property
    def ttl_s(self) -> float:
        return self.retention_days * 86400.0


class AckResult(enum.StrEnum):
    ACKED = "acked"
    ALREADY = "already_acked"
    UNKNOWN_CODE = "unknown_code"
    NOT_RECIPIENT = "not_recipient"


class Dispatcher:
    """Routes, dedupes, rate-limits and sends alerts; see the module docstring for the guarantees.

    :param redis: a ``redis.asyncio.Redis`` client (either ``decode_responses`` setting).
    :param sender: an :class:`~alerting.sms.SmsSender` (Twilio or dry run).
    :param routing: the validated :class:`~alerting.routing.Routing`.
    :param config: :class:`DispatchConfig`.
    :param limiter: per-number send-rate bound; default 1 SMS/s per number, burst 5, shared through Redis by every
        dispatcher on the same server (:class:`~alerting.ratelimit.RedisSendRateLimiter`).
    :param clock: epoch seconds (injectable for tests of quiet hours, escalation and staleness).
    """

    def __init__(
        self,
        redis: aredis.Redis,
        sender: SmsSender,
        routing: Routing,
        *,
        config: DispatchConfig | None = None,
        limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or DispatchConfig()
        self.ledger = Ledger(redis, ttl_s=self.config.ttl_s)
        self.sender = sender
        self.routing = routing
        self.limiter: RateLimiter = limiter or RedisSendRateLimiter(redis)
        self._clock = clock
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._due_busy: set[str] = set()
        self._slow_log_next = 0.0  # perf_counter() before which slow SMS are only counted
        self._slow_left_out = 0
        self._rng = random.Random()
        read_timeout = getattr(sender, "read_timeout", None)
        if isinstance(read_timeout, int | float) and self.config.send_timeout_s <= read_timeout:
            # A live request would be declared abandoned (unknown) while it may still succeed.
            logger.warning(
                "send_timeout_s (%.1fs) should exceed the sender's read timeout (%.1fs)",
                self.config.send_timeout_s,
                read_timeout,
            )

    # ---- the entry point of both inputs -------------------------------------------------------------------

    async def dispatch(self, anomaly: Mapping[str, Any], received: float | None = None) -> bool:
        """Handle one anomaly (a dict as in CONTRACT.md section 3); True when settled.

        ``received``: when the input took it (``time.perf_counter()``), for the slow-SMS log line.
        Raises :class:`~alerting.errors.InvalidAnomaly` for a payload that is not an anomaly (never retry it),
        and Redis errors as they come (retry later).
        """
        start = time.perf_counter()
        # Only live alerts (Pub/Sub, which passes ``received``) are timed: a backfill waits for the send rate.
        token = _TRACE.set(None if received is None else {"received": received, "start": start})
        try:
            try:
                model = Anomaly.model_validate(anomaly)
            except pydantic.ValidationError as exc:
                raise InvalidAnomaly(f"not a contract anomaly: {exc.error_count()} error(s)") from exc
            alert_id = model.alert_id
            resend = anomaly.get("replayed") is True and anomaly.get("resend") is True
            tag = f"r{anomaly.get('replay_id') or ''}" if resend else ""
            async with self._alert_lock(f"{alert_id}|{tag}"):
                return await self._dispatch(anomaly, model, tag, resend)
        finally:
            _TRACE.reset(token)

    async def _dispatch(self, anomaly: Mapping[str, Any], model: Anomaly, tag: str, resend: bool) -> bool:
        cfg = self.config
        alert_id = model.alert_id
        now = self._clock()
        anomaly_json = orjson.dumps(dict(anomaly)).decode()
        plan = self.routing.plan(model.site, model.severity, now)
        body = format_body(anomaly, code=ack_code(alert_id), resend=resend)
        if resend:
            # An operator asked for it again: no folding or throttling, no escalation; its own ledger tag.
            await self.ledger.store_anomaly(alert_id, anomaly_json)
            if not plan.routed:
                metrics.ALERTS_UNROUTED.inc()  # an operator asked for it: each request counts
                logger.warning(
                    "resend of alert %s (site %s, %s) matched no route", alert_id, model.site, model.severity
                )
                return True
            return await _all_settled(
                [
                    self._deliver(alert_id, tag, phone, due, body, model.ts_ms, observe_latency=True)
                    for phone, due in plan.phones.items()
                ]
            )

        # One round trip decides (fold, throttle, lead), plans the escalations and, for each phone to send to now,
        # reserves its send slot and claims its record: the SMS request can follow at once.
        now_phones = [p for p, due in plan.phones.items() if due is None or due <= now] if plan.routed else []
        base = {"body": body, "ts": model.ts_ms, "n": 0}
        claim, token = self._claim(base, now)
        buckets = getattr(self.limiter, "buckets", None)  # a Redis-shared limiter reserves inside the step
        requests = [
            PhoneRequest(phone_field("", p), claim, True, *buckets(p))
            if buckets is not None
            else PhoneRequest(phone_field("", p), claim, False)
            for p in now_phones
        ]
        metric = model.explanation[0].metric if model.explanation else "_score"
        decision, admitted = await self.ledger.admit(
            anomaly_json,
            alert_id=alert_id,
            site=model.site,
            sensor_id=model.sensor_id,
            metric=metric,
            ts_ms=model.ts_ms,
            severity_rank=SEVERITY_RANK[model.severity],
            fold_window_ms=int(cfg.fold_window_s * 1000),
            throttle_max=cfg.throttle_max,
            throttle_window_ms=int(cfg.throttle_window_s * 1000),
            summary_due_floor_ms=int((now + cfg.fold_settle_s) * 1000),
            escalations=[
                EscalationPlan(
                    esc.route,
                    {
                        "phones": list(esc.phones),
                        "qh": esc.quiet_hours.to_json() if esc.quiet_hours else None,
                    },
                    int(esc.due * 1000),
                )
                for esc in plan.escalations
            ]
            if plan.routed
            else [],
            phones=requests,
        )
        if (trace := _TRACE.get()) is not None:
            trace["admitted"] = time.perf_counter()
        if decision.kind == "folded":
            if decision.new:
                metrics.ALERTS_FOLDED.inc()
                logger.info("alert %s folded into %s", alert_id, decision.lead)
            return True
        if decision.kind == "throttled":
            if decision.new:
                metrics.ALERTS_THROTTLED.inc()
                logger.warning("alert %s throttled: sensor %s keeps firing", alert_id, model.sensor_id)
            return True
        if not plan.routed:
            if decision.new:
                metrics.ALERTS_UNROUTED.inc()
                logger.warning(
                    "alert %s (site %s, %s) matched no route", alert_id, model.site, model.severity
                )
            return True
        sends = [
            *(
                self._admitted(alert_id, phone, base, admission, token)
                for phone, admission in zip(now_phones, admitted, strict=True)
            ),
            *(
                self._deliver(alert_id, "", phone, due, body, model.ts_ms, observe_latency=True)
                for phone, due in plan.phones.items()
                if due is not None and due > now
            ),
        ]
        return await _all_settled(sends)

    # ---- one SMS ------------------------------------------------------------------------------------------

    async def _admitted(
        self, alert_id: str, phone: str, base: dict[str, Any], admission: PhoneAdmission, token: str
    ) -> bool:
        """Go on from what the admission step did for a phone to send to now."""
        field = phone_field("", phone)
        if admission.current is not None and not _ours(admission.current, token):
            return await self._settle_existing(alert_id, field, admission.current)
        if admission.claimed or admission.current is not None:
            return await self._send_loop(alert_id, "", phone, base, observe_latency=True)
        if admission.wait_s > 0:  # our slot is reserved but not due yet: claim it when it is
            return await self._claim_and_send(
                alert_id, "", phone, base, admission.wait_s, observe_latency=True
            )
        # No shared limiter: reserve in this process, then claim.
        return await self._deliver(
            alert_id, "", phone, None, str(base["body"]), int(base["ts"]), observe_latency=True
        )

    async def _deliver(
        self,
        alert_id: str,
        tag: str,
        phone: str,
        due: float | None,
        body: str,
        ts_ms: int,
        *,
        observe_latency: bool,
        unless_acked: bool = False,
    ) -> bool:
        """Send (or defer to ``due``) one SMS of an alert; ``unless_acked``: an escalation or a fold summary,
        which an acknowledgement arriving while it waits for its send slot cancels."""
        field = phone_field(tag, phone)
        now = self._clock()
        base = {"body": body, "ts": ts_ms, "n": 0}
        if due is not None and due > now:
            due_ms = int(due * 1000)
            ok, cur = await self.ledger.cas(
                alert_id,
                field,
                {**base, "s": "deferred", "t": _ms(now), "due": due_ms, "why": "quiet_hours"},
                allowed=("",),
                now_ms=_ms(now),
                schedule=(send_member(alert_id, tag, phone), due_ms),
            )
            if ok:
                metrics.ALERTS_DEFERRED.labels("quiet_hours").inc()
                logger.info(
                    "alert %s to %s deferred by quiet hours until %.0f", alert_id, mask_phone(phone), due
                )
                return True
            return await self._settle_existing(alert_id, field, cur)

        # An SMS already handled or in hand (this item looked at again, a resend, another process) takes no send
        # slot: each spare reservation would push the number's next real SMS back by one.
        existing = await self.ledger.get(alert_id, field)
        if existing is not None:
            return await self._settle_existing(alert_id, field, existing)
        wait = await self.limiter.reserve_async(phone)
        return await self._claim_and_send(
            alert_id, tag, phone, base, wait, observe_latency=observe_latency, unless_acked=unless_acked
        )

    async def _claim_and_send(
        self,
        alert_id: str,
        tag: str,
        phone: str,
        base: dict[str, Any],
        wait: float,
        *,
        observe_latency: bool,
        unless_acked: bool = False,
    ) -> bool:
        """Wait for a reserved send slot, claim the record (absent -> ``sending``) and send."""
        field = phone_field(tag, phone)
        if wait > 0:
            await asyncio.sleep(wait)
            if unless_acked and (done := await self._cancel_if_acked(alert_id, field, base)) is not None:
                return done
        now = self._clock()
        claim, token = self._claim(base, now)
        # The claim: the compare-and-set returns the existing record instead when someone was first.
        ok, cur = await self.ledger.cas(
            alert_id,
            field,
            claim,
            allowed=("",),
            now_ms=_ms(now),
        )
        if not ok and not _ours(cur, token):
            return await self._settle_existing(alert_id, field, cur)
        return await self._send_loop(alert_id, tag, phone, base, observe_latency=observe_latency)

    async def _send_loop(
        self,
        alert_id: str,
        tag: str,
        phone: str,
        base: dict[str, Any],
        *,
        observe_latency: bool,
        member: str | None = None,
    ) -> bool:
        """Send a record we hold in ``sending``; retry 429s; write the final outcome. Always returns settled."""
        cfg = self.config
        field = phone_field(tag, phone)
        attempts = int(base.get("n", 0))
        body, ts_ms = str(base["body"]), int(base["ts"])
        scheduled = member is not None  # is there a due item to remove with the outcome?
        member = member or send_member(alert_id, tag, phone)
        while True:
            attempts += 1
            sending = time.perf_counter()
            result = await self.sender.send(phone, body)
            now = self._clock()
            rec: dict[str, Any] = {"body": body, "ts": ts_ms, "n": attempts, "t": _ms(now)}
            if attempts == 1 and result.outcome is Outcome.ACCEPTED:
                self._log_if_slow(alert_id, phone, sending)
            if result.outcome is not Outcome.RETRYABLE:
                await self._final(
                    alert_id, field, phone, rec, result, member if scheduled else None, now, observe_latency
                )
                return True

            metrics.SMS_RETRIES.labels(result.reason.split(":", 1)[0]).inc()
            wait = self._backoff(attempts, result.retry_after)
            due_ms = _ms(now + wait)
            inline = attempts < cfg.max_inline_attempts and wait <= cfg.max_inline_wait_s
            # Written before waiting, so a crash here leaves a durable retry, not a lost SMS.
            takeover_ms = due_ms + int(cfg.takeover_grace_s * 1000) if inline else due_ms
            await self._put_owned(
                alert_id,
                field,
                {**rec, "s": "retry_wait", "due": due_ms, "why": result.reason},
                schedule=(member, takeover_ms),
            )
            scheduled = True
            if not inline:
                metrics.ALERTS_DEFERRED.labels("retry").inc()
                logger.warning(
                    "alert %s to %s: %s, retry in %.1fs by the scheduler (attempt %d)",
                    alert_id,
                    mask_phone(phone),
                    result.reason,
                    wait,
                    attempts,
                )
                return True
            logger.info(
                "alert %s to %s: %s, retrying in %.2fs", alert_id, mask_phone(phone), result.reason, wait
            )
            await asyncio.sleep(wait)
            await self.limiter.acquire(phone)
            now = self._clock()
            claim, token = self._claim(rec, now)
            ok, cur = await self.ledger.cas(
                alert_id,
                field,
                claim,
                allowed=("retry_wait",),
                now_ms=_ms(now),
            )
            if not ok and not _ours(cur, token):  # the scheduler took it over: it owns the outcome now
                return await self._settle_existing(alert_id, field, cur)

    async def _final(
        self,
        alert_id: str,
        field: str,
        phone: str,
        rec: dict[str, Any],
        result: SendResult,
        member: str | None,
        now: float,
        observe_latency: bool,
    ) -> None:
        outcome = result.outcome.value
        rec = {**rec, "s": outcome}
        if result.sid:
            rec["sid"] = result.sid
        if result.reason:
            rec["why"] = result.reason
        if result.code is not None:
            rec["code"] = result.code
        await self._put_owned(alert_id, field, rec, unschedule=member)
        metrics.SMS_TOTAL.labels(outcome).inc()
        if result.outcome in (Outcome.ACCEPTED, Outcome.DRY_RUN):
            if observe_latency:
                metrics.ALERT_LATENCY.observe(max(0.0, now - int(rec["ts"]) / 1000.0))
            logger.info("alert %s to %s: %s", alert_id, mask_phone(phone), outcome)
        elif result.outcome is Outcome.UNKNOWN:
            metrics.SMS_UNKNOWN.labels(result.reason.split(":", 1)[0]).inc()
            logger.error(
                "alert %s to %s: outcome UNKNOWN (%s); Twilio may have sent it; not resending",
                alert_id,
                mask_phone(phone),
                result.reason,
            )
        else:
            logger.error(
                "alert %s to %s: rejected (%s, Twilio code %s)",
                alert_id,
                mask_phone(phone),
                result.reason,
                result.code,
            )

    def _claim(self, rec: Mapping[str, Any], now: float) -> tuple[dict[str, Any], str]:
        """``rec`` as a ``sending`` claim made now (it counts as abandoned after ``send_timeout_s``), with a fresh
        owner token (its ``k``, see :func:`_ours`); returns (record, token)."""
        token = secrets.token_hex(8)
        due = _ms(now + self.config.send_timeout_s)
        return {**rec, "s": "sending", "t": _ms(now), "due": due, "k": token}, token

    def _log_if_slow(self, alert_id: str, phone: str, sending: float) -> None:
        """Log a live alert's SMS accepted :data:`SLOW_SMS_S` or more after the alert arrived, with where the time
        went (at most one line per :data:`SLOW_SMS_LOG_EVERY_S`)."""
        trace = _TRACE.get()
        if trace is None:  # not a live alert: the stream path, the scheduler (deferred or retried SMS)
            return
        done = time.perf_counter()
        if done - trace["received"] < SLOW_SMS_S:
            return
        if done < self._slow_log_next:
            self._slow_left_out += 1
            return
        self._slow_log_next = done + SLOW_SMS_LOG_EVERY_S
        left_out, self._slow_left_out = self._slow_left_out, 0
        admitted = trace.get("admitted", trace["start"])
        logger.info(
            "slow SMS: alert %s to %s accepted %.1f ms after it arrived (waiting %.1f, admission %.1f, "
            "send slot and claim %.1f, Twilio %.1f ms)%s",
            alert_id,
            mask_phone(phone),
            (done - trace["received"]) * 1000,
            (trace["start"] - trace["received"]) * 1000,
            (admitted - trace["start"]) * 1000,
            (sending - admitted) * 1000,
            (done - sending) * 1000,
            f"; {left_out} more slow SMS since the last such line" if left_out else "",
        )

    async def _put_owned(
        self,
        alert_id: str,
        field: str,
        rec: dict[str, Any],
        *,
        schedule: tuple[str, int] | None = None,
        unschedule: str | None = None,
    ) -> None:
        """Write a record our ``sending`` claim holds: its outcome, or a 429's durable retry.

        Losing this write would leave the claim to go stale and be recorded "unknown" later (for a 429, an SMS
        Twilio never accepted), so ride out a short Redis blip before giving up.
        """
        for attempt in range(6):
            try:
                await self.ledger.put(alert_id, field, rec, schedule=schedule, unschedule=unschedule)
                return
            except (aredis.ConnectionError, aredis.TimeoutError):
                if attempt == 5:
                    raise
                logger.warning("recording %s of %s failed; retrying", rec.get("s"), alert_id)
                await asyncio.sleep(0.1 * 2**attempt)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cfg = self.config
        # Jitter spreads the retries of a burst that was refused together.
        exp: float = min(cfg.backoff_cap_s, cfg.backoff_base_s * 2.0 ** (attempt - 1)) * self._rng.uniform(
            0.5, 1.0
        )
        return max(retry_after, exp) if retry_after is not None else exp

    async def _settle_existing(self, alert_id: str, field: str, rec: dict[str, Any] | None) -> bool:
        """Someone else handled or holds this (alert, phone): settled once it is final or durably deferred."""
        wait = _INFLIGHT_WAIT.get()
        deadline = time.monotonic() + (self.config.inflight_wait_s if wait is None else wait)
        delay = 0.005
        while True:
            if rec is None:
                return False  # vanished (expired): nothing we may safely do; let the input retry
            state = rec.get("s")
            if state in FINAL_STATES or state in DURABLE_STATES:
                return True
            now = self._clock()
            if state == "sending" and int(rec.get("due", 0)) <= _ms(now):
                return await self._abandoned(alert_id, field, rec, now)
            if time.monotonic() >= deadline:
                logger.info("alert %s %s still in flight elsewhere; not settled yet", alert_id, field)
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
            rec = await self.ledger.get(alert_id, field)

    async def _abandoned(self, alert_id: str, field: str, rec: dict[str, Any], now: float) -> bool:
        """A claim whose sender vanished mid-send (crash, kill): the SMS may have gone out. Record unknown."""
        new = {**rec, "s": "unknown", "why": "stale_claim", "t": _ms(now)}
        ok, cur = await self.ledger.cas(alert_id, field, new, allowed=("sending",), now_ms=_ms(now))
        if ok:
            metrics.SMS_TOTAL.labels("unknown").inc()
            metrics.SMS_UNKNOWN.labels("stale_claim").inc()
            phone = field.rsplit(":", 1)[-1]
            logger.error(
                "alert %s to %s: claimed but never finished (sender crashed?); outcome UNKNOWN, not resending",
                alert_id,
                mask_phone(phone),
            )
            return True
        return await self._settle_existing(alert_id, field, cur)

    @contextlib.asynccontextmanager
    async def _alert_lock(self, key: str) -> AsyncIterator[None]:
        # Serialises the two inputs of one process on the same alert, so the second simply finds the outcome.
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (asyncio.Lock(), [0])
        entry[1][0] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1][0] -= 1
            if entry[1][0] == 0:
                del self._locks[key]

    # ---- durable background work --------------------------------------------------------------------------

    async def run_scheduler(self, stop: asyncio.Event) -> None:
        """Run due work until ``stop`` is set; errors are logged and the loop carries on.

        Items run as tasks, at most ``scheduler_concurrency`` at once, and a poll does not wait for the items of the
        last one: an item that takes long (a send waiting for its number's slot, or out a 429's ``Retry-After``)
        holds one slot, while work that falls due meanwhile goes out at the next poll. At most one SMS item per
        number is in hand (see :meth:`_due_items`). Escalations and fold summaries waiting for their numbers' slots
        still hold a slot each: many of them to one number can fill the slots for as long as that number's backlog
        lasts. On ``stop`` the items in hand get ``scheduler_drain_s`` to finish, then they are cancelled; cancelled,
        they are cancelled too (an interrupted send is settled by the next start).
        """
        limit = max(1, self.config.scheduler_concurrency)
        running: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                room = limit - len(running)
                items: list[tuple[str, int]] = []
                if room > 0:
                    try:
                        items = await self._due_items(room, one_per_phone=True)
                    except Exception:
                        logger.exception("alert scheduler poll failed; retrying")
                for member, due_ms in items:
                    self._due_busy.add(member)  # before the task runs: the next poll must not pick it again
                    task = asyncio.create_task(self._run_due(member, due_ms), name="alerts-due")
                    running.add(task)
                    task.add_done_callback(running.discard)
                if items and len(items) == room:
                    # Every slot busy, maybe more due: poll again when a slot frees (or after the interval).
                    wait: set[asyncio.Future[Any]] = {*running, asyncio.ensure_future(stop.wait())}
                    try:
                        await asyncio.wait(
                            wait,
                            timeout=self.config.scheduler_interval_s,
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                    finally:
                        for f in wait - running:
                            f.cancel()
                elif not items:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.config.scheduler_interval_s)
                # else: everything due was started; poll again at once for what fell due meanwhile
            if running:
                # Stopping: the items in hand get ``scheduler_drain_s`` (within the crew's grace), then they are
                # cancelled. One still waiting then is mostly asleep (for its number's send slot, or out a
                # Retry-After, its retry already written): it stays scheduled for the next start.
                await asyncio.wait(running, timeout=self.config.scheduler_drain_s)
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def run_due_once(self) -> int:
        """Process every due item once (bounded concurrency) and wait for them; returns how many were looked at."""
        items = await self._due_items(self.config.scheduler_batch)
        if not items:
            return 0
        sem = asyncio.Semaphore(self.config.scheduler_concurrency)

        async def one(member: str, due_ms: int) -> None:
            async with sem:
                self._due_busy.add(member)
                await self._run_due(member, due_ms)

        await asyncio.gather(*(one(m, due_ms) for m, due_ms in items))
        return len(items)

    async def _due_items(self, limit: int, *, one_per_phone: bool = False) -> list[tuple[str, int]]:
        """Up to ``limit`` due items (member, due time in ms), oldest first, none being processed here.

        With ``one_per_phone``, at most one SMS item per number is in hand: a number's SMS go out one send slot at
        a time anyway, and a backlog of them (quiet hours ending on a night of warnings) would otherwise hold every
        scheduler slot asleep, waiting for that number's slots, while other numbers' work waited behind it.
        """
        # As of the read: an item that finishes while the read is under way is not picked again.
        busy = set(self._due_busy)
        window = max(self.config.scheduler_batch, limit + len(busy)) if one_per_phone else limit + len(busy)
        due = await self.ledger.due(_ms(self._clock()), window)
        lanes = {phone for m in busy if (phone := _send_phone(m))} if one_per_phone else set()
        out: list[tuple[str, int]] = []
        for member, due_ms in due:
            if member in busy or member in self._due_busy:
                continue
            if one_per_phone and (phone := _send_phone(member)):
                if phone in lanes:
                    continue
                lanes.add(phone)
            out.append((member, due_ms))
            if len(out) == limit:
                break
        return out

    async def _run_due(self, member: str, due_ms: int) -> None:
        """Process one due item picked up at ``due_ms`` (the caller put it in ``_due_busy``; taken out here)."""
        # The scheduler never waits for someone else's in-flight send: it comes back to the item later.
        _INFLIGHT_WAIT.set(0.0)
        try:
            if await self._process_due(member):
                # Done with the item as it was picked up; one rescheduled meanwhile (another long 429 met by
                # this very pass) keeps its new time.
                await self.ledger.unschedule_if(member, due_ms)
            else:
                await self.ledger.postpone(member, _ms(self._clock() + self.config.postpone_s))
        except Exception:
            logger.exception(
                "due item %s failed; it stays scheduled, retried in %.0fs",
                member.split("|", 2)[:2],
                self.config.postpone_s,
            )
            # Not at its old time: items that keep failing would fill every pass and starve the rest.
            with contextlib.suppress(Exception):
                await self.ledger.postpone(member, _ms(self._clock() + self.config.postpone_s))
        finally:
            self._due_busy.discard(member)

    async def _process_due(self, member: str) -> bool:
        kind, _, rest = member.partition("|")
        if kind == "send":
            alert_id, tag, phone = rest.split("|", 2)
            return await self._due_send(alert_id, tag, phone, member)
        if kind == "esc":
            alert_id, route = rest.rsplit("|", 1)
            return await self._due_escalation(alert_id, int(route))
        if kind == "fold":
            lead, gen = rest.rsplit("|", 1)
            return await self._due_fold(lead, int(gen))
        logger.error("unknown due item kind %r: dropped", kind)
        return True

    async def _due_send(self, alert_id: str, tag: str, phone: str, member: str) -> bool:
        field = phone_field(tag, phone)
        rec = await self.ledger.get(alert_id, field)
        if rec is None or rec.get("s") in FINAL_STATES:
            return True
        state = rec.get("s")
        if state == "sending":
            return await self._settle_existing(alert_id, field, rec)
        now = self._clock()
        if state not in DURABLE_STATES:
            return True
        if int(rec.get("due", 0)) > _ms(now):
            return False  # not yet (rescheduled by its owner); keep the item
        if (
            state == "deferred"
            and (done := await self._cancel_if_acked(alert_id, field, rec, member)) is not None
        ):
            return done
        await self.limiter.acquire(phone)
        # Many deferred SMS to one number queue behind its rate bound when quiet hours end: the alert may have
        # been acknowledged while this one waited for its slot.
        if (
            state == "deferred"
            and (done := await self._cancel_if_acked(alert_id, field, rec, member)) is not None
        ):
            return done
        now = self._clock()
        claim, token = self._claim(rec, now)
        ok, cur = await self.ledger.cas(
            alert_id,
            field,
            claim,
            allowed=(state,),
            now_ms=_ms(now),
        )
        if not ok and not _ours(cur, token):
            return await self._settle_existing(alert_id, field, cur)
        return await self._send_loop(alert_id, tag, phone, rec, observe_latency=False, member=member)

    async def _cancel_if_acked(
        self, alert_id: str, field: str, rec: dict[str, Any], member: str | None = None
    ) -> bool | None:
        """Record an SMS of an acknowledged alert cancelled instead of sending it (True once settled); None when
        the alert is not acknowledged. ``rec``: its deferred record (``member`` its due item), or the base of one
        not claimed yet."""
        if not await self.ledger.acked(alert_id):
            return None
        now = self._clock()
        ok, cur = await self.ledger.cas(
            alert_id,
            field,
            {**rec, "s": "cancelled", "why": "acknowledged", "t": _ms(now)},
            allowed=(str(rec.get("s", "")),),
            now_ms=_ms(now),
            unschedule=member,
        )
        return True if ok else await self._settle_existing(alert_id, field, cur)

    async def _due_escalation(self, alert_id: str, route: int) -> bool:
        fields = await self.ledger.alert(alert_id)
        if "ack" in fields:
            # Acknowledged. An escalation already under way then (its sender crashed mid-send; see acknowledge)
            # still has claims to settle: recorded unknown once stale, not left "sending" for ever.
            return await self._settle_claims(alert_id, fields, route)
        spec, anomaly = loads(fields.get(f"e:{route}")), loads(fields.get("a"))
        if spec is None or anomaly is None:
            logger.warning("escalation of %s (route %d) has no data left; dropped", alert_id, route)
            return True
        now = self._clock()
        due: float | None = None
        if spec.get("qh") and anomaly.get("severity") != "critical":
            until = QuietHours.from_json(spec["qh"]).until(_utc(now))
            due = until.timestamp() if until else None
        body = format_body(anomaly, code=ack_code(alert_id), escalated=True)
        settled = await _all_settled(
            [
                self._deliver(
                    alert_id,
                    "",
                    p,
                    due,
                    body,
                    int(anomaly["ts_ms"]),
                    observe_latency=False,
                    unless_acked=True,
                )
                for p in spec["phones"]
            ]
        )
        if not settled:
            return False
        # Every process that looks at this escalation once its SMS are settled gets here: count it once.
        if await self.ledger.first_to_mark(alert_id, f"x:{route}"):
            metrics.ESCALATIONS.inc()
            logger.warning("alert %s unacknowledged: escalated to %d phone(s)", alert_id, len(spec["phones"]))
        return True

    async def _settle_claims(self, alert_id: str, fields: Mapping[str, str], route: int) -> bool:
        """Settle the ``sending`` claims of a route's escalation phones; True when none is left open."""
        settled = True
        for field, rec in _escalation_claims(fields, route):
            settled = await self._settle_existing(alert_id, field, rec) and settled
        return settled

    async def _due_fold(self, lead: str, gen: int) -> bool:
        count, last_id = await self.ledger.fold_summary(lead, gen)
        if count <= 0:
            return True
        fields = await self.ledger.alert(lead)
        lead_anomaly = loads(fields.get("a"))
        if lead_anomaly is None or "ack" in fields:
            return True  # expired, or an operator is already on it
        latest = loads((await self.ledger.alert(last_id)).get("a")) if last_id else None
        shown = {**(latest or lead_anomaly), "severity": lead_anomaly["severity"]}
        now = self._clock()
        plan = self.routing.plan(str(lead_anomaly["site"]), str(lead_anomaly["severity"]), now)
        body = format_body(shown, code=ack_code(lead), alert_id=last_id or lead, folded=count)
        return await _all_settled(
            [
                self._deliver(
                    lead, f"f{gen}", p, d, body, int(shown["ts_ms"]), observe_latency=False, unless_acked=True
                )
                for p, d in plan.phones.items()
            ]
        )

    # ---- acknowledgements ---------------------------------------------------------------------------------

    async def acknowledge(self, code: str, phone: str) -> tuple[AckResult, str | None]:
        """Acknowledge the alert named by ``code`` (short code or alert_id) on behalf of ``phone``.

        Only a recipient of the alert may acknowledge it. Stops its escalations (and those of the lead it was
        folded into). Returns the result and the alert_id.
        """
        alert_id = code if ":" in code else await self.ledger.resolve_code(code)
        if not alert_id:
            return AckResult.UNKNOWN_CODE, None
        fields = await self.ledger.alert(alert_id)
        if not fields:
            return AckResult.UNKNOWN_CODE, None
        recipients = {k.rsplit(":", 1)[-1] for k in fields if k.startswith("p:")}
        for k, v in fields.items():
            if k.startswith("e:"):
                spec = loads(v) or {}
                recipients.update(spec.get("phones", []))
        if phone not in recipients:
            return AckResult.NOT_RECIPIENT, alert_id
        targets = [alert_id]
        decision = fields.get("d", "")
        if decision.startswith("folded:"):
            targets.append(decision.split(":", 1)[1])
        record = {"by": phone, "at": _ms(self._clock())}
        first = False
        for target in targets:
            first = await self.ledger.ack(target, record) or first
            target_fields = fields if target == alert_id else await self.ledger.alert(target)
            routes = [int(k[2:]) for k in target_fields if k.startswith("e:")]
            # Escalations stop here, except one whose sends are under way (claimed): its item settles them.
            await self.ledger.unschedule(
                *(esc_member(target, r) for r in routes if not _escalation_claims(target_fields, r))
            )
        if not first:
            return AckResult.ALREADY, alert_id
        metrics.ACKS.inc()
        logger.info("alert %s acknowledged by %s", alert_id, mask_phone(phone))
        return AckResult.ACKED, alert_id

    async def aclose(self) -> None:
        await self.sender.aclose()


def _send_phone(member: str) -> str | None:
    """The number of a due SMS item (``send|alert|tag|phone``); None for other kinds."""
    kind, _, rest = member.partition("|")
    return rest.rsplit("|", 1)[-1] if kind == "send" else None


def _escalation_claims(fields: Mapping[str, str], route: int) -> list[tuple[str, dict[str, Any]]]:
    """The (field, record) of each SMS of this route's escalation claimed (``sending``) in the alert's hash."""
    spec = loads(fields.get(f"e:{route}")) or {}
    claims = []
    for phone in spec.get("phones", []):
        field = phone_field("", phone)
        rec = loads(fields.get(field))
        if rec is not None and rec.get("s") == "sending":
            claims.append((field, rec))
    return claims


def _ours(rec: Mapping[str, Any] | None, token: str) -> bool:
    """Is ``rec`` the claim made with ``token``? A claim's reply can be lost after the server ran it (the
    connection dropped); redis-py then sends the command again, which finds the record already claimed. Without the
    token that claim looked like someone else's, was waited for until it counted as abandoned and became an
    ``unknown`` outcome: an SMS never sent."""
    return rec is not None and rec.get("s") == "sending" and rec.get("k") == token


async def _all_settled(sends: list[Coroutine[Any, Any, bool]]) -> bool:
    """Run an alert's sends together; True when all are settled (also when there are none).

    One send (one phone, the usual route) is awaited in this task: through ``gather`` it would become a new task
    queued behind everything else ready on the loop, and a burst of alerts (a gateway's backlog of one sensor) puts
    dozens of other dispatches there, most of them about to fold (measured: 27 ms of a 52-ms hop).
    """
    if len(sends) == 1:
        return await sends[0]
    # Every send runs to its end before an error is raised: one left running would send (or hold its claim) after
    # the caller had moved on, untracked, maybe against a client being closed.
    results = await asyncio.gather(*sends, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return all(results)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
