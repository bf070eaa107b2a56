"""The analytics crew: a member of group ``analytics`` on ``wd:readings:v1`` that scores every reading.

Per batch (bounded by count and by a few milliseconds of waiting, see :class:`handoff.worker.WorkerConfig`; a
large batch is handled and committed in chunks, oldest first: 16 KiB of entries, then each chunk up to twice the
one before until 128 KiB, so after a stall the oldest readings' anomalies are not held back until the whole backlog
is scored, and the rest of the backlog costs a few calls): decode every entry, hand all readings to the :class:`~analytics.detector.DetectorBank` in one call (one scorer call
per sensor), and return for each entry an :class:`~handoff.worker.Ack` carrying its anomalies' XADD (MINID-trimmed
to the retention window) and PUBLISH. The worker commits those writes and the XACK in one atomic script that writes
only if the XACK removed the entry from the pending list, so a reading yields at most one anomaly entry however
often it is delivered.

Models are fitted off the event loop, by default in a child process that runs at a lower CPU priority (``nice``
+10): a fit holds the GIL for much of its time (scikit-learn builds each tree from Python), so in a thread it stalled
scoring for tens of milliseconds at a time, and on a busy machine the scoring loop, ingest, the broker and Redis
must win the CPU over background fitting. Fitted models come back pickled (and serialized for the registry), are
installed between batches, and saved to the shared :class:`~analytics.registry.ModelRegistry`. A starting process
loads every stored model before it reads a reading, one that meets a new sensor loads its model if another process
stored one, and every process picks up newer generations fitted elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import traceback
from collections.abc import Mapping, Sequence
from concurrent.futures import BrokenExecutor, Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import redis.asyncio as aredis
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import RedisError

from analytics.detector import DetectorBank, DetectorConfig, TrainingWindow, fit_model
from analytics.fitproc import fit_process_pool
from analytics.model import SensorModel
from analytics.registry import ModelRegistry, generation_of
from handoff import keys, runloop
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

#: A batch that takes longer than this to score is logged (INFO) with where the time went.
SLOW_BATCH_S = 0.05
#: Readings per batch above which scoring runs in a thread, so a huge backlog batch does not hold the loop.
THREAD_SCORING_ABOVE = 5000


@dataclass
class AnalyticsConfig:
    retention_days: float = 30.0
    worker: WorkerConfig = field(
        default_factory=lambda: WorkerConfig(
            batch_size=500, block_ms=5, chunk_bytes=16 * 1024, chunk_bytes_max=128 * 1024
        )
    )
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    #: Where fits run: ``"process"`` (child processes at ``refit_nice``, the default) or ``"thread"`` (this
    #: process; fits then compete with scoring for the GIL).
    refit_in: Literal["process", "thread"] = "process"
    refit_workers: int = 1
    #: ``nice`` increment of the fit processes: under CPU contention a nice-10 process gets about a tenth of
    #: what a nice-0 one gets, so fits use spare CPU and slow down, rather than slow scoring, when there is none.
    refit_nice: int = 10
    max_refits_in_flight: int = 4
    #: After loading the stored models at start, exempt them (and everything else alive) from the cyclic garbage
    #: collector (:func:`handoff.runloop.freeze_long_lived`); the command-line crew does, tests need not.
    freeze_after_preload: bool = False
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
        if config.refit_workers < 1:
            raise ValueError("refit_workers must be at least 1")
        self._executor: Executor | None = None  # started at the first fit
        self._fits: set[asyncio.Future[ChildResult]] = set()
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
        t0 = time.perf_counter()
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
        scored = time.perf_counter()
        SCORE_SECONDS.observe(scored - started)
        if scored - t0 > SLOW_BATCH_S:
            logger.info(
                "slow batch: %d readings, %.1f ms installing/loading models, %.1f ms scoring",
                len(readings),
                (started - t0) * 1000,
                (scored - started) * 1000,
            )
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

    async def preload(self, chunk: int = 200) -> int:
        """Load every stored model before scoring starts; returns how many.

        Loading a model costs ~0.7 ms (decompression and checks; ~2.5 ms for a format-1 model): a restarted crew
        that met its 1,000 sensors in its first batches would hold those batches for most of a second. Sensors
        without a stored model warm up as usual.
        """
        sensors = await self.registry.sensors()
        loaded = 0
        for i in range(0, len(sensors), chunk):
            part = sensors[i : i + chunk]
            loaded += await self._install_stored(part)
            self._checked |= set(part)
            await asyncio.sleep(0)
        if loaded:
            logger.info("loaded %d stored models", loaded)
        return loaded

    async def _install_stored(self, sensors: Sequence[tuple[str, str]] | set[tuple[str, str]]) -> int:
        """Install the registry's models of ``sensors`` (those it has); returns how many."""
        models = await self.registry.load_many(sensors)
        for sensor, model in models.items():
            self.bank.sensor(*sensor).install(model)
        if models:
            MODELS_LOADED.inc(len(models))
            self._count_models()
        return len(models)

    def _count_models(self) -> None:
        MODELS.set(sum(1 for d in self.bank.sensors.values() if d.model is not None))

    async def _load_new_sensors(self, readings: list[dict[str, Any]]) -> None:
        new = {(r["site"], r["sensor_id"]) for r in readings} - self._checked
        if new:
            self._checked |= new
            await self._install_stored(new)
        if time.monotonic() >= self._next_refresh:
            self._next_refresh = time.monotonic() + self.config.registry_refresh_s
            await self._refresh_generations()

    async def _refresh_generations(self) -> None:
        """Adopt models that another process fitted since we last looked."""
        sensors = list(self.bank.sensors)
        stored = await self.registry.generations(sensors)
        await self._install_stored([s for s, gen in stored.items() if gen > self.bank.sensors[s].generation])

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
            try:
                fut = loop.run_in_executor(self._fit_executor(), _fit_in_worker, window)
            except (BrokenExecutor, RuntimeError) as exc:  # a fit process died: start over with a new pool
                logger.warning("refit pool unusable (%r); starting a new one", exc)
                self._drop_executor()
                self._ready.append((window, None, None))
                continue
            self._fits.add(fut)
            fut.add_done_callback(functools.partial(self._fit_done, window))

    def _fit_executor(self) -> Executor:
        if self._executor is None:
            workers = self.config.refit_workers
            if self.config.refit_in == "thread":
                self._executor = ThreadPoolExecutor(workers, thread_name_prefix="refit")
            else:
                self._executor = fit_process_pool(workers, self.config.refit_nice)
        return self._executor

    def _drop_executor(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def _fit_done(self, window: TrainingWindow, fut: asyncio.Future[ChildResult]) -> None:
        self._fits.discard(fut)
        model: SensorModel | None = None
        blob: bytes | None = None
        if fut.cancelled():
            pass
        elif (exc := fut.exception()) is not None:
            logger.warning("fit of %s failed: %r", window.model_version, exc)
            if isinstance(exc, BrokenExecutor):  # the fit process was killed (OOM, operator): use a new one
                self._drop_executor()
        else:
            model, blob, error = fut.result()
            if error is not None:
                logger.warning("fit of %s failed:\n%s", window.model_version, error)
            else:
                assert model is not None
                logger.info(
                    "fitted %s on %d readings (generation %d)",
                    window.model_version,
                    len(window.values),
                    generation_of(model),
                )
        # Installed (or abandoned) at the start of the next batch, never while a batch is being scored.
        self._ready.append((window, model, blob))

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
        if ready:
            self._count_models()

    async def wait_for_refits(self) -> None:
        """Wait for refits in flight and install them (tests, shutdown)."""
        while self._fits:
            await asyncio.wait(set(self._fits))
        async with self._bank_lock:
            await self._install_ready()

    def close(self) -> None:
        self._drop_executor()


#: A finished fit: the window, the model (None: the fit failed or was abandoned) and its registry bytes.
FitResult = tuple[TrainingWindow, SensorModel | None, bytes | None]
#: What a fit worker sends back: the model and its registry bytes, or the error's traceback.
ChildResult = tuple[SensorModel | None, bytes | None, str | None]


def _fit_in_worker(window: TrainingWindow) -> ChildResult:
    """Fit and serialize one model (in a fit process or thread). Errors come back as text, not exceptions."""
    try:
        model = fit_model(window)
        # Serialized here (~7 ms of CPU), not by the event loop that scores readings.
        blob = model.to_bytes()
    except Exception:
        return None, None, traceback.format_exc()
    return model, blob, None


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
    try:
        if await handler.preload() and config.freeze_after_preload:
            runloop.freeze_long_lived()  # the models just loaded live as long as they are current
    except RedisError as exc:  # not fatal: models then load as their sensors' readings arrive
        logger.warning("could not preload stored models (%r); loading them on demand", exc)
    maintenance = asyncio.create_task(handler.maintain(stop), name="analytics-maintenance")
    try:
        await worker.run()
    finally:
        stop.set()
        await maintenance
        handler.close()
    return handler
