"""The compiled detector steps (analytics._jit) against the numpy arithmetic they replace."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from analytics._jit import median_before, push_row, push_rows, segment_scores, stuck_runs
from analytics.model import SensorModel, forward_fill

METRICS = ["chlorine_mg_l", "flow_m3_h", "ph", "turbidity_ntu"]
CENTER = np.array([1.2, 400.0, 7.4, 0.3])
SIGMA = np.array([0.02, 4.0, 0.02, 0.01])


@pytest.fixture(scope="module")
def model() -> SensorModel:
    rng = np.random.default_rng(1)
    X = CENTER + rng.normal(size=(1500, 4)) * SIGMA
    return SensorModel(random_state=0, n_estimators=40).fit_matrix(X, METRICS)


def numpy_segment(model: SensorModel, values: NDArray[np.float64], hist: NDArray[np.float64]) -> tuple:
    """The detector's general-path arithmetic, in numpy (what it runs for models the kernels cannot take)."""
    last = hist[-1]
    filled = forward_fill(values, np.where(np.isnan(last), model.center_, last))
    h = hist.shape[0]
    start = np.where(np.isnan(hist), filled[0], hist)
    windows = np.concatenate([start, filled])
    base = np.array([np.median(windows[i : i + h], axis=0) for i in range(values.shape[0])])
    Z = model.features(values, base)
    return base, Z, model.score_features(Z)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    h=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
    missing=st.floats(0.0, 0.5),
    never=st.booleans(),
)
def test_segment_scores_equal_the_numpy_path(
    model: SensorModel, n: int, h: int, seed: int, missing: float, never: bool
) -> None:
    rng = np.random.default_rng(seed)
    values = CENTER + rng.normal(size=(n, 4)) * SIGMA * rng.choice([1.0, 3.0, 40.0], size=(n, 4))
    values[rng.random((n, 4)) < missing] = np.nan
    hist = CENTER + rng.normal(size=(h, 4)) * SIGMA
    if never:  # a metric the sensor never reported before this run
        hist[:, 2] = np.nan
    args = model.compiled_args_
    assert args is not None
    got = segment_scores(values, hist, *args[:-1])
    want = numpy_segment(model, values, hist)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_models_with_drift_features_use_the_numpy_path() -> None:
    rng = np.random.default_rng(2)
    X = CENTER + rng.normal(size=(600, 4)) * SIGMA
    assert (
        SensorModel(random_state=0, n_estimators=10, slow_alpha=0.01).fit_matrix(X, METRICS).compiled_args_
        is None
    )


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 30), h=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_median_before_is_the_median_of_each_window(n: int, h: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.integers(-3, 4, size=(n, 3)).astype(np.float64)  # ties on purpose
    history = rng.normal(size=(h, 3))
    stacked = np.concatenate([history, values])
    want = np.array([np.median(stacked[i : i + h], axis=0) for i in range(n)])
    np.testing.assert_array_equal(median_before(values, history), want)


def _history_update(history: NDArray[np.float64], values: NDArray[np.float64]) -> NDArray[np.float64]:
    """The reference in numpy: the last ``h`` rows of ``history`` followed by ``values`` (forward-filled); a new
    column starts full."""
    h = history.shape[0]
    never = np.isnan(history[-1])
    if not never.any() and not np.isnan(values).any():  # the common case, without the bookkeeping
        filled, hist = values, history
    else:
        present = ~np.isnan(values)
        first_row = present.argmax(axis=0)
        first_val = np.where(present.any(axis=0), values[first_row, np.arange(values.shape[1])], np.nan)
        hist = np.where(never[None, :], first_val[None, :], history)
        filled = forward_fill(values, hist[-1])
    out: NDArray[np.float64] = np.concatenate([hist, filled], axis=0)[-h:]
    return out


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 7))
def test_push_row_equals_the_history_update(seed: int, rows: int) -> None:
    rng = np.random.default_rng(seed)
    hist = rng.normal(size=(rows, 5))
    hist[:, 0] = np.nan  # never seen
    hist[:, 1] = np.nan  # never seen, and missing again below
    row = rng.normal(size=5)
    row[1] = np.nan
    row[3] = np.nan  # missing: keeps its last value
    want = _history_update(hist, row[None, :])
    push_row(hist, row)
    np.testing.assert_array_equal(hist, want)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 7), n=st.integers(1, 12))
def test_push_rows_equals_the_history_update(seed: int, rows: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    hist = rng.normal(size=(rows, 5))
    hist[:, 0] = np.nan  # never seen
    hist[:, 1] = np.nan  # never seen, and missing in the first rows below
    values = rng.normal(size=(n, 5))
    values[: n // 2 + 1, 1] = np.nan
    values[rng.random(size=(n, 5)) < 0.2] = np.nan  # missing here and there: each keeps its last value
    want = _history_update(hist, values)
    push_rows(hist, values)
    np.testing.assert_array_equal(hist, want)


def test_stuck_runs_continue_across_calls_and_ignore_missing_values() -> None:
    last = np.full(2, np.nan)
    run = np.zeros(2, dtype=np.int64)
    values = np.array([[1.0, 5.0], [1.0, np.nan], [1.0, 5.0], [2.0, 6.0]])
    np.testing.assert_array_equal(stuck_runs(values[:2], last, run), [[1, 1], [2, 1]])
    np.testing.assert_array_equal(stuck_runs(values[2:], last, run), [[3, 2], [1, 1]])
    np.testing.assert_array_equal(run, [1, 1])
    np.testing.assert_array_equal(last, [2.0, 6.0])


def test_wrong_argument_types_are_refused_not_recompiled() -> None:
    with pytest.raises(TypeError):
        push_row(np.zeros((3, 2), dtype=np.float32), np.zeros(2))
