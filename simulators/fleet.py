"""A seeded, deterministic fleet of water-treatment sensors with labelled anomalies (ground truth).

Each sensor is a multi-parameter station at one stage of a plant (``intake`` raw water, ``treated`` plant outlet,
``network`` distribution main) and reports seven metrics every ``interval_s``:

* ``flow_m3_h`` follows a demand curve with morning and evening peaks; ``pressure_bar`` falls with the square of
  flow (pump curve and head loss), so the two are anti-correlated.
* rain events per site raise turbidity a few hours later (a lot at the intake, a little after filtration), dilute
  conductivity and lower intake pH; free chlorine falls as chlorine demand rises with turbidity and temperature.
* temperature has a small daily cycle; every metric carries white noise plus a slow AR(1) wander.

Devices misbehave like real ones: they go silent (no readings), lose their uplink and flush a buffer when they
reconnect (late readings: ``ts`` older than the publish time), delay single readings, and send a reading twice
(same ``seq``). Anomaly episodes are injected with their class as the label: ``spike``, ``drift`` (slow ramp),
``stuck`` (flat line), ``out_of_range`` (physically impossible), ``level_shift``.

Everything is a pure function of the constructor arguments: the same ``seed`` and parameters give the same readings
and labels, however the caller slices time into :meth:`Fleet.step` calls. Generation is vectorised with numpy in
blocks of ticks (one tick = one reading per sensor); the published payload never carries the label.

Typical offline use (precision/recall over a simulated day)::

    fleet = Fleet(sites=5, sensors_per_site=10, interval_s=10, anomaly_rate=0.01, seed=7)
    for r in fleet.simulate(86_400):           # list[LabelledReading], in emission order
        score(r.metrics) ... compare with r.label
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple, cast

import numpy as np
import numpy.typing as npt

__all__ = [
    "ANOMALY_CLASSES",
    "DEFAULT_START_MS",
    "METRICS",
    "PHYSICAL_LIMITS",
    "STAGES",
    "AnomalyClass",
    "AnomalyEpisode",
    "Fleet",
    "LabelledReading",
    "ReadingBatch",
    "ReadingKey",
    "SensorInfo",
    "format_ts",
]

logger = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

#: Metric names, in the column order of :attr:`ReadingBatch.values`.
METRICS: Final = (
    "ph",
    "turbidity_ntu",
    "chlorine_mg_l",
    "flow_m3_h",
    "pressure_bar",
    "temperature_c",
    "conductivity_us_cm",
)
PH, TURB, CL, FLOW, PRES, TEMP, COND = range(7)

AnomalyClass = Literal["spike", "drift", "stuck", "out_of_range", "level_shift"]
#: Anomaly classes; a label code in :attr:`ReadingBatch.label` is an index into this tuple (-1: normal).
ANOMALY_CLASSES: Final[tuple[AnomalyClass, ...]] = ("spike", "drift", "stuck", "out_of_range", "level_shift")

Stage = Literal["treated", "network", "intake"]
#: Sensor ``i`` of a site sits at stage ``STAGES[i % 3]``.
STAGES: Final[tuple[Stage, ...]] = ("treated", "network", "intake")

#: Inclusive physical limits of each metric. Every reading lies inside them except ``out_of_range`` anomalies,
#: which lie outside (pH above 14, negative turbidity, liquid water at 120 degC, ...).
PHYSICAL_LIMITS: Final[Mapping[str, tuple[float, float]]] = {
    "ph": (0.0, 14.0),
    "turbidity_ntu": (0.0, 4000.0),
    "chlorine_mg_l": (0.0, 20.0),
    "flow_m3_h": (0.0, 100_000.0),
    "pressure_bar": (-1.0, 25.0),  # gauge pressure cannot go below vacuum
    "temperature_c": (-5.0, 100.0),
    "conductivity_us_cm": (0.0, 100_000.0),
}
# Normal readings and every anomaly but out_of_range are clipped into this plausible range (a strong negative spike
# on an intake gauge reads 0 bar, not a vacuum); it lies inside PHYSICAL_LIMITS.
_CLIP_LO = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
_CLIP_HI = np.array([13.0, 1000.0, 10.0, 10_000.0, 16.0, 40.0, 10_000.0])
_DECIMALS: Final = (2, 3, 3, 1, 3, 2, 1)

#: 2026-01-01T00:00:00Z: the default simulated start, fixed so that a default fleet is reproducible.
DEFAULT_START_MS: Final = 1_767_225_600_000
_DAY_MS: Final = 86_400_000
_HOUR_MS: Final = 3_600_000

# Episode length in ticks (readings) per class, inclusive ranges; the mean sets the start probability.
_EPISODE_TICKS: Final[Mapping[AnomalyClass, tuple[int, int]]] = {
    "spike": (1, 1),
    "drift": (60, 240),
    "stuck": (20, 80),
    "out_of_range": (1, 3),
    "level_shift": (20, 80),
}

# Device quirks. Outages are in wall time (a network outage lasts seconds whatever the sampling interval), so their
# start rates are per sensor-hour; late and repeated readings are per reading. All scale with ``quirk_rate``.
_SILENT_PER_HOUR: Final = 0.05
_SILENT_S: Final = (60.0, 900.0)
_RECONNECT_PER_HOUR: Final = 0.3
_RECONNECT_S: Final = (5.0, 120.0)
_LATE_PER_READING: Final = 0.002
_LATE_S: Final = (2.0, 90.0)
_REPEAT_PER_READING: Final = 0.002

_AR_TAU_S: Final = 900.0  # time constant of the slow wander
_BLOCK_CELLS: Final = 32_768  # sensors x ticks generated at once; bounds the pause a live publisher sees

ReadingKey = tuple[str, str, int]
"""``(site, sensor_id, seq)``: the contract's identity of a reading."""


_LABEL_NAMES: Final[tuple[AnomalyClass | None, ...]] = (*ANOMALY_CLASSES, None)  # code -1 -> None


def _metrics_dict(
    ph: float, turb: float, cl: float, flow: float, pres: float, temp: float, cond: float
) -> dict[str, float]:
    return {
        "ph": ph,
        "turbidity_ntu": turb,
        "chlorine_mg_l": cl,
        "flow_m3_h": flow,
        "pressure_bar": pres,
        "temperature_c": temp,
        "conductivity_us_cm": cond,
    }


_ts_cache: dict[int, str] = {}


def format_ts(ts_ms: int) -> str:
    """RFC 3339 UTC with milliseconds (``2026-12-01T07:00:00.123Z``), cheap enough for the publish hot path."""
    sec, ms = divmod(ts_ms, 1000)
    prefix = _ts_cache.get(sec)
    if prefix is None:
        if len(_ts_cache) > 8192:  # readings arrive roughly in time order: a small cache is enough
            _ts_cache.clear()
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _ts_cache[sec] = prefix
    return f"{prefix}.{ms:03d}Z"


class LabelledReading(NamedTuple):
    """One reading as a device emits it, with its ground-truth ``label`` (never part of :meth:`payload`).

    ``emit_ms`` is when the device sends it (simulated clock); it is later than ``ts_ms`` for late readings and for
    readings buffered during an outage. ``repeat`` marks a second send of the same ``seq``.
    """

    site: str
    sensor_id: str
    seq: int
    ts_ms: int
    metrics: dict[str, float]
    label: AnomalyClass | None
    emit_ms: int
    repeat: bool
    gateway_id: str
    anomaly_metric: str | None = None  # the metric the anomaly affects (ground truth, like ``label``)

    @property
    def key(self) -> ReadingKey:
        return (self.site, self.sensor_id, self.seq)

    @property
    def ts(self) -> str:
        return format_ts(self.ts_ms)

    def payload(self) -> dict[str, Any]:
        """The contract JSON object of this reading (CONTRACT.md section 2), without the label."""
        return {
            "site": self.site,
            "sensor_id": self.sensor_id,
            "seq": self.seq,
            "ts": format_ts(self.ts_ms),
            "metrics": self.metrics,
        }


@dataclass(frozen=True, slots=True)
class SensorInfo:
    """Static description of one sensor; ``index`` is its row in :attr:`ReadingBatch.sensor`."""

    index: int
    site: str
    sensor_id: str
    gateway_id: str
    stage: Stage


@dataclass(frozen=True, slots=True)
class AnomalyEpisode:
    """One injected anomaly: ``length`` consecutive ticks of ``metric`` on one sensor from ``start_ts_ms``.

    ``magnitude`` is the offset (spike, level shift; the final offset for a drift), the frozen value (stuck) or the
    first impossible value (out of range). Ticks that fall in a silent period produce no reading, so an episode may
    label fewer than ``length`` readings.
    """

    site: str
    sensor_id: str
    kind: AnomalyClass
    metric: str
    start_ts_ms: int
    length: int
    magnitude: float


@dataclass(frozen=True, slots=True)
class ReadingBatch:
    """Readings in columns (numpy), in emission order; the fast form for offline analysis.

    ``sensor`` indexes :attr:`sensors`; ``values`` has one column per name in :data:`METRICS`; ``label`` is an
    index into :data:`ANOMALY_CLASSES` or -1; ``anomaly_metric`` the column the anomaly affects, or -1.
    """

    sensors: tuple[SensorInfo, ...]
    sensor: npt.NDArray[np.int32]
    seq: I64
    ts_ms: I64
    emit_ms: I64
    values: F64
    label: npt.NDArray[np.int8]
    repeat: npt.NDArray[np.bool_]
    anomaly_metric: npt.NDArray[np.int8]

    def __len__(self) -> int:
        return int(self.sensor.shape[0])

    def column(self, metric: str) -> F64:
        """The values of one metric."""
        return self.values[:, METRICS.index(metric)]

    def label_counts(self) -> Counter[AnomalyClass]:
        """Labelled readings per anomaly class (repeats not counted twice)."""
        codes = self.label[(self.label >= 0) & ~self.repeat]
        return Counter(
            {ANOMALY_CLASSES[c]: int(n) for c, n in enumerate(np.bincount(codes, minlength=5)) if n}
        )

    def to_readings(self) -> list[LabelledReading]:
        """The batch as :class:`LabelledReading` objects (about 2 to 3 microseconds each)."""
        # Column-wise with map() over C-level callables: about twice as fast as a per-row Python loop.
        sensors = self.sensors
        idx = self.sensor.tolist()
        sites = list(map([s.site for s in sensors].__getitem__, idx))
        ids = list(map([s.sensor_id for s in sensors].__getitem__, idx))
        gateways = list(map([s.gateway_id for s in sensors].__getitem__, idx))
        metrics = list(map(_metrics_dict, *(self.values[:, i].tolist() for i in range(len(METRICS)))))
        labels = list(map(_LABEL_NAMES.__getitem__, self.label.tolist()))
        affected = list(map(_METRIC_NAMES.__getitem__, self.anomaly_metric.tolist()))
        rows = zip(
            sites,
            ids,
            self.seq.tolist(),
            self.ts_ms.tolist(),
            metrics,
            labels,
            self.emit_ms.tolist(),
            self.repeat.tolist(),
            gateways,
            affected,
            strict=True,
        )
        return list(map(LabelledReading._make, rows))

    @classmethod
    def concat(cls, sensors: tuple[SensorInfo, ...], parts: Sequence[ReadingBatch]) -> ReadingBatch:
        if not parts:
            return cls.empty(sensors)
        if len(parts) == 1:
            return parts[0]
        return cls(sensors, *(np.concatenate([getattr(p, name) for p in parts]) for name in _COLUMNS))

    @classmethod
    def empty(cls, sensors: tuple[SensorInfo, ...]) -> ReadingBatch:
        return cls(
            sensors,
            np.empty(0, np.int32),
            np.empty(0, np.int64),
            np.empty(0, np.int64),
            np.empty(0, np.int64),
            np.empty((0, len(METRICS))),
            np.empty(0, np.int8),
            np.empty(0, np.bool_),
            np.empty(0, np.int8),
        )

    def _take(self, index: npt.NDArray[np.intp] | slice) -> ReadingBatch:
        return ReadingBatch(self.sensors, *(getattr(self, name)[index] for name in _COLUMNS))

    def _sorted(self) -> ReadingBatch:
        # Emission order; ties broken by sensor, seq, and original before repeat, so the order is total.
        order = np.lexsort((self.repeat, self.seq, self.sensor, self.emit_ms))
        return self._take(order)


_COLUMNS: Final = ("sensor", "seq", "ts_ms", "emit_ms", "values", "label", "repeat", "anomaly_metric")
_METRIC_NAMES: Final[tuple[str | None, ...]] = (*METRICS, None)  # code -1 -> None


@dataclass(slots=True)
class _Params:
    """Per-sensor constants (one array entry per sensor)."""

    phase_ms: F64
    site: npt.NDArray[np.intp]
    stage: npt.NDArray[np.intp]  # index into STAGES
    tz_ms: F64
    demand_amp: F64
    flow_base: F64
    p_static: F64
    p_drop: F64
    temp_base: F64
    temp_amp: F64
    ph_base: F64
    ph_amp: F64
    turb_base: F64
    turb_rain: F64
    cl_set: F64
    cl_temp: F64
    cond_base: F64
    white: F64  # (S, 7) white-noise sigma
    ar: F64  # (S, 7) stationary sigma of the AR(1) wander
    scale: F64  # (S, 7) anomaly magnitude unit
    flaky: F64  # quirk-rate multiplier


@dataclass(slots=True)
class _Episode:
    sensor: int
    kind: int  # index into ANOMALY_CLASSES
    metric: int
    start_tick: int
    length: int
    value: float  # offset, frozen value, or final drift offset


@dataclass(slots=True)
class _RainEvent:
    t_ms: float
    amp: float
    lag_ms: float
    tau_ms: float


@dataclass
class _State:
    next_tick: int = 0
    seq_next: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    last_emit: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    silent_until: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    offline_until: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    ar: F64 = field(default_factory=lambda: np.zeros((0, 7)))
    episodes: list[_Episode] = field(default_factory=list)  # still running at the end of the last block
    busy_until: I64 = field(default_factory=lambda: np.zeros(0, np.int64))  # tick after the sensor's episode


class Fleet:
    """A deterministic fleet: ``sites`` x ``sensors_per_site`` stations reporting every ``interval_s``.

    Args:
        sites: number of sites (named ``plant-1`` ...) or their names.
        sensors_per_site: stations per site, ids ``s-0001`` ...; station ``i`` is at stage ``STAGES[i % 3]``.
        interval_s: sampling interval of every sensor; the nominal rate is ``sensors / interval_s`` readings/s.
        anomaly_rate: expected fraction of readings that carry an anomaly label (0 to 0.5).
        seed: the seed; equal seeds and parameters give equal readings and labels.
        start_ms: simulated epoch milliseconds of the first tick (default :data:`DEFAULT_START_MS`). Pass the wall
            clock when publishing live, so that ``ts`` falls in the contract's window.
        quirk_rate: scale of device quirks (silences, reconnect bursts, late and repeated readings); 0 disables.
        anomaly_mix: relative share of labelled readings per class (default equal shares).
        sensors_per_gateway: stations behind one gateway (``gw-1`` ...) within a site, for batched publishing.
        rain_per_day: mean rain events per site and day.
        seq_start: ``seq`` of each sensor's first reading. A live publisher passes something time-based so that a
            second run against the same pipeline is not taken for repeats.
    """

    def __init__(
        self,
        sites: int | Sequence[str] = 3,
        sensors_per_site: int = 4,
        interval_s: float = 10.0,
        anomaly_rate: float = 0.005,
        seed: int = 0,
        start_ms: int = DEFAULT_START_MS,
        *,
        quirk_rate: float = 1.0,
        anomaly_mix: Mapping[AnomalyClass, float] | None = None,
        sensors_per_gateway: int = 50,
        rain_per_day: float = 0.8,
        seq_start: int = 0,
    ) -> None:
        site_names = [f"plant-{i + 1}" for i in range(sites)] if isinstance(sites, int) else list(sites)
        if not site_names or len(set(site_names)) != len(site_names):
            raise ValueError("sites must be a positive count or distinct names")
        if sensors_per_site < 1 or sensors_per_site > 9999:
            raise ValueError("sensors_per_site must be 1 to 9999")
        if not interval_s > 0:
            raise ValueError("interval_s must be positive")
        if not 0.0 <= anomaly_rate <= 0.5:
            raise ValueError("anomaly_rate must be within 0 and 0.5")
        if quirk_rate < 0 or rain_per_day < 0 or sensors_per_gateway < 1 or seq_start < 0:
            raise ValueError("quirk_rate, rain_per_day and seq_start must be >= 0, sensors_per_gateway >= 1")
        mix = dict(anomaly_mix) if anomaly_mix is not None else dict.fromkeys(ANOMALY_CLASSES, 1.0)
        if set(mix) - set(ANOMALY_CLASSES) or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"anomaly_mix must map classes of {ANOMALY_CLASSES} to non-negative weights")

        self.site_names: tuple[str, ...] = tuple(site_names)
        self.sensors_per_site = sensors_per_site
        self.interval_s = float(interval_s)
        self.anomaly_rate = float(anomaly_rate)
        self.seed = int(seed)
        self.start_ms = int(start_ms)
        self.quirk_rate = float(quirk_rate)
        self.rain_per_day = float(rain_per_day)
        self.seq_start = int(seq_start)

        self.sensors: tuple[SensorInfo, ...] = tuple(
            SensorInfo(
                index=si * sensors_per_site + j,
                site=site,
                sensor_id=f"s-{j + 1:04d}",
                gateway_id=f"gw-{j // sensors_per_gateway + 1}",
                stage=STAGES[j % len(STAGES)],
            )
            for si, site in enumerate(site_names)
            for j in range(sensors_per_site)
        )
        n = len(self.sensors)
        self._interval_ms = self.interval_s * 1000.0
        self._block = max(1, min(1024, _BLOCK_CELLS // n))
        total = sum(mix.values())
        # Probability per tick that an episode of each class starts, so that the labelled share matches the mix.
        self._start_p = np.array(
            [
                self.anomaly_rate
                * mix.get(c, 0.0)
                / total
                / ((_EPISODE_TICKS[c][0] + _EPISODE_TICKS[c][1]) / 2)
                for c in ANOMALY_CLASSES
            ]
        ) / max(1e-9, 1.0 - self.anomaly_rate)
        self._p = self._make_params()
        self._rain_cache: dict[tuple[int, int], list[_RainEvent]] = {}
        self._state = _State(
            seq_next=np.full(n, self.seq_start, np.int64),
            last_emit=np.zeros(n, np.int64),
            silent_until=np.zeros(n, np.int64),
            offline_until=np.zeros(n, np.int64),
            ar=np.zeros((n, len(METRICS))),
            busy_until=np.zeros(n, np.int64),
        )
        self._pending = ReadingBatch.empty(self.sensors)
        self.now_ms = self.start_ms
        #: Ground truth of every emitted reading that carries a label: ``(site, sensor_id, seq) -> class``.
        self.ground_truth: dict[ReadingKey, AnomalyClass] = {}
        #: Every anomaly episode that started at or before ``now_ms``, in start order.
        self.episodes: list[AnomalyEpisode] = []
        #: Labelled readings emitted per class (a repeated send is not counted again).
        self.injected: Counter[AnomalyClass] = Counter()
        #: Device quirks up to ``now_ms``: ``silent`` and ``reconnect`` periods started, ``late`` readings (sent
        #: after their ``ts``: delayed, or buffered during an outage) and ``repeat`` sends.
        self.quirks: Counter[str] = Counter()
        # Generation runs ahead of ``now_ms`` (whole blocks); events wait here until their time has come.
        self._future_episodes: list[AnomalyEpisode] = []
        self._future_outages: list[tuple[int, str]] = []
        #: Readings emitted so far (repeats included).
        self.emitted = 0

    # -- public API -------------------------------------------------------------------------------------------

    @classmethod
    def for_rate(
        cls, rate: float, sites: int | Sequence[str] = 3, sensors_per_site: int = 4, **kwargs: Any
    ) -> Fleet:
        """A fleet whose nominal rate is ``rate`` readings/s: the interval is ``sensors / rate``."""
        if not rate > 0:
            raise ValueError("rate must be positive")
        n_sites = sites if isinstance(sites, int) else len(sites)
        return cls(sites, sensors_per_site, interval_s=n_sites * sensors_per_site / rate, **kwargs)

    @property
    def rate(self) -> float:
        """Nominal readings per second (before silences and repeats)."""
        return len(self.sensors) / self.interval_s

    def step_arrays(self, now_ms: int) -> ReadingBatch:
        """Every reading the devices emit in ``(previous now, now_ms]``, as columns in emission order."""
        now_ms = int(now_ms)
        if now_ms < self.now_ms:
            raise ValueError(f"time runs forward: {now_ms} < {self.now_ms}")
        self.now_ms = now_ms
        blocks: list[ReadingBatch] = []
        # Generate every tick whose nominal time is <= now: emission is never earlier than the reading's ts.
        # (a tick's ts is the floor of its nominal time, hence the ``< now + 1``).
        while self.start_ms + self._state.next_tick * self._interval_ms < now_ms + 1:
            blocks.append(self._generate_block())
        if blocks:
            self._pending = ReadingBatch.concat(self.sensors, [self._pending, *blocks])._sorted()
        pending = self._pending
        cut = int(np.searchsorted(pending.emit_ms, now_ms, side="right"))
        out = pending._take(slice(0, cut))
        self._pending = pending._take(slice(cut, None))
        self._account(out)
        return out

    def step(self, now_ms: int) -> list[LabelledReading]:
        """Every reading the devices emit in ``(previous now, now_ms]``, in emission order."""
        return self.step_arrays(now_ms).to_readings()

    def simulate_arrays(self, duration_s: float) -> ReadingBatch:
        """Advance simulated time by ``duration_s`` at once and return what was emitted (columns)."""
        return self.step_arrays(self.now_ms + round(duration_s * 1000))

    def simulate(self, duration_s: float, chunk_s: float | None = None) -> list[LabelledReading]:
        """Advance simulated time by ``duration_s`` and return the readings emitted (the same whatever ``chunk_s``)."""
        if chunk_s is None:
            return self.simulate_arrays(duration_s).to_readings()
        out: list[LabelledReading] = []
        end = self.now_ms + round(duration_s * 1000)
        while self.now_ms < end:
            out += self.step(min(end, self.now_ms + max(1, round(chunk_s * 1000))))
        return out

    def iter_arrays(self, duration_s: float, chunk_s: float = 3600.0) -> Iterator[ReadingBatch]:
        """Advance by ``duration_s`` in chunks of ``chunk_s``, yielding each chunk's columns (bounded memory)."""
        end = self.now_ms + round(duration_s * 1000)
        while self.now_ms < end:
            yield self.step_arrays(min(end, self.now_ms + max(1, round(chunk_s * 1000))))

    def iter_readings(self, duration_s: float, chunk_s: float = 3600.0) -> Iterator[LabelledReading]:
        """Like :meth:`simulate`, lazily, holding about ``chunk_s`` of readings at a time."""
        end = self.now_ms + round(duration_s * 1000)
        while self.now_ms < end:
            yield from self.step(min(end, self.now_ms + max(1, round(chunk_s * 1000))))

    def held_back(self) -> int:
        """Readings taken before now that their devices have not sent yet (late, or buffered in an outage)."""
        return int(np.count_nonzero(self._pending.ts_ms <= self.now_ms))

    def rain_events(self, site: str, start_ms: int, end_ms: int) -> list[tuple[int, float]]:
        """Rain events at ``site`` between two instants: ``(epoch ms, intensity)``; turbidity follows hours later."""
        si = self.site_names.index(site)
        out = [
            (round(ev.t_ms), ev.amp)
            for day in range(start_ms // _DAY_MS, end_ms // _DAY_MS + 1)
            for ev in self._rain_events(si, day)
            if start_ms <= ev.t_ms < end_ms
        ]
        return sorted(out)

    def labelled_episodes(self, kind: AnomalyClass | None = None) -> list[AnomalyEpisode]:
        """Episodes started so far, of one class or all."""
        return [e for e in self.episodes if kind is None or e.kind == kind]

    # -- model ------------------------------------------------------------------------------------------------

    def _make_params(self) -> _Params:
        n = len(self.sensors)
        cols: dict[str, list[float]] = {}
        white = np.zeros((n, 7))
        ar = np.zeros((n, 7))
        scale = np.zeros((n, 7))
        site_idx = np.zeros(n, np.intp)
        stage_idx = np.zeros(n, np.intp)
        for s in self.sensors:
            si = s.index // self.sensors_per_site
            j = s.index % self.sensors_per_site
            site_idx[s.index] = si
            stage_idx[s.index] = STAGES.index(s.stage)
            # Site constants come from a generator keyed by the site alone, sensor constants by (site, sensor):
            # adding sites or sensors does not change the existing ones.
            site_rng = np.random.default_rng([self.seed, 1, si])
            rng = np.random.default_rng([self.seed, 2, si, j])
            site_temp = site_rng.uniform(6.0, 22.0)
            site_cond = site_rng.uniform(250.0, 750.0)
            site_tz = site_rng.uniform(-1.0, 1.0) * _HOUR_MS
            site_demand = site_rng.uniform(0.8, 1.2)
            stage = s.stage
            flow_base = rng.uniform(200.0, 800.0) if stage != "network" else rng.uniform(20.0, 150.0)
            p_static, p_drop = {
                "treated": (rng.uniform(5.5, 6.5), rng.uniform(0.6, 1.0)),
                "network": (rng.uniform(3.8, 5.0), rng.uniform(1.0, 1.6)),
                "intake": (rng.uniform(0.8, 1.5), rng.uniform(0.1, 0.3)),
            }[stage]
            turb_base, turb_rain = {
                "treated": (rng.uniform(0.08, 0.3), 1.5),
                "network": (rng.uniform(0.1, 0.4), 0.8),
                "intake": (rng.uniform(2.0, 10.0), 4.0),
            }[stage]
            cl_set, cl_temp = {
                "treated": (rng.uniform(0.9, 1.5), 0.02),
                "network": (rng.uniform(0.4, 0.9), 0.015),
                "intake": (rng.uniform(0.02, 0.08), 0.0),
            }[stage]
            ph_base = rng.uniform(6.9, 8.1) if stage == "intake" else rng.uniform(7.2, 7.8)
            values = {
                "phase_ms": rng.uniform(0.0, self._interval_ms),
                "tz_ms": site_tz,
                "demand_amp": site_demand,
                "flow_base": flow_base,
                "p_static": p_static,
                "p_drop": p_drop,
                "temp_base": site_temp + (0.5 if stage == "network" else 0.0),
                "temp_amp": {"treated": 0.4, "network": 0.3, "intake": 0.6}[stage],
                "ph_base": ph_base,
                "ph_amp": 0.06 if stage == "intake" else 0.02,
                "turb_base": turb_base,
                "turb_rain": turb_rain,
                "cl_set": cl_set,
                "cl_temp": cl_temp,
                "cond_base": site_cond * (1.0 if stage == "intake" else 1.06),
                "flaky": float(rng.lognormal(0.0, 0.75)),
            }
            for k, v in values.items():
                cols.setdefault(k, []).append(float(v))
            cl_noise = 0.004 + 0.01 * cl_set
            white[s.index] = [
                0.015,
                0.02 + 0.03 * turb_base,
                cl_noise,
                0.01 * flow_base,
                0.02,
                0.02,
                0.003 * site_cond,
            ]
            ar[s.index] = [
                0.03,
                0.06 * turb_base,
                2 * cl_noise,
                0.03 * flow_base,
                0.04,
                0.05,
                0.01 * site_cond,
            ]
            scale[s.index] = [
                0.3,
                max(0.4 * turb_base, 0.2),
                max(0.25 * cl_set, 0.15),
                0.15 * flow_base,
                0.35,
                1.2,
                0.1 * site_cond,
            ]
        arr = {k: np.array(v) for k, v in cols.items()}
        return _Params(site=site_idx, stage=stage_idx, white=white, ar=ar, scale=scale, **arr)

    def _rain_events(self, site: int, day: int) -> list[_RainEvent]:
        key = (site, day)
        events = self._rain_cache.get(key)
        if events is None:
            rng = np.random.default_rng([self.seed, 3, site, day & 0xFFFFFFFF])
            events = [
                _RainEvent(
                    t_ms=day * _DAY_MS + rng.uniform(0, _DAY_MS),
                    amp=rng.uniform(0.5, 2.0),
                    lag_ms=rng.uniform(0.5, 3.0) * _HOUR_MS,
                    tau_ms=rng.uniform(3.0, 10.0) * _HOUR_MS,
                )
                for _ in range(int(rng.poisson(self.rain_per_day)))
            ]
            self._rain_cache[key] = events
        return events

    def _rain_index(self, ts: I64) -> F64:
        """Rain index R >= 0 per cell: each event rises after its lag and decays exponentially."""
        p = self._p
        out = np.zeros(ts.shape)
        for site in range(len(self.site_names)):
            rows = np.nonzero(p.site == site)[0]
            t = ts[rows].astype(np.float64)
            lo_day = int(t.min() // _DAY_MS) - 3  # an event's effect lasts well under three days
            hi_day = int(t.max() // _DAY_MS)
            acc = np.zeros(t.shape)
            for day in range(lo_day, hi_day + 1):
                for ev in self._rain_events(site, day):
                    dt = t - ev.t_ms - ev.lag_ms
                    active = dt > 0
                    if not active.any():
                        continue
                    d = np.where(active, dt, 0.0)
                    acc += np.where(
                        active, ev.amp * (1 - np.exp(-d / (0.7 * _HOUR_MS))) * np.exp(-d / ev.tau_ms), 0
                    )
            out[rows] = acc
        return out

    def _generate_block(self) -> ReadingBatch:
        st, p = self._state, self._p
        n, b = len(self.sensors), self._block
        k0 = st.next_tick
        st.next_tick += b
        rng = np.random.default_rng([self.seed, 4, k0])
        ticks = np.arange(k0, k0 + b, dtype=np.float64)
        ts: I64 = np.floor(self.start_ms + p.phase_ms[:, None] + ticks[None, :] * self._interval_ms).astype(
            np.int64
        )

        # Drivers: demand (double-peaked daily curve), rain, temperature.
        hours = ((ts + p.tz_ms[:, None].astype(np.int64)) % _DAY_MS) / _HOUR_MS
        demand = 1.0 + p.demand_amp[:, None] * (
            0.38 * _bump(hours, 7.5, 1.6) + 0.28 * _bump(hours, 19.5, 2.0) - 0.35 * _bump(hours, 3.5, 2.5)
        )
        rain = self._rain_index(ts)
        rn = rain / (1.0 + rain)  # saturating rain effect, 0..1
        stage = p.stage[:, None]
        intake = stage == STAGES.index("intake")

        noise = rng.standard_normal((n, b, 7)) * p.white[:, None, :]
        wander = self._wander(rng.standard_normal((n, b, 7)), first=k0 == 0)
        noise += wander

        v = np.empty((n, b, 7))
        temp = p.temp_base[:, None] + p.temp_amp[:, None] * np.cos(2 * np.pi * (hours - 16.0) / 24.0)
        v[..., TEMP] = temp
        flow = p.flow_base[:, None] * demand
        v[..., FLOW] = flow
        # Pressure falls with the square of the actual (noisy) flow: the correlation survives in the data.
        rel_flow = (flow + noise[..., FLOW]) / p.flow_base[:, None]
        v[..., PRES] = p.p_static[:, None] - p.p_drop[:, None] * rel_flow**2
        turb = p.turb_base[:, None] * (1.0 + p.turb_rain[:, None] * rain) * (0.9 + 0.1 * demand)
        v[..., TURB] = turb
        v[..., COND] = p.cond_base[:, None] * (1.0 - 0.2 * rn)
        v[..., PH] = (
            p.ph_base[:, None]
            + p.ph_amp[:, None] * np.cos(2 * np.pi * (hours - 15.0) / 24.0)
            - np.where(intake, 0.15, 0.03) * rn
        )
        # Free chlorine: the dose is fixed, the demand grows with turbidity (rain) and temperature, and the water
        # in the network ages (loses chlorine) when demand is low at night.
        age = np.where(stage == STAGES.index("network"), 0.12 * (1.0 - demand), 0.0)
        v[..., CL] = p.cl_set[:, None] * (1.0 - 0.3 * rn - age) - p.cl_temp[:, None] * (temp - 12.0)
        v += noise

        labels = np.full((n, b), -1, np.int8)
        affected = np.full((n, b), -1, np.int8)
        self._apply_anomalies(rng, v, labels, affected, k0, ts)
        silent, emit = self._apply_quirks(rng, ts)

        produced = ~silent
        count = produced.sum(axis=1)
        seq = st.seq_next[:, None] + np.cumsum(produced, axis=1) - 1
        st.seq_next = st.seq_next + count
        # A device sends in seq order: a held-back reading holds back the ones after it (store and forward).
        emit = np.where(produced, emit, 0)
        emit = np.maximum.accumulate(np.concatenate([st.last_emit[:, None], emit], axis=1), axis=1)[:, 1:]
        st.last_emit = emit[:, -1].copy()

        rows, cols = np.nonzero(produced)
        repeat_cells = produced & (
            rng.random((n, b)) < _REPEAT_PER_READING * self.quirk_rate * p.flaky[:, None]
        )
        rr, rc = np.nonzero(repeat_cells)
        rows = np.concatenate([rows, rr])
        cols = np.concatenate([cols, rc])
        is_repeat = np.zeros(rows.shape[0], np.bool_)
        is_repeat[rows.shape[0] - rr.shape[0] :] = True
        return ReadingBatch(
            self.sensors,
            rows.astype(np.int32),
            seq[rows, cols],
            ts[rows, cols],
            emit[rows, cols],
            _round(v[rows, cols]),
            labels[rows, cols],
            is_repeat,
            affected[rows, cols],
        )

    def _wander(self, innovations: F64, first: bool) -> F64:
        """AR(1) noise along the tick axis, carried across blocks; stationary sigma ``p.ar``."""
        a = math.exp(-self.interval_s / _AR_TAU_S)
        innovations *= self._p.ar[:, None, :] * math.sqrt(1.0 - a * a)
        x = self._state.ar
        if first:  # first block: start from the stationary distribution, not from zero
            x = innovations[:, 0, :] / math.sqrt(1.0 - a * a)
        for k in range(innovations.shape[1]):
            x = a * x + innovations[:, k, :]
            innovations[:, k, :] = x
        self._state.ar = x.copy()
        return innovations

    def _apply_anomalies(
        self,
        rng: np.random.Generator,
        v: F64,
        labels: npt.NDArray[np.int8],
        affected: npt.NDArray[np.int8],
        k0: int,
        ts: I64,
    ) -> None:
        st, p = self._state, self._p
        n, b = labels.shape
        active = st.episodes
        # Candidate starts per class; a candidate is dropped while its sensor already has an episode running.
        draws = rng.random((len(ANOMALY_CLASSES), n, b))
        cand = np.nonzero(draws < self._start_p[:, None, None])
        order = np.lexsort((cand[0], cand[2], cand[1]))  # by sensor, then tick
        for i in order.tolist():
            kind, s, k = int(cand[0][i]), int(cand[1][i]), int(cand[2][i])
            tick = k0 + k
            if tick < st.busy_until[s]:
                continue
            name = ANOMALY_CLASSES[kind]
            lo, hi = _EPISODE_TICKS[name]
            length = int(rng.integers(lo, hi + 1))
            metric = int(rng.integers(0, len(METRICS)))
            unit = p.scale[s, metric]
            sign = 1.0 if rng.random() < (0.8 if metric == TURB else 0.5) else -1.0
            if name == "spike":
                value = sign * unit * rng.uniform(4.0, 8.0)
            elif name == "level_shift":
                value = sign * unit * rng.uniform(2.5, 5.0)
            elif name == "drift":
                value = sign * unit * rng.uniform(3.0, 6.0)
            elif name == "stuck":
                value = float(v[s, k, metric])  # no other episode has touched this sensor yet
            else:
                value = _impossible(rng, metric, p.flow_base[s])
            ep = _Episode(s, kind, metric, tick, length, value)
            active.append(ep)
            st.busy_until[s] = tick + length
            self._future_episodes.append(
                AnomalyEpisode(
                    self.sensors[s].site,
                    self.sensors[s].sensor_id,
                    name,
                    METRICS[metric],
                    int(ts[s, k]),
                    length,
                    round(value, 4),
                )
            )
        oor: list[tuple[_Episode, int, int]] = []
        still: list[_Episode] = []
        for ep in active:
            a = max(ep.start_tick, k0) - k0
            z = min(ep.start_tick + ep.length, k0 + b) - k0
            if ep.start_tick + ep.length > k0 + b:
                still.append(ep)
            if z <= a:
                continue
            sl = slice(a, z)
            name = ANOMALY_CLASSES[ep.kind]
            labels[ep.sensor, sl] = ep.kind
            affected[ep.sensor, sl] = ep.metric
            if name in ("spike", "level_shift"):
                v[ep.sensor, sl, ep.metric] += ep.value
            elif name == "drift":
                done = np.arange(k0 + a, k0 + z) - ep.start_tick + 1
                v[ep.sensor, sl, ep.metric] += ep.value * done / ep.length
            elif name == "stuck":
                v[ep.sensor, sl, ep.metric] = ep.value
            else:
                oor.append((ep, a, z))
        st.episodes = still
        np.clip(v, _CLIP_LO, _CLIP_HI, out=v)
        # Impossible values go in after the clip; the first one is the episode's recorded magnitude.
        for ep, a, z in oor:
            for k in range(a, z):
                first = k0 + k == ep.start_tick
                v[ep.sensor, k, ep.metric] = (
                    ep.value if first else _impossible(rng, ep.metric, p.flow_base[ep.sensor])
                )

    def _apply_quirks(self, rng: np.random.Generator, ts: I64) -> tuple[npt.NDArray[np.bool_], I64]:
        """Silent cells (no reading) and the earliest emit time of every cell."""
        st, p = self._state, self._p
        n, b = ts.shape
        q = self.quirk_rate * p.flaky[:, None]
        per_tick_h = self.interval_s / 3600.0
        silent = ts < st.silent_until[:, None]
        emit = np.maximum(ts, np.where(ts < st.offline_until[:, None], st.offline_until[:, None], 0))
        if self.quirk_rate > 0:
            for kind, per_hour, (lo, hi) in (
                ("silent", _SILENT_PER_HOUR, _SILENT_S),
                ("reconnect", _RECONNECT_PER_HOUR, _RECONNECT_S),
            ):
                starts = np.nonzero(rng.random((n, b)) < q * per_hour * per_tick_h)
                for s, k in zip(starts[0].tolist(), starts[1].tolist(), strict=True):
                    t0 = int(ts[s, k])
                    until_arr = st.silent_until if kind == "silent" else st.offline_until
                    if t0 < st.silent_until[s] or t0 < st.offline_until[s]:
                        continue  # already silent or offline
                    until = t0 + round(rng.uniform(lo, hi) * 1000)
                    until_arr[s] = until
                    cells = (ts[s] >= t0) & (ts[s] < until)
                    if kind == "silent":
                        silent[s] |= cells
                    else:
                        emit[s] = np.where(cells, np.maximum(emit[s], until), emit[s])
                    self._future_outages.append((t0, kind))
            late = (rng.random((n, b)) < q * _LATE_PER_READING) & ~silent
            delay = (rng.uniform(_LATE_S[0], _LATE_S[1], (n, b)) * 1000).astype(np.int64)
            emit = np.where(late, np.maximum(emit, ts + delay), emit)
        return silent, emit

    def _account(self, out: ReadingBatch) -> None:
        now = self.now_ms
        due = sorted((e for e in self._future_episodes if e.start_ts_ms <= now), key=lambda e: e.start_ts_ms)
        if due:
            self.episodes += due
            self._future_episodes = [e for e in self._future_episodes if e.start_ts_ms > now]
        for t0, kind in self._future_outages:
            if t0 <= now:
                self.quirks[kind] += 1
        self._future_outages = [o for o in self._future_outages if o[0] > now]
        self.emitted += len(out)
        self.quirks["repeat"] += int(out.repeat.sum())
        self.quirks["late"] += int(np.count_nonzero((out.emit_ms > out.ts_ms) & ~out.repeat))
        labelled = np.nonzero(out.label >= 0)[0]
        if labelled.shape[0] == 0:
            return
        sensors = self.sensors
        for si, sq, code, rep in zip(
            out.sensor[labelled].tolist(),
            out.seq[labelled].tolist(),
            out.label[labelled].tolist(),
            out.repeat[labelled].tolist(),
            strict=True,
        ):
            if rep:
                continue
            info = sensors[si]
            cls = ANOMALY_CLASSES[code]
            self.ground_truth[(info.site, info.sensor_id, sq)] = cls
            self.injected[cls] += 1


def _bump(hours: F64, centre: float, width: float) -> F64:
    """A Gaussian bump on the 24-hour circle."""
    d = (hours - centre + 12.0) % 24.0 - 12.0
    return cast(F64, np.exp(-((d / width) ** 2)))


def _round(values: F64) -> F64:
    out = np.empty_like(values)
    for m, dec in enumerate(_DECIMALS):
        out[:, m] = np.round(values[:, m], dec)
    return out


def _impossible(rng: np.random.Generator, metric: int, flow_base: float) -> float:
    """A value no working sensor could report (well outside :data:`PHYSICAL_LIMITS`, even after rounding)."""
    up = rng.random() < 0.5
    if metric == PH:
        return float(rng.uniform(14.5, 16.0) if up else rng.uniform(-2.0, -0.5))
    if metric == TURB:
        return float(-rng.uniform(0.5, 8.0))
    if metric == CL:
        return float(-rng.uniform(0.3, 3.0))
    if metric == FLOW:
        return float(-rng.uniform(0.05, 0.5) * flow_base - 1.0)
    if metric == PRES:
        return float(-rng.uniform(2.0, 5.0))
    if metric == TEMP:
        return float(rng.uniform(105.0, 150.0) if up else rng.uniform(-40.0, -10.0))
    return float(-rng.uniform(10.0, 500.0))
