"""Per-sensor anomaly model: an isolation forest over short-term residuals, a calibrated threshold, explanations.

Why residuals and not raw values. Water signals move a lot for good reasons: daily demand cycles (flow +-35 %),
rain (intake turbidity up several-fold for hours), slow sensor wander. An isolation forest on raw values flags every
hour of the day it has not seen in its training window. What a fault looks like instead is a *jump*: the value
leaves where the sensor just was. So each metric becomes a feature ``(x_t - b_t) / s`` where ``b_t`` is the median
of the sensor's last ``baseline_window`` *accepted* readings and ``s`` the robust spread of that residual over the
training window. Optionally (``slow_alpha`` > 0) a second feature per metric measures the distance from a slow
exponentially weighted mean, for drifts; it is off by default (see benchmarks/RESULTS.md, "Detection quality").

Why the forest is extended outside its training envelope. An isolation forest draws split thresholds between the
training minimum and maximum, so a reading 8 spreads out scores the same as the most extreme training point
(measured: a +8 sigma spike in one of four Gaussian features crossed the 1e-4 false-positive threshold in under 1 %
of cases). :meth:`SensorModel.score` therefore raises the forest score toward 1 as the furthest feature moves past
the training envelope: ``score = s_if + (1 - s_if) * (1 - exp(-excess / envelope_scale))`` with ``excess`` in
spreads beyond ``max(training extreme) + envelope_guard``. Inside the envelope the score is the forest's own
(``-IsolationForest.score_samples``, computed by :class:`~analytics.forest.CompiledForest`).

Score sign: **higher is more anomalous**, in ``(0, 1)``; hard physical limits (:mod:`analytics.detector`) use 1.0.
The threshold is kept apart from the score (``threshold_``), calibrated per model as the ``threshold_quantile``
of the training scores plus ``threshold_margin`` times its distance to the median training score.

Persistence: :meth:`SensorModel.to_bytes` writes numeric arrays (format 2, :func:`pack_model`: one compressed block,
read back as views) plus a JSON metadata record holding the parameters, the model version and the scikit-learn,
numpy and format versions. :meth:`SensorModel.from_bytes` also reads format 1 (an ``.npz`` loaded with
``allow_pickle=False``), refuses any other format, and by default also a different scikit-learn or numpy version
(:class:`ModelVersionMismatch`): the caller then refits from its window. No pickle, no code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import sklearn
from numpy.typing import ArrayLike, NDArray
from scipy.signal import lfilter  # type: ignore[import-untyped]
from sklearn.ensemble import IsolationForest

from analytics._jit import median_before
from analytics.forest import CompiledForest

__all__ = [
    "FORMAT_VERSION",
    "ModelFormatError",
    "ModelVersionMismatch",
    "SensorModel",
    "ewma_baselines",
    "forward_fill",
    "library_versions",
    "median_baselines",
    "robust_spread",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the byte layout written by :meth:`SensorModel.to_bytes` changes.
FORMAT_VERSION = 2
#: Formats :meth:`SensorModel.from_bytes` reads: 1 (``.npz``) from registries written before format 2.
READABLE_FORMATS = (1, 2)
_MAGIC = "waterdoctor.sensor-model"
#: Format 2 starts with these bytes, then the JSON header's length (4 bytes, little-endian), the header, and the
#: arrays' raw bytes, one after the other, zlib-compressed as one block.
_PREFIX = b"WDSM"
_HEAD = struct.Struct("<I")

Direction = Literal["high", "low"]
Severity = Literal["warning", "critical"]
F64 = NDArray[np.float64]
#: :attr:`SensorModel.compiled_args_`: limits, then the forest's complete arrays (feature, threshold, nan_right,
#: leaf_value, n_trees, depth, denominator), then ``envelope_scale`` and ``threshold_``.
CompiledArgs = tuple[
    F64, NDArray[Any], NDArray[np.float32], NDArray[np.bool_], F64, int, int, float, float, float
]


class ModelFormatError(ValueError):
    """Bytes that are not a sensor model this code can read (wrong magic, format version, or corrupt)."""


class ModelVersionMismatch(ModelFormatError):
    """The model was saved with another scikit-learn or numpy version; refit it (or load with ``strict=False``)."""

    def __init__(self, saved: Mapping[str, str], running: Mapping[str, str]) -> None:
        super().__init__(f"model saved with {dict(saved)}, running {dict(running)}: refit it")
        self.saved = dict(saved)
        self.running = dict(running)


def library_versions() -> dict[str, str]:
    """The versions recorded beside a persisted model."""
    return {"sklearn": str(sklearn.__version__), "numpy": str(np.__version__)}


def robust_spread(values: ArrayLike) -> float:
    """A robust standard deviation of finite ``values``: IQR / 1.349, else MAD * 1.4826, else std.

    A metric that never moved in training (all equal) gets the smallest step between distinct values seen, or,
    failing that, ``max(1e-3 * |median|, 1e-6)``: a later change of it is then news, which is what we want.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 1.0
    q25, q50, q75 = np.quantile(v, [0.25, 0.5, 0.75])
    spread = float(q75 - q25) / 1.349
    if spread > 0:
        return spread
    mad = float(np.median(np.abs(v - q50))) * 1.4826
    if mad > 0:
        return mad
    std = float(np.std(v))
    if std > 0:
        return std
    return max(1e-3 * abs(float(q50)), 1e-6)


def ewma_baselines(values: F64, alpha: float, start: F64) -> tuple[F64, F64]:
    """EWMA *before* each row, and after the last: ``(baselines (n, k), final (k,))``.

    ``values`` must hold no NaN (forward-fill first). ``b_0 = start`` and ``b_{t+1} = b_t + alpha (x_t - b_t)``,
    run as a first-order IIR filter over all columns at once (scipy's ``lfilter``; no Python loop per row).
    """
    n, k = values.shape
    start = np.asarray(start, dtype=np.float64).reshape(k)
    if n == 0:
        return np.empty((0, k)), start.copy()
    decay = 1.0 - alpha
    # y[t] = decay * y[t-1] + alpha * x[t] with y[-1] = start, i.e. y[t] = b_{t+1}; zi carries decay * start.
    after, _ = lfilter([alpha], [1.0, -decay], values, axis=0, zi=(decay * start)[None, :])
    before = np.empty((n, k), dtype=np.float64)
    before[0] = start
    before[1:] = after[:-1]
    return before, np.asarray(after[-1], dtype=np.float64)


def median_baselines(values: F64, history: F64) -> tuple[F64, F64]:
    """Median of the ``h`` rows before each row: ``(baselines (n, k), new history (h, k))``.

    ``history`` holds the ``h`` most recent accepted rows, oldest first; ``values`` must hold no NaN. A median
    rather than a mean so one bad reading that slipped into the history (say, a spike during warm-up) cannot
    drag the baseline away and make every following reading look like a jump. Compiled
    (:func:`analytics._jit.median_before`): the same values as ``np.median`` over each window.
    """
    values = np.asarray(values, dtype=np.float64)
    history = np.asarray(history, dtype=np.float64)
    n, k = values.shape
    h = history.shape[0]
    new_history = np.concatenate([history, values], axis=0)[-h:].copy()
    if n == 0:
        return np.empty((0, k)), new_history
    before: F64 = median_before(values, history)
    return before, new_history


def forward_fill(values: F64, first: F64) -> F64:
    """Replace NaN by the last finite value above it in the same column (``first`` before row 0)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or not np.isnan(v).any():
        return v  # callers never write to the result, so no copy
    v = np.vstack([first[None, :], v])
    mask = np.isnan(v)
    idx = np.where(~mask, np.arange(v.shape[0])[:, None], 0)
    np.maximum.accumulate(idx, axis=0, out=idx)
    filled: F64 = v[idx, np.arange(v.shape[1])[None, :]][1:]
    return filled


class SensorModel:
    """Isolation forest over one sensor's metrics, with a calibrated threshold and per-metric explanations.

    Follows scikit-learn conventions: ``__init__`` stores parameters only, :meth:`fit` sets the attributes that
    end in ``_``, ``random_state`` makes a fit repeatable. Not thread-safe while fitting; a fitted model is
    read-only and may be shared by threads.

    Parameters:
        n_estimators, max_samples, max_features, bootstrap, random_state: passed to the isolation forest.
        baseline_window: accepted readings whose median is the short-term baseline.
        slow_alpha: weight of the slow baseline for drift features; 0 disables them (default).
        threshold_quantile, threshold_margin: ``threshold_ = q + margin * (q - median)`` over training scores.
        envelope_guard, envelope_scale: how far past the training envelope (in spreads) the score starts to rise,
            and how fast it approaches 1.
        critical_fraction: ``critical_threshold_ = threshold_ + critical_fraction * (1 - threshold_)``.
        min_coverage: a metric enters the model when present in at least this share of training readings.
        stuck_fpr, stuck_min_run: a run of identical values is "stuck" once its length ``L`` satisfies
            ``p ** (L - 1) <= stuck_fpr`` (``p``: share of repeated consecutive values in training), and never
            below ``stuck_min_run``; metrics that repeat in more than half the training pairs are never "stuck".
        trim_z: training readings with a residual beyond this many spreads are left out of the forest and the
            envelope (faults that slipped into the window during warm-up).
        range_quantile: the normal range of each metric's level (``level_lo_``, ``level_hi_``) is between this
            quantile of the training window and its complement (used to recognise recoveries).
        saturation_share: a metric whose training minimum (maximum) holds at least this share of the readings
            saturates there (``saturated_lo_``/``saturated_hi_``): runs at that value are not "stuck".
        min_train: fewest training readings accepted by :meth:`fit`.
        keep_estimator: keep the fitted scikit-learn forest in ``estimator_`` (about 1 MB per model; off by
            default: scoring needs only the compiled arrays, and a crew holds one model per sensor).
    """

    def __init__(
        self,
        *,
        n_estimators: int = 100,
        max_samples: int | float | str = "auto",
        max_features: float = 1.0,
        bootstrap: bool = False,
        random_state: int | None = None,
        baseline_window: int = 5,
        slow_alpha: float = 0.0,
        threshold_quantile: float = 0.995,
        threshold_margin: float = 1.0,
        envelope_guard: float = 1.0,
        envelope_scale: float = 2.0,
        critical_fraction: float = 0.5,
        min_coverage: float = 0.5,
        stuck_fpr: float = 1e-6,
        stuck_min_run: int = 4,
        trim_z: float = 10.0,
        range_quantile: float = 0.01,
        saturation_share: float = 0.002,
        min_train: int = 32,
        keep_estimator: bool = False,
    ) -> None:
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.max_features = max_features
        self.bootstrap = bootstrap
        self.random_state = random_state
        self.baseline_window = baseline_window
        self.slow_alpha = slow_alpha
        self.threshold_quantile = threshold_quantile
        self.threshold_margin = threshold_margin
        self.envelope_guard = envelope_guard
        self.envelope_scale = envelope_scale
        self.critical_fraction = critical_fraction
        self.min_coverage = min_coverage
        self.stuck_fpr = stuck_fpr
        self.stuck_min_run = stuck_min_run
        self.trim_z = trim_z
        self.range_quantile = range_quantile
        self.saturation_share = saturation_share
        self.min_train = min_train
        self.keep_estimator = keep_estimator

    _PARAM_NAMES = (
        "n_estimators",
        "max_samples",
        "max_features",
        "bootstrap",
        "random_state",
        "baseline_window",
        "slow_alpha",
        "threshold_quantile",
        "threshold_margin",
        "envelope_guard",
        "envelope_scale",
        "critical_fraction",
        "min_coverage",
        "stuck_fpr",
        "stuck_min_run",
        "trim_z",
        "range_quantile",
        "saturation_share",
        "min_train",
        "keep_estimator",
    )

    # fitted attributes (declared for mypy; set by fit / from_bytes)
    metrics_: tuple[str, ...]
    center_: F64
    scale_: F64
    fast_scale_: F64
    slow_scale_: F64
    feature_lo_: F64
    feature_hi_: F64
    level_lo_: F64
    level_hi_: F64
    saturated_lo_: F64
    saturated_hi_: F64
    stuck_run_: NDArray[np.int64]
    forest_: CompiledForest
    estimator_: IsolationForest | None
    threshold_: float
    critical_threshold_: float
    train_score_median_: float
    n_train_: int
    model_version_: str
    versions_: dict[str, str]

    # ------------------------------------------------------------------ sklearn-style plumbing

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters (scikit-learn convention)."""
        return {name: getattr(self, name) for name in self._PARAM_NAMES}

    def set_params(self, **params: Any) -> SensorModel:
        """Set constructor parameters; unknown names raise ``ValueError``."""
        for name, value in params.items():
            if name not in self._PARAM_NAMES:
                raise ValueError(f"unknown parameter {name!r}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        fitted = (
            f", fitted on {self.n_train_} readings, version {self.model_version_!r}" if self.is_fitted else ""
        )
        return f"SensorModel(metrics={getattr(self, 'metrics_', None)}{fitted})"

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "forest_")

    @property
    def n_features_(self) -> int:
        """Forest features: one short-term residual per metric, plus one slow residual per metric if enabled."""
        return len(self.metrics_) * (2 if self.slow_alpha > 0 else 1)

    # ------------------------------------------------------------------ fitting

    def fit(
        self, readings: Sequence[Mapping[str, float]], y: None = None, *, model_version: str | None = None
    ) -> SensorModel:
        """Fit on a window of readings (metric name -> value dicts), oldest first, anomalies already left out.

        The metric set is fixed here: every metric present in at least ``min_coverage`` of the readings.
        """
        names = sorted({name for r in readings for name in r})
        values = np.full((len(readings), len(names)), np.nan)
        col = {name: i for i, name in enumerate(names)}
        for i, r in enumerate(readings):
            for name, v in r.items():
                values[i, col[name]] = v
        return self.fit_matrix(values, names, model_version=model_version)

    def fit_matrix(
        self, values: ArrayLike, metrics: Sequence[str], *, model_version: str | None = None
    ) -> SensorModel:
        """Fit on a ``(n, len(metrics))`` matrix in time order; NaN marks a metric missing from a reading."""
        X = np.asarray(values, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(metrics):
            raise ValueError(f"values must have shape (n, {len(metrics)}), got {X.shape}")
        if not np.isfinite(X[~np.isnan(X)]).all():
            raise ValueError("values must be finite (NaN marks a missing metric)")
        n = X.shape[0]
        if n < self.min_train:
            raise ValueError(f"need at least {self.min_train} readings to fit, got {n}")
        present = ~np.isnan(X)
        keep = np.flatnonzero(present.mean(axis=0) >= self.min_coverage)
        if keep.size == 0:
            raise ValueError("no metric is present often enough to model")
        X = X[:, keep]
        self.metrics_ = tuple(str(metrics[int(i)]) for i in keep)
        center = np.nanmedian(X, axis=0)
        self.center_ = center
        self.scale_ = np.array([robust_spread(X[:, j]) for j in range(X.shape[1])])
        self.stuck_run_ = self._calibrate_stuck(X)
        self.saturated_lo_, self.saturated_hi_ = self._saturation(X)

        filled = forward_fill(X, center)
        h = self.baseline_window
        fast_base, _ = median_baselines(filled, np.repeat(filled[:1], h, axis=0))
        # The first readings have a history made of copies of row 0: leave them out of the statistics.
        skip = min(h, n - 1)
        fast = (filled - fast_base)[skip:]
        self.fast_scale_ = np.array([robust_spread(fast[:, j]) for j in range(fast.shape[1])])
        parts = [fast / self.fast_scale_]
        if self.slow_alpha > 0:
            slow_base, _ = ewma_baselines(filled, self.slow_alpha, np.median(filled[: min(20, n)], axis=0))
            slow = (filled - slow_base)[skip:]
            self.slow_scale_ = np.array([robust_spread(slow[:, j]) for j in range(slow.shape[1])])
            parts.append(slow / self.slow_scale_)
        else:
            self.slow_scale_ = np.ones(0)
        Z = np.hstack(parts)
        levels = filled[skip:]
        clean = np.abs(Z).max(axis=1) <= self.trim_z
        if clean.sum() >= max(self.min_train // 2, 2):
            Z, levels = Z[clean], levels[clean]
        self.feature_lo_ = Z.min(axis=0)
        self.feature_hi_ = Z.max(axis=0)
        # The normal range for the recovery rule: 1 % / 99 % quantiles, not min / max, so that the few readings
        # of an undetected fault (a slow drift) that reached the window do not stretch it.
        self.level_lo_, self.level_hi_ = np.quantile(
            levels, [self.range_quantile, 1 - self.range_quantile], axis=0
        )

        est = IsolationForest(
            n_estimators=self.n_estimators,
            max_samples=self.max_samples
            if not isinstance(self.max_samples, int)
            else min(self.max_samples, len(Z)),
            max_features=self.max_features,
            bootstrap=self.bootstrap,
            random_state=self.random_state,
        ).fit(Z)
        self.forest_ = CompiledForest.from_sklearn(est)
        self.estimator_ = est if self.keep_estimator else None
        train = self.forest_.score(Z)  # inside the envelope by definition: the plain forest score
        q = float(np.quantile(train, self.threshold_quantile))
        med = float(np.median(train))
        self.train_score_median_ = med
        self.threshold_ = min(q + self.threshold_margin * max(q - med, 0.0), 0.999)
        self.critical_threshold_ = self.threshold_ + self.critical_fraction * (1.0 - self.threshold_)
        self.n_train_ = n
        self.versions_ = library_versions()
        self.model_version_ = model_version if model_version is not None else self._content_hash()
        logger.debug(
            "fitted %s: %d readings, metrics %s, threshold %.4f",
            self.model_version_,
            n,
            self.metrics_,
            self.threshold_,
        )
        return self

    def _calibrate_stuck(self, X: F64) -> NDArray[np.int64]:
        runs = np.zeros(X.shape[1], dtype=np.int64)
        if X.shape[0] < 2:
            return runs
        a, b = X[1:], X[:-1]
        both = ~np.isnan(a) & ~np.isnan(b)
        for j in range(X.shape[1]):
            pairs = int(both[:, j].sum())
            repeats = int((a[both[:, j], j] == b[both[:, j], j]).sum())
            p = (repeats + 1.0) / (pairs + 2.0)  # add-one: an unseen repeat is not impossible
            if p > 0.5:
                continue  # a metric that mostly repeats (clipped at 0, coarse resolution) cannot be called stuck
            need = 1 + math.ceil(math.log(self.stuck_fpr) / math.log(p))
            runs[j] = max(self.stuck_min_run, need)
        return runs

    def _saturation(self, X: F64) -> tuple[F64, F64]:
        """Per metric, the training minimum / maximum if the metric sits exactly there often (NaN otherwise).

        A value clipped at a floor (intake chlorine at 0 mg/L) repeats for good reasons: runs of it are a
        saturated signal, not a stuck sensor. "Often": at least ``saturation_share`` of the readings.
        """
        k = X.shape[1]
        lo, hi = np.full(k, np.nan), np.full(k, np.nan)
        for j in range(k):
            col = X[:, j][~np.isnan(X[:, j])]
            if col.size == 0:
                continue
            need = max(5, self.saturation_share * col.size)
            vmin, vmax = col.min(), col.max()
            if vmin != vmax:
                if (col == vmin).sum() >= need:
                    lo[j] = vmin
                if (col == vmax).sum() >= need:
                    hi[j] = vmax
        return lo, hi

    def _content_hash(self) -> str:
        h = hashlib.sha256()
        arrays, _ = self.forest_.to_arrays()
        for a in (*arrays.values(), self.fast_scale_, self.center_):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(repr(self.metrics_).encode())
        return "if-" + h.hexdigest()[:12]

    # ------------------------------------------------------------------ scoring

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError("SensorModel is not fitted")

    def features(self, values: ArrayLike, fast_base: ArrayLike, slow_base: ArrayLike | None = None) -> F64:
        """Forest features of rows ``values`` (``(n, len(metrics_))``, NaN = missing) given the baselines.

        ``fast_base``: the short-term baseline of each row (median of the accepted readings before it);
        ``slow_base``: the slow EWMA before each row (only for models with ``slow_alpha`` > 0). Same shape.
        A missing value contributes a zero residual (no evidence either way).
        """
        self._check_fitted()
        v = np.asarray(values, dtype=np.float64)
        fb = np.asarray(fast_base, dtype=np.float64)
        z_fast = (v - fb) / self.fast_scale_
        parts = [z_fast]
        if self.slow_alpha > 0:
            if slow_base is None:
                raise ValueError("this model has slow features: pass slow_base")
            sb = np.asarray(slow_base, dtype=np.float64)
            parts.append((v - sb) / self.slow_scale_)
        Z = np.hstack(parts) if len(parts) > 1 else z_fast
        return np.where(np.isnan(Z), 0.0, Z)

    def score_features(self, Z: ArrayLike) -> F64:
        """Scores (higher = more anomalous) of feature rows from :meth:`features`; see the module docstring."""
        self._check_fitted()
        z = np.asarray(Z, dtype=np.float64)
        s = self.forest_.score(z)
        excess = self.envelope_excess(z).max(axis=1) if z.shape[0] else np.zeros(0)
        out: F64 = s + (1.0 - s) * -np.expm1(-excess / self.envelope_scale)
        return out

    def is_recovery(self, values: F64, baseline: F64, z: F64) -> bool:
        """Does this flagged jump look like a return to normal? Every metric that jumped past the envelope came
        from a baseline outside its normal range (``level_lo_``..``level_hi_`` widened by ``envelope_guard`` level
        spreads) to a value inside it:
        the end of a fault the baseline had followed. The detector waits for the next reading to confirm it.
        """
        k = len(self.metrics_)
        jumped = self.envelope_excess(np.asarray(z, dtype=np.float64)[None, :])[0, :k] > 0
        if not jumped.any():
            return False
        widen = self.envelope_guard * self.scale_
        with np.errstate(invalid="ignore"):
            outside = (baseline < self.level_lo_ - widen) | (baseline > self.level_hi_ + widen)
            inside = (values >= self.level_lo_) & (values <= self.level_hi_)
        return bool((outside & inside)[jumped].all())

    @property
    def stuck_limit_(self) -> NDArray[np.int64]:
        """Per metric, the run length from which it is stuck: ``stuck_run_``, or the largest int64 where 0 (never)."""
        cached = self.__dict__.get("_stuck_limit")
        if cached is None or cached[0] is not self.stuck_run_:
            limit = np.where(self.stuck_run_ > 0, self.stuck_run_, np.iinfo(np.int64).max)
            cached = self.__dict__["_stuck_limit"] = (self.stuck_run_, limit)
        out: NDArray[np.int64] = cached[1]
        return out

    @property
    def compiled_args_(self) -> CompiledArgs | None:
        """The model as the compiled detector steps (:mod:`analytics._jit`: ``accept_if_normal``,
        ``segment_scores``) take it, or None when they cannot use it (drift features on, or a forest too deep for
        the complete layout): the detector then runs the same arithmetic in numpy.

        Computed once per fit (keyed on ``forest_``): per metric, the stuck run length, the saturation floor and
        ceiling, the residual scale, the training envelope with its guard and the training median; then the
        forest's arrays, ``envelope_scale`` and ``threshold_``.
        """
        cached = self.__dict__.get("_compiled_args")
        if cached is not None and cached[0] is self.forest_:
            out: CompiledArgs | None = cached[1]
            return out
        forest = self.forest_
        args: CompiledArgs | None = None
        if self.slow_alpha == 0 and forest.layout == "complete":
            k = len(self.metrics_)
            g = self.envelope_guard
            limits = np.ascontiguousarray(
                np.vstack(
                    [
                        self.stuck_limit_.astype(np.float64),
                        self.saturated_lo_,
                        self.saturated_hi_,
                        self.fast_scale_,
                        self.feature_lo_[:k] - g,
                        self.feature_hi_[:k] + g,
                        self.center_,
                    ]
                ),
                dtype=np.float64,
            )
            args = (
                limits,
                *forest.complete_arrays(),
                float(self.envelope_scale),
                float(self.threshold_),
            )
        self.__dict__["_compiled_args"] = (forest, args)
        return args

    def envelope_excess(self, z: F64) -> F64:
        """Per feature: how many spreads beyond ``training extreme + envelope_guard`` (0 inside); shape of ``z``."""
        g = self.envelope_guard
        over = np.maximum(z - (self.feature_hi_ + g), (self.feature_lo_ - g) - z)
        return np.maximum(over, 0.0)

    def score(
        self,
        rows: Sequence[Mapping[str, float]] | ArrayLike,
        fast_base: ArrayLike | None = None,
        slow_base: ArrayLike | None = None,
    ) -> F64:
        """Scores of readings (dicts, or a ``(n, len(metrics_))`` matrix in ``metrics_`` order).

        Without baselines, each row is compared with the training median (a stateless approximation: use
        :class:`~analytics.detector.SensorDetector`, which keeps the real baselines, for live data).
        """
        v = self.to_matrix(rows)
        fb = np.broadcast_to(self.center_, v.shape) if fast_base is None else fast_base
        sb = np.broadcast_to(self.center_, v.shape) if slow_base is None else slow_base
        return self.score_features(self.features(v, fb, sb if self.slow_alpha > 0 else None))

    def to_matrix(self, rows: Sequence[Mapping[str, float]] | ArrayLike) -> F64:
        """Rows as a ``(n, len(metrics_))`` float matrix in ``metrics_`` order; NaN where a metric is missing."""
        self._check_fitted()
        if isinstance(rows, Sequence) and (len(rows) == 0 or isinstance(rows[0], Mapping)):
            out = np.full((len(rows), len(self.metrics_)), np.nan)
            for i, r in enumerate(rows):
                assert isinstance(r, Mapping)
                for j, name in enumerate(self.metrics_):
                    v = r.get(name)
                    if v is not None:
                        out[i, j] = v
            return out
        arr = np.asarray(rows, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != len(self.metrics_):
            raise ValueError(f"rows must have shape (n, {len(self.metrics_)}), got {arr.shape}")
        return arr

    def severity(self, score: float) -> Severity | None:
        """``None`` below the threshold, ``"critical"`` at or past ``critical_threshold_``, else ``"warning"``."""
        self._check_fitted()
        if score < self.threshold_:
            return None
        return "critical" if score >= self.critical_threshold_ else "warning"

    def explain_features(
        self, z: ArrayLike, values: ArrayLike, *, max_items: int = 3
    ) -> list[tuple[str, float, Direction]]:
        """The metric(s) that drove a row's score: ``[(metric, value, "high"|"low"), ...]``, strongest first.

        A metric's strength is its largest feature relative to the training envelope on that side (1.0 = at the
        most extreme training value). Metrics past their envelope are listed (up to ``max_items``); if none is,
        the single strongest one. Direction is the sign of that feature: above its baseline is ``high``.
        """
        self._check_fitted()
        zz = np.asarray(z, dtype=np.float64).reshape(-1)
        vals = np.asarray(values, dtype=np.float64).reshape(-1)
        k = len(self.metrics_)
        env = np.where(zz >= 0, np.maximum(self.feature_hi_, 1e-12), np.maximum(-self.feature_lo_, 1e-12))
        ratio = np.abs(zz) / env
        per_metric = ratio.reshape(-1, k)  # rows: feature groups (fast[, slow]); columns: metrics
        best_group = per_metric.argmax(axis=0)
        strength = per_metric.max(axis=0)
        strength = np.where(np.isnan(vals), -1.0, strength)  # a missing metric explains nothing
        order = [j for j in np.argsort(-strength, kind="stable") if strength[j] >= 0]
        chosen = [j for j in order if strength[j] > 1.0][:max_items] or order[:1]
        out: list[tuple[str, float, Direction]] = []
        for j in chosen:
            sign = zz[best_group[j] * k + j]
            out.append((self.metrics_[j], float(vals[j]), "high" if sign >= 0 else "low"))
        return out

    def explain(
        self, row: Mapping[str, float], fast_base: Mapping[str, float] | None = None
    ) -> list[tuple[str, float, Direction]]:
        """Explain one reading; without a baseline, relative to the training median (see :meth:`score`)."""
        v = self.to_matrix([row])
        fb = np.broadcast_to(self.center_, v.shape) if fast_base is None else self.to_matrix([fast_base])
        fb = np.where(np.isnan(fb), self.center_, fb)
        sb = np.broadcast_to(self.center_, v.shape) if self.slow_alpha > 0 else None
        z = self.features(v, fb, sb)
        return self.explain_features(z[0], v[0])

    # ------------------------------------------------------------------ persistence

    def to_bytes(self) -> bytes:
        """Serialise to format-2 bytes (:func:`pack_model`): numeric arrays plus a JSON metadata record, no pickle."""
        self._check_fitted()
        forest_arrays, forest_meta = self.forest_.to_arrays()
        meta = {
            "magic": _MAGIC,
            "format_version": FORMAT_VERSION,
            "versions": self.versions_,
            "params": self.get_params(),
            "metrics": list(self.metrics_),
            "model_version": self.model_version_,
            "threshold": self.threshold_,
            "critical_threshold": self.critical_threshold_,
            "train_score_median": self.train_score_median_,
            "n_train": self.n_train_,
            "forest": forest_meta,
        }
        arrays: dict[str, NDArray[Any]] = {f"forest__{k}": v for k, v in forest_arrays.items()}
        arrays.update(
            center=self.center_,
            scale=self.scale_,
            fast_scale=self.fast_scale_,
            slow_scale=self.slow_scale_,
            feature_lo=self.feature_lo_,
            feature_hi=self.feature_hi_,
            level_lo=self.level_lo_,
            level_hi=self.level_hi_,
            saturated_lo=self.saturated_lo_,
            saturated_hi=self.saturated_hi_,
            stuck_run=self.stuck_run_,
        )
        return pack_model(meta, arrays)

    @classmethod
    def from_bytes(cls, data: bytes, *, strict: bool = True) -> SensorModel:
        """Load a model written by :meth:`to_bytes`.

        Raises :class:`ModelFormatError` for foreign or corrupt data, and :class:`ModelVersionMismatch` when the
        scikit-learn or numpy version differs from the running one and ``strict`` is true (the default; the caller
        should refit). With ``strict=False`` a mismatch is logged and the model loaded: it holds plain arrays
        only, so it still scores exactly as saved, but its ``estimator_`` is ``None`` either way.
        """
        try:
            meta, arrays = unpack_model(data)
        except Exception as exc:  # zlib, struct, zipfile, ValueError, KeyError, JSON errors: "not our bytes"
            raise ModelFormatError(f"not a sensor model: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("magic") != _MAGIC:
            raise ModelFormatError("not a sensor model (magic mismatch)")
        if meta.get("format_version") not in READABLE_FORMATS:
            raise ModelFormatError(
                f"model format {meta.get('format_version')}, this code reads {', '.join(map(str, READABLE_FORMATS))}"
            )
        running = library_versions()
        saved = {str(k): str(v) for k, v in dict(meta.get("versions", {})).items()}
        if saved != running:
            if strict:
                raise ModelVersionMismatch(saved, running)
            logger.warning(
                "loading model %s saved with %s under %s", meta.get("model_version"), saved, running
            )
        try:
            model = cls(**meta["params"])
            forest_arrays = {
                k.removeprefix("forest__"): v for k, v in arrays.items() if k.startswith("forest__")
            }
            model.forest_ = CompiledForest.from_arrays(forest_arrays, meta["forest"])
            model.metrics_ = tuple(meta["metrics"])
            model.center_ = arrays["center"]
            model.scale_ = arrays["scale"]
            model.fast_scale_ = arrays["fast_scale"]
            model.slow_scale_ = arrays["slow_scale"]
            model.feature_lo_ = arrays["feature_lo"]
            model.feature_hi_ = arrays["feature_hi"]
            model.level_lo_ = arrays["level_lo"]
            model.level_hi_ = arrays["level_hi"]
            model.saturated_lo_ = arrays["saturated_lo"]
            model.saturated_hi_ = arrays["saturated_hi"]
            model.stuck_run_ = arrays["stuck_run"].astype(np.int64)
            model.threshold_ = float(meta["threshold"])
            model.critical_threshold_ = float(meta["critical_threshold"])
            model.train_score_median_ = float(meta["train_score_median"])
            model.n_train_ = int(meta["n_train"])
            model.model_version_ = str(meta["model_version"])
            model.versions_ = saved
            model.estimator_ = None
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"corrupt sensor model: {exc}") from exc
        k = len(model.metrics_)
        shapes_ok = (
            model.center_.shape
            == model.scale_.shape
            == model.fast_scale_.shape
            == model.stuck_run_.shape
            == (k,)
            and model.feature_lo_.shape == model.feature_hi_.shape == (model.n_features_,)
            and model.forest_.n_features_in == model.n_features_
        )
        if not shapes_ok:
            raise ModelFormatError("corrupt sensor model: array shapes disagree with its metrics")
        return model


def pack_model(meta: Mapping[str, Any], arrays: Mapping[str, NDArray[Any]]) -> bytes:
    """Format 2: ``meta`` (JSON) with an index of ``arrays``, then their bytes compressed as one block.

    Loads in a fraction of format 1's time (a ``.npz``: one zip member, one parsed ``.npy`` header and one zlib
    stream per array, 2.5 to 4 ms per model here; ~0.7 to 1 ms now): a restarted crew loads every stored model before it scores.
    Compressed: the padded tree layout repeats leaf values, so models shrink about 4x in the registry.
    """
    index = []
    parts = []
    offset = 0
    for name, array in arrays.items():
        a = np.ascontiguousarray(array)
        index.append([name, a.dtype.str, list(a.shape), offset])
        parts.append(a.tobytes())
        offset += a.nbytes
    head = json.dumps({**meta, "arrays": index}, sort_keys=True).encode()
    return _PREFIX + _HEAD.pack(len(head)) + head + zlib.compress(b"".join(parts), 6)


def unpack_model(data: bytes) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
    """``(meta, arrays)`` from format 2 (:func:`pack_model`) or format 1 (``.npz`` with a ``meta_json`` array).

    Raises on anything else (zlib, struct, zipfile, JSON, ``ValueError``): the caller names it a format error.
    Arrays of format 2 are writable views of one decompressed buffer; only numeric dtypes are accepted.
    """
    if data[: len(_PREFIX)] != _PREFIX:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return json.loads(arrays.pop("meta_json").tobytes().decode()), arrays
    start = len(_PREFIX) + _HEAD.size
    (n,) = _HEAD.unpack_from(data, len(_PREFIX))
    meta = json.loads(data[start : start + n])
    body = bytearray(zlib.decompress(data[start + n :]))
    arrays = {}
    for name, dtype, shape, offset in meta.pop("arrays"):
        dt = np.dtype(dtype)
        if dt.kind not in "biuf":
            raise ValueError(f"array {name!r} has dtype {dtype!r}")
        count = math.prod(shape)
        arrays[str(name)] = np.frombuffer(body, dt, count, int(offset)).reshape(shape)
    return meta, arrays
