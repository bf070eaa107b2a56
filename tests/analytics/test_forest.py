"""The compiled scorer equals ``-IsolationForest.score_samples`` on every kind of forest and input we can think of."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray
from sklearn.ensemble import IsolationForest

from analytics.forest import CompiledForest, average_path_length

TOL = 1e-9
LAYOUTS = ["complete", "sparse"]


def reference(est: IsolationForest, X: NDArray[Any]) -> NDArray[np.float64]:
    """sklearn's score with our sign (higher = more anomalous); huge values overflow to inf in its float32 cast."""
    with np.errstate(over="ignore"):
        return -np.asarray(est.score_samples(X), dtype=np.float64)


def assert_equal_scores(est: IsolationForest, X: NDArray[Any], **compile_kw: Any) -> CompiledForest:
    forest = CompiledForest.from_sklearn(est, **compile_kw)
    expected = reference(est, X)
    got = forest.score(X)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
    # The single-row path must agree with the batch path, row by row.
    for i in range(min(len(X), 25)):
        assert abs(forest.score_one(X[i]) - expected[i]) <= TOL
    return forest


def gaussian(n: int, d: int, seed: int) -> NDArray[np.float64]:
    return np.random.default_rng(seed).normal(size=(n, d))


CONFIGS: list[dict[str, Any]] = [
    {},
    {"max_features": 0.5},
    {"max_features": 0.3, "bootstrap": True},
    {"max_features": 1},
    {"max_features": 3},
    {"bootstrap": True},
    {"max_samples": 64},
    {"max_samples": 1000},
    {"max_samples": 0.25},
    {"max_samples": 1.0, "bootstrap": True, "max_features": 0.6},
    {"max_samples": 1},
    {"max_samples": 2},
    {"n_estimators": 1},
    {"n_estimators": 13, "contamination": 0.05},
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"
)
def test_equals_sklearn_on_random_inputs(config: dict[str, Any], layout: str) -> None:
    X_train = gaussian(1500, 5, seed=1)
    est = IsolationForest(random_state=7, **config).fit(X_train)
    X = np.vstack([gaussian(800, 5, seed=2) * 3.0, X_train[:200]])
    assert_equal_scores(est, X, layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_exactly_on_thresholds_and_their_float_neighbours(layout: str) -> None:
    """Every threshold (and the next float32/float64 up and down) as an input value: the <= vs < edge."""
    X_train = gaussian(600, 3, seed=3)
    est = IsolationForest(n_estimators=20, random_state=3, max_features=0.7).fit(X_train)
    values: list[float] = []
    for tree in est.estimators_:
        s = tree.tree_
        for node in np.flatnonzero(s.children_left != -1)[:15]:
            thr = float(s.threshold[node])
            t32 = np.float32(thr)
            values += [
                thr,
                float(t32),
                float(np.nextafter(t32, np.float32(np.inf))),
                float(np.nextafter(t32, np.float32(-np.inf))),
                float(np.nextafter(thr, np.inf)),
                float(np.nextafter(thr, -np.inf)),
            ]
    v = np.array(values)
    rng = np.random.default_rng(4)
    # Put each candidate value into every column, with the others drawn from training rows.
    rows = []
    for col in range(3):
        block = X_train[rng.integers(0, len(X_train), size=len(v))].copy()
        block[:, col] = v
        rows.append(block)
    X = np.vstack(rows)
    assert_equal_scores(est, X, layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_extreme_values_infinities_zeros_and_nan(layout: str) -> None:
    X_train = gaussian(500, 4, seed=5)
    est = IsolationForest(n_estimators=30, random_state=5).fit(X_train)
    specials = np.array(
        [
            0.0,
            -0.0,
            1e-45,
            -1e-45,
            5e-324,
            1e-300,
            3.4e38,
            3.5e38,
            1e300,
            -1e300,
            np.inf,
            -np.inf,
            np.nan,
            1e6,
        ]
    )
    rng = np.random.default_rng(6)
    X = rng.choice(specials, size=(600, 4))
    X[:100] = X_train[:100]
    X[100:200, 0] = np.nan  # one missing feature: sklearn's per-node missing_go_to_left decides
    X[200:210] = np.nan  # every feature missing
    assert_equal_scores(est, X, layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_constant_and_integer_columns(layout: str) -> None:
    rng = np.random.default_rng(8)
    X_train = np.column_stack(
        [np.full(400, 7.25), rng.normal(size=400), rng.integers(0, 3, size=400).astype(float), np.zeros(400)]
    )
    est = IsolationForest(n_estimators=40, random_state=8, max_features=0.5).fit(X_train)
    X = np.vstack(
        [
            X_train[:50],
            np.column_stack([np.full(50, 7.25), rng.normal(size=50), np.full(50, 1.0), np.full(50, 1e9)]),
            np.column_stack([np.full(50, -7.25), rng.normal(size=50) * 10, np.full(50, 2.0), np.zeros(50)]),
        ]
    )
    assert_equal_scores(est, X, layout=layout)
    # Integer and float32 input take the same cast as sklearn.
    assert_equal_scores(est, X.astype(np.float32), layout=layout)
    assert_equal_scores(est, np.rint(X[:, :]).clip(-100, 100).astype(np.int64), layout=layout)


def test_all_constant_training_data_gives_single_leaf_trees() -> None:
    est = IsolationForest(n_estimators=10, random_state=0).fit(np.ones((300, 2)))
    forest = assert_equal_scores(est, np.array([[1.0, 1.0], [5.0, -5.0], [np.nan, 1.0]]))
    assert forest.depth == 0


def test_warm_start_grown_forest() -> None:
    X_train = gaussian(700, 3, seed=9)
    est = IsolationForest(n_estimators=10, random_state=9, warm_start=True, max_features=0.67).fit(X_train)
    est.set_params(n_estimators=25)
    est.fit(X_train)
    assert_equal_scores(est, gaussian(300, 3, seed=10) * 2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 127, 128, 129, 300])
def test_batch_sizes(layout: str, n: int) -> None:
    X_train = gaussian(400, 3, seed=11)
    est = IsolationForest(n_estimators=16, random_state=11).fit(X_train)
    forest = CompiledForest.from_sklearn(est, layout=layout)
    X = gaussian(n, 3, seed=n) * 2
    X[::5, 2] = np.nan
    np.testing.assert_allclose(forest.score(X), reference(est, X), rtol=0, atol=TOL)


def test_auto_layout_switches_to_sparse_over_budget() -> None:
    est = IsolationForest(n_estimators=8, random_state=0).fit(gaussian(300, 2, seed=0))
    assert CompiledForest.from_sklearn(est).layout == "complete"
    sparse = CompiledForest.from_sklearn(est, complete_budget=16)
    assert sparse.layout == "sparse"
    X = gaussian(100, 2, seed=1)
    np.testing.assert_allclose(sparse.score(X), reference(est, X), rtol=0, atol=TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_arrays_round_trip(layout: str) -> None:
    est = IsolationForest(n_estimators=12, random_state=2, max_features=0.5).fit(gaussian(500, 4, seed=2))
    forest = CompiledForest.from_sklearn(est, layout=layout)
    arrays, meta = forest.to_arrays()
    assert all(a.dtype != object for a in arrays.values())
    again = CompiledForest.from_arrays(arrays, meta)
    X = gaussian(200, 4, seed=3)
    np.testing.assert_array_equal(again.score(X), forest.score(X))


def test_bad_input_shapes_and_corrupt_arrays_are_refused() -> None:
    est = IsolationForest(n_estimators=4, random_state=0).fit(gaussian(100, 3, seed=0))
    forest = CompiledForest.from_sklearn(est)
    with pytest.raises(ValueError, match="shape"):
        forest.score(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="shape"):
        forest.score(np.zeros(3))
    with pytest.raises(TypeError):
        forest.score(np.array([["a", "b", "c"]]))
    assert forest.score(np.zeros((0, 3))).shape == (0,)
    arrays, meta = forest.to_arrays()
    arrays["feature"] = arrays["feature"].copy()
    arrays["feature"][0] = 3
    with pytest.raises(ValueError, match="feature index"):
        CompiledForest.from_arrays(arrays, meta)
    arrays["feature"][0] = 0
    with pytest.raises(ValueError, match="do not match"):
        CompiledForest.from_arrays(arrays, {**meta, "depth": meta["depth"] + 1})
    with pytest.raises(ValueError, match="not a fitted"):
        CompiledForest.from_sklearn(IsolationForest())


def test_average_path_length_matches_formula() -> None:
    n = np.array([0, 1, 2, 3, 256])
    c = average_path_length(n)
    assert c[0] == 0 and c[1] == 0 and c[2] == 1
    assert c[3] == pytest.approx(2 * (np.log(2) + np.euler_gamma) - 2 * 2 / 3)
    assert c[4] == pytest.approx(2 * (np.log(255) + np.euler_gamma) - 2 * 255 / 256)


finite_or_special = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.floats(min_value=-5, max_value=5),
    st.sampled_from([0.0, -0.0, 1e38, 4e38, -4e38, 1e-40]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    n_features=st.integers(1, 6),
    n_train=st.integers(2, 400),
    n_estimators=st.integers(1, 12),
    max_features=st.floats(0.1, 1.0),
    bootstrap=st.booleans(),
    max_samples=st.one_of(st.just("auto"), st.floats(0.05, 1.0), st.integers(1, 64)),
    layout=st.sampled_from(LAYOUTS),
    data=st.data(),
)
def test_property_equals_sklearn(
    seed: int,
    n_features: int,
    n_train: int,
    n_estimators: int,
    max_features: float,
    bootstrap: bool,
    max_samples: Any,
    layout: str,
    data: st.DataObject,
) -> None:
    rng = np.random.default_rng(seed)
    # Mix scales and repeated values so ties and constant columns occur.
    X_train = rng.normal(size=(n_train, n_features)) * rng.choice([1e-3, 1.0, 1e4], size=n_features)
    X_train[:, 0] = np.round(X_train[:, 0])
    if isinstance(max_samples, int):
        max_samples = min(max_samples, n_train)  # larger is a sklearn warning, not what we test
    if isinstance(max_samples, float) and int(max_samples * n_train) < 1:
        max_samples = 1
    est = IsolationForest(
        n_estimators=n_estimators,
        max_features=max_features,
        bootstrap=bootstrap,
        max_samples=max_samples,
        random_state=seed,
    ).fit(X_train)
    X = data.draw(
        hnp.arrays(np.float64, st.tuples(st.integers(1, 40), st.just(n_features)), elements=finite_or_special)
    )
    X = np.vstack([X, X_train[:5]])
    forest = CompiledForest.from_sklearn(est, layout=layout)
    np.testing.assert_allclose(forest.score(X), reference(est, X), rtol=0, atol=TOL)
    assert abs(forest.score_one(X[0]) - reference(est, X[:1])[0]) <= TOL


def test_a_training_window_scored_at_once_equals_scoring_it_in_small_batches() -> None:
    """From 256 rows the complete layout is walked tree by tree: the sums must be the same, bit for bit."""
    X_train = gaussian(2000, 6, seed=21)
    est = IsolationForest(n_estimators=100, random_state=21).fit(X_train)
    forest = CompiledForest.from_sklearn(est, layout="complete")
    X = np.vstack([X_train, gaussian(500, 6, seed=22) * 4])
    X[::7, 3] = np.nan
    X[::11, 0] = np.inf
    whole = forest.score(X)
    pieces = np.concatenate([forest.score(X[i : i + 7]) for i in range(0, len(X), 7)])
    np.testing.assert_array_equal(whole, pieces)
    np.testing.assert_allclose(whole, reference(est, X), rtol=0, atol=TOL)
