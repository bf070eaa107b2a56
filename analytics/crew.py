"""The analytics crew: a member of group ``analytics`` on ``wd:readings:v1`` that scores every reading.

Per batch (bounded by count and by a few milliseconds of waiting, see :class:`handoff.worker.WorkerConfig`):
decode every entry, hand all readings to the :class:`~analytics.detector.DetectorBank` in one call (one scorer call
per sensor), and return for each entry an :class:`~handoff.worker.Ack` carrying its anomalies' XADD (MINID-trimmed
to the retention window) and PUBLISH. The worker commits those writes and the XACK in one atomic script that writes
only if the XACK removed the entry from the pending list, so a reading yields at most one anomaly entry however
often it is delivered.

Models are fitted off the event loop (a thread: scikit-learn's tree building releases the GIL), installed between
batches, and saved to the shared :class:`~analytics.registry.ModelRegistry`; a process that meets a sensor for the
first time, or restarts, loads the sensor's stored model instead of warming up again, and every process picks up
newer generations fitted elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aredis
from prometheus_client import Counter, Gauge, Histogram

from analytics.detector import DetectorBank, DetectorConfig, TrainingWindow, fit_model
from analytics.model import SensorModel
from analytics.registry import ModelRegistry, generation_of
from handoff import keys
from handoff.worker import Ack, ConsumerGroupWorker, Entry, Fail, Outcome, Publish, WorkerConfig, XAdd

logger = logging.getLogger(__name__)

ANOMALIES = Counter("wd_anomalies_total", "Anomalies emitted", ["severity"])
for _severity in ("warning", "critical"):
    ANOMALIES.labels(_severity)  # exported at 0 from the start, so increase() sees the first one
SCORED = Counter("wd_analytics_readings_total", "Readings scored")
SCORE_BATCH = Histogram(
    "wd_analytics_batch_readings",
    "Readings per scoring batch",
    buckets=(1, 10, 50, 100, 500, 1000, 5000, 10000, 50000),
)
SCORE_SECONDS = Histogram(
    "wd_analytics_score_seconds",
    "Time to score one batch",
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
FITS = Counter("wd_analytics_model_fits_total", "Models fitted", ["outcome"])
MODELS_LOADED = Counter("wd_analytics_models_loaded_total", "Models loaded from the registry")
MODELS = Gauge("wd_analytics_models", "Sensors with a model in this process")

#: Readings per batch above which scoring runs in a thread, so a huge backlog batch does not hold the loop.
THREAD_SCORING_ABOVE = 5000


@dataclass
class AnalyticsConfig:
    retention_days: float = 30.0
    worker: WorkerConfig = field(default_factory=lambda: WorkerConfig(batch_size=500, block_ms=5))
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    refit_threads: int = 1
    max_refits_in_flight: int = 4
    #: Fits started per second at most. A fit costs tens of milliseconds of CPU (and some of the GIL); at tens of
    #: thousands of readings/s the detector would ask for one every few milliseconds and starve scoring. Sensors
    #: whose refit waits keep scoring with their current model.
    max_fits_per_s: float = 2.0
    registry_refresh_s: float = 30.0


class AnalyticsHandler:
    """The batch handler plugged into :class:`~handoff.worker.ConsumerGroupWorker`."""

    def __init__(self, redis: aredis.Redis, config: AnalyticsConfig) -> None:
        self.redis = redis
        self.config = config
        self.bank = DetectorBank(config.detector)
        self.registry = ModelRegistry(redis)
        self.max_age_ms = int(config.retention_days * 86_400_000)
        self._executor = ThreadPoolExecutor(config.refit_threads, thread_name_prefix="refit")
        self._fits: set[asyncio.Future[FitResult]] = set()
        self._ready: list[FitResult] = []
        self._checked: set[tuple[str, str]] = set()
        self._next_refresh = time.monotonic() + config.registry_refresh_s
        self._fit_tokens = max(1.0, config.max_fits_per_s)
        self._fit_clock = time.monotonic()
        # The bank is not thread-safe: scoring (sometimes in a thread) and installing models take turns.
        self._bank_lock = asyncio.Lock()

    async def __call__(self, entries: Sequence[Entry]) -> Mapping[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        readings: list[dict[str, Any]] = []
        entry_ids: list[str] = []
        for e in entries:
            try:
                batch = orjson.loads(e.payload)["readings"]
                if not isinstance(batch, list):
                    raise TypeError("readings is not a list")
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                outcomes[e.id] = Fail(f"malformed readings entry: {exc}", permanent=True)
                continue
            readings.extend(batch)
            entry_ids.extend([e.id] * len(batch))
        await self._install_ready()
        await self._load_new_sensors(readings)
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        if len(readings) > THREAD_SCORING_ABOVE:
            anomalies = await asyncio.to_thread(
                self.bank.process, readings, detected_ms=now_ms, entry_ids=entry_ids
            )
        else:
            anomalies = self.bank.process(readings, detected_ms=now_ms, entry_ids=entry_ids)
        SCORE_SECONDS.observe(time.perf_counter() - started)
        SCORE_BATCH.observe(len(readings))
        SCORED.inc(len(readings))
        ops: dict[str, list[XAdd | Publish]] = {}
        for anomaly in anomalies:
            data = orjson.dumps(anomaly)
            ops.setdefault(anomaly["reading_entry_id"], []).extend(
                [XAdd(keys.ANOMALIES, data, max_age_ms=self.max_age_ms), Publish(keys.ALERTS_CHANNEL, data)]
            )
            ANOMALIES.labels(anomaly["severity"]).inc()
        for entry_id, entry_ops in ops.items():
            outcomes[entry_id] = Ack(entry_ops)
        return outcomes

    async def maintain(self, stop: asyncio.Event, interval_s: float = 0.2) -> None:
        """Install finished fits and start due ones while no batch arrives (a quiet stream must not stall refits)."""
        while not stop.is_set():
            if self._ready or len(self._fits) < self.config.max_refits_in_flight:
                async with self._bank_lock:
                    await self._install_ready()
                    self._schedule_refits()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    # -- models ----------------------------------------------------------------------------------------------

    async def _load_new_sensors(self, readings: list[dict[str, Any]]) -> None:
        new = {(r["site"], r["sensor_id"]) for r in readings} - self._checked
        if new:
            self._checked |= new
            for sensor, model in (await self.registry.load_many(new)).items():
                self.bank.sensor(*sensor).install(model)
                MODELS_LOADED.inc()
        if time.monotonic() >= self._next_refresh:
            self._next_refresh = time.monotonic() + self.config.registry_refresh_s
            await self._refresh_generations()
        MODELS.set(sum(1 for d in self.bank.sensors.values() if d.model is not None))

    async def _refresh_generations(self) -> None:
        """Adopt models that another process fitted since we last looked."""
        sensors = list(self.bank.sensors)
        stored = await self.registry.generations(sensors)
        newer = [s for s, gen in stored.items() if gen > self.bank.sensors[s].generation]
        for sensor, model in (await self.registry.load_many(newer)).items():
            self.bank.sensor(*sensor).install(model)
            MODELS_LOADED.inc()

    def _schedule_refits(self) -> None:
        now = time.monotonic()
        rate = self.config.max_fits_per_s
        self._fit_tokens = min(max(1.0, rate), self._fit_tokens + (now - self._fit_clock) * rate)
        self._fit_clock = now
        room = min(self.config.max_refits_in_flight - len(self._fits), int(self._fit_tokens))
        if room <= 0:
            return
        loop = asyncio.get_running_loop()
        for window in self.bank.due_refits(limit=room):
            self._fit_tokens -= 1
            fut = loop.run_in_executor(self._executor, _fit_safely, window)
            self._fits.add(fut)
            fut.add_done_callback(self._fit_done)

    def _fit_done(self, fut: asyncio.Future[FitResult]) -> None:
        self._fits.discard(fut)
        if not fut.cancelled() and fut.exception() is None:
            # Installed at the start of the next batch, never while a batch is being scored.
            self._ready.append(fut.result())

    async def _install_ready(self) -> None:
        ready, self._ready = self._ready, []
        for window, model, blob in ready:
            detector = self.bank.sensor(window.site, window.sensor_id)
            if model is None:
                detector.abandon_refit()
                FITS.labels("failed").inc()
                continue
            detector.install(model)
            FITS.labels("ok").inc()
            try:
                await self.registry.save(window.site, window.sensor_id, model, blob)
            except Exception:  # the model still serves this process; the next refit saves again
                logger.warning("could not save model %s", model.model_version_, exc_info=True)

    async def wait_for_refits(self) -> None:
        """Wait for refits in flight and install them (tests, shutdown)."""
        while self._fits:
            await asyncio.wait(set(self._fits))
        async with self._bank_lock:
            await self._install_ready()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


#: A finished fit: the window, the model (None: the fit failed) and its registry bytes.
FitResult = tuple[TrainingWindow, SensorModel | None, bytes | None]


def _fit_safely(window: TrainingWindow) -> FitResult:
    try:
        model = fit_model(window)
        # Serialized here, in the refit thread (zlib releases the GIL): ~7 ms of CPU the event loop, which
        # scores readings, would otherwise spend per installed model.
        blob = model.to_bytes()
    except Exception:
        logger.warning("fit failed for %s", window.model_version, exc_info=True)
        return window, None, None
    logger.info(
        "fitted %s on %d readings (generation %d)",
        window.model_version,
        len(window.values),
        generation_of(model),
    )
    return window, model, blob


async def run_analytics(
    redis: aredis.Redis, config: AnalyticsConfig, stop: asyncio.Event, consumer: str | None = None
) -> AnalyticsHandler:
    """Run the crew until ``stop`` is set; returns the handler (its bank and stats) for inspection."""
    handler = AnalyticsHandler(redis, config)
    worker = ConsumerGroupWorker(
        redis,
        keys.READINGS,
        keys.GROUP_ANALYTICS,
        handler,
        consumer=consumer,
        config=config.worker,
        stop_event=stop,
    )
    maintenance = asyncio.create_task(handler.maintain(stop), name="analytics-maintenance")
    try:
        await worker.run()
    finally:
        stop.set()
        await maintenance
        handler.close()
    return handler
