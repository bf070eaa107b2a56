"""Write accepted readings to ``wd:readings:v1`` exactly once, and refused ones to ``wd:quarantine:v1``.

Exactly once across processes and restarts: the broker redelivers a QoS 1 message whose PUBACK it did not get, and
a gateway may resend. ``(site, sensor_id, seq)`` identifies a reading, so one Lua script, per group of messages,
checks and marks each reading in a per-sensor dedupe state and XADDs each message's *new* readings as one entry,
in one atomic step: a crash leaves either the marks and the entry, or neither.

Per-sensor state (one string key ``wd:_seen:{site}:sensor_id``; the site is a hash tag so a future Cluster keeps a
site's keys in one slot): a 30-byte header, the high-water mark (highest seq stored) as two zero-padded 10-digit
halves and the time its TTL was last set, then a ring of :data:`SEEN_WINDOW` bits, bit ``seq mod W`` set when that
seq was stored. Seqs travel and are compared as two base-10^10 halves because Lua numbers are doubles and ``seq``
goes to 2^63-1. The script reads each key once per call, works on the bits in Lua and writes the changed bytes
back in one SETRANGE per run (a SETBIT per reading cost more than the rest of the script). A reading is

* new if above the high-water mark, or within the window below it with its bit clear: stored and marked;
* a duplicate if its bit is set (or it equals the mark): dropped and counted;
* ``stale_seq`` if it is ``W`` or more below the mark: the ring no longer says whether it was stored. It is
  quarantined (never silently dropped, never stored twice): the operator can replay it. This happens when a sensor
  resets its counter, or when a message sat unacknowledged in a dead ingest's session while the sensor moved on by
  more than ``W`` readings. ``W`` = 4096 keeps that rare at 512 bytes per sensor.

The state expires :data:`SEEN_TTL_MS` after the sensor's last stored reading (the TTL is refreshed at most hourly,
so at least 8 days minus an hour). That is safe: a reading older than 7
days is refused for clock skew before it gets here, so any reading that could still be accepted has its sensor's
state alive. Changing ``W`` changes bit positions: it needs new keys (bump the prefix), never an in-place change.
"""

from __future__ import annotations

import base64
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from handoff import keys
from ingest.validate import QUARANTINE_RAW_BYTES, Reading, Reason

logger = logging.getLogger(__name__)

__all__ = [
    "SEEN_TTL_MS",
    "SEEN_WINDOW",
    "MessageWrite",
    "Quarantine",
    "ReadingStore",
    "StoreError",
    "seen_key",
]

SEEN_WINDOW: Final = 4096  # bits per sensor; a multiple of 8
SEEN_TTL_MS: Final = 8 * 24 * 3600 * 1000  # the 7-day clock window plus a day (refreshed at most hourly)
#: Upper bound on readings per script call: a script blocks the server while it runs (~1-2 us per reading).
MAX_READINGS_PER_CALL: Final = 2000  # also keeps key indexes within the record's 16 bits
QUARANTINE_MAXLEN: Final = 100_000

# The shebang matters: a script declared with it (and without allow-oom) is refused as a whole when the server is
# over maxmemory, instead of failing half-way through; a half-run script could mark readings it never stored.
_INGEST_LUA: Final = r"""#!lua
local W = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local field = ARGV[3]
local meta = ARGV[4]
local HEAD = 30 -- bytes: high-water mark (two 10-digit halves) and the time the TTL was last set
local REFRESH = 3600 -- seconds between TTL refreshes of one key
local now = tonumber(redis.call('TIME')[1])
local floor = math.floor
local unpack = struct.unpack
-- Per sensor key index: high-water mark halves, TTL time, the ring as read, and the ring bytes changed since.
-- Bits are worked on in Lua and written back once per key (contiguous changed bytes in one SETRANGE): a
-- SETBIT per reading cost more than everything else in the script.
local hwhi, hwlo, refreshed, ring, changed, stored = {}, {}, {}, {}, {}, {}

local function getbyte(ki, bi)
  local v = changed[ki][bi]
  if v == nil then v = string.byte(ring[ki], bi + 1) or 0 end
  return v
end

local function clear_bit(ki, p)
  local bi = floor(p / 8)
  local mask = 2 ^ (7 - p % 8)
  local v = getbyte(ki, bi)
  if floor(v / mask) % 2 == 1 then changed[ki][bi] = v - mask end
end

local function clear_span(ki, p, n) -- ring bits p .. p+n-1, no wrap
  while n > 0 and p % 8 ~= 0 do clear_bit(ki, p); p = p + 1; n = n - 1 end
  while n >= 8 do changed[ki][p / 8] = 0; p = p + 8; n = n - 8 end
  while n > 0 do clear_bit(ki, p); p = p + 1; n = n - 1 end
end

local function clear_ring(ki, p, n)
  if n <= 0 then return end
  if p + n <= W then clear_span(ki, p, n)
  else clear_span(ki, p, W - p); clear_span(ki, 0, n - (W - p)) end
end

-- ARGV[4]: per message a uint32 reading count, then per reading a _RECORD (key index, ring position, seq as
-- two base-1e10 halves, offset and length of its JSON in the payload). ARGV[5 ..]: per message its entry payload
-- {"readings":[...]} holding every reading, sliced when some are not new.
local mp = 1
local out = {}
for m = 1, #ARGV - 4 do
  local payload = ARGV[4 + m]
  local n
  n, mp = unpack('>I', meta, mp)
  local fresh, spans, stale, dups = 0, {}, {}, 0
  for r = 1, n do
    local ki, pos, hi, lo, off, len
    ki, pos, hi, lo, off, len, mp = unpack('>HHddII', meta, mp)
    local hh = hwhi[ki]
    if hh == nil then
      local data = redis.call('GETRANGE', KEYS[ki], 0, HEAD + W / 8 - 1)
      if data == '' then
        hh = false
      else
        hh = tonumber(string.sub(data, 1, 10))
        hwlo[ki] = tonumber(string.sub(data, 11, 20))
        refreshed[ki] = tonumber(string.sub(data, 21, 30))
      end
      hwhi[ki] = hh
      ring[ki] = string.sub(data, HEAD + 1)
      changed[ki] = {}
    end
    local new, check = false, false
    if not hh then
      new = true; hwhi[ki] = hi; hwlo[ki] = lo
    else
      -- exact while |d| < 2^53; past that only its sign and size matter, and both are right
      local d = (hi - hh) * 1e10 + (lo - hwlo[ki])
      if d > 0 then
        -- the window moves up: forget the seqs that leave it (their slots are hw+1 .. seq-1, and seq's own)
        if d >= W then clear_span(ki, 0, W) else clear_ring(ki, (pos - d + 1) % W, d - 1) end
        new = true; hwhi[ki] = hi; hwlo[ki] = lo
      elseif d == 0 then
        dups = dups + 1
      elseif -d >= W then
        stale[#stale + 1] = r - 1
      else
        check = true
      end
    end
    if new or check then
      local bi = floor(pos / 8)
      local mask = 2 ^ (7 - pos % 8)
      local v = getbyte(ki, bi)
      local set = floor(v / mask) % 2 == 1
      if check and set then
        dups = dups + 1
      else
        new = true
        if not set then changed[ki][bi] = v + mask end -- set after a move up: seq - W's slot, now reused
      end
    end
    if new then
      stored[ki] = true
      fresh = fresh + 1
      spans[fresh] = off
      spans[-fresh] = len
    end
  end
  local id = ''
  if fresh == n then
    id = redis.call('XADD', KEYS[1], '*', field, payload)
  elseif fresh > 0 then
    local parts = {}
    for j = 1, fresh do parts[j] = string.sub(payload, spans[j] + 1, spans[j] + spans[-j]) end
    id = redis.call('XADD', KEYS[1], '*', field, '{"readings":[' .. table.concat(parts, ',') .. ']}')
  end
  out[#out + 1] = id
  out[#out + 1] = fresh
  out[#out + 1] = dups
  out[#out + 1] = #stale
  for _, x in ipairs(stale) do out[#out + 1] = x end
end
for ki, _ in pairs(stored) do
  local key = KEYS[ki]
  local bytes = changed[ki]
  local idx = {}
  for bi, _ in pairs(bytes) do idx[#idx + 1] = bi end
  table.sort(idx)
  local i = 1
  while i <= #idx do
    local j = i
    while j < #idx and idx[j + 1] == idx[j] + 1 do j = j + 1 end
    local run = {}
    for k = i, j do run[#run + 1] = string.char(bytes[idx[k]]) end
    redis.call('SETRANGE', key, HEAD + idx[i], table.concat(run))
    i = j + 1
  end
  -- the TTL is refreshed at most hourly: still above 7 days after the last stored reading
  local since = refreshed[ki]
  local refresh = since == nil or now - since >= REFRESH
  if refresh then since = now end
  redis.call('SETRANGE', key, 0, string.format('%010.0f%010.0f%010d', hwhi[ki], hwlo[ki], since))
  if refresh then redis.call('PEXPIRE', key, ttl) end
end
return out
"""

_ENTRY_HEAD: Final = b'{"readings":['
_COUNT: Final = struct.Struct(">I")
#: Per reading: key index, ring position, seq // 1e10 and seq % 1e10 (doubles: exact, and Lua numbers are doubles
#: so a 63-bit seq cannot travel whole), offset and length of its JSON in the message's payload.
_RECORD: Final = struct.Struct(">HHddII")
_SPLIT: Final = 10**10


class StoreError(Exception):
    """A write did not complete (Redis unreachable, out of memory, WAITAOF not confirmed): retry later."""


def seen_key(site: str, sensor_id: str) -> str:
    """The dedupe-state key of one sensor; the site is a Cluster hash tag."""
    return f"{keys.INGEST_SEEN_PREFIX}{{{site}}}:{sensor_id}"


@dataclass(slots=True)
class Quarantine:
    """One refused message or reading, as it goes to ``wd:quarantine:v1``."""

    reason: Reason
    detail: str
    topic: str
    received_ms: int
    raw: bytes

    def payload(self) -> bytes:
        """The contract JSON of this entry."""
        return orjson.dumps(
            {
                "reason": self.reason,
                "detail": self.detail,
                "topic": self.topic,
                "received_ms": self.received_ms,
                "raw_b64": base64.b64encode(self.raw[:QUARANTINE_RAW_BYTES]).decode("ascii"),
            }
        )


@dataclass(slots=True)
class MessageWrite:
    """The readings of one MQTT message to write, and (after the write) what happened to them."""

    topic: str
    received_ms: int
    readings: list[Reading]
    entry_id: str | None = None
    stored: int = 0
    duplicates: int = 0
    stale: list[Reading] = field(default_factory=list)
    done: bool = False
    stale_written: bool = False


@dataclass(slots=True)
class _Call:
    messages: list[MessageWrite]
    args: list[Any]
    done: bool = False


class ReadingStore:
    """Pipelined, idempotent writes of readings (deduplicated) and quarantine entries.

    :meth:`write` may be called again with the same objects after a :class:`StoreError`: what completed is not
    sent twice, and the readings script is idempotent anyway (a repeat is a duplicate).
    """

    def __init__(
        self,
        redis: aredis.Redis,
        *,
        window: int = SEEN_WINDOW,
        ttl_ms: int = SEEN_TTL_MS,
        quarantine_maxlen: int = QUARANTINE_MAXLEN,
        waitaof: bool = False,
        waitaof_timeout_ms: int = 1000,
    ) -> None:
        if not 0 < window <= 65_536 or window % 8:
            raise ValueError("window must be a multiple of 8 up to 65536")
        self.redis = redis
        self.window = window
        self.ttl_ms = ttl_ms
        self.quarantine_maxlen = quarantine_maxlen
        self.waitaof_wanted = waitaof
        self.waitaof = False  # decided by prepare(): wanted, and the server can do it
        self.waitaof_timeout_ms = waitaof_timeout_ms
        self._sha: str | None = None

    async def prepare(self) -> None:
        """Load the script and find out whether WAITAOF can be used (Redis 7.2+, Valkey 8, with AOF on)."""
        self._sha = await self.redis.script_load(_INGEST_LUA)
        if not self.waitaof_wanted:
            return
        try:
            await self.redis.execute_command("WAITAOF", 1, 0, self.waitaof_timeout_ms)  # type: ignore[no-untyped-call]
        except ResponseError as exc:
            logger.warning(
                "WAITAOF requested but not usable on this server (%s): writes are not fsync-confirmed", exc
            )
            self.waitaof = False
        else:
            self.waitaof = True
            logger.info("WAITAOF on: each flush waits for the local AOF fsync before acknowledging")

    async def write(self, messages: Sequence[MessageWrite], quarantine: list[Quarantine]) -> None:
        """Write every message's new readings and the quarantine entries, pipelined in one round trip.

        Results land in each :class:`MessageWrite`; written entries are removed from ``quarantine``. Readings found
        ``stale_seq`` are quarantined in a second round trip (rare). Raises :class:`StoreError` when anything is not
        confirmed; nothing may be acknowledged then, and calling again with the same objects resumes.
        """
        if self._sha is None:
            await self.prepare()
        for m in messages:
            if not m.readings:
                m.done = m.stale_written = True
        await self._run(self._calls([m for m in messages if not m.done]), quarantine)
        stale = [m for m in messages if not m.stale_written]
        stale_q = [self._stale_entry(m, r) for m in stale for r in m.stale]
        if stale_q:
            await self._run([], stale_q)
        for m in stale:
            m.stale_written = True

    def _stale_entry(self, m: MessageWrite, reading: Reading) -> Quarantine:
        return Quarantine(
            "stale_seq",
            f"seq {reading.seq} of {reading.site}/{reading.sensor_id} is {self.window} or more below the highest "
            "seq stored for that sensor: cannot tell whether it was stored before",
            m.topic,
            m.received_ms,
            reading.json,
        )

    def _calls(self, messages: list[MessageWrite]) -> list[_Call]:
        # One script call per site (a future Cluster shards by site) and at most MAX_READINGS_PER_CALL readings.
        by_site: dict[str, list[MessageWrite]] = {}
        for m in messages:
            by_site.setdefault(m.readings[0].site, []).append(m)
        calls = []
        for group in by_site.values():
            chunk: list[MessageWrite] = []
            count = 0
            for m in group:
                if chunk and count + len(m.readings) > MAX_READINGS_PER_CALL:
                    calls.append(self._call(chunk))
                    chunk, count = [], 0
                chunk.append(m)
                count += len(m.readings)
            if chunk:
                calls.append(self._call(chunk))
        return calls

    def _call(self, messages: list[MessageWrite]) -> _Call:
        # A few big arguments instead of several per reading: redis-py packs every argument in Python, which cost
        # more than the script itself with 200k small arguments per flush.
        key_index: dict[tuple[str, str], int] = {}
        script_keys: list[str] = [keys.READINGS]
        meta: list[bytes] = []
        payloads: list[bytes] = []
        window = self.window
        pack = _RECORD.pack
        for m in messages:
            meta.append(_COUNT.pack(len(m.readings)))
            offset = len(_ENTRY_HEAD)
            for reading in m.readings:
                ident = (reading.site, reading.sensor_id)
                index = key_index.get(ident)
                if index is None:
                    script_keys.append(seen_key(*ident))
                    index = key_index[ident] = len(script_keys)
                seq = reading.seq
                size = len(reading.json)
                if seq < _SPLIT:
                    meta.append(pack(index, seq % window, 0, seq, offset, size))
                else:
                    hi, lo = divmod(seq, _SPLIT)
                    meta.append(pack(index, seq % window, hi, lo, offset, size))
                offset += size + 1
            payloads.append(_ENTRY_HEAD + b",".join([r.json for r in m.readings]) + b"]}")
        argv = [self.window, self.ttl_ms, keys.PAYLOAD_FIELD, b"".join(meta), *payloads]
        return _Call(messages, [len(script_keys), *script_keys, *argv])

    async def _run(self, calls: list[_Call], quarantine: list[Quarantine]) -> None:
        todo = [c for c in calls if not c.done]
        if not todo and not quarantine:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for call in todo:
                    pipe.execute_command("EVALSHA", self._sha, *call.args)
                for q in quarantine:
                    pipe.execute_command(
                        "XADD",
                        keys.QUARANTINE,
                        "MAXLEN",
                        "~",
                        self.quarantine_maxlen,
                        "*",
                        keys.PAYLOAD_FIELD,
                        q.payload(),
                    )
                if self.waitaof:
                    pipe.execute_command("WAITAOF", 1, 0, self.waitaof_timeout_ms)
                results = await pipe.execute(raise_on_error=False)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreError(f"redis write failed: {exc}") from exc
        failed: list[BaseException] = []
        for call, result in zip(todo, results[: len(todo)], strict=True):
            if isinstance(result, NoScriptError):
                self._sha = None  # the server lost its script cache (restart, SCRIPT FLUSH): load it again
                failed.append(result)
            elif isinstance(result, BaseException):
                failed.append(result)
            else:
                self._apply(call, result)
        q_results = results[len(todo) : len(todo) + len(quarantine)]
        q_failed = [q for q, res in zip(quarantine, q_results, strict=True) if isinstance(res, BaseException)]
        failed += [res for res in q_results if isinstance(res, BaseException)]
        if self.waitaof:
            confirm = results[-1]
            if isinstance(confirm, ResponseError):
                logger.error(
                    "WAITAOF failed (%s): turning it off, writes are no longer fsync-confirmed", confirm
                )
                self.waitaof = False
            elif isinstance(confirm, BaseException):
                failed.append(confirm)
            elif int(confirm[0]) < 1:
                failed.append(StoreError(f"AOF fsync not confirmed within {self.waitaof_timeout_ms} ms"))
        if failed:
            quarantine[:] = q_failed
            if self._sha is None:
                self._sha = await self.redis.script_load(_INGEST_LUA)
            raise StoreError(f"{len(failed)} write(s) failed, first: {failed[0]}")
        quarantine.clear()

    @staticmethod
    def _apply(call: _Call, result: list[Any]) -> None:
        pos = 0
        for m in call.messages:
            entry_id, stored, dups, n_stale = result[pos : pos + 4]
            pos += 4
            m.entry_id = (entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)) or None
            m.stored, m.duplicates = int(stored), int(dups)
            m.stale = [m.readings[int(index)] for index in result[pos : pos + int(n_stale)]]
            m.stale_written = not m.stale
            pos += int(n_stale)
            m.done = True
        call.done = True
