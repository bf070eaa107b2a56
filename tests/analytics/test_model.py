"""SensorModel: conventions, threshold sanity, explanations, persistence and its version checks."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

import analytics.model as model_mod
from analytics.model import (
    ModelFormatError,
    ModelVersionMismatch,
    SensorModel,
    ewma_baselines,
    forward_fill,
    median_baselines,
    robust_spread,
)

METRICS = ["chlorine_mg_l", "flow_m3_h", "ph", "turbidity_ntu"]
CENTER = np.array([1.2, 400.0, 7.4, 0.3])
SIGMA = np.array([0.02, 4.0, 0.02, 0.01])


def normal_readings(n: int, seed: int) -> NDArray[np.float64]:
    """Independent Gaussian noise around a fixed level (columns in METRICS order)."""
    return CENTER + np.random.default_rng(seed).normal(size=(n, len(METRICS))) * SIGMA


def as_dicts(values: NDArray[np.float64]) -> list[dict[str, float]]:
    return [dict(zip(METRICS, map(float, row), strict=True)) for row in values]


def live_scores(model: SensorModel, values: NDArray[np.float64], history: NDArray[np.float64]) -> Any:
    """Scores with the baselines a detector would use when every reading is accepted."""
    base, _ = median_baselines(values, history)
    return model.score(values, base)


@pytest.fixture(scope="module")
def fitted() -> SensorModel:
    return SensorModel(random_state=0, keep_estimator=True).fit(as_dicts(normal_readings(2000, seed=1)))


def test_init_stores_parameters_only_and_fit_sets_trailing_underscore_attributes() -> None:
    m = SensorModel(n_estimators=17, random_state=3)
    assert m.get_params()["n_estimators"] == 17 and m.get_params()["random_state"] == 3
    assert not m.is_fitted
    assert not [a for a in vars(m) if a.endswith("_")]
    with pytest.raises(RuntimeError, match="not fitted"):
        m.score(np.zeros((1, 4)))
    m.set_params(n_estimators=20)
    assert m.n_estimators == 20
    with pytest.raises(ValueError, match="unknown parameter"):
        m.set_params(bogus=1)
    m.fit_matrix(normal_readings(300, seed=0), METRICS)
    assert m.metrics_ == tuple(METRICS)
    assert 0.5 < m.threshold_ < m.critical_threshold_ < 1.0
    assert m.model_version_.startswith("if-")
    assert m.estimator_ is None, "the sklearn forest (~1 MB) is dropped unless keep_estimator=True"


def test_same_random_state_same_model() -> None:
    X = normal_readings(500, seed=4)
    a = SensorModel(random_state=7).fit_matrix(X, METRICS)
    b = SensorModel(random_state=7).fit_matrix(X, METRICS)
    assert a.threshold_ == b.threshold_ and a.model_version_ == b.model_version_


def test_forest_scores_equal_sklearn_on_the_model_features(fitted: SensorModel) -> None:
    assert fitted.estimator_ is not None
    X = normal_readings(300, seed=5)
    Z = fitted.features(X, np.broadcast_to(fitted.center_, X.shape))
    np.testing.assert_allclose(
        fitted.forest_.score(Z), -fitted.estimator_.score_samples(Z), rtol=0, atol=1e-9
    )
    # Inside the training envelope the model score is the forest score itself.
    inside = fitted.envelope_excess(Z).max(axis=1) == 0
    assert inside.sum() > 250
    np.testing.assert_allclose(fitted.score_features(Z)[inside], fitted.forest_.score(Z)[inside], atol=1e-12)


def test_normal_data_raises_at_most_about_one_false_alert_per_day(fitted: SensorModel) -> None:
    # 4 simulated days at one reading per 10 s.
    X = normal_readings(4 * 8640, seed=2)
    scores = live_scores(fitted, X, X[:5])
    false_alerts = int((scores >= fitted.threshold_).sum())
    assert false_alerts <= 4, f"{false_alerts} false alerts in 4 days"


@pytest.mark.parametrize(("metric", "sign"), [("ph", -1), ("ph", 1), ("turbidity_ntu", 1), ("flow_m3_h", -1)])
def test_injected_spike_is_detected_and_explained(fitted: SensorModel, metric: str, sign: int) -> None:
    X = normal_readings(50, seed=6)
    j = METRICS.index(metric)
    X[40, j] += sign * 8 * SIGMA[j]
    scores = live_scores(fitted, X, X[:5])
    assert scores[40] >= fitted.threshold_
    assert (scores[:40] < fitted.threshold_).all()
    base, _ = median_baselines(X, X[:5])
    explanation = fitted.explain(
        dict(zip(METRICS, X[40], strict=True)), dict(zip(METRICS, base[40], strict=True))
    )
    assert explanation[0][0] == metric
    assert explanation[0][1] == pytest.approx(X[40, j])
    assert explanation[0][2] == ("high" if sign > 0 else "low")


def test_severity_critical_far_past_threshold(fitted: SensorModel) -> None:
    assert fitted.severity(fitted.threshold_ - 1e-6) is None
    assert fitted.severity(fitted.threshold_) == "warning"
    assert fitted.severity(fitted.critical_threshold_) == "critical"
    X = normal_readings(10, seed=8)
    X[9, 2] -= 50 * SIGMA[2]  # pH far off
    score = live_scores(fitted, X, X[:5])[9]
    assert fitted.severity(float(score)) == "critical"


def test_missing_metrics_in_training_and_scoring() -> None:
    rows = as_dicts(normal_readings(400, seed=9))
    for i, r in enumerate(rows):
        if i % 3 == 0:
            del r["turbidity_ntu"]  # present in 2/3 of readings: kept
        if i % 4 != 0:
            del r["chlorine_mg_l"]  # present in 1/4: dropped (min_coverage 0.5)
    rows[0]["rare_metric"] = 1.0  # seen once: not part of the model
    m = SensorModel(random_state=0).fit(rows)
    assert m.metrics_ == ("flow_m3_h", "ph", "turbidity_ntu")
    scores = m.score([{"ph": 7.4}, {"flow_m3_h": 400.0, "unknown": 3.0}, {}])
    assert np.isfinite(scores).all()
    assert (scores < m.threshold_).all(), "a reading missing metrics is not an anomaly by itself"
    assert m.explain({"ph": 9.0})[0][:1] == ("ph",)


def test_constant_metric_in_training_then_moving_is_news() -> None:
    X = normal_readings(400, seed=10)
    X[:, 0] = 1.25
    m = SensorModel(random_state=0).fit_matrix(X, METRICS)
    assert m.fast_scale_[0] > 0
    row = X[-1].copy()
    row[0] = 1.5
    assert m.score(row[None, :], X[-1][None, :])[0] >= m.threshold_
    assert m.explain(dict(zip(METRICS, row, strict=True)), dict(zip(METRICS, X[-1], strict=True)))[0] == (
        "chlorine_mg_l",
        1.5,
        "high",
    )


def test_faults_in_the_training_window_do_not_widen_the_envelope() -> None:
    clean = normal_readings(1000, seed=11)
    dirty = clean.copy()
    dirty[::97, 2] += 40 * SIGMA[2]
    a = SensorModel(random_state=0).fit_matrix(clean, METRICS)
    b = SensorModel(random_state=0).fit_matrix(dirty, METRICS)
    assert b.feature_hi_[2] < 2 * a.feature_hi_[2]


def test_stuck_run_reflects_how_often_values_repeat() -> None:
    X = normal_readings(2000, seed=12)
    X[:, 2] = np.round(X[:, 2], 2)  # pH to 0.01 with sigma 0.02: repeats are common
    X[:, 3] = np.round(X[:, 3], 6)  # almost never repeats
    X[:, 0] = 0.0  # always repeats (a clipped value): never "stuck"
    m = SensorModel(random_state=0).fit_matrix(X, METRICS)
    runs = dict(zip(m.metrics_, m.stuck_run_.tolist(), strict=True))
    assert runs["chlorine_mg_l"] == 0
    assert runs["ph"] > runs["turbidity_ntu"] >= m.stuck_min_run


def test_saturation_values_are_learned() -> None:
    X = normal_readings(2000, seed=16)
    X[:, 0] = np.clip(
        np.random.default_rng(16).normal(0.02, 0.01, size=2000).round(3), 0.0, None
    )  # at 0: ~2 %
    m = SensorModel(random_state=0).fit_matrix(X, METRICS)
    assert m.saturated_lo_[0] == 0.0 and np.isnan(m.saturated_hi_[0])
    assert np.isnan(m.saturated_lo_[1:]).all() and np.isnan(m.saturated_hi_[1:]).all()
    again = SensorModel.from_bytes(m.to_bytes())
    np.testing.assert_array_equal(again.saturated_lo_, m.saturated_lo_)


def test_fit_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="at least"):
        SensorModel().fit_matrix(normal_readings(5, seed=0), METRICS)
    with pytest.raises(ValueError, match="shape"):
        SensorModel().fit_matrix(normal_readings(50, seed=0), METRICS[:2])
    bad = normal_readings(50, seed=0)
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="finite"):
        SensorModel().fit_matrix(bad, METRICS)


def test_persistence_round_trip_without_pickle(fitted: SensorModel) -> None:
    data = fitted.to_bytes()
    meta, arrays = model_mod.unpack_model(data)  # JSON and numeric arrays only
    assert meta["format_version"] == model_mod.FORMAT_VERSION
    assert all(a.dtype.kind in "biuf" for a in arrays.values())
    assert meta["versions"] == model_mod.library_versions()
    assert meta["model_version"] == fitted.model_version_
    loaded = SensorModel.from_bytes(data)
    assert loaded.estimator_ is None
    assert loaded.get_params() == fitted.get_params()
    assert loaded.metrics_ == fitted.metrics_ and loaded.threshold_ == fitted.threshold_
    X = normal_readings(200, seed=13)
    X[100, 1] += 30 * SIGMA[1]
    base = np.broadcast_to(fitted.center_, X.shape)
    np.testing.assert_array_equal(loaded.score(X, base), fitted.score(X, base))
    assert loaded.explain({"flow_m3_h": 500.0}) == fitted.explain({"flow_m3_h": 500.0})
    assert np.array_equal(loaded.stuck_run_, fitted.stuck_run_)


def test_version_mismatch_is_refused_unless_lenient(
    fitted: SensorModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = fitted.to_bytes()
    monkeypatch.setattr(model_mod, "library_versions", lambda: {"sklearn": "0.0.1", "numpy": np.__version__})
    with pytest.raises(ModelVersionMismatch) as info:
        SensorModel.from_bytes(data)
    assert info.value.saved["sklearn"] != "0.0.1"
    loaded = SensorModel.from_bytes(data, strict=False)
    assert "saved with" in caplog.text
    assert loaded.threshold_ == fitted.threshold_


def test_foreign_and_corrupt_bytes_are_refused(fitted: SensorModel) -> None:
    with pytest.raises(ModelFormatError):
        SensorModel.from_bytes(b"not a model")
    data = fitted.to_bytes()
    with pytest.raises(ModelFormatError, match="not a sensor model"):
        SensorModel.from_bytes(data[: len(data) // 2])  # truncated
    buf = io.BytesIO()
    np.savez(buf, meta_json=np.frombuffer(b'{"magic": "other"}', dtype=np.uint8))
    with pytest.raises(ModelFormatError, match="magic"):
        SensorModel.from_bytes(buf.getvalue())
    meta, arrays = model_mod.unpack_model(data)
    with pytest.raises(ModelFormatError, match="magic"):
        SensorModel.from_bytes(model_mod.pack_model({**meta, "magic": "other"}, arrays))
    # A newer format version is refused, not misread.
    with pytest.raises(ModelFormatError, match="format 99"):
        SensorModel.from_bytes(model_mod.pack_model({**meta, "format_version": 99}, arrays))
    # Shapes that disagree with the metrics are caught.
    with pytest.raises(ModelFormatError, match="shapes"):
        SensorModel.from_bytes(model_mod.pack_model({**meta, "metrics": meta["metrics"][:-1]}, arrays))
    # Only numeric arrays: an object array would be a way to smuggle pickles in.
    with pytest.raises(ModelFormatError, match="dtype"):
        SensorModel.from_bytes(model_mod.pack_model(meta, {**arrays, "center": np.array([None] * 3)}))


def test_format_1_models_still_load_and_score_the_same(fitted: SensorModel) -> None:
    # What registries written before format 2 hold: a compressed .npz with the metadata as a uint8 array.
    meta, arrays = model_mod.unpack_model(fitted.to_bytes())
    meta["format_version"] = 1
    buf = io.BytesIO()
    np.savez_compressed(
        buf, **arrays, meta_json=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    )
    loaded = SensorModel.from_bytes(buf.getvalue())
    X = normal_readings(200, seed=13)
    X[100, 1] += 30 * SIGMA[1]
    base = np.broadcast_to(fitted.center_, X.shape)
    np.testing.assert_array_equal(loaded.score(X, base), fitted.score(X, base))
    assert loaded.model_version_ == fitted.model_version_
    assert np.array_equal(loaded.stuck_run_, fitted.stuck_run_)


def test_helpers() -> None:
    assert robust_spread([1.0, 1.0, 1.0]) == pytest.approx(1e-3)
    assert robust_spread([0.0, 0.0]) == 1e-6
    assert robust_spread(np.random.default_rng(0).normal(size=20000)) == pytest.approx(1.0, rel=0.05)
    x = np.array([[1.0, np.nan], [np.nan, 2.0], [3.0, np.nan]])
    np.testing.assert_array_equal(forward_fill(x, np.array([0.0, 9.0])), [[1, 9], [1, 2], [3, 2]])
    v = np.random.default_rng(1).normal(size=(30, 2))
    before, after = ewma_baselines(v, 0.3, np.array([1.0, -1.0]))
    b = np.array([1.0, -1.0])
    for i in range(30):
        np.testing.assert_allclose(before[i], b)
        b = b + 0.3 * (v[i] - b)
    np.testing.assert_allclose(after, b)
    hist = np.array([[0.0], [10.0], [20.0]])
    med, new_hist = median_baselines(np.array([[30.0], [-5.0]]), hist)
    np.testing.assert_array_equal(med[:, 0], [10.0, 20.0])
    np.testing.assert_array_equal(new_hist[:, 0], [20.0, 30.0, -5.0])
