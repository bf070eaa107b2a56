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

How it stays fast (``benchmarks/bench_handoff.py``, results in ``benchmarks/RESULTS.md``): reads and commits are
packed by hiredis and their replies parsed without redis-py's callbacks (:mod:`handoff._wire`); a commit sends each
op's command once per batch and two arguments per entry; the plain XACK and the next batch's (non-blocking) read
ride in the commit's write, so a busy worker makes one round trip per batch. The read runs on the server after the
commit, and a batch read that way when a stop arrives is handled before :meth:`ConsumerGroupWorker.run` returns.
With ``chunk_bytes`` a large batch is handled and committed in chunks, oldest first: a backlog's oldest entries are
then out in the time of one chunk rather than of the whole batch (what analytics uses, for latency after a stall).
A chunk's commit is in flight while the next is handled, and with ``chunk_bytes_max`` each further chunk may be
twice the size of the one before, so a long backlog costs a few handler calls, not one per small chunk.
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
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from handoff import keys
from handoff._wire import RawRedis, Script
from handoff.metrics import ACKED, DEAD_LETTERS, HANDLED_SECONDS
from handoff.producer import MAX_PAYLOAD_BYTES, minid_for_age

logger = logging.getLogger(__name__)

#: Errors that mean "Redis is not reachable right now": retried with backoff, never fatal.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
#: Raised by a handler, these are not the entry's fault: Redis went away (the worker backs off and handles the
#: entries again) or this crew's Redis user lacks a permission (a deployment error: the worker stops with it rather
#: than dead-lettering good entries one by one).
NOT_THE_ENTRYS_FAULT: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    NoPermissionError,
    AuthenticationError,
)


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

# KEYS[1] = stream. ARGV: group; template count, then each template (arg count, args); then runs of entries that
# have the same shape: entry count, op count k, the k template indices, then per entry: id and its ops' last
# arguments. A template is an op's command without its last argument, sent once per commit: the ops of a batch are
# mostly the same XADD or PUBLISH with another payload, so an entry with one op costs two arguments instead of
# eight (packing on the client and converting arguments in Lua both scale with their number).
# Each entry's ops run only if its XACK removed it from the PEL, so a commit is all-or-nothing per entry and an
# entry committed by one consumer cannot be committed again by another that still held it.
_COMMIT_LUA = """
local stream = KEYS[1]
local group = ARGV[1]
local tpl, tlen = {}, {}
local i = 3
for t = 1, tonumber(ARGV[2]) do
  local n = tonumber(ARGV[i])
  local cmd = {}
  for k = 1, n do cmd[k] = ARGV[i + k] end
  tpl[t], tlen[t] = cmd, n + 1
  i = i + n + 1
end
local acked = 0
local nargv = #ARGV
while i <= nargv do
  local count, nops = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local shape = {}
  for k = 1, nops do shape[k] = tonumber(ARGV[i + 1 + k]) end
  i = i + 2 + nops
  for _ = 1, count do
    if redis.call('XACK', stream, group, ARGV[i]) == 1 then
      acked = acked + 1
      for k = 1, nops do
        local t = shape[k]
        local cmd, n = tpl[t], tlen[t]
        cmd[n] = ARGV[i + k]
        redis.call(unpack(cmd, 1, n))
      end
    end
    i = i + 1 + nops
  end
end
return acked
"""
_COMMIT = Script(_COMMIT_LUA)

_PLAIN_ACK = Ack()


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
    #: Handle and commit a read batch in chunks of at most this many payload bytes (at least one entry each;
    #: 0: the whole batch at once). After a stall the oldest entries then go out first instead of waiting for the
    #: whole backlog to be handled; each chunk costs one more handler call and commit.
    chunk_bytes: int = 0
    #: With ``chunk_bytes``: each further chunk of a batch may hold twice as much as the one before, up to this many
    #: bytes (0 or at most ``chunk_bytes``: every chunk the same). The oldest entries still go out in the time of
    #: one small chunk, and a long backlog is drained in a few calls instead of one per entry: its last entries are
    #: out sooner (a chunk's fixed cost is paid log-many times, not once per chunk of the smallest size).
    chunk_bytes_max: int = 0


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
        self._raw = RawRedis(redis)
        self._read_cmds: dict[tuple[str, int, int | None], Any] = {}
        # New entries read in the same write as the previous batch's commit, handled by the next step().
        self._prefetched: list[Entry] = []
        self._redrain = False
        # Labelled metric children resolved once: .labels() is a locked dict lookup, per batch it adds up.
        self._acked_total = ACKED.labels(stream, group)
        self._dead_total = DEAD_LETTERS.labels(stream, group)
        self._handled_seconds = HANDLED_SECONDS.labels(stream, group)
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
            if self._redrain:
                # Entries delivered by a read whose reply was lost are in our pending list: collect them now
                # rather than after claim_idle_ms. The batch read with the last commit is in that list too.
                self._redrain = False
                drained = False
                self._prefetched = []
            try:
                if not self._group_ready:
                    await self.ensure_group()
                if not drained:
                    await self.drain_own_pending()
                    drained = True
                await self.step()
                self._failures = 0
            except TRANSIENT_ERRORS as exc:
                # A read whose reply was lost has still delivered its entries to this consumer: read the own
                # pending list again once Redis is back instead of leaving them to a claim much later.
                drained = False
                self._prefetched = []
                await self._backoff(exc)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    # The server lost the group (restart without persistence): make it again and re-drain.
                    logger.warning("group %s on %s is gone; recreating it", self.group, self.stream)
                    self._group_ready = False
                    drained = False
                    self._prefetched = []
                    continue
                if "LOADING" in str(exc) or "BUSY" in str(exc):
                    await self._backoff(exc)
                    continue
                raise
        await self._finish_prefetched()
        logger.info("worker %s stopped", self.consumer)

    async def _finish_prefetched(self) -> None:
        """Handle entries read with the last commit before the stop came: they are in hand, not left pending."""
        entries, self._prefetched = self._prefetched, []
        if not entries:
            return
        try:
            await self._process(entries)
        except TRANSIENT_ERRORS as exc:
            logger.warning("%d entries stay pending on %s after a stop: %s", len(entries), self.stream, exc)

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
        entries, self._prefetched = self._prefetched, []
        if not entries:
            entries = await self._read(">", block=True)
        if entries:
            await self._process(entries, read_next=True)
            n += len(entries)
        return n

    def _collect_lost_reads(self) -> None:
        """A read is being retried: its first delivery may have happened with the reply lost. Re-drain soon."""
        self._redrain = True

    async def _read(self, start: str, *, block: bool, count: int | None = None) -> list[Entry]:
        raw = self._raw
        (resp,) = await raw.call(self._read_command(start, block, count), on_retry=self._collect_lost_reads)
        return self._entries(resp)

    def _read_command(self, start: str, block: bool, count: int | None = None) -> Any:
        count = self.config.batch_size if count is None else count
        block_ms = self.config.block_ms if block else None
        key = (start, count, block_ms)
        packed = self._read_cmds.get(key)
        if packed is None:
            # New entries are read with the same few commands over and over: pack each once.
            args: list[Any] = ["XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count]
            if block_ms is not None:
                args += ["BLOCK", block_ms]
            packed = self._raw.pack([*args, "STREAMS", self.stream, start])
            if start == ">":
                self._read_cmds[key] = packed
        return packed

    def _entries(self, resp: Any) -> list[Entry]:
        """Entries from a raw XREADGROUP reply (RESP2 list or RESP3 map) or a list of XAUTOCLAIM items."""
        if not resp:
            return []
        out: list[Entry] = []
        append = out.append
        stream = self.stream
        for _stream, items in resp.items() if isinstance(resp, dict) else resp:
            for raw_id, fields in items:
                entry_id = raw_id.decode() if type(raw_id) is bytes else str(raw_id)
                if type(fields) is list and len(fields) == 2 and fields[0] in _PAYLOAD_NAMES:
                    append(_entry(stream, entry_id, fields[1], 1))
                elif not fields:
                    # A PEL reference to an entry trimmed away: nothing to process.
                    append(_entry(stream, entry_id, b"", 0))
                else:
                    values = _field_map(fields)
                    append(
                        _entry(
                            stream, entry_id, values.get(b"payload", values.get(keys.PAYLOAD_FIELD, b"")), 1
                        )
                    )
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
            wanted = set(chunk)
            read = await self._read(_prev_id(chunk[0]), block=False, count=len(chunk) + 16)
            entries = [e for e in read if e.id in wanted]
            await self._process(await self._with_delivery_counts(entries))
            n += len(entries)
        return n

    async def claim_stale(self) -> int:
        """Take over entries idle past ``claim_idle_ms`` on any consumer (XAUTOCLAIM, cursor to the end)."""
        cursor = "0-0"
        n = 0
        while not self.stopping:
            raw = self._raw
            (resp,) = await raw.call(
                raw.pack(
                    (
                        "XAUTOCLAIM",
                        self.stream,
                        self.group,
                        self.consumer,
                        self.config.claim_idle_ms,
                        cursor,
                        "COUNT",
                        self.config.batch_size,
                    )
                ),
                on_retry=self._collect_lost_reads,  # like a read: claimed entries are ours once the server ran it
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

    async def _process(self, entries: list[Entry], *, read_next: bool = False) -> None:
        """Handle and commit ``entries`` (in chunks of ``chunk_bytes``, oldest first); with ``read_next`` the last
        commit's write also reads the next new batch.

        Chunks overlap by one: a chunk's commit is sent before the next chunk is handled, and its reply is read
        after (before the next commit is sent: commits stay in order). Draining a backlog then costs the handler's
        time per chunk, without a wait for each reply.
        """
        limit = self.config.chunk_bytes
        if limit <= 0 or len(entries) < 2:
            live = await self._live(entries)
            if live:
                await self._commit_outcomes(live, await self._handle(live), read_next=read_next)
            return
        chunks = _chunked(entries, limit, self.config.chunk_bytes_max)
        last = len(chunks) - 1
        loop = asyncio.get_running_loop()
        commit: asyncio.Task[None] | None = None
        try:
            for i, chunk in enumerate(chunks):
                # No stop check between chunks: the whole batch is in hand (delivered to us), so it is finished.
                live = await self._live(chunk)
                if not live:
                    continue
                outcomes = await self._handle(live)
                if commit is not None:
                    task, commit = commit, None
                    await task
                if i == last:
                    await self._commit_outcomes(live, outcomes, read_next=read_next)
                    break
                sent: asyncio.Future[None] = loop.create_future()

                def mark(_: object = None, sent: asyncio.Future[None] = sent) -> None:
                    if not sent.done():
                        sent.set_result(None)

                commit = asyncio.create_task(self._commit_outcomes(live, outcomes, on_sent=mark))
                commit.add_done_callback(mark)
                await sent  # written (or failed): the next chunk is handled while Redis runs it
            if commit is not None:
                task, commit = commit, None
                await task
        except BaseException as exc:
            if commit is not None:
                # The next chunk failed while this commit was in flight: let it finish (its chunk is handled), unless
                # we are being cancelled. Its own error, if any, would only hide this one.
                if isinstance(exc, asyncio.CancelledError):
                    commit.cancel()
                with contextlib.suppress(BaseException):
                    await commit
            raise

    async def _live(self, entries: list[Entry]) -> list[Entry]:
        """``entries`` less references to entries trimmed away (acknowledged here); counts the batch."""
        live = entries
        gone = [e.id for e in entries if e.deliveries == 0 and not e.payload]
        if gone:
            await self.redis.xack(self.stream, self.group, *gone)
            self.stats.deleted_dropped += len(gone)
            live = [e for e in entries if e.payload or e.deliveries != 0]
        if live:
            self.stats.batches += 1
            self.stats.entries += len(live)
        return live

    async def _handle(self, entries: list[Entry]) -> dict[str, Outcome]:
        started = time.perf_counter()
        try:
            result = dict(await self.handler(entries))
        except NOT_THE_ENTRYS_FAULT:
            raise
        except Exception as exc:
            if len(entries) == 1:
                logger.exception("handler failed on %s %s", self.stream, entries[0].id)
                return {entries[0].id: Fail(f"{type(exc).__name__}: {exc}")}
            # Isolate the entry that broke the batch: the others must not wait behind it.
            logger.warning("handler failed on a batch of %d; retrying entry by entry", len(entries))
            isolated: dict[str, Outcome] = {}
            for entry in entries:
                isolated.update(await self._handle([entry]))
            return isolated
        finally:
            self._handled_seconds.observe(time.perf_counter() - started)
        return result

    async def _commit_outcomes(
        self,
        entries: list[Entry],
        outcomes: Mapping[str, Outcome],
        *,
        read_next: bool = False,
        on_sent: Callable[[], None] | None = None,
    ) -> None:
        """Acknowledge the batch: plain acks in one XACK, entries with ops through the commit script, one write.

        With ``read_next`` (and no stop requested) the same write ends with a non-blocking read of new entries,
        kept for the next step: one round trip per batch instead of two. The read runs after the commit on the
        server, so nothing is read before the batch in hand is committed.
        """
        if not outcomes:
            # The common case of a handler with nothing to write: one XACK, no per-entry decisions.
            plain = [e.id for e in entries]
            body: list[Any] = []
            dead = 0
        else:
            plain, body, dead = self._commit_body(entries, outcomes)
        raw = self._raw
        then = [raw.pack(("XACK", self.stream, self.group, *plain))] if plain else []
        read = bool(read_next and (body or then) and not self.stopping)
        on_retry = None
        if read:
            then.append(self._read_command(">", False))
            on_retry = self._collect_lost_reads
        if body:
            replies = await raw.evalsha(
                _COMMIT, (self.stream,), [body], then=then, on_retry=on_retry, on_sent=on_sent
            )
        elif then:
            replies = await raw.call(*then, on_retry=on_retry, on_sent=on_sent)
        else:
            replies = []
        if read:
            self._prefetched = self._entries(replies.pop())
        acked = sum(int(x) for x in replies)
        if dead:
            self.stats.dead += dead
            self._dead_total.inc(dead)
        self.stats.acked += acked
        self._acked_total.inc(acked)

    def _commit_body(
        self, entries: list[Entry], outcomes: Mapping[str, Outcome]
    ) -> tuple[list[str], list[Any], int]:
        """Sort outcomes into plain acks and the commit script's arguments (see :data:`_COMMIT_LUA`)."""
        now_ms = int(time.time() * 1000)
        plain: list[str] = []
        templates: list[Any] = []
        index: dict[Any, int] = {}

        def ref(op: Op) -> tuple[int, Any]:
            """The op's template number (adding the template on first use) and its last argument."""
            # Exact types only for the shortcuts: a subclass may override args().
            key: Any
            if type(op) is XAdd:
                key, last = (XAdd, op.stream, op.max_age_ms, op.maxlen), op.payload
            elif type(op) is Publish:
                key, last = (Publish, op.channel), op.data
            else:
                args = op.args(now_ms)
                key, last = (type(op), *args[:-1]), args[-1]
            try:
                t = index.get(key)
            except TypeError:  # an unhashable argument: no sharing, a template of its own
                key, t = object(), None
            if t is None:
                prefix = op.args(now_ms)[:-1]
                templates.append(len(prefix))
                templates.extend(prefix)
                t = index[key] = len(index) + 1
            return t, last

        runs: list[Any] = []
        run_shape: Any = None
        run_start = 0
        dead = 0
        get = outcomes.get
        for entry in entries:
            outcome = get(entry.id, _PLAIN_ACK)
            if type(outcome) is Ack or isinstance(outcome, Ack):
                ops = outcome.ops
                if not ops:
                    plain.append(entry.id)
                    continue
            elif isinstance(outcome, Hold):
                self.stats.held += 1
                self.stats.pending_retry.add(entry.id)
                continue
            else:
                self.stats.failed += 1
                if not (outcome.permanent or entry.deliveries >= self.config.max_deliveries):
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
                ops = (self._dead_letter_op(entry, outcome.error, now_ms),)
                dead += 1
            if len(ops) == 1:  # the common case, without the lists
                t, last = ref(ops[0])
                if t != run_shape:
                    run_shape, run_start = t, len(runs)
                    runs += [0, 1, t]
                runs[run_start] += 1
                runs.append(entry.id)
                runs.append(last)
                continue
            refs = [ref(op) for op in ops]
            shape = tuple(t for t, _ in refs)
            if shape != run_shape:
                run_shape, run_start = shape, len(runs)
                runs += [0, len(shape), *shape]
            runs[run_start] += 1
            runs.append(entry.id)
            runs += [last for _, last in refs]
        if not runs:
            return plain, [], dead
        return plain, [self.group, len(index), *templates, *runs], dead

    def _dead_letter_op(self, entry: Entry, error: str, now_ms: int) -> XAdd:
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
        return XAdd(self.config.dead_stream, body)


_PAYLOAD_NAMES = (b"payload", keys.PAYLOAD_FIELD)  # bytes, or str from a decode_responses client

# Entry is a frozen dataclass: its __init__ sets each field through object.__setattr__, which costs about twice
# as much as the slot descriptors themselves. Building thousands of entries per batch, the reader uses these.
_new_entry = object.__new__
_slot: Any = vars(Entry)
_set_stream = _slot["stream"].__set__
_set_id = _slot["id"].__set__
_set_payload = _slot["payload"].__set__
_set_deliveries = _slot["deliveries"].__set__


def _chunked(entries: list[Entry], limit: int, limit_max: int = 0) -> list[list[Entry]]:
    """Split ``entries`` in order into runs of at most ``limit`` payload bytes (a larger entry stands alone); with
    ``limit_max`` the limit doubles from one run to the next, up to ``limit_max``."""
    chunks: list[list[Entry]] = []
    chunk: list[Entry] = []
    size = 0
    for e in entries:
        n = len(e.payload)
        if chunk and size + n > limit:
            chunks.append(chunk)
            chunk, size = [], 0
            if limit < limit_max:
                limit = min(2 * limit, limit_max)
        chunk.append(e)
        size += n
    if chunk:
        chunks.append(chunk)
    return chunks


def _entry(stream: str, entry_id: str, payload: Any, deliveries: int) -> Entry:
    """The same object as ``Entry(stream, entry_id, payload, deliveries)``, built faster."""
    e: Entry = _new_entry(Entry)
    _set_stream(e, stream)
    _set_id(e, entry_id)
    _set_payload(e, payload)
    _set_deliveries(e, deliveries)
    return e


def _field_map(fields: Any) -> dict[Any, Any]:
    """An entry's fields as a dict (a flat [field, value, ...] list, or a map from a RESP3 server)."""
    if isinstance(fields, dict):
        return fields
    return dict(zip(fields[::2], fields[1::2], strict=False))


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _prev_id(entry_id: str) -> str:
    """The largest ID strictly below ``entry_id`` (XREADGROUP on a PEL returns IDs greater than the one given)."""
    ms, seq = _id_key(entry_id)
    if seq > 0:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-18446744073709551615" if ms > 0 else "0"
