"""Garbage-collector hygiene of the crews: pauses measured, long-lived objects frozen."""

from __future__ import annotations

import gc
import logging

import pytest
from prometheus_client import REGISTRY

from handoff import metrics, runloop


def collections_timed(generation: int) -> float:
    value = REGISTRY.get_sample_value("wd_gc_pause_seconds_count", {"generation": str(generation)})
    return value or 0.0


def test_every_collection_is_timed_and_a_slow_one_logged(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics.watch_gc()
    metrics.watch_gc()  # idempotent: one callback
    before = collections_timed(2)
    gc.collect()
    assert collections_timed(2) == before + 1
    monkeypatch.setattr(metrics, "SLOW_GC_S", 0.0)
    with caplog.at_level(logging.INFO, logger="handoff.metrics"):
        gc.collect()
    assert any("garbage collection (generation 2) took" in r.message for r in caplog.records)


def test_freeze_long_lived_takes_objects_out_of_later_collections() -> None:
    held = [{"n": i} for i in range(10_000)]
    try:
        runloop.freeze_long_lived()
        assert gc.get_freeze_count() >= len(held)
        # A full collection no longer walks them: they are not among the objects it tracks.
        tracked = {id(o) for o in gc.get_objects()}
        assert not any(id(o) in tracked for o in held[:100])
    finally:
        gc.unfreeze()
