"""The alerting crew: Pub/Sub for speed, the ``alerting`` group on ``wd:anomalies:v1`` for durability.

Both inputs call the same :class:`~alerting.dispatcher.Dispatcher`, which claims each (alert, phone) in the Redis
ledger before sending, so an alert that arrives by Pub/Sub, by the stream, or both, goes out once per phone. The
Pub/Sub path dispatches at once (milliseconds after the anomaly is written); the stream path backfills whatever
Pub/Sub lost while this crew was down, oldest first, and acknowledges an entry only when its dispatch is settled
(every SMS has a final outcome or is durably scheduled): an unsettled entry is held and handed over again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from alerting.dispatcher import Dispatcher
from alerting.errors import InvalidAnomaly
from handoff import keys
from handoff.worker import Ack, ConsumerGroupWorker, Entry, Fail, Hold, Outcome, WorkerConfig

logger = logging.getLogger(__name__)


@dataclass
class AlertingConfig:
    worker: WorkerConfig = field(
        default_factory=lambda: WorkerConfig(batch_size=100, block_ms=200, retry_ms=2_000, max_deliveries=20)
    )
    pubsub_concurrency: int = 32  # with the stream window, well under redis-py's connection pool limit
    stream_concurrency: int = 16
    use_pubsub: bool = True
    #: With Pub/Sub on, the stream path leaves an entry younger than this to Pub/Sub (it dispatches it once it is
    #: this old; a lost Pub/Sub message costs that much more). Both paths at once doubled the alerting crew's work
    #: at the worst moment: a burst of alerts (a gateway's backlog of one sensor) arrives on both together.
    stream_grace_s: float = 0.5


class StreamHandler:
    """Dispatches anomaly entries, oldest first; Ack when settled, Hold when not yet (it comes back later).

    ``grace_s``: an entry younger than this (by its id, the server's clock) waits until it is that old first.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        concurrency: int = 16,
        grace_s: float = 0.0,
    ) -> None:
        self.dispatcher = dispatcher
        self.concurrency = concurrency
        self.grace_s = grace_s

    async def __call__(self, entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        async def one(entry: Entry) -> Outcome:
            try:
                anomaly = orjson.loads(entry.payload)
            except orjson.JSONDecodeError as exc:
                return Fail(f"anomaly is not JSON: {exc}", permanent=True)
            try:
                settled = await self.dispatcher.dispatch(anomaly)
            except InvalidAnomaly as exc:
                return Fail(f"invalid anomaly: {exc}", permanent=True)
            return Ack() if settled else Hold("dispatch not settled yet")

        # Started in stream order through a small window: a backfill goes out oldest first (give or take the
        # window) while several Twilio round trips overlap, so its pace is set by the send-rate bound.
        window = asyncio.Semaphore(self.concurrency)

        async def in_window(entry: Entry) -> Outcome:
            if self.grace_s > 0:
                age = time.time() - int(entry.id.split("-", 1)[0]) / 1000
                if age < self.grace_s:
                    await asyncio.sleep(min(self.grace_s, self.grace_s - age))
            async with window:
                return await one(entry)

        tasks = [asyncio.create_task(in_window(e)) for e in entries]
        results = await asyncio.gather(*tasks)
        return {e.id: o for e, o in zip(entries, results, strict=True)}


async def listen_pubsub(
    redis: aredis.Redis,
    dispatcher: Dispatcher,
    stop: asyncio.Event,
    concurrency: int = 64,
    drain_s: float = 8.0,
) -> None:
    """Dispatch every anomaly published on ``wd:alerts:v1`` until ``stop``; reconnects with jittered backoff.

    Pub/Sub may lose messages (while disconnected); the stream group brings those back, so nothing here retries.
    On ``stop`` the dispatches under way get ``drain_s`` to finish (within the run loop's grace), then they are
    cancelled; they are also cancelled, and waited for, when this is: none outlives it, to fail later against a
    closed sender or Redis client.
    """
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def dispatch(data: bytes, received: float) -> None:
        try:
            await dispatcher.dispatch(orjson.loads(data), received)
        except Exception:  # one bad alert must not stop the listener; the stream path retries it
            logger.warning("pub/sub dispatch failed", exc_info=True)
        finally:
            slots.release()

    try:
        await _listen(redis, stop, slots, tasks, dispatch)
        if tasks:
            await asyncio.wait(tasks, timeout=drain_s)
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def _listen(
    redis: aredis.Redis,
    stop: asyncio.Event,
    slots: asyncio.Semaphore,
    tasks: set[asyncio.Task[None]],
    dispatch: Callable[[bytes, float], Coroutine[Any, Any, None]],
) -> None:
    failures = 0
    while not stop.is_set():
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(keys.ALERTS_CHANNEL)
            failures = 0
            while not stop.is_set():
                message = await pubsub.get_message(timeout=0.2)
                if message is None:
                    continue
                received = time.perf_counter()
                await slots.acquire()
                task = asyncio.create_task(dispatch(message["data"], received))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            failures += 1
            delay = random.uniform(0, min(5.0, 0.1 * 2**failures))
            logger.warning("pub/sub connection lost (%s); resubscribing in %.2fs", exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]


async def run_alerting(
    redis: aredis.Redis,
    dispatcher: Dispatcher,
    stop: asyncio.Event,
    config: AlertingConfig | None = None,
    consumer: str | None = None,
) -> ConsumerGroupWorker:
    """Run both inputs and the dispatcher's scheduler until ``stop``; returns the stream worker (for its stats)."""
    cfg = config or AlertingConfig()
    worker = ConsumerGroupWorker(
        redis,
        keys.ANOMALIES,
        keys.GROUP_ALERTING,
        StreamHandler(dispatcher, cfg.stream_concurrency, cfg.stream_grace_s if cfg.use_pubsub else 0.0),
        consumer=consumer,
        config=cfg.worker,
        stop_event=stop,
    )
    async with asyncio.TaskGroup() as tg:
        if cfg.use_pubsub:
            tg.create_task(
                listen_pubsub(redis, dispatcher, stop, cfg.pubsub_concurrency), name="alerts-pubsub"
            )
        tg.create_task(dispatcher.run_scheduler(stop), name="alerts-scheduler")
        tg.create_task(worker.run(), name="alerts-stream")
    return worker
