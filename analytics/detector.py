"""Per-sensor detection policy: hard limits, warm-up, model scoring with live baselines, stuck values, refits.

Pure and synchronous: no Redis, no clock, no threads. The analytics crew feeds batches of normalized readings
(contract form ``{"site", "sensor_id", "seq", "ts_ms", "received_ms", "metrics"}``) to :meth:`DetectorBank.process`
and gets back the anomalies to emit, at most one per reading, as contract ``Anomaly`` dicts (``detected_ms`` and
``reading_entry_id`` are included when the caller passes them) plus an extra ``"rule"`` field saying what fired:

``hard_limit``
    a value outside :data:`HARD_LIMITS` (pH outside 0..14, negative turbidity, ...): always ``critical``, also during
    warm-up, ``score`` 1.0 (the top of the score scale: certain).
``model``
    the sensor's :class:`~analytics.model.SensorModel` score reached its threshold; ``critical`` past the model's
    ``critical_threshold_``.
``stuck``
    a metric repeated the identical value for longer than its training data makes plausible (the model's
    ``stuck_run_``), other than a floor or ceiling it saturates at (``saturated_lo_``/``saturated_hi_``); ``warning``. ``score``/``threshold`` are the model's for that reading.

Warm-up: until a sensor has ``warmup`` accepted readings it has no model, so only hard limits fire. Then the
crew fits one (:meth:`SensorDetector.training_window` + :func:`fit_model`, off the event loop) and installs it.
Refits follow on a ring buffer of the last ``window`` *accepted* readings: a reading that raised an anomaly never
enters it, so the model does not learn faults as normal. Refits come when the buffer has doubled since the last fit
(so early models, fitted on few readings, are soon replaced) and every ``refit_every`` accepted readings after that.

Baselines (what a jump is measured from: the median of the sensor's last few accepted readings, see
:mod:`analytics.model`), and the rules that keep them honest:

* A flagged reading holds back the baseline of the metrics it is about, so a level shift keeps alerting while it
  lasts; its other metrics still move the baseline (demand and weather do not wait for a fault to end).
* After ``rebaseline_after`` consecutive flagged readings the sensor is taken to have a new normal and the baseline
  jumps to it (the model is level-independent, so nothing else needs to change).
* Recovery: a flagged jump that takes a metric from outside its normal range back inside it, or back to a level it
  held within the last hour, confirmed by the next reading (same level), moves the baseline there: the end of a
  fault the baseline had followed (a drift) costs one alert, not ``rebaseline_after``.
* Silence: a reading more than ``gap_factor`` typical intervals after the previous one restarts the baseline.
"""

from __future__ import annotations

import bisect
import logging
import zlib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from analytics._jit import accept_if_normal, push_row, push_rows, segment_scores, stuck_runs
from analytics.model import SensorModel, ewma_baselines, forward_fill, median_baselines

__all__ = [
    "HARD_LIMITS",
    "DetectorBank",
    "DetectorConfig",
    "SensorDetector",
    "TrainingWindow",
    "fit_model",
]

logger = logging.getLogger(__name__)

F64 = NDArray[np.float64]
Rule = Literal["hard_limit", "model", "stuck"]

#: Physical limits per metric, inclusive: a value outside is impossible for a working sensor, whatever the model
#: says. ``None``: no bound on that side. Names follow CONTRACT.md and the simulated fleet; unknown metrics have none.
HARD_LIMITS: Mapping[str, tuple[float | None, float | None]] = {
    "ph": (0.0, 14.0),  # the pH scale of aqueous solutions
    "turbidity_ntu": (0.0, None),  # scattered light cannot be negative
    "chlorine_mg_l": (0.0, None),  # a concentration
    "flow_m3_h": (0.0, None),  # our meters are unidirectional: reverse flow reads as a fault
    # Gauge pressure can go negative on a suction line, but never below vacuum (-1.013 bar gauge).
    "pressure_bar": (-1.0, None),
    "conductivity_us_cm": (0.0, None),
    "temperature_c": (-5.0, 100.0),  # liquid water in a pipe (slightly supercooled / saline at the low end)
    "dissolved_oxygen_mg_l": (0.0, None),
}

#: Beyond this many names per sensor, new metric names are ignored by the model (hard limits still apply).
MAX_METRICS_PER_SENSOR = 64
#: The recovery rule remembers a sensor's level every LEVEL_EVERY accepted readings (5 minutes at one per 10 s),
#: RECENT_LEVELS of them (the last hour).
LEVEL_EVERY = 30
RECENT_LEVELS = 12


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Detection policy shared by every sensor of a bank.

    Attributes:
        warmup: accepted readings before a sensor's first model is fitted (no model-based alert before).
        window: ring buffer of accepted readings used for (re)fits.
        refit_every: accepted readings between refits once the window is full.
        rebaseline_after: consecutive flagged readings after which the baseline follows the new level.
        model_params: keyword arguments for :class:`~analytics.model.SensorModel` (``random_state`` included).
        hard_limits: metric -> (low, high) physical limits (see :data:`HARD_LIMITS`).
        max_replay: longest run of readings scored in one call after a flagged reading (bounds re-scoring work
            when a fault spans a large backlog batch); flags close together shorten it to twice their spacing.
        gap_factor: a reading more than this many typical intervals after the previous one (the sensor was
            silent) restarts the baseline at its own values: demand and weather move in 15 minutes, so a jump
            across a gap is no evidence of a fault.
    """

    warmup: int = 200
    window: int = 8640
    refit_every: int = 2048
    rebaseline_after: int = 90
    model_params: Mapping[str, Any] = field(default_factory=dict)
    hard_limits: Mapping[str, tuple[float | None, float | None]] = field(
        default_factory=lambda: dict(HARD_LIMITS)
    )
    max_replay: int = 64
    gap_factor: float = 6.0

    def __post_init__(self) -> None:
        if self.warmup < 2 or self.window < self.warmup or self.refit_every < 1 or self.rebaseline_after < 1:
            raise ValueError("need 2 <= warmup <= window, refit_every >= 1, rebaseline_after >= 1")


@dataclass(frozen=True, slots=True)
class TrainingWindow:
    """A snapshot of a sensor's accepted readings, oldest first: what :func:`fit_model` needs (picklable)."""

    site: str
    sensor_id: str
    generation: int  # the generation the fitted model will carry
    metrics: tuple[str, ...]
    values: NDArray[np.float32]  # (n, len(metrics)); NaN = metric missing from that reading
    model_params: Mapping[str, Any]

    @property
    def model_version(self) -> str:
        """``{site}:{sensor_id}:{generation}``, as in the contract's example."""
        return f"{self.site}:{self.sensor_id}:{self.generation}"


def fit_model(window: TrainingWindow) -> SensorModel:
    """Fit a new model on a training window. CPU-bound (~0.1 s); run it in a thread or process executor.

    Repeatable: unless ``model_params`` sets ``random_state``, the seed comes from the model version (site, sensor,
    generation), so the same window always gives the same trees (an alert can be explained later by refitting
    its model's window) while each sensor and generation gets trees of its own.
    """
    params = dict(window.model_params)
    if params.get("random_state") is None:
        params["random_state"] = zlib.crc32(window.model_version.encode())
    return SensorModel(**params).fit_matrix(
        window.values.astype(np.float64), window.metrics, model_version=window.model_version
    )


class SensorDetector:
    """Detection state of one sensor: model, baselines, stuck runs, ring buffer of accepted readings."""

    def __init__(self, site: str, sensor_id: str, config: DetectorConfig | None = None) -> None:
        self.site = site
        self.sensor_id = sensor_id
        self.config = config or DetectorConfig()
        self.model: SensorModel | None = None
        self.generation = 0
        self.last_seq: int | None = None
        self.readings_seen = 0
        self.consecutive_flags = 0
        self._last_ts: int | None = None
        # Recent intervals between readings (ms), for the gap rule: in arrival order and sorted (for the median).
        self._deltas: deque[int] = deque()
        self._deltas_sorted: list[int] = []
        self._return_pending: tuple[F64, NDArray[np.bool_]] | None = None
        self._refit_in_flight = False
        self._accepted_since_fit = 0
        self._n_at_fit = 0
        # Metric registry: name -> column of the per-sensor arrays below (grows as names appear).
        self._columns: dict[str, int] = {}
        self._names: list[str] = []
        width = 8
        cap = self.config.window
        self._buffer = np.full((cap, width), np.nan, dtype=np.float32)
        self._buf_pos = 0  # next row to write
        self._buf_len = 0
        self._last = np.full(width, np.nan)  # last seen value (any reading): forward fill and stuck runs
        self._run = np.zeros(width, dtype=np.int64)  # length of the current run of identical values
        # The last h accepted readings (forward-filled), oldest first: their median is the short-term baseline.
        self._history_len = int(SensorModel(**dict(self.config.model_params)).baseline_window)
        self._hist = np.full((self._history_len, width), np.nan)
        self._slow = np.full(width, np.nan)
        # Levels the sensor held lately (one row per LEVEL_EVERY accepted readings, RECENT_LEVELS rows): a jump
        # back to one of them is how the end of a drift looks.
        self._levels = np.full((RECENT_LEVELS, width), np.nan)
        self._levels_n = 0
        self._accepted_total = 0
        self._model_cols = np.zeros(0, dtype=np.intp)  # registry column of each model metric

    # ------------------------------------------------------------------ refit protocol

    @property
    def n_buffered(self) -> int:
        """Accepted readings in the ring buffer."""
        return self._buf_len

    @property
    def needs_refit(self) -> bool:
        """True when a (re)fit is due and none is in flight (see the module docstring for the schedule)."""
        if self._refit_in_flight or self._buf_len < self.config.warmup:
            return False
        if self.model is None:
            return True
        if self._buf_len < self.config.window and self._buf_len >= 2 * self._n_at_fit:
            return True
        return self._accepted_since_fit >= self.config.refit_every

    def training_window(self) -> TrainingWindow:
        """Snapshot the ring buffer for a fit and mark a refit in flight (``needs_refit`` turns false).

        Call :meth:`install` with the fitted model, or :meth:`abandon_refit` if the fit failed.
        """
        n, cap = self._buf_len, self.config.window
        if n < cap:
            values = self._buffer[:n].copy()
        else:  # oldest first
            values = np.concatenate([self._buffer[self._buf_pos :], self._buffer[: self._buf_pos]])
        width = len(self._names)
        self._refit_in_flight = True
        self._accepted_since_fit = 0
        self._n_at_fit = n
        return TrainingWindow(
            site=self.site,
            sensor_id=self.sensor_id,
            generation=self.generation + 1,
            metrics=tuple(self._names),
            values=values[:, :width],
            model_params=dict(self.config.model_params),
        )

    def fit_new_model(self, window: TrainingWindow | None = None) -> SensorModel:
        """Fit on ``window`` (default: a fresh :meth:`training_window`). Pure CPU work: safe in an executor."""
        return fit_model(window if window is not None else self.training_window())

    def install(self, model: SensorModel) -> None:
        """Swap in a fitted model (a fresh fit, or one loaded from storage). Atomic from the caller's view."""
        if not model.is_fitted:
            raise ValueError("install() needs a fitted model")
        cols = [self._column(name) for name in model.metrics_]
        if min(cols, default=0) < 0:
            raise ValueError(f"{self.site}:{self.sensor_id} tracks too many metric names for this model")
        self._model_cols = np.array(cols, dtype=np.intp)
        self.model = model
        self._return_pending = None
        self._refit_in_flight = False
        if self._n_at_fit == 0:  # a loaded model: refit once the buffer refills
            self._n_at_fit = max(model.n_train_, self.config.warmup)
        try:
            self.generation = max(self.generation, int(model.model_version_.rsplit(":", 1)[-1]))
        except ValueError:
            self.generation += 1
        logger.debug("%s:%s installed model %s", self.site, self.sensor_id, model.model_version_)

    def abandon_refit(self) -> None:
        """Forget a refit that failed; another is requested after ``refit_every`` more readings."""
        self._refit_in_flight = False

    # ------------------------------------------------------------------ registry

    def _column(self, name: str) -> int:
        col = self._columns.get(name)
        if col is not None:
            return col
        if len(self._names) >= MAX_METRICS_PER_SENSOR:
            return -1
        col = len(self._names)
        self._columns[name] = col
        self._names.append(name)
        width = self._buffer.shape[1]
        if col >= width:
            grow = width
            self._buffer = np.hstack(
                [self._buffer, np.full((self._buffer.shape[0], grow), np.nan, np.float32)]
            )
            self._last = np.concatenate([self._last, np.full(grow, np.nan)])
            self._run = np.concatenate([self._run, np.zeros(grow, np.int64)])
            self._hist = np.hstack([self._hist, np.full((self._hist.shape[0], grow), np.nan)])
            self._slow = np.concatenate([self._slow, np.full(grow, np.nan)])
            self._levels = np.hstack([self._levels, np.full((self._levels.shape[0], grow), np.nan)])
        return col

    def _matrix(self, readings: Sequence[Mapping[str, Any]]) -> F64:
        """Metric values in registry columns, NaN where missing."""
        known = self._columns.keys()
        for r in readings:
            if not r["metrics"].keys() <= known:
                for name in r["metrics"]:
                    if name not in self._columns:
                        self._column(name)
        out = np.full((len(readings), self._buffer.shape[1]), np.nan)
        cols = self._columns
        for i, r in enumerate(readings):
            row = out[i]
            for name, value in r["metrics"].items():
                c = cols.get(name, -1)
                if c >= 0:
                    row[c] = value
        return out

    # ------------------------------------------------------------------ detection

    def process(self, readings: Sequence[Mapping[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
        """Score this sensor's readings (any order; sorted by ``seq`` here). Returns ``(index, anomaly)`` pairs.

        ``index`` points into ``readings``. A reading whose ``seq`` is not above every ``seq`` seen before
        (late or repeated) is scored against the current state but does not change it; a ``seq`` twice in one
        call is scored once.
        """
        if not readings:
            return []
        if len(readings) == 1:  # the common live case, without the sorting and de-duplication
            seq = int(readings[0]["seq"])
            if self.last_seq is None or seq > self.last_seq:
                found = self._process_fresh(list(readings), [0])
                self.last_seq = seq
                return found
            return self._process_stale(list(readings), [0])
        order = sorted(range(len(readings)), key=lambda i: int(readings[i]["seq"]))
        fresh: list[int] = []
        stale: list[int] = []
        seen: set[int] = set()
        last = self.last_seq
        for i in order:
            seq = int(readings[i]["seq"])
            if seq in seen:
                continue
            seen.add(seq)
            if last is None or seq > last:
                fresh.append(i)
                last = seq
            else:
                stale.append(i)
        out: list[tuple[int, dict[str, Any]]] = []
        if fresh:
            out += self._process_fresh([readings[i] for i in fresh], fresh)
            self.last_seq = last
        if stale:
            out += self._process_stale([readings[i] for i in stale], stale)
        return out

    def _hard_violations(self, rows: Sequence[Mapping[str, Any]]) -> list[list[tuple[str, float, str]]]:
        limits = self.config.hard_limits
        result: list[list[tuple[str, float, str]]] = []
        for r in rows:
            bad: list[tuple[str, float, str]] = []
            for name, value in r["metrics"].items():
                lim = limits.get(name)
                if lim is None:
                    continue
                lo, hi = lim
                if lo is not None and value < lo:
                    bad.append((name, float(value), "low"))
                elif hi is not None and value > hi:
                    bad.append((name, float(value), "high"))
            result.append(bad)
        return result

    def _stuck_runs(self, values: F64) -> NDArray[np.int64]:
        """Run length of identical values per row and column, continuing the stored runs; updates them."""
        runs: NDArray[np.int64] = stuck_runs(values, self._last, self._run)
        return runs

    def _process_fresh(
        self, rows: list[Mapping[str, Any]], idx: list[int]
    ) -> list[tuple[int, dict[str, Any]]]:
        values = self._matrix(rows)
        hard = self._hard_violations(rows)
        runs = self._stuck_runs(values)
        gap_rows = self._gap_rows([int(r["ts_ms"]) for r in rows])
        self.readings_seen += len(rows)
        model = self.model
        out: list[tuple[int, dict[str, Any]]] = []
        if model is None:
            for i, row in enumerate(rows):
                if hard[i]:
                    out.append((idx[i], self._hard_anomaly(row, hard[i], None)))
                else:
                    self._accept(values[i : i + 1])
            return out

        if (
            len(rows) <= min(self.config.max_replay, self.config.window - 1)
            and not any(hard)
            and True not in gap_rows
            and self._all_normal(values, runs, model)
        ):
            return []  # the common live case: this sensor's few readings in the batch are all normal

        mcols = self._model_cols
        mvals = values[:, mcols]
        stuck_limit = model.stuck_run_
        stuck = (
            (runs[:, mcols] >= np.where(stuck_limit > 0, stuck_limit, np.iinfo(np.int64).max))
            & ~np.isnan(mvals)
            & (mvals != model.saturated_lo_)  # sitting at a floor or ceiling the sensor saturates at
            & (mvals != model.saturated_hi_)
        )
        alpha_s = model.slow_alpha
        cargs = model.compiled_args_
        m = len(rows)
        start = 0
        horizon = m
        last_flag: int | None = None  # row of the previous flagged reading in this call
        while start < m:
            if self._return_pending is not None:
                self._check_return(mvals[start], model)
            if gap_rows[start]:
                self._restart_baseline(mvals[start])
            later_gaps = np.flatnonzero(gap_rows[start + 1 :])
            stop = min(m, start + horizon, start + 1 + int(later_gaps[0]) if later_gaps.size else m)
            seg = slice(start, stop)
            # Baselines for the segment as if every reading in it were accepted; cut at the first flagged one.
            # A missing value is forward-filled for the baselines and scores as no evidence (residual 0).
            hist = self._model_history()
            if cargs is not None:  # the same arithmetic as below, compiled
                fast_b, Z, scores = segment_scores(mvals[seg], hist, *cargs[:-1])
            else:
                last = hist[-1]
                filled = forward_fill(mvals[seg], np.where(np.isnan(last), model.center_, last))
                # A metric never accepted before starts from its first value here (a zero residual, no evidence).
                fast_b, _ = median_baselines(filled, np.where(np.isnan(hist), filled[0], hist))
                slow_b = None
                if alpha_s > 0:
                    base_slow = self._slow[mcols]
                    slow_b, _ = ewma_baselines(
                        filled, alpha_s, np.where(np.isnan(base_slow), filled[0], base_slow)
                    )
                Z = model.features(mvals[seg], fast_b, slow_b)
                scores = model.score_features(Z)
            is_hard = np.array([bool(h) for h in hard[seg]], dtype=np.bool_)
            flagged = (scores >= model.threshold_) | is_hard | stuck[seg].any(axis=1)
            hits = np.flatnonzero(flagged)
            if hits.size == 0:
                self._accept(values[seg])
                self.consecutive_flags = 0
                start = stop
                horizon = max(horizon * 2, self.config.max_replay)
                continue
            j = int(hits[0])
            if j:
                self._accept(values[start : start + j])
                self.consecutive_flags = 0
            i = start + j
            row = rows[i]
            if hard[i]:
                anomaly = self._hard_anomaly(row, hard[i], model, float(scores[j]))
            elif scores[j] >= model.threshold_:
                expl = model.explain_features(Z[j], mvals[i])
                anomaly = self._anomaly(
                    row, "model", float(scores[j]), model, model.severity(float(scores[j])), expl
                )
            else:
                expl = [
                    (
                        model.metrics_[c],
                        float(mvals[i, c]),
                        "high" if mvals[i, c] >= model.center_[c] else "low",
                    )
                    for c in np.flatnonzero(stuck[i])
                ]
                anomaly = self._anomaly(row, "stuck", float(scores[j]), model, "warning", expl)
            out.append((idx[i], anomaly))
            k = len(model.metrics_)
            row_excess = model.envelope_excess(Z[j])
            excess = row_excess.reshape(-1, k).max(axis=0)
            # Only the metrics the anomaly is about stay out of the baseline; the others keep following demand
            # and weather (a long fault on one metric must not freeze the rest and make them look like jumps).
            if hard[i]:
                implicated = [self._columns[name] for name, _, _ in hard[i]]
            elif anomaly["rule"] == "model":
                named = {e["metric"] for e in anomaly["explanation"]}
                implicated = [
                    int(mcols[c])
                    for c in range(k)
                    if excess[c] > 0 or (not excess.any() and model.metrics_[c] in named)
                ]
            else:
                implicated = [int(mcols[c]) for c in np.flatnonzero(stuck[i])]
            self._advance_baselines(values[i], implicated)
            jumped = row_excess[:k] > 0
            if anomaly["rule"] == "model" and jumped.any():
                returning = model.is_recovery(mvals[i], fast_b[j], Z[j]) or self._back_to_recent_level(
                    mvals[i], fast_b[j], jumped
                )
                if returning:
                    # Possibly the end of a fault the baseline had followed (a drift): if the next reading confirms
                    # the level, the baseline moves there. Not at once: a spike toward the middle (say, during
                    # rain) must not become the baseline.
                    self._return_pending = (mvals[i].copy(), jumped)
            self.consecutive_flags += 1
            if self.consecutive_flags >= self.config.rebaseline_after and not hard[i]:
                # A new normal: let the baseline jump to it (the reading itself stays out of the training data).
                self._rebaseline(mvals[i])
                self.consecutive_flags = 0
            start = i + 1
            # Score about twice the distance between the last two flags next: a stuck sensor's backlog (a flag on
            # every reading) then costs one or two rows of scoring per reading, not max_replay; isolated flags
            # still get segments of max_replay rows.
            spacing = i - last_flag if last_flag is not None else self.config.max_replay
            horizon = min(self.config.max_replay, 2 * spacing)
            last_flag = i
        return out

    def _all_normal(self, values: F64, runs: NDArray[np.int64], model: SensorModel) -> bool:
        """Fast path for a few live readings: score them and, if every one is normal, accept them all. False: use
        the general path (nothing changed).

        Gives exactly the general path's result (same baselines, same scores) in one compiled call
        (:func:`analytics._jit.accept_if_normal`); it only skips the bookkeeping that flags, missing values,
        pending rules and slow features need.
        """
        h = model.baseline_window
        if self._return_pending is not None or h > self._hist.shape[0]:
            return False
        args = model.compiled_args_
        if args is None or not accept_if_normal(
            values, runs, self._model_cols, self._hist, h, *args, self._buffer, self._buf_pos
        ):
            return False
        n = values.shape[0]
        cap = self.config.window
        self._buf_pos = (self._buf_pos + n) % cap
        self._buf_len = min(cap, self._buf_len + n)
        self._accepted_since_fit += n
        self._record_levels(n)
        self.consecutive_flags = 0
        return True

    def _accept(self, values: F64) -> None:
        """Add accepted readings to the ring buffer and move the baselines (every registry column)."""
        n = values.shape[0]
        if n == 0:
            return
        cap = self.config.window
        vals32 = values.astype(np.float32)
        if n >= cap:
            self._buffer[:] = vals32[-cap:]
            self._buf_pos = 0
            self._buf_len = cap
        else:
            first = min(n, cap - self._buf_pos)
            self._buffer[self._buf_pos : self._buf_pos + first] = vals32[:first]
            if first < n:
                self._buffer[: n - first] = vals32[first:]
            self._buf_pos = (self._buf_pos + n) % cap
            self._buf_len = min(cap, self._buf_len + n)
        self._accepted_since_fit += n
        if n == 1:
            push_row(self._hist, values[0])
        else:
            push_rows(self._hist, values)
        self._record_levels(n)
        if self.model is not None:
            alpha_s = self.model.slow_alpha
        else:
            alpha_s = float(self.config.model_params.get("slow_alpha", 0.0))
        if alpha_s > 0:
            self._slow = _ewma_update(self._slow, values, alpha_s)

    def _gap_rows(self, ts: list[int]) -> list[bool]:
        """Which rows come after a silence (see ``gap_factor``); also tracks the typical interval."""
        out = [False] * len(ts)
        prev = self._last_ts
        deltas, ordered = self._deltas, self._deltas_sorted
        factor = self.config.gap_factor
        for i, t in enumerate(ts):
            if prev is not None:
                delta = t - prev
                if len(deltas) >= 8 and delta > factor * max(ordered[len(ordered) // 2], 1):
                    out[i] = True
                elif delta > 0:
                    deltas.append(delta)
                    bisect.insort(ordered, delta)
                    if len(deltas) > 32:
                        del ordered[bisect.bisect_left(ordered, deltas.popleft())]
            prev = t if prev is None else max(prev, t)
        self._last_ts = prev
        return out

    def _restart_baseline(self, mrow: F64) -> None:
        """Forget the pre-gap baseline: the reading after a silence becomes the baseline of what follows."""
        cols = self._model_cols
        present = ~np.isnan(mrow)
        self._hist[:, cols[present]] = mrow[present]
        self._return_pending = None

    def _back_to_recent_level(self, x: F64, base: F64, jumped: NDArray[np.bool_]) -> bool:
        """Did every jumped metric land where the sensor was within the last hour (``recent_levels``)?

        "Where it was" is within a quarter of the jump: a drift's end lands back on its starting level, a level
        shift lands somewhere the sensor has not been lately.
        """
        if self._levels_n == 0:
            return False
        cols = self._model_cols[jumped]
        past = self._levels[: min(self._levels_n, self._levels.shape[0])][:, cols]  # (m, j)
        tol = 0.25 * np.abs(x[jumped] - base[jumped])
        with np.errstate(invalid="ignore"):
            near = np.abs(past - x[jumped][None, :]) <= tol[None, :]
        return bool(near.any(axis=0).all())

    def _record_levels(self, n_accepted: int) -> None:
        """Every ``LEVEL_EVERY`` accepted readings, remember the current baseline level of every metric."""
        before = self._accepted_total
        self._accepted_total += n_accepted
        if self._accepted_total // LEVEL_EVERY != before // LEVEL_EVERY:
            self._levels[self._levels_n % self._levels.shape[0]] = self._hist[-1]
            self._levels_n += 1

    def _check_return(self, x: F64, model: SensorModel) -> None:
        """Second half of the return-to-normal rule: is ``x`` consistent with the flagged level before it?"""
        assert self._return_pending is not None
        prev, jumped = self._return_pending
        self._return_pending = None
        k = len(model.metrics_)
        with np.errstate(invalid="ignore"):
            d = (x - prev) / model.fast_scale_
        g = model.envelope_guard
        consistent = ~np.isnan(d) & (d >= model.feature_lo_[:k] - g) & (d <= model.feature_hi_[:k] + g)
        if consistent[jumped].all():
            cols = self._model_cols[jumped]
            self._hist[:, cols] = prev[jumped]
            logger.debug("%s:%s baseline moved back toward normal", self.site, self.sensor_id)

    def _model_history(self) -> F64:
        """The baseline history of the model's metrics, as long as the model's ``baseline_window``."""
        assert self.model is not None
        hist = self._hist[:, self._model_cols]
        h = self.model.baseline_window
        if h <= hist.shape[0]:
            return hist[-h:]
        return np.concatenate([np.repeat(hist[:1], h - hist.shape[0], axis=0), hist])

    def _advance_baselines(self, row: F64, implicated: list[int]) -> None:
        """Move the baselines with a flagged reading's uninvolved metrics (the ring buffer does not get it)."""
        partial = row.copy()
        partial[implicated] = np.nan  # forward-filled: those metrics keep their pre-anomaly baseline
        push_row(self._hist, partial)
        if self.model is not None and self.model.slow_alpha > 0:
            self._slow = _ewma_update(self._slow, partial[None, :], self.model.slow_alpha)

    def _rebaseline(self, mrow: F64) -> None:
        cols = self._model_cols
        present = ~np.isnan(mrow)
        self._hist[:, cols[present]] = mrow[present]
        self._slow[cols[present]] = mrow[present]

    def _process_stale(
        self, rows: list[Mapping[str, Any]], idx: list[int]
    ) -> list[tuple[int, dict[str, Any]]]:
        hard = self._hard_violations(rows)
        model = self.model
        out: list[tuple[int, dict[str, Any]]] = []
        scores: F64 | None = None
        Z: F64 | None = None
        mvals: F64 | None = None
        if model is not None:
            values = self._matrix(rows)
            mvals = values[:, self._model_cols]
            fast = np.median(self._model_history(), axis=0)
            slow = self._slow[self._model_cols]
            base = np.broadcast_to(np.where(np.isnan(fast), model.center_, fast), mvals.shape)
            slow = np.broadcast_to(np.where(np.isnan(slow), model.center_, slow), mvals.shape)
            Z = model.features(mvals, base, slow if model.slow_alpha > 0 else None)
            scores = model.score_features(Z)
        for i, row in enumerate(rows):
            if hard[i]:
                out.append((idx[i], self._hard_anomaly(row, hard[i], model)))
            elif model is not None and scores is not None and Z is not None and mvals is not None:
                s = float(scores[i])
                if s >= model.threshold_:
                    expl = model.explain_features(Z[i], mvals[i])
                    out.append((idx[i], self._anomaly(row, "model", s, model, model.severity(s), expl)))
        return out

    # ------------------------------------------------------------------ anomaly records

    def _hard_anomaly(
        self,
        row: Mapping[str, Any],
        bad: list[tuple[str, float, str]],
        model: SensorModel | None,
        model_score: float | None = None,
    ) -> dict[str, Any]:
        del model_score  # a physical impossibility is certain: score 1.0 whatever the model thinks
        return self._anomaly(row, "hard_limit", 1.0, model, "critical", bad)

    def _anomaly(
        self,
        row: Mapping[str, Any],
        rule: Rule,
        score: float,
        model: SensorModel | None,
        severity: str | None,
        explanation: Iterable[tuple[str, float, str]],
    ) -> dict[str, Any]:
        site, sensor_id, seq = row["site"], row["sensor_id"], int(row["seq"])
        return {
            "alert_id": f"{site}:{sensor_id}:{seq}",
            "site": site,
            "sensor_id": sensor_id,
            "seq": seq,
            "ts_ms": int(row["ts_ms"]),
            "score": round(float(score), 6),
            "threshold": round(model.threshold_, 6) if model is not None else 1.0,
            "severity": severity or "warning",
            "model_version": model.model_version_ if model is not None else f"{site}:{sensor_id}:0",
            "metrics": dict(row["metrics"]),
            "explanation": [{"metric": m, "value": v, "direction": d} for m, v, d in explanation],
            "rule": rule,
        }


class DetectorBank:
    """All sensors' detectors; routes a mixed batch to each sensor and collects the anomalies.

    Not thread-safe: call :meth:`process` and :meth:`install` from one thread (the crew's loop), and only
    :func:`fit_model` from executors.
    """

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self.sensors: dict[tuple[str, str], SensorDetector] = {}

    def sensor(self, site: str, sensor_id: str) -> SensorDetector:
        """The detector of one sensor, created on first use."""
        key = (site, sensor_id)
        det = self.sensors.get(key)
        if det is None:
            det = self.sensors[key] = SensorDetector(site, sensor_id, self.config)
        return det

    def process(
        self,
        readings: Sequence[Mapping[str, Any]],
        *,
        detected_ms: int | None = None,
        entry_ids: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Anomalies for a batch of normalized readings, in input order, at most one per reading.

        ``detected_ms`` and ``entry_ids`` (one per reading: the ``wd:readings:v1`` entry it came from) are copied
        into the anomalies when given; otherwise the caller adds ``detected_ms`` and ``reading_entry_id``.
        """
        if entry_ids is not None and len(entry_ids) != len(readings):
            raise ValueError("entry_ids must have one id per reading")
        groups: dict[tuple[str, str], list[int]] = {}
        for i, r in enumerate(readings):
            groups.setdefault((r["site"], r["sensor_id"]), []).append(i)
        found: list[tuple[int, dict[str, Any]]] = []
        for (site, sensor_id), idx in groups.items():
            det = self.sensor(site, sensor_id)
            for j, anomaly in det.process([readings[i] for i in idx]):
                found.append((idx[j], anomaly))
        found.sort(key=lambda p: p[0])
        out: list[dict[str, Any]] = []
        for i, anomaly in found:
            if detected_ms is not None:
                anomaly["detected_ms"] = int(detected_ms)
            if entry_ids is not None:
                anomaly["reading_entry_id"] = entry_ids[i]
            out.append(anomaly)
        return out

    def due_refits(self, limit: int | None = None) -> list[TrainingWindow]:
        """Training windows of sensors whose refit is due (marks each in flight); fit them, then :meth:`install`."""
        out: list[TrainingWindow] = []
        for det in self.sensors.values():
            if limit is not None and len(out) >= limit:
                break
            if det.needs_refit:
                out.append(det.training_window())
        return out

    def install(self, model: SensorModel, window: TrainingWindow) -> None:
        """Install a model fitted on ``window`` into its sensor."""
        self.sensor(window.site, window.sensor_id).install(model)

    def refit_due_now(self) -> int:
        """Fit and install every due model synchronously (tests, benchmarks, offline replays). Returns the count."""
        windows = self.due_refits()
        for w in windows:
            try:
                self.install(fit_model(w), w)
            except ValueError:
                logger.warning("fit failed for %s:%s", w.site, w.sensor_id, exc_info=True)
                self.sensor(w.site, w.sensor_id).abandon_refit()
        return len(windows)


def _ewma_update(state: F64, values: F64, alpha: float) -> F64:
    """EWMA ``state`` after ``values`` (rows in order, NaN = missing); a column never seen starts at its first value."""
    present = ~np.isnan(values)
    first_row = present.argmax(axis=0)
    first_val = np.where(present.any(axis=0), values[first_row, np.arange(values.shape[1])], np.nan)
    start = np.where(np.isnan(state), first_val, state)
    known = ~np.isnan(start)
    filled = forward_fill(values, np.where(known, start, 0.0))
    _, final = ewma_baselines(filled, alpha, np.where(known, start, 0.0))
    return np.where(known, final, np.nan)
