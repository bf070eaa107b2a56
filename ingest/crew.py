"""The ingest crew: MQTT -> validate -> rate limit -> dedupe + XADD (one pipelined round trip) -> PUBACK.

Threading (measured with py-spy, see benchmarks/RESULTS.md "Ingest"): paho's network thread parses MQTT and fills
the inbox; the asyncio loop (this module) takes micro-batches, validates them, writes them to Redis with
``redis.asyncio`` and acknowledges. Two flushes overlap: the next batch is validated while Redis runs the script of
the previous one (writes are serialized, so Redis applies them in arrival order). Everything is Python under one
GIL, so another thread would only add switching; more throughput comes from more processes on the shared
subscription. The broker's in-flight window (``receive_maximum``, default 1000) is twice the flush size.

No loss: a message is acknowledged only after :meth:`ingest.store.ReadingStore.write` returned for it (and
WAITAOF, when on). If Redis is down, the batch in hand is retried with capped, jittered backoff and nothing is
acknowledged, so the broker stops sending once ``receive_maximum`` messages are held and keeps the rest.

Backpressure: every ``pressure_check_s`` the crew reads the ``analytics`` group lag on ``wd:readings:v1`` and Redis
``used_memory``/``maxmemory``. Above ``max_lag`` entries or ``memory_high`` of maxmemory it stops taking messages
(gauge ``wd_ingest_backpressure`` = 1 and a log line); held acknowledgements make the broker queue the rest. It resumes
by itself below 80% of ``max_lag`` and 5 points under ``memory_high``.

Stop (SIGTERM/SIGINT through :mod:`handoff.runloop`): stop accepting messages (new ones stay unacknowledged in the
session), write and acknowledge what is held if Redis answers within the grace period, disconnect keeping the
session, return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import redis.asyncio as aredis
from redis.exceptions import RedisError

from handoff import keys
from handoff.connection import redis_from_url
from handoff.errors import HandoffError
from handoff.metrics import STREAM_LAG
from handoff.settings import MqttEndpoint
from handoff.stats import stream_stats
from ingest import metrics
from ingest.mqtt import Incoming, MqttIntake
from ingest.ratelimit import DeviceLimiter
from ingest.store import MessageWrite, Quarantine, ReadingStore, StoreError
from ingest.validate import validate_message

logger = logging.getLogger(__name__)

__all__ = ["IngestConfig", "IngestCrew", "IngestStats", "PressureReading", "read_pressure"]


@dataclass(slots=True)
class IngestConfig:
    """Everything the crew is configured with (the command line builds it from Settings and flags)."""

    redis_url: str
    mqtt: MqttEndpoint
    client_id: str
    batch_size: int = 500
    flush_ms: float = 5.0
    #: A message of at least this many bytes (a gateway batch of ~60 readings or more) is written at once, without
    #: lingering for flush_ms: it amortizes a flush by itself. 0: only batch_size messages or flush_ms start one.
    #: (A bound on the bytes of all held messages instead made flushes of single readings small: 30k -> 21k/s.)
    flush_bytes: int = 8 * 1024
    receive_maximum: int = 1000
    session_expiry_s: int = 86_400
    # readings/s per (site, sensor_id): a sensor normally sends well under 10/s, so 1000/s is a runaway device,
    # and 100 sensors at the limit still make a 100k readings/s load test. None: no limit.
    device_rate: float | None = 1000.0
    device_burst: float = 10_000.0
    max_lag: int = 100_000  # entries of wd:readings:v1 not yet delivered to group analytics
    memory_high: float = 0.90  # share of maxmemory
    pressure_check_s: float = 1.0
    waitaof: bool = False
    quarantine_maxlen: int = 100_000
    stop_grace_s: float = 5.0


@dataclass(slots=True)
class IngestStats:
    """Running totals of this process (the same figures as the Prometheus counters, for tests and status)."""

    messages: int = 0
    readings: int = 0
    duplicates: int = 0
    rate_limited: int = 0
    acked: int = 0
    ack_skipped: int = 0
    flushes: int = 0
    redis_errors: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class PressureReading:
    lag: int | None
    used_memory: int
    maxmemory: int


async def read_pressure(r: aredis.Redis) -> PressureReading:
    """Lag of group ``analytics`` on ``wd:readings:v1`` (None without that group) and Redis memory use.

    Swappable: the one place that knows where backpressure signals come from.
    """
    stats = await stream_stats(r, keys.READINGS, memory_samples=1, lag_count_cap=5_000)
    lag = next((g.lag for g in stats.groups if g.name == keys.GROUP_ANALYTICS), None)
    info = await r.info("memory")
    return PressureReading(lag, int(info.get("used_memory", 0)), int(info.get("maxmemory", 0)))


class IngestCrew:
    """One ingest process. ``await crew.run(stop)`` until ``stop`` is set."""

    def __init__(self, config: IngestConfig) -> None:
        self.config = config
        self.stats = IngestStats()
        self.limiter = DeviceLimiter(config.device_rate, config.device_burst) if config.device_rate else None
        self.backpressure = False
        self.intake: MqttIntake | None = None
        self.ready = asyncio.Event()  # set once connected and subscribed (tests wait for it)
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._resume = asyncio.Event()
        self._failure: BaseException | None = None

    # --- main loop ---------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        redis = redis_from_url(cfg.redis_url, name="wd-ingest", socket_timeout=10)
        store = ReadingStore(redis, waitaof=cfg.waitaof, quarantine_maxlen=cfg.quarantine_maxlen)
        intake = self.intake = MqttIntake(
            cfg.mqtt,
            cfg.client_id,
            session_expiry_s=cfg.session_expiry_s,
            receive_maximum=cfg.receive_maximum,
            wake_at=cfg.batch_size,
            wake_bytes=cfg.flush_bytes,
            on_ready=lambda full: self._notify(loop, full),
        )
        background = [
            asyncio.create_task(self._relay_stop(stop), name="ingest-stop-relay"),
            asyncio.create_task(self._watch_pressure(redis, stop), name="ingest-pressure"),
            asyncio.create_task(self._watch_ready(intake, stop), name="ingest-ready"),
        ]
        try:
            await self._prepare_store(store, stop)
            if stop.is_set():
                return  # stopped while waiting for Redis: never connected to the broker
            intake.start()
            logger.info(
                "ingest %s: batch %d, flush %.1f ms, receive maximum %d, device rate %s/s",
                cfg.client_id,
                cfg.batch_size,
                cfg.flush_ms,
                cfg.receive_maximum,
                cfg.device_rate or "unlimited",
            )
            await self._loop(intake, store, stop)
            intake.stop_accepting()
            rest = intake.take(1 << 30)
            if rest:
                await self._final_flush(rest, intake, store)
        finally:
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await asyncio.to_thread(intake.close)
            await redis.aclose()
            logger.info(
                "ingest stopped: %d messages, %d readings stored, %d duplicates, %d quarantined",
                self.stats.messages,
                self.stats.readings,
                self.stats.duplicates,
                sum(self.stats.quarantined.values()),
            )

    async def _loop(self, intake: MqttIntake, store: ReadingStore, stop: asyncio.Event) -> None:
        batch_size = self.config.batch_size
        flush_s = self.config.flush_ms / 1000
        # Up to two flushes overlap: while one waits for Redis (which runs the script on another core), the next
        # batch is validated here. Writes go through one lock, in order, so Redis applies flushes in arrival order.
        inflight: set[asyncio.Task[bool]] = set()
        write_lock = asyncio.Lock()
        last_flush = 0.0  # monotonic start of the last flush
        try:
            while not stop.is_set() and self._failure is None:
                if self.backpressure:
                    self._resume.clear()
                    await self._resume.wait()
                    continue
                self._wake.clear()
                if intake.held() == 0:
                    await self._wake.wait()
                    continue
                since = time.monotonic() - last_flush
                if not intake.full() and (inflight or since < flush_s):
                    # Busy (a write in flight, or the last flush began less than flush_ms ago): let the batch fill
                    # until it is full (batch_size messages, or a message of flush_bytes) or flush_ms after the
                    # last flush, so one round trip carries many small messages. Idle (no flush for flush_ms):
                    # write at once, so a lone reading waits for nothing; a gateway's batch fills a flush itself.
                    self._full.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(flush_s if inflight else flush_s - since):
                            await self._full.wait()
                batch = intake.take(batch_size)
                if not batch:
                    continue
                last_flush = time.monotonic()
                started = time.perf_counter()
                writes, quarantine = self._prepare(batch)
                while len(inflight) >= 2:
                    done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                    if not all(t.result() for t in done):
                        return  # stopped while Redis was down: the batches in hand stay unacknowledged
                task = asyncio.create_task(
                    self._flush(batch, writes, quarantine, started, intake, store, write_lock, stop),
                    name="ingest-flush",
                )
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                task.add_done_callback(self._check_flush)
                if self._failure is not None:
                    raise self._failure
        finally:
            if inflight:
                await asyncio.wait(inflight)
        if self._failure is not None:
            raise self._failure

    def _check_flush(self, task: asyncio.Task[bool]) -> None:
        # A flush that raised is a bug: surface it from the loop instead of losing it with the task.
        if not task.cancelled() and task.exception() is not None:
            self._failure = task.exception()
            self._wake.set()

    def _notify(self, loop: asyncio.AbstractEventLoop, full: bool) -> None:
        """From paho's thread: wake the flusher (only on the first message and when a batch is full)."""
        loop.call_soon_threadsafe(self._signal, full)

    def _signal(self, full: bool) -> None:
        self._wake.set()
        if full:
            self._full.set()

    async def _relay_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()
        self._full.set()
        self._resume.set()

    async def _watch_ready(self, intake: MqttIntake, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if await asyncio.to_thread(intake.subscribed_event.wait, 0.2):
                self.ready.set()
                return

    async def _prepare_store(self, store: ReadingStore, stop: asyncio.Event) -> None:
        delay = 0.1
        while not stop.is_set():
            try:
                await store.prepare()
                return
            except (RedisError, OSError) as exc:
                logger.warning("redis not ready (%s): retrying", exc)
                await self._sleep(delay, stop)
                delay = min(delay * 2, 5.0)

    # --- one flush ---------------------------------------------------------------------------------------------

    def _prepare(self, batch: list[Incoming]) -> tuple[list[MessageWrite], list[Quarantine]]:
        writes: list[MessageWrite] = []
        quarantine: list[Quarantine] = []
        limiter = self.limiter
        now_s = time.time()
        dropped = 0
        for m in batch:
            result = validate_message(m.topic, m.payload, m.received_ms)
            readings = result.readings
            if limiter is not None and readings:
                kept = []
                for r in readings:
                    device = (r.site, r.sensor_id)
                    if limiter.allow(device, now_s, r.ts_ms / 1000):
                        kept.append(r)
                        continue
                    dropped += 1
                    if limiter.should_sample(device, now_s):
                        quarantine.append(
                            Quarantine(
                                "rate_limited",
                                f"{r.site}/{r.sensor_id} is over {self.config.device_rate:g} readings/s "
                                "(one dropped reading per device per 10 s is kept here as a sample)",
                                m.topic,
                                m.received_ms,
                                r.json,
                            )
                        )
                readings = kept
            writes.append(MessageWrite(m.topic, m.received_ms, readings))
            for rej in result.rejected:
                quarantine.append(Quarantine(rej.reason, rej.detail, m.topic, m.received_ms, rej.raw))
        if dropped:
            self.stats.rate_limited += dropped
            metrics.RATE_LIMITED.inc(dropped)
        return writes, quarantine

    async def _flush(
        self,
        batch: list[Incoming],
        writes: list[MessageWrite],
        quarantine: list[Quarantine],
        started: float,
        intake: MqttIntake,
        store: ReadingStore,
        write_lock: asyncio.Lock,
        stop: asyncio.Event,
    ) -> bool:
        """Write (retrying while Redis is down), then acknowledge. False: stopped before the write landed."""
        reasons: Counter[str] = Counter(q.reason for q in quarantine)
        delay = 0.05
        failing_since: float | None = None
        async with write_lock:
            while True:
                try:
                    await store.write(writes, quarantine)
                    break
                except StoreError as exc:
                    self.stats.redis_errors += 1
                    metrics.REDIS_ERRORS.inc()
                    if failing_since is None:
                        failing_since = time.monotonic()
                        logger.warning(
                            "redis write failed (%s): holding %d messages unacknowledged", exc, len(batch)
                        )
                    if stop.is_set():
                        logger.warning(
                            "stopping while redis is down: %d messages left unacknowledged", len(batch)
                        )
                        return False
                    await self._sleep(delay, stop)
                    delay = min(delay * 2, 5.0)
        if failing_since is not None:
            logger.info("redis writes recovered after %.1f s", time.monotonic() - failing_since)
        acked, skipped = intake.ack(batch)
        self._account(batch, writes, reasons, acked, skipped, time.perf_counter() - started)
        return True

    async def _final_flush(self, batch: list[Incoming], intake: MqttIntake, store: ReadingStore) -> None:
        writes, quarantine = self._prepare(batch)
        reasons: Counter[str] = Counter(q.reason for q in quarantine)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.config.stop_grace_s):
                await store.write(writes, quarantine)
        except (StoreError, TimeoutError) as exc:
            logger.warning(
                "could not write the %d held messages on stop (%s): left unacknowledged", len(batch), exc
            )
            return
        acked, skipped = intake.ack(batch)
        self._account(batch, writes, reasons, acked, skipped, time.perf_counter() - started)

    def _account(
        self,
        batch: list[Incoming],
        writes: list[MessageWrite],
        reasons: Counter[str],
        acked: int,
        skipped: int,
        seconds: float,
    ) -> None:
        stored = dups = stale = 0
        for w in writes:
            stored += w.stored
            dups += w.duplicates
            stale += len(w.stale)
        if stale:
            reasons["stale_seq"] += stale
        s = self.stats
        s.messages += len(batch)
        s.readings += stored
        s.duplicates += dups
        s.acked += acked
        s.ack_skipped += skipped
        s.flushes += 1
        s.quarantined.update(reasons)
        metrics.MESSAGES.inc(len(batch))
        metrics.READINGS.inc(stored)
        if dups:
            metrics.DUPLICATES.inc(dups)
        if stale:
            metrics.STALE.inc(stale)
        for reason, count in reasons.items():
            metrics.QUARANTINED.labels(reason).inc(count)
        metrics.ACKED.inc(acked)
        metrics.FLUSH_MESSAGES.observe(len(batch))
        metrics.FLUSH_SECONDS.observe(seconds)
        if self.intake is not None:
            metrics.HELD.set(self.intake.held())

    # --- backpressure ------------------------------------------------------------------------------------------

    async def _watch_pressure(self, redis: aredis.Redis, stop: asyncio.Event) -> None:
        cfg = self.config
        failing = False
        while not stop.is_set():
            try:
                reading = await read_pressure(redis)
            except (RedisError, OSError, HandoffError) as exc:
                # Once per outage at warning level: a check that keeps failing (a Redis user without the
                # commands it needs, say) leaves ingest without backpressure, which an operator must see.
                (logger.debug if failing else logger.warning)("cannot read backpressure signals: %s", exc)
                failing = True
            else:
                if failing:
                    logger.info("backpressure signals readable again")
                failing = False
                self._apply_pressure(reading)
            await self._sleep(cfg.pressure_check_s, stop)

    def _apply_pressure(self, p: PressureReading) -> None:
        cfg = self.config
        if p.lag is not None:
            STREAM_LAG.labels(keys.READINGS, keys.GROUP_ANALYTICS).set(p.lag)
        memory_share = p.used_memory / p.maxmemory if p.maxmemory else 0.0
        lagging = p.lag is not None and p.lag > cfg.max_lag
        full = memory_share >= cfg.memory_high
        if not self.backpressure and (lagging or full):
            self.backpressure = True
            metrics.BACKPRESSURE.set(1)
            logger.warning(
                "backpressure on: analytics lag %s (bound %d), redis memory %.0f%% of maxmemory: holding intake, "
                "messages wait at the broker",
                p.lag,
                cfg.max_lag,
                memory_share * 100,
            )
        elif self.backpressure and not (
            (p.lag is not None and p.lag > cfg.max_lag * 0.8) or memory_share >= cfg.memory_high - 0.05
        ):
            self.backpressure = False
            metrics.BACKPRESSURE.set(0)
            self._resume.set()
            logger.info(
                "backpressure off: analytics lag %s, redis memory %.0f%%: intake resumed",
                p.lag,
                memory_share * 100,
            )

    @staticmethod
    async def _sleep(seconds: float, stop: asyncio.Event) -> None:
        """Sleep about ``seconds`` (jittered +-20%), returning early when ``stop`` is set."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds * random.uniform(0.8, 1.2)):
                await stop.wait()
