"""Compiled tree walks for :class:`analytics.forest.CompiledForest` (numba, ``nogil``).

The numpy walk of one row paid a dozen array calls per tree level (~25 us for 100 trees at depth 8, half the
analytics crew's time per live reading); these loops visit only the nodes on each row's path, all trees a level at
a time. They take the same
flat arrays the forest persists (see :mod:`analytics.forest` for both layouts) and return, per row, the sum over
trees of the leaf contributions, summed tree by tree in tree order.

Branching is sklearn's: ``x32 > threshold32`` goes right (thresholds are already rounded down to float32), and a
NaN goes right exactly where ``nan_right`` says so (sklearn's ``missing_go_to_left``, negated).

Every function has explicit signatures (a forest's arrays and the rows it walks are C-contiguous, which the
compiled loops rely on: ~20 % faster), so it is compiled (or loaded from numba's cache: ``__pycache__`` beside this
file, else ``NUMBA_CACHE_DIR``) when this module is imported, never in the middle of a batch; an argument of another
type is a TypeError, not a silent recompilation. First import on a machine: ~3 s; later ones ~0.1 s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np
from numba import njit
from numpy.typing import NDArray

__all__ = [
    "accept_if_normal",
    "complete_path_sums",
    "median_before",
    "place_complete_tree",
    "push_row",
    "push_rows",
    "segment_scores",
    "sparse_path_sums",
    "stuck_runs",
]

logger = logging.getLogger(__name__)


_F = TypeVar("_F", bound=Callable[..., Any])


def _compiled(signatures: str | list[str]) -> Callable[[_F], _F]:
    """``njit`` with these signatures, cached on disk when a writable cache folder exists, releasing the GIL."""

    def wrap(fn: _F) -> _F:
        try:
            return cast(_F, njit(signatures, cache=True, nogil=True)(fn))
        except RuntimeError:  # "cannot cache function": a read-only install and no writable NUMBA_CACHE_DIR
            logger.warning("no writable numba cache folder (set NUMBA_CACHE_DIR): compiling %s", fn.__name__)
            return cast(_F, njit(signatures, nogil=True)(fn))

    return wrap


#: Rows walked together by the complete-layout walk (measured on the 2-core EPYC, 100 trees, depth 8: 8 rows
#: give 252,000 rows/s in batches against 195,000 one row at a time).
_ROWS = 8
#: From this many rows on, the complete-layout walk goes tree by tree, _TREE_MAJOR_BLOCK rows at a time (measured on
#: the same EPYC, 8,640 rows of 7 features, 100 trees at depth 8: 37 ms level by level, 8.6 ms tree by tree).
_TREE_MAJOR_ROWS = 256
_TREE_MAJOR_BLOCK = 16


def _signatures(template: str) -> list[str]:
    """One signature per integer type a forest's ``feature`` array can have (see ``forest._index_dtype``)."""
    return [template.format(f=f) for f in ("u1", "u2", "u4")]


@_compiled(_signatures("f8[:](f4[:, ::1], {f}[::1], f4[::1], b1[::1], f8[::1], i8, i8)"))
def complete_path_sums(
    x: NDArray[np.float32],
    feature: NDArray[Any],
    threshold: NDArray[np.float32],
    nan_right: NDArray[np.bool_],
    leaf_value: NDArray[np.float64],
    n_trees: int,
    depth: int,
) -> NDArray[np.float64]:  # pragma: no cover - compiled; exercised through CompiledForest
    """Padded complete layout: level ``d`` holds ``n_trees * 2**d`` slots from ``n_trees * (2**d - 1)``, tree ``t``
    at ``t * 2**d`` of them, so position ``p`` moves to ``2 p`` or ``2 p + 1`` of the next level."""
    n = x.shape[0]
    out = np.empty(n, dtype=np.float64)
    # Level by level across all trees, not tree by tree: the loads of one level are independent, so the CPU
    # overlaps their cache misses (a forest is ~350 KB and a crew holds one per sensor: most loads of a lone
    # reading miss). Batches go _ROWS rows at a time, which also share the cache lines of each tree's top levels;
    # a row alone keeps the plainer loop (measured: 9.5 against 12 us per row with a cold cache).
    if n < _ROWS:
        one = np.empty(n_trees, dtype=np.intp)
        for r in range(n):
            for t in range(n_trees):
                one[t] = t
            for d in range(depth):
                start = n_trees * ((1 << d) - 1)
                for t in range(n_trees):
                    slot = start + one[t]
                    v = x[r, feature[slot]]
                    right = v > threshold[slot]
                    if v != v:
                        right = nan_right[slot]
                    one[t] = 2 * one[t] + np.intp(right)
            total = 0.0
            for t in range(n_trees):
                total += leaf_value[one[t]]
            out[r] = total
        return out
    if n >= _TREE_MAJOR_ROWS:
        # Many rows (a training window, when a fit sets its threshold): tree by tree, so each tree stays in the
        # L1 cache while every row walks it, _TREE_MAJOR_BLOCK rows at a time. Each row still adds the trees' values in tree
        # order, starting from 0.0: the same sums, bit for bit, as the loops below.
        out[:] = 0.0
        walk = np.empty(_TREE_MAJOR_BLOCK, dtype=np.intp)
        for t in range(n_trees):
            for r0 in range(0, n, _TREE_MAJOR_BLOCK):
                nb = min(_TREE_MAJOR_BLOCK, n - r0)
                for b in range(nb):
                    walk[b] = t
                for d in range(depth):
                    start = n_trees * ((1 << d) - 1)
                    for b in range(nb):
                        slot = start + walk[b]
                        v = x[r0 + b, feature[slot]]
                        right = v > threshold[slot]
                        if v != v:
                            right = nan_right[slot]
                        walk[b] = 2 * walk[b] + np.intp(right)
                for b in range(nb):
                    out[r0 + b] += leaf_value[walk[b]]
        return out
    pos = np.empty((n_trees, _ROWS), dtype=np.intp)
    for r0 in range(0, n, _ROWS):
        nb = min(_ROWS, n - r0)
        for t in range(n_trees):
            for b in range(nb):
                pos[t, b] = t
        for d in range(depth):
            start = n_trees * ((1 << d) - 1)
            for t in range(n_trees):
                for b in range(nb):
                    slot = start + pos[t, b]
                    v = x[r0 + b, feature[slot]]
                    right = v > threshold[slot]
                    if v != v:
                        right = nan_right[slot]
                    pos[t, b] = 2 * pos[t, b] + np.intp(right)
        for b in range(nb):
            total = 0.0
            for t in range(n_trees):
                total += leaf_value[pos[t, b]]
            out[r0 + b] = total
    return out


@_compiled(_signatures("f8[:](f4[:, ::1], {f}[::1], f4[::1], b1[::1], f8[::1], intp[::1], intp[::1], i8)"))
def sparse_path_sums(
    x: NDArray[np.float32],
    feature: NDArray[Any],
    threshold: NDArray[np.float32],
    nan_right: NDArray[np.bool_],
    leaf_value: NDArray[np.float64],
    base: NDArray[np.intp],
    roots: NDArray[np.intp],
    depth: int,
) -> NDArray[np.float64]:  # pragma: no cover - compiled; exercised through CompiledForest
    """Sparse layout: children of ``i`` at ``base[i]`` (left) and ``base[i] + 1``; a leaf's ``base`` is itself."""
    n = x.shape[0]
    n_trees = roots.shape[0]
    out = np.empty(n, dtype=np.float64)
    pos = np.empty(n_trees, dtype=np.intp)
    for r in range(n):
        row = x[r]
        for t in range(n_trees):
            pos[t] = roots[t]
        for _ in range(depth):
            for t in range(n_trees):
                node = pos[t]
                child = base[node]
                if child != node:
                    v = row[feature[node]]
                    right = v > threshold[node]
                    if v != v:
                        right = nan_right[node]
                    pos[t] = child + np.intp(right)
        total = 0.0
        for t in range(n_trees):
            total += leaf_value[pos[t]]
        out[r] = total
    return out


@_compiled(
    "void(i8[:], i8[:], i8[:], f4[:], u1[:], f8[:], i8[:], i8, i8, i8, i8[::1], f4[::1], b1[::1], f8[::1])"
)
def place_complete_tree(
    left: NDArray[np.int64],
    right: NDArray[np.int64],
    feat: NDArray[np.int64],
    thr32: NDArray[np.float32],
    go_left: NDArray[np.uint8],
    path_length: NDArray[np.float64],
    feature_map: NDArray[np.int64],
    tree: int,
    n_trees: int,
    depth: int,
    feature: NDArray[np.int64],
    threshold: NDArray[np.float32],
    nan_right: NDArray[np.bool_],
    leaf_value: NDArray[np.float64],
) -> None:  # pragma: no cover - compiled; exercised through CompiledForest.from_sklearn
    """Write one fitted sklearn tree (its node arrays; ``path_length``: ``c(n_node_samples)`` per node) into the
    complete layout's arrays as tree number ``tree``: a split at level ``d`` and position ``p`` goes to slot
    ``n_trees * (2**d - 1) + tree * 2**d + p``; a leaf above ``depth`` fills every leaf slot below it with its
    contribution ``depth(leaf) + c(n_node_samples) - 1`` (sklearn's expression, the root at depth 1)."""
    stack = np.empty((2 * depth + 2, 3), dtype=np.int64)  # (node, level, position within the level)
    stack[0, 0] = 0
    stack[0, 1] = 0
    stack[0, 2] = 0
    top = 1
    while top > 0:
        top -= 1
        node = stack[top, 0]
        level = stack[top, 1]
        p = stack[top, 2]
        if left[node] == -1:  # sklearn's TREE_LEAF
            span = 1 << (depth - level)
            first = (tree << depth) + p * span
            value = (level + 1) + path_length[node] - 1.0
            for q in range(span):
                leaf_value[first + q] = value
            continue
        slot = n_trees * ((1 << level) - 1) + (tree << level) + p
        feature[slot] = feature_map[feat[node]]
        threshold[slot] = thr32[node]
        nan_right[slot] = go_left[node] == 0
        stack[top, 0] = left[node]
        stack[top, 1] = level + 1
        stack[top, 2] = 2 * p
        stack[top + 1, 0] = right[node]
        stack[top + 1, 1] = level + 1
        stack[top + 1, 2] = 2 * p + 1
        top += 2


@_compiled("i8[:, :](f8[:, :], f8[:], i8[:])")
def stuck_runs(
    values: NDArray[np.float64], last: NDArray[np.float64], run: NDArray[np.int64]
) -> NDArray[np.int64]:  # pragma: no cover - compiled; exercised through SensorDetector
    """Per row and column, the length of the run of identical values it ends (continuing ``last``/``run``, which
    are updated in place); a missing (NaN) value keeps the run as it was."""
    n, w = values.shape
    out = np.empty((n, w), dtype=np.int64)
    for i in range(n):
        for c in range(w):
            v = values[i, c]
            if v == v:
                run[c] = run[c] + 1 if v == last[c] else 1
                last[c] = v
            out[i, c] = run[c]
    return out


@njit(nogil=True)
def _insert(window: NDArray[np.float64], count: int, v: float) -> None:  # pragma: no cover - compiled
    """Insert ``v`` into the sorted ``window[:count]`` (insertion sort: a median window is a handful of values).
    Compiled into its callers (no signature of its own)."""
    j = count
    while j > 0 and window[j - 1] > v:
        window[j] = window[j - 1]
        j -= 1
    window[j] = v


@njit(nogil=True)
def _middle(window: NDArray[np.float64], h: int) -> float:  # pragma: no cover - compiled
    """The median of the sorted ``window[:h]``: the mean of the two middle values when ``h`` is even."""
    mid = h // 2
    return float(window[mid]) if h % 2 else float((window[mid - 1] + window[mid]) / 2.0)


@_compiled("void(f8[:, :], f8[:])")
def push_row(hist: NDArray[np.float64], row: NDArray[np.float64]) -> None:  # pragma: no cover - compiled
    """Append ``row`` to a baseline history in place, dropping its oldest row: a missing (NaN) metric repeats its
    last value, and a metric's first value fills its whole column."""
    n_hist = hist.shape[0]
    for c in range(row.shape[0]):
        v = row[c]
        last = hist[n_hist - 1, c]
        if v != v:
            v = last
        for i in range(n_hist - 1):
            hist[i, c] = hist[i + 1, c]
        hist[n_hist - 1, c] = v
        if last != last and v == v:
            for i in range(n_hist - 1):
                hist[i, c] = v


@_compiled("void(f8[:, :], f8[:, :])")
def push_rows(hist: NDArray[np.float64], rows: NDArray[np.float64]) -> None:  # pragma: no cover - compiled
    """:func:`push_row` for each row of ``rows`` in order (several accepted readings of one sensor at once)."""
    for r in range(rows.shape[0]):
        push_row(hist, rows[r])


@_compiled("f8[:, :](f8[:, :], f8[:, :])")
def median_before(
    values: NDArray[np.float64], history: NDArray[np.float64]
) -> NDArray[np.float64]:  # pragma: no cover - compiled; exercised through median_baselines
    """Per row of ``values`` and column, the median of the ``h`` rows before it in ``history`` then ``values``
    (``h`` = rows of ``history``); no NaN anywhere. The mean of the two middle values when ``h`` is even."""
    n, k = values.shape
    h = history.shape[0]
    out = np.empty((n, k), dtype=np.float64)
    window = np.empty(h, dtype=np.float64)
    for c in range(k):
        for i in range(n):
            for q in range(h):
                r = i + q
                _insert(window, q, history[r, c] if r < h else values[r - h, c])
            out[i, c] = _middle(window, h)
    return out


@_compiled(
    _signatures(
        "Tuple((f8[:, :], f8[:, :], f8[:]))(f8[:, :], f8[:, :], f8[:, :], {f}[::1], f4[::1], b1[::1], f8[::1], i8, i8, f8, f8)"
    )
)
def segment_scores(
    values: NDArray[np.float64],
    history: NDArray[np.float64],
    limits: NDArray[np.float64],
    feature: NDArray[Any],
    threshold: NDArray[np.float32],
    nan_right: NDArray[np.bool_],
    leaf_value: NDArray[np.float64],
    n_trees: int,
    depth: int,
    denominator: float,
    envelope_scale: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:  # pragma: no cover - compiled
    """Baselines, features and scores of a run of a sensor's readings as if each were accepted (the detector's
    general path, for models with fast features only): ``(fast_base, Z, scores)``.

    ``values``: the model metrics of the run (NaN = missing: forward-filled for the baselines, residual 0);
    ``history``: the ``h`` accepted rows before it (NaN = a metric never accepted: it starts at its first value
    here); ``limits``: as for :func:`accept_if_normal`.
    """
    n, k = values.shape
    h = history.shape[0]
    filled = np.empty((n, k), dtype=np.float64)
    for c in range(k):
        prev = history[h - 1, c]
        if prev != prev:
            prev = limits[6, c]
        for i in range(n):
            v = values[i, c]
            if v != v:
                v = prev
            filled[i, c] = v
            prev = v
    start = np.empty((h, k), dtype=np.float64)
    for q in range(h):
        for c in range(k):
            v = history[q, c]
            start[q, c] = filled[0, c] if v != v else v
    base = median_before(filled, start)
    Z = np.empty((n, k), dtype=np.float64)
    z32 = np.empty((n, k), dtype=np.float32)
    excess = np.zeros(n, dtype=np.float64)
    for i in range(n):
        for c in range(k):
            z = (values[i, c] - base[i, c]) / limits[3, c]
            if z != z:
                z = 0.0
            Z[i, c] = z
            z32[i, c] = z
            excess[i] = max(excess[i], z - limits[5, c], limits[4, c] - z)
    scores = np.empty(n, dtype=np.float64)
    sums = complete_path_sums(z32, feature, threshold, nan_right, leaf_value, n_trees, depth)
    for i in range(n):
        s = 0.5 if denominator == 0.0 else 2.0 ** -(sums[i] / denominator)
        scores[i] = s + (1.0 - s) * -math.expm1(-excess[i] / envelope_scale)
    return base, Z, scores


@_compiled(
    _signatures(
        "b1(f8[:, :], i8[:, :], intp[:], f8[:, :], i8, f8[:, :], {f}[::1], f4[::1], b1[::1], f8[::1], i8, i8, f8, f8, f8, f4[:, :], i8)"
    )
)
def accept_if_normal(
    rows: NDArray[np.float64],
    runs: NDArray[np.int64],
    cols: NDArray[np.intp],
    hist: NDArray[np.float64],
    h: int,
    limits: NDArray[np.float64],
    feature: NDArray[Any],
    threshold: NDArray[np.float32],
    nan_right: NDArray[np.bool_],
    leaf_value: NDArray[np.float64],
    n_trees: int,
    depth: int,
    denominator: float,
    envelope_scale: float,
    score_threshold: float,
    buffer: NDArray[np.float32],
    buf_pos: int,
) -> bool:  # pragma: no cover - compiled; exercised through SensorDetector
    """Live readings of one sensor, in ``seq`` order, whose model uses only fast features (complete forest
    layout): if every one is plainly normal, accept them all (ring buffer rows from ``buf_pos``, wrapping; the
    baseline history shifted by one per row) and return True. Each row is scored against the baseline of the
    accepted rows before it, those of this call included: exactly what the general path computes for them.

    False, with nothing changed, when any row needs the general path: a missing value here or in the baseline, a
    stuck metric, or a score at or over ``score_threshold``. ``limits`` rows, per model metric: stuck run length,
    saturation floor, saturation ceiling, residual scale, training low - guard, training high + guard, training
    median (see ``SensorModel.compiled_args_``).
    """
    n = rows.shape[0]
    k = cols.shape[0]
    n_hist = hist.shape[0]
    total = 0.0
    for c in range(k):
        total += hist[n_hist - 1, cols[c]]
    for i in range(n):
        for c in range(k):
            total += rows[i, cols[c]]
    if total != total:  # a NaN (missing value) somewhere
        return False
    for i in range(n):
        for c in range(k):
            x = rows[i, cols[c]]
            if runs[i, cols[c]] >= limits[0, c] and x != limits[1, c] and x != limits[2, c]:
                return False
    # Residuals from the median of the h accepted readings before each row: the history's last h rows, then
    # this call's earlier rows.
    z = np.empty((n, k), dtype=np.float32)
    over = np.zeros(n, dtype=np.float64)
    window = np.empty(h, dtype=np.float64)
    for c in range(k):
        col = cols[c]
        for i in range(n):
            for q in range(h):
                r = i + q
                _insert(window, q, hist[n_hist - h + r, col] if r < h else rows[r - h, col])
            zc = (rows[i, col] - _middle(window, h)) / limits[3, c]
            z[i, c] = zc
            over[i] = max(over[i], zc - limits[5, c], limits[4, c] - zc)
    sums = complete_path_sums(z, feature, threshold, nan_right, leaf_value, n_trees, depth)
    for i in range(n):
        score = 0.5 if denominator == 0.0 else 2.0 ** -(sums[i] / denominator)
        if over[i] > 0.0:
            score = score + (1.0 - score) * -math.expm1(-over[i] / envelope_scale)
        if score >= score_threshold:
            return False
    # Accept: ring buffer, then the baseline history moves up one row per reading.
    cap = buffer.shape[0]
    for i in range(n):
        p = (buf_pos + i) % cap
        for c in range(rows.shape[1]):
            buffer[p, c] = rows[i, c]
        push_row(hist, rows[i])
    return True
