"""The consumer-group worker: the one loop every crew plugs a batch handler into.

What it guarantees, and how:

* **At-least-once delivery.** An entry stays in the group's pending entries list (PEL) until it is acknowledged. On
  start the worker reads its own PEL (ID ``0``) before new entries (``>``), so a restart under the same consumer
  name resumes exactly where the last process died.
* **All-or-nothing commit.** A handler returns, per entry, the writes it wants (:class:`XAdd`, :class:`Publish`,
  :class:`Command`). One Lua script acknowledges each entry and performs its writes *only if that XACK removed the
  entry from the PEL*. A crash leaves all or nothing, and if two consumers ever hold the same entry (one was
  claimed away while it was slow) only the first commit writes: each entry's outputs happen exactly once.
* **Dead consumers.** Entries idle past ``claim_idle_ms`` on any consumer are taken over with XAUTOCLAIM (cursor
  followed to the end); what XAUTOCLAIM reports deleted (trimmed) is dropped from the PEL, not retried.
* **Poison entries.** An entry that failed ``max_deliveries`` times, or that the handler marks permanently bad, is
  moved to ``wd:dead:v1`` with its error and acknowledged, in the same atomic script. A batch whose handler raises
  is retried entry by entry, so one bad entry never blocks the others.
* **Redis outages.** Connection errors are retried with capped, jittered exponential backoff (never a hot loop);
  a group lost with a non-persistent server is recreated.
* **Shutdown in stages.** :meth:`ConsumerGroupWorker.stop` (or the stop event) stops reading; the batch in hand is
  finished and committed; anything not committed stays pending for the next start or for a claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

import orjson
import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from handoff import keys
from handoff.metrics import ACKED, DEAD_LETTERS, HANDLED_SECONDS
from handoff.producer import MAX_PAYLOAD_BYTES, minid_for_age

logger = logging.getLogger(__name__)

#: Errors that mean "Redis is not reachable right now": retried with backoff, never fatal.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry handed to a handler."""

    stream: str
    id: str
    payload: bytes
    deliveries: int = 1

    def json(self) -> Any:
        """The payload decoded as JSON (raises ``orjson.JSONDecodeError`` on bad input)."""
        return orjson.loads(self.payload)


# --- What a handler asks for, per entry ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class XAdd:
    """Append ``payload`` to ``stream`` (trimmed by age with MINID ~ when ``max_age_ms`` is set)."""

    stream: str
    payload: bytes
    max_age_ms: int | None = None
    maxlen: int | None = None

    def args(self, now_ms: int) -> list[Any]:
        out: list[Any] = ["XADD", self.stream]
        if self.max_age_ms is not None:
            out += ["MINID", "~", minid_for_age(self.max_age_ms, now_ms)]
        elif self.maxlen is not None:
            out += ["MAXLEN", "~", self.maxlen]
        return [*out, "*", keys.PAYLOAD_FIELD, self.payload]


@dataclass(frozen=True, slots=True)
class Publish:
    """PUBLISH ``data`` on ``channel``."""

    channel: str
    data: bytes

    def args(self, now_ms: int) -> list[Any]:
        return ["PUBLISH", self.channel, self.data]


@dataclass(frozen=True, slots=True)
class Command:
    """Any other Redis write, e.g. ``Command(("HSET", "quote:1", "total", "42"))``."""

    argv: tuple[Any, ...]

    def args(self, now_ms: int) -> list[Any]:
        return list(self.argv)


Op: TypeAlias = XAdd | Publish | Command


@dataclass(frozen=True, slots=True)
class Ack:
    """Acknowledge the entry and perform ``ops`` atomically with the acknowledgement."""

    ops: Sequence[Op] = ()


@dataclass(frozen=True, slots=True)
class Fail:
    """The entry failed: it stays pending and is retried; ``permanent`` sends it to dead letters now."""

    error: str
    permanent: bool = False


@dataclass(frozen=True, slots=True)
class Hold:
    """Leave the entry pending, to be handed over again after ``retry_ms`` (not counted as a failure)."""

    reason: str = ""


Outcome: TypeAlias = Ack | Fail | Hold


class BatchHandler(Protocol):
    """A crew's processing step: entries in, one outcome per entry id out (a missing id means plain Ack)."""

    async def __call__(self, entries: Sequence[Entry]) -> Mapping[str, Outcome]: ...


# --- The atomic commit -----------------------------------------------------------------------------------------

# ARGV: group, now, then per entry: id, op count, and per op: arg count, args...
# Each entry's ops run only if its XACK removed it from the PEL, so a commit is all-or-nothing per entry and an
# entry committed by one consumer cannot be committed again by another that still held it.
_COMMIT_LUA = """
local stream = KEYS[1]
local group = ARGV[1]
local i = 3
local acked = 0
while i <= #ARGV do
  local id = ARGV[i]
  local nops = tonumber(ARGV[i + 1])
  i = i + 2
  local n = redis.call('XACK', stream, group, id)
  acked = acked + n
  for _ = 1, nops do
    local nargs = tonumber(ARGV[i])
    if n == 1 then
      redis.call(unpack(ARGV, i + 1, i + nargs))
    end
    i = i + nargs + 1
  end
end
return acked
"""


@dataclass
class WorkerConfig:
    """Tunables of a :class:`ConsumerGroupWorker`. Defaults suit a crew on one small machine."""

    batch_size: int = 500
    block_ms: int = 5
    claim_idle_ms: int = 30_000
    claim_interval_s: float = 5.0
    retry_ms: int = 1_000
    max_deliveries: int = 5
    start_id: str = "0"
    dead_stream: str = keys.DEAD
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 5.0
    delete_idle_consumers_ms: int = 24 * 3600 * 1000


def default_consumer_name(prefix: str = "") -> str:
    """A name unique to this process and stable for its lifetime: ``host-pid``."""
    host = socket.gethostname().split(".")[0] or "host"
    name = f"{host}-{os.getpid()}"
    return f"{prefix}-{name}" if prefix else name


@dataclass
class WorkerStats:
    """Counters a crew can show or test against."""

    batches: int = 0
    entries: int = 0
    acked: int = 0
    failed: int = 0
    held: int = 0
    dead: int = 0
    claimed: int = 0
    deleted_dropped: int = 0
    reconnects: int = 0
    last_error: str | None = None
    pending_retry: set[str] = field(default_factory=set)


class ConsumerGroupWorker:
    """Reads ``stream`` as ``consumer`` of ``group`` and hands batches to ``handler``.

    Use :meth:`run` inside a task; call :meth:`stop` (or set ``stop_event``) to stop. The worker owns no signal
    handlers: :mod:`handoff.runloop` wires signals for command-line crews, and an embedding program wires its own.
    """

    def __init__(
        self,
        redis: aredis.Redis,
        stream: str,
        group: str,
        handler: BatchHandler | Callable[[Sequence[Entry]], Awaitable[Mapping[str, Outcome]]],
        *,
        consumer: str | None = None,
        config: WorkerConfig | None = None,
        stop_event: asyncio.Event | None = None,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.handler = handler
        self.consumer = consumer or default_consumer_name(group)
        self.config = config or WorkerConfig()
        self.stop_event = stop_event or asyncio.Event()
        self.stats = WorkerStats()
        self._commit = redis.register_script(_COMMIT_LUA)
        self._failures = 0
        self._next_claim = 0.0
        self._next_retry = 0.0
        self._group_ready = False

    # -- lifecycle -------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop reading; the batch in hand is finished and committed first."""
        self.stop_event.set()

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    async def run(self) -> None:
        """Run until stopped. Redis outages are waited out with backoff; only bugs escape."""
        logger.info("worker %s joining %s/%s", self.consumer, self.stream, self.group)
        drained = False
        while not self.stopping:
            try:
                if not self._group_ready:
                    await self.ensure_group()
                if not drained:
                    await self.drain_own_pending()
                    drained = True
                await self.step()
                self._failures = 0
            except TRANSIENT_ERRORS as exc:
                await self._backoff(exc)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    # The server lost the group (restart without persistence): make it again and re-drain.
                    logger.warning("group %s on %s is gone; recreating it", self.group, self.stream)
                    self._group_ready = False
                    drained = False
                    continue
                if "LOADING" in str(exc) or "BUSY" in str(exc):
                    await self._backoff(exc)
                    continue
                raise
        logger.info("worker %s stopped", self.consumer)

    async def _backoff(self, exc: BaseException) -> None:
        self._failures += 1
        self.stats.reconnects += 1
        self.stats.last_error = repr(exc)
        cap = min(self.config.backoff_cap_s, self.config.backoff_base_s * 2 ** min(self._failures, 16))
        delay = random.uniform(cap / 2, cap)
        logger.warning(
            "redis unavailable for %s/%s (%s); retrying in %.2fs", self.stream, self.group, exc, delay
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), delay)

    async def ensure_group(self) -> None:
        """Create the group (and the stream) if needed; an existing group is left as it is."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id=self.config.start_id, mkstream=True)
            logger.info("created group %s on %s", self.group, self.stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    # -- reading ---------------------------------------------------------------------------------------------

    async def drain_own_pending(self) -> int:
        """Re-process every entry this consumer name still holds (from a previous life), oldest first."""
        total = 0
        cursor = "0"
        while not self.stopping:
            entries = await self._read(cursor, block=False)
            if not entries:
                break
            cursor = entries[-1].id
            await self._process(await self._with_delivery_counts(entries))
            total += len(entries)
        if total:
            logger.info("worker %s re-processed %d pending entries", self.consumer, total)
        return total

    async def step(self) -> int:
        """One read of new entries (blocking briefly), plus due claims and retries. Returns entries handled."""
        now = time.monotonic()
        n = 0
        if now >= self._next_claim:
            self._next_claim = now + self.config.claim_interval_s
            n += await self.claim_stale()
        if self.stats.pending_retry and now >= self._next_retry:
            self._next_retry = now + self.config.retry_ms / 1000
            n += await self.retry_own_pending()
        entries = await self._read(">", block=True)
        if entries:
            await self._process(entries)
            n += len(entries)
        return n

    async def _read(self, start: str, *, block: bool) -> list[Entry]:
        resp = await self.redis.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: start},
            count=self.config.batch_size,
            block=self.config.block_ms if block else None,
        )
        return self._entries(resp)

    def _entries(self, resp: Any) -> list[Entry]:
        out: list[Entry] = []
        if not resp:
            return out
        for _stream, items in resp:
            for raw_id, fields in items:
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                if not fields:
                    # A PEL reference to an entry trimmed away: nothing to process.
                    out.append(Entry(self.stream, entry_id, b"", 0))
                    continue
                payload = fields.get(b"payload", fields.get(keys.PAYLOAD_FIELD, b""))
                out.append(Entry(self.stream, entry_id, payload))
        return out

    async def _with_delivery_counts(self, entries: list[Entry]) -> list[Entry]:
        """Fill in delivery counts (from XPENDING) for entries re-read from a PEL."""
        if not entries:
            return entries
        rows = await self.redis.xpending_range(
            self.stream,
            self.group,
            min=entries[0].id,
            max=entries[-1].id,
            count=len(entries),
            consumername=self.consumer,
        )
        counts = {
            (r["message_id"].decode() if isinstance(r["message_id"], bytes) else r["message_id"]): int(
                r["times_delivered"]
            )
            for r in rows
        }
        return [
            Entry(e.stream, e.id, e.payload, counts.get(e.id, e.deliveries)) if e.payload else e
            for e in entries
        ]

    async def retry_own_pending(self) -> int:
        """Hand entries that failed or were held back to the handler again."""
        ids = sorted(self.stats.pending_retry, key=_id_key)
        self.stats.pending_retry.clear()
        n = 0
        for chunk_start in range(0, len(ids), self.config.batch_size):
            chunk = ids[chunk_start : chunk_start + self.config.batch_size]
            # XCLAIM to ourselves with JUSTID would not bump the count; re-reading our PEL does, which is what
            # makes a repeatedly failing entry reach max_deliveries.
            resp = await self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: _prev_id(chunk[0])}, count=len(chunk) + 16
            )
            wanted = set(chunk)
            entries = [e for e in self._entries(resp) if e.id in wanted]
            await self._process(await self._with_delivery_counts(entries))
            n += len(entries)
        return n

    async def claim_stale(self) -> int:
        """Take over entries idle past ``claim_idle_ms`` on any consumer (XAUTOCLAIM, cursor to the end)."""
        cursor = "0-0"
        n = 0
        while not self.stopping:
            resp = await self.redis.execute_command(  # type: ignore[no-untyped-call]
                "XAUTOCLAIM",
                self.stream,
                self.group,
                self.consumer,
                self.config.claim_idle_ms,
                cursor,
                "COUNT",
                self.config.batch_size,
            )
            cursor = resp[0].decode() if isinstance(resp[0], bytes) else str(resp[0])
            entries = self._entries([(self.stream, resp[1])])
            deleted = [
                d.decode() if isinstance(d, bytes) else str(d) for d in (resp[2] if len(resp) > 2 else [])
            ]
            if deleted:
                # Redis 7 already removed them from the PEL; XACK makes sure on any server and is idempotent.
                await self.redis.xack(self.stream, self.group, *deleted)
                self.stats.deleted_dropped += len(deleted)
                logger.warning("dropped %d pending entries trimmed from %s", len(deleted), self.stream)
            if entries:
                self.stats.claimed += len(entries)
                logger.info("claimed %d stale entries on %s/%s", len(entries), self.stream, self.group)
                await self._process(await self._with_delivery_counts(entries))
                n += len(entries)
            if cursor == "0-0":
                break
        return n

    # -- processing and commit -------------------------------------------------------------------------------

    async def _process(self, entries: list[Entry]) -> None:
        gone = [e.id for e in entries if not e.payload and e.deliveries == 0]
        if gone:
            await self.redis.xack(self.stream, self.group, *gone)
            self.stats.deleted_dropped += len(gone)
        live = [e for e in entries if e.payload or e.deliveries != 0]
        if not live:
            return
        self.stats.batches += 1
        self.stats.entries += len(live)
        outcomes = await self._handle(live)
        await self._commit_outcomes(live, outcomes)

    async def _handle(self, entries: list[Entry]) -> dict[str, Outcome]:
        started = time.perf_counter()
        try:
            result = dict(await self.handler(entries))
        except Exception as exc:
            if len(entries) == 1:
                logger.exception("handler failed on %s %s", self.stream, entries[0].id)
                return {entries[0].id: Fail(f"{type(exc).__name__}: {exc}")}
            # Isolate the entry that broke the batch: the others must not wait behind it.
            logger.warning("handler failed on a batch of %d; retrying entry by entry", len(entries))
            result = {}
            for entry in entries:
                result.update(await self._handle([entry]))
            return result
        finally:
            HANDLED_SECONDS.labels(self.stream, self.group).observe(time.perf_counter() - started)
        return result

    async def _commit_outcomes(self, entries: list[Entry], outcomes: Mapping[str, Outcome]) -> None:
        now_ms = int(time.time() * 1000)
        argv: list[Any] = [self.group, now_ms]
        plain: list[str] = []  # acks without writes go in one XACK: cheaper than the script
        dead = 0
        for entry in entries:
            outcome = outcomes.get(entry.id, Ack())
            if isinstance(outcome, Hold):
                self.stats.held += 1
                self.stats.pending_retry.add(entry.id)
                continue
            if isinstance(outcome, Fail):
                self.stats.failed += 1
                if outcome.permanent or entry.deliveries >= self.config.max_deliveries:
                    argv += self._dead_letter_argv(entry, outcome.error, now_ms)
                    dead += 1
                else:
                    logger.warning(
                        "entry %s on %s failed (delivery %d of %d): %s",
                        entry.id,
                        self.stream,
                        entry.deliveries,
                        self.config.max_deliveries,
                        outcome.error,
                    )
                    self.stats.pending_retry.add(entry.id)
                continue
            if not outcome.ops:
                plain.append(entry.id)
                continue
            argv += [entry.id, len(outcome.ops)]
            for op in outcome.ops:
                args = op.args(now_ms)
                argv += [len(args), *args]
        acked = 0
        if len(argv) > 2:
            acked += int(await self._commit(keys=[self.stream], args=argv))
        if plain:
            acked += int(await self.redis.xack(self.stream, self.group, *plain))
        if dead:
            self.stats.dead += dead
            DEAD_LETTERS.labels(self.stream, self.group).inc(dead)
        self.stats.acked += acked
        ACKED.labels(self.stream, self.group).inc(acked)

    def _dead_letter_argv(self, entry: Entry, error: str, now_ms: int) -> list[Any]:
        logger.error(
            "entry %s on %s/%s dead after %d deliveries: %s",
            entry.id,
            self.stream,
            self.group,
            entry.deliveries,
            error,
        )
        body = orjson.dumps(
            {
                "stream": self.stream,
                "group": self.group,
                "entry_id": entry.id,
                "deliveries": entry.deliveries,
                "error": error[:2000],
                "payload": entry.payload[:MAX_PAYLOAD_BYTES].decode("utf-8", "replace"),
                "consumer": self.consumer,
                "dead_ms": now_ms,
            }
        )
        args = XAdd(self.config.dead_stream, body).args(now_ms)
        return [entry.id, 1, len(args), *args]


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _prev_id(entry_id: str) -> str:
    """The largest ID strictly below ``entry_id`` (XREADGROUP on a PEL returns IDs greater than the one given)."""
    ms, seq = _id_key(entry_id)
    if seq > 0:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-18446744073709551615" if ms > 0 else "0"
