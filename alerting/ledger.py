"""The SMS ledger in Redis: one record per alert and phone, written *before* sending, so an SMS goes out at most once.

Layout (all names built from :mod:`handoff.keys`; ``{site:sensor}`` is a hash tag so one sensor's keys share a
Cluster slot):

``wd:_sms:{site:sensor}:seq``  hash per alert, TTL = anomaly retention:
    ``a``            the anomaly JSON (deferred sends, escalations and summaries are formatted from it)
    ``d``            the noise-control decision, made once: ``lead``, ``folded:<lead alert_id>``, ``throttled``
    ``p:<tag>:<phone>``  a phone record (JSON). ``tag`` is empty for the alert itself, ``r<replay_id>`` for an
                     operator resend, ``f<n>`` for the n-th fold summary of a lead
    ``e:<route>``    an escalation planned for route ``<route>`` (JSON: phones, quiet hours)
    ``ack``          who acknowledged it and when (JSON)
    ``fc fl flts fg fsched fs:<n>``  fold bookkeeping of a lead
``wd:_sms_fold:{site:sensor}:<metric>``  hash: the current lead for that sensor and metric (noise control)
``wd:_sms_thr:{site:sensor}:<rank>:<bucket>``  counter: leads of that sensor and severity in the throttle window
``wd:_sms_ack:<code>``                   string: alert_id for an ``ACK <code>`` reply
``wd:_sms_due``                          sorted set of due work (score: epoch ms), members:
    ``send|<alert_id>|<tag>|<phone>``   a deferred (quiet hours) or 429-delayed SMS
    ``esc|<alert_id>|<route>``          an escalation check
    ``fold|<lead alert_id>|<n>``        a fold summary

Phone record states: ``deferred`` / ``retry_wait`` (durable, scheduled in ``wd:_sms_due``; ``due`` is when it may
go), ``sending`` (claimed, a request may be in flight; ``due`` is when the claim counts as abandoned), and the final
``accepted``, ``unknown``, ``rejected``, ``dry_run``, ``cancelled``. Only a compare-and-set (Lua) moves a record
into ``sending`` (the admission script, or the compare-and-set), so exactly one party ever sends it; an abandoned
``sending`` becomes ``unknown``, never resent.

Before the first SMS request of an alert there is one round trip: the admission script decides (fold, throttle,
lead), plans the escalations, and per phone reserves the send slot (the shared GCRA buckets of
:mod:`alerting.ratelimit`) and claims the record, or returns the record someone else already holds.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import orjson
import redis.asyncio as aredis

from alerting.body import ack_code
from alerting.ratelimit import GCRA_LUA
from handoff import keys

FINAL_STATES: Final = frozenset({"accepted", "unknown", "rejected", "dry_run", "cancelled"})
DURABLE_STATES: Final = frozenset({"deferred", "retry_wait"})

DUE_KEY: Final = keys.private("sms_due")


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def split_alert_id(alert_id: str) -> tuple[str, str]:
    """``site:sensor:seq`` -> (``site:sensor``, ``seq``); an id of another shape is kept whole."""
    head, sep, seq = alert_id.rpartition(":")
    return (head, seq) if sep and head else (alert_id, "")


def alert_key(alert_id: str) -> str:
    """Ledger hash of one alert."""
    tag, seq = split_alert_id(alert_id)
    return f"{keys.SMS_LEDGER_PREFIX}{{{tag}}}:{seq}"


def fold_key(site: str, sensor_id: str, metric: str) -> str:
    return keys.private("sms_fold", f"{{{site}:{sensor_id}}}", metric)


def throttle_key(site: str, sensor_id: str, severity_rank: int, bucket: int) -> str:
    return keys.private("sms_thr", f"{{{site}:{sensor_id}}}", str(severity_rank), str(bucket))


def ack_code_key(code: str) -> str:
    return keys.private("sms_ack", code.upper())


def phone_field(tag: str, phone: str) -> str:
    return f"p:{tag}:{phone}"


def send_member(alert_id: str, tag: str, phone: str) -> str:
    return f"send|{alert_id}|{tag}|{phone}"


def esc_member(alert_id: str, route: int) -> str:
    return f"esc|{alert_id}|{route}"


@dataclass(frozen=True, slots=True)
class EscalationPlan:
    """An escalation to schedule with an alert: its route index, its phones and quiet hours (JSON), when it is due."""

    route: int
    spec: Mapping[str, Any]
    due_ms: int


@dataclass(frozen=True, slots=True)
class PhoneRequest:
    """A phone to send an alert to now: its record field, the ``sending`` record to claim it with, whether to claim
    it in the admission step, and its send-rate buckets (keys and (interval_ms, burst) pairs) to reserve a slot in."""

    field: str
    record: Mapping[str, Any]
    claim: bool
    bucket_keys: Sequence[str] = ()
    bucket_args: Sequence[float] = ()


@dataclass(frozen=True, slots=True)
class PhoneAdmission:
    """What admission did for one phone: claimed it (send now), or reserved a slot ``wait_s`` away without claiming
    (claim when it comes due), or found its record already there (``current``: someone else has it)."""

    claimed: bool
    wait_s: float
    current: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Decision:
    """The noise-control verdict for an alert, and whether this call made it (so it is counted once)."""

    kind: str  # "lead", "folded", "throttled"
    new: bool
    lead: str | None = None


# Admission of an alert in one step (one round trip before the SMS request):
# 1. decide once per alert (idempotent): fold into the current lead of the sensor+metric, throttle, or become a lead;
# 2. for a lead, plan its escalations (once per alert and route: a redelivered alert must not schedule again an
#    escalation that already ran);
# 3. for a lead, per phone to send now: if the phone record exists, return it (someone else has it: no send slot is
#    taken); otherwise reserve a send slot (GCRA, when the phone has buckets) and, when no wait is due and claiming
#    is asked for, claim the record (absent -> ``sending``).
# KEYS: alert hash, fold hash, throttle counter, ack-code key, due zset, then the rate buckets of every phone in order
# ARGV: anomaly json, alert_id, ts_ms, severity rank, fold window ms, throttle max, throttle ttl ms, ledger ttl ms,
#       summary due floor ms (now + settle), alert hash key (stored in the fold hash for the folded ones),
#       n escalations, then per escalation: field, spec json, due member, due ms;
#       n phones, then per phone: field, claim record json, claim ("1"/"0"), n buckets, then (interval_ms, burst)
#       per bucket
# Returns {new, decision, then per phone: claimed (0/1), wait ms, current record or ""}.
_ADMIT = (
    GCRA_LUA
    + """
local new = 0
local decision = redis.call('HGET', KEYS[1], 'd')
if not decision then
  new = 1
  local ts = tonumber(ARGV[3])
  local rank = tonumber(ARGV[4])
  local win = tonumber(ARGV[5])
  decision = 'lead'
  if win > 0 then
    local f = redis.call('HMGET', KEYS[2], 'lead', 'start', 'rank', 'lk')
    if f[1] and f[1] ~= ARGV[2] and math.abs(ts - tonumber(f[2])) < win and rank <= tonumber(f[3]) then
      decision = 'folded:' .. f[1]
      local lk = f[4]
      redis.call('HINCRBY', lk, 'fc', 1)
      local lts = tonumber(redis.call('HGET', lk, 'flts') or '-1')
      if ts >= lts then redis.call('HSET', lk, 'fl', ARGV[2], 'flts', ts) end
      if redis.call('HSETNX', lk, 'fsched', '1') == 1 then
        local g = redis.call('HINCRBY', lk, 'fg', 1)
        local due = math.max(tonumber(ARGV[9]), tonumber(f[2]) + win)
        redis.call('ZADD', KEYS[5], 'NX', due, 'fold|' .. f[1] .. '|' .. g)
      end
    end
  end
  if decision == 'lead' and tonumber(ARGV[6]) > 0 then
    local n = redis.call('INCR', KEYS[3])
    if n == 1 then redis.call('PEXPIRE', KEYS[3], ARGV[7]) end
    if n > tonumber(ARGV[6]) then decision = 'throttled' end
  end
  if decision == 'lead' and win > 0 then
    local start = tonumber(redis.call('HGET', KEYS[2], 'start') or '-1')
    if ts >= start then
      redis.call('DEL', KEYS[2])
      redis.call('HSET', KEYS[2], 'lead', ARGV[2], 'start', ts, 'rank', rank, 'lk', ARGV[10])
      redis.call('PEXPIRE', KEYS[2], 2 * win)
    end
  end
  redis.call('HSET', KEYS[1], 'a', ARGV[1], 'd', decision)
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  if decision == 'lead' then redis.call('SET', KEYS[4], ARGV[2], 'PX', ARGV[8]) end
end
local out = {new, decision}
if decision ~= 'lead' then return out end
local i = 11
for _ = 1, tonumber(ARGV[i]) do
  if redis.call('HSETNX', KEYS[1], ARGV[i + 1], ARGV[i + 2]) == 1 then
    redis.call('ZADD', KEYS[5], 'NX', ARGV[i + 4], ARGV[i + 3])
  end
  i = i + 4
end
local k = 6
local nphones = tonumber(ARGV[i + 1])
i = i + 2
for _ = 1, nphones do
  local field, rec, claim, nb = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  i = i + 4
  local cur = redis.call('HGET', KEYS[1], field)
  if cur then
    table.insert(out, 0); table.insert(out, 0); table.insert(out, cur)
  else
    local wait = 0
    if nb > 0 then wait = gcra_reserve(k, nb, i) end
    if wait <= 0 and claim == '1' then
      redis.call('HSET', KEYS[1], field, rec)
      table.insert(out, 1); table.insert(out, 0)
    else
      table.insert(out, 0); table.insert(out, wait)
    end
    table.insert(out, '')
  end
  k = k + nb
  i = i + 2 * nb
end
return out
"""
)

# Compare-and-set of one phone record, optionally scheduling or unscheduling due work in the same step.
# KEYS: alert hash, due zset
# ARGV: field, new json, allowed states (",a,b," with "" meaning absent), now ms, ttl ms, zadd member, zadd score,
#       zrem member
_CAS = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local state = ''
local due = 0
if cur then
  local r = cjson.decode(cur)
  state = r['s'] or ''
  due = tonumber(r['due'] or 0)
end
if string.find(ARGV[3], ',' .. state .. ',', 1, true) and (state == '' or due <= tonumber(ARGV[4])) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  if not cur then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
  if ARGV[6] ~= '' then redis.call('ZADD', KEYS[2], ARGV[7], ARGV[6]) end
  if ARGV[8] ~= '' then redis.call('ZREM', KEYS[2], ARGV[8]) end
  return {1, cur or ''}
end
return {0, cur or ''}
"""

# Freeze the count of a fold summary (idempotent per generation) and let later folds schedule the next one.
# KEYS: lead alert hash.  ARGV: generation.  Returns {count to report, latest folded alert_id}.
_FOLD_SUMMARY = """
local g = tonumber(ARGV[1])
local total = redis.call('HGET', KEYS[1], 'fs:' .. g)
if not total then
  total = redis.call('HGET', KEYS[1], 'fc') or '0'
  redis.call('HSET', KEYS[1], 'fs:' .. g, total)
  if tonumber(redis.call('HGET', KEYS[1], 'fg') or '0') == g then redis.call('HDEL', KEYS[1], 'fsched') end
end
local before = redis.call('HGET', KEYS[1], 'fs:' .. (g - 1)) or '0'
return {tonumber(total) - tonumber(before), redis.call('HGET', KEYS[1], 'fl') or ''}
"""

# Remove a due item only if it is still due when it was picked up (its score unchanged): whoever rescheduled it
# meanwhile (the pass that processed it meeting another long 429, another process) owns the new time.
# KEYS: due set.  ARGV: member, score seen.  Returns 1 when removed.
_UNSCHEDULE_IF = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) == tonumber(ARGV[2]) then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"""


def dumps(record: Mapping[str, Any]) -> str:
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS).decode()


def loads(raw: Any) -> dict[str, Any] | None:
    if raw is None or raw == b"" or raw == "":
        return None
    value = orjson.loads(raw)
    return value if isinstance(value, dict) else None


class Ledger:
    """Redis operations of the SMS ledger; every method is one round trip unless it says otherwise."""

    def __init__(self, redis: aredis.Redis, *, ttl_s: float) -> None:
        self.redis = redis
        self.ttl_ms = int(ttl_s * 1000)
        self._admit = redis.register_script(_ADMIT)
        self._cas = redis.register_script(_CAS)
        self._fold_summary = redis.register_script(_FOLD_SUMMARY)
        self._unschedule_if = redis.register_script(_UNSCHEDULE_IF)

    async def admit(
        self,
        anomaly_json: str,
        *,
        alert_id: str,
        site: str,
        sensor_id: str,
        metric: str,
        ts_ms: int,
        severity_rank: int,
        fold_window_ms: int,
        throttle_max: int,
        throttle_window_ms: int,
        summary_due_floor_ms: int,
        escalations: Sequence[EscalationPlan] = (),
        phones: Sequence[PhoneRequest] = (),
    ) -> tuple[Decision, list[PhoneAdmission]]:
        """Store the anomaly and make (or read back) its noise-control decision; for a lead, also plan its
        escalations and reserve and claim the phones to send to now, all in one step (see :data:`_ADMIT`).

        The phone admissions are in the order of ``phones`` (empty unless the alert is a lead).
        """
        bucket = ts_ms // throttle_window_ms if throttle_window_ms > 0 else 0
        akey = alert_key(alert_id)
        script_keys = [
            akey,
            fold_key(site, sensor_id, metric),
            throttle_key(site, sensor_id, severity_rank, bucket),
            ack_code_key(ack_code(alert_id)),
            DUE_KEY,
        ]
        args: list[Any] = [
            anomaly_json,
            alert_id,
            ts_ms,
            severity_rank,
            fold_window_ms,
            throttle_max,
            2 * throttle_window_ms if throttle_window_ms > 0 else 1000,
            self.ttl_ms,
            summary_due_floor_ms,
            akey,
            len(escalations),
        ]
        for esc in escalations:
            args += [f"e:{esc.route}", dumps(esc.spec), esc_member(alert_id, esc.route), esc.due_ms]
        args.append(len(phones))
        for p in phones:
            script_keys += p.bucket_keys
            args += [p.field, dumps(p.record), "1" if p.claim else "0", len(p.bucket_keys), *p.bucket_args]
        reply = await self._admit(keys=script_keys, args=args)
        d = _s(reply[1])
        if d.startswith("folded:"):
            decision = Decision("folded", bool(reply[0]), d.split(":", 1)[1])
        else:
            decision = Decision(d, bool(reply[0]))
        admitted = [
            PhoneAdmission(bool(reply[j]), max(0, int(reply[j + 1])) / 1000, loads(reply[j + 2]))
            for j in range(2, len(reply), 3)
        ]
        return decision, admitted

    async def store_anomaly(self, alert_id: str, anomaly_json: str) -> None:
        """Keep the anomaly for later formatting without deciding anything (operator resends)."""
        akey = alert_key(alert_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(akey, "a", anomaly_json)
            pipe.pexpire(akey, self.ttl_ms)
            pipe.set(ack_code_key(ack_code(alert_id)), alert_id, px=self.ttl_ms)
            await pipe.execute()

    async def cas(
        self,
        alert_id: str,
        field: str,
        record: Mapping[str, Any],
        *,
        allowed: Iterable[str],
        now_ms: int,
        schedule: tuple[str, int] | None = None,
        unschedule: str | None = None,
    ) -> tuple[bool, dict[str, Any] | None]:
        """Write ``record`` if the current state is in ``allowed`` ("" = no record) and its ``due`` has passed.

        Returns (written, the record found before).
        """
        ok, cur = await self._cas(
            keys=[alert_key(alert_id), DUE_KEY],
            args=[
                field,
                dumps(record),
                "," + ",".join(allowed) + ",",
                now_ms,
                self.ttl_ms,
                schedule[0] if schedule else "",
                schedule[1] if schedule else 0,
                unschedule or "",
            ],
        )
        return bool(ok), loads(cur)

    async def put(
        self,
        alert_id: str,
        field: str,
        record: Mapping[str, Any],
        *,
        schedule: tuple[str, int] | None = None,
        unschedule: str | None = None,
    ) -> None:
        """Overwrite a record we own (after our own send), scheduling or unscheduling due work atomically."""
        if schedule is None and unschedule is None:
            await self.redis.hset(alert_key(alert_id), field, dumps(record))
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(alert_key(alert_id), field, dumps(record))
            if schedule is not None:
                pipe.zadd(DUE_KEY, {schedule[0]: schedule[1]})
            if unschedule is not None:
                pipe.zrem(DUE_KEY, unschedule)
            await pipe.execute()

    async def get(self, alert_id: str, field: str) -> dict[str, Any] | None:
        return loads(await self.redis.hget(alert_key(alert_id), field))

    async def alert(self, alert_id: str) -> dict[str, str]:
        """Every field of an alert's hash (phone records still JSON strings)."""
        raw = await self.redis.hgetall(alert_key(alert_id))
        return {_s(k): _s(v) for k, v in raw.items()}

    async def phone_records(self, alert_id: str) -> dict[str, dict[str, Any]]:
        """``{field: record}`` of every phone record of an alert (for status pages and tests)."""
        out: dict[str, dict[str, Any]] = {}
        for k, v in (await self.alert(alert_id)).items():
            if k.startswith("p:"):
                rec = loads(v)
                if rec is not None:
                    out[k] = rec
        return out

    async def fold_summary(self, lead_id: str, generation: int) -> tuple[int, str]:
        count, last = await self._fold_summary(keys=[alert_key(lead_id)], args=[generation])
        return int(count), _s(last)

    async def due(self, now_ms: int, limit: int) -> list[tuple[str, int]]:
        """Due items (member, due time in ms), earliest first."""
        items = await self.redis.zrangebyscore(DUE_KEY, "-inf", now_ms, start=0, num=limit, withscores=True)
        return [(_s(m), int(score)) for m, score in cast("list[tuple[bytes, float]]", items)]

    async def due_count(self) -> int:
        return int(await self.redis.zcard(DUE_KEY))

    async def postpone(self, member: str, due_ms: int) -> None:
        """Move an existing due item to ``due_ms`` (no effect when it was removed meanwhile)."""
        await self.redis.zadd(DUE_KEY, {member: due_ms}, xx=True)

    async def unschedule(self, *members: str) -> None:
        if members:
            await self.redis.zrem(DUE_KEY, *members)

    async def unschedule_if(self, member: str, due_ms: int) -> bool:
        """Remove ``member`` only if it is still due at ``due_ms`` (not rescheduled since it was read)."""
        return bool(await self._unschedule_if(keys=[DUE_KEY], args=[member, due_ms]))

    async def first_to_mark(self, alert_id: str, field: str) -> bool:
        """Set ``field`` on the alert's hash unless it is there: True for the one caller, of all processes, that
        set it (an event that several processes may each see complete, counted once). The value is a token of
        this call, so a command resent after a lost reply still finds the mark its own."""
        token = secrets.token_hex(8)
        key = alert_key(alert_id)
        if await self.redis.hsetnx(key, field, token):
            return True
        return _s(await self.redis.hget(key, field)) == token

    async def acked(self, alert_id: str) -> bool:
        return bool(await self.redis.hexists(alert_key(alert_id), "ack"))

    async def resolve_code(self, code: str) -> str | None:
        raw = await self.redis.get(ack_code_key(code))
        return None if raw is None else _s(raw)

    async def ack(self, alert_id: str, record: Mapping[str, Any]) -> bool:
        """Record the first acknowledgement; False when it was already acknowledged."""
        return bool(await self.redis.hsetnx(alert_key(alert_id), "ack", dumps(record)))
