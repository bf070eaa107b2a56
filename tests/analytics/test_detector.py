"""DetectorBank / SensorDetector: warm-up, hard limits, refits without anomalies, baselines, contract output."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from analytics.detector import HARD_LIMITS, DetectorBank, DetectorConfig, SensorDetector, fit_model
from analytics.model import SensorModel
from handoff.models import Anomaly

LEVEL = {"ph": 7.4, "turbidity_ntu": 0.3, "chlorine_mg_l": 1.2, "flow_m3_h": 400.0}
NOISE = {"ph": 0.02, "turbidity_ntu": 0.01, "chlorine_mg_l": 0.02, "flow_m3_h": 4.0}
T0 = 1_767_225_600_000


def config(**kw: Any) -> DetectorConfig:
    base: dict[str, Any] = {
        "warmup": 200,
        "window": 1024,
        "refit_every": 512,
        "model_params": {"random_state": 0, "n_estimators": 50},
    }
    base.update(kw)
    return DetectorConfig(**base)


class Sensor:
    """A synthetic sensor: Gaussian noise around fixed levels, one reading every 10 s."""

    def __init__(self, seed: int = 0, site: str = "plant-1", sensor_id: str = "s-0001") -> None:
        self.rng = np.random.default_rng(seed)
        self.site, self.sensor_id = site, sensor_id
        self.seq = 0
        self.ts = T0

    def reading(self, **override: float) -> dict[str, Any]:
        metrics = {k: round(v + NOISE[k] * float(self.rng.normal()), 4) for k, v in LEVEL.items()}
        metrics.update(override)
        r = {
            "site": self.site,
            "sensor_id": self.sensor_id,
            "seq": self.seq,
            "ts_ms": self.ts,
            "received_ms": self.ts + 5,
            "metrics": metrics,
        }
        self.seq += 1
        self.ts += 10_000
        return r

    def readings(self, n: int) -> list[dict[str, Any]]:
        return [self.reading() for _ in range(n)]


def warmed_bank(sensor: Sensor, n: int = 600, **kw: Any) -> DetectorBank:
    bank = DetectorBank(config(**kw))
    for start in range(0, n, 50):
        assert bank.process(sensor.readings(min(50, n - start))) == []
        bank.refit_due_now()
    assert bank.sensor(sensor.site, sensor.sensor_id).model is not None
    return bank


def test_warmup_has_no_model_alerts_but_hard_limits_fire() -> None:
    s = Sensor()
    bank = DetectorBank(config())
    det = bank.sensor(s.site, s.sensor_id)
    batch = s.readings(150)
    batch[100]["metrics"]["ph"] = 11.0  # wildly off, but physically possible: no model yet, no alert
    batch[120]["metrics"]["ph"] = 14.5  # impossible
    batch[130]["metrics"]["turbidity_ntu"] = -0.2
    out = bank.process(batch)
    assert [(a["seq"], a["rule"], a["severity"]) for a in out] == [
        (120, "hard_limit", "critical"),
        (130, "hard_limit", "critical"),
    ]
    assert out[0]["explanation"] == [{"metric": "ph", "value": 14.5, "direction": "high"}]
    assert out[1]["explanation"] == [{"metric": "turbidity_ntu", "value": -0.2, "direction": "low"}]
    assert out[0]["score"] == 1.0 and out[0]["model_version"] == "plant-1:s-0001:0"
    assert det.model is None and not det.needs_refit  # 148 accepted < warmup 200
    assert det.n_buffered == 148  # the two impossible readings stay out of the training data
    bank.process(s.readings(60))
    assert det.needs_refit


@pytest.mark.parametrize(("metric", "limits"), sorted(HARD_LIMITS.items()))
def test_hard_limit_boundaries_are_inclusive(metric: str, limits: tuple[float | None, float | None]) -> None:
    s = Sensor()
    bank = DetectorBank(config())
    lo, hi = limits
    rows = []
    if lo is not None:
        rows += [s.reading(**{metric: lo}), s.reading(**{metric: lo - 0.01})]
    if hi is not None:
        rows += [s.reading(**{metric: hi}), s.reading(**{metric: hi + 0.01})]
    out = bank.process(rows)
    assert [a["seq"] for a in out] == [r["seq"] for r in rows[1::2]]
    assert all(a["severity"] == "critical" and a["explanation"][0]["metric"] == metric for a in out)


def test_spike_after_warmup_is_an_explained_model_anomaly_in_contract_form() -> None:
    s = Sensor(seed=1)
    bank = warmed_bank(s)
    batch = s.readings(20)
    batch[7]["metrics"]["ph"] = 6.9  # -25 sigma
    batch[12]["metrics"]["flow_m3_h"] = 460.0  # +15 sigma
    ids = [f"{T0 + i}-0" for i in range(len(batch))]
    out = bank.process(batch, detected_ms=T0 + 999, entry_ids=ids)
    assert [a["seq"] for a in out] == [batch[7]["seq"], batch[12]["seq"]]
    ph, flow = out
    assert ph["rule"] == "model" and ph["explanation"][0] == {
        "metric": "ph",
        "value": 6.9,
        "direction": "low",
    }
    assert flow["explanation"][0] == {"metric": "flow_m3_h", "value": 460.0, "direction": "high"}
    assert ph["score"] >= ph["threshold"] and ph["model_version"] == "plant-1:s-0001:2"
    assert ph["reading_entry_id"] == ids[7] and ph["detected_ms"] == T0 + 999
    assert ph["alert_id"] == f"plant-1:s-0001:{batch[7]['seq']}"
    for a in out:
        Anomaly.model_validate(a)  # contract section 3 (extra "rule" is an allowed addition)


def test_refit_leaves_detected_anomalies_out_of_the_training_window() -> None:
    s = Sensor(seed=2)
    bank = warmed_bank(s)
    det = bank.sensor(s.site, s.sensor_id)
    batch = s.readings(300)
    spikes = {50: 9.5, 120: 5.0, 200: 15.5}  # two model anomalies, one hard-limit violation
    for i, v in spikes.items():
        batch[i]["metrics"]["ph"] = v
    out = bank.process(batch)
    assert {a["seq"] for a in out} == {batch[i]["seq"] for i in spikes}
    window = det.training_window()
    col = window.metrics.index("ph")
    ph = window.values[:, col]
    assert window.values.shape[0] == det.n_buffered
    assert np.abs(ph - 7.4).max() < 0.2, "an anomalous value reached the training data"
    model = fit_model(window)
    assert model.model_version_ == f"plant-1:s-0001:{window.generation}"
    det.install(model)
    assert det.generation == window.generation


def test_a_fit_is_repeatable_and_each_sensor_generation_gets_its_own_trees() -> None:
    s = Sensor(seed=4)
    det = warmed_bank(s).sensor(s.site, s.sensor_id)
    seeded = det.training_window()  # this file's config pins random_state; the crew's does not
    window = dataclasses.replace(
        seeded, model_params={k: v for k, v in seeded.model_params.items() if k != "random_state"}
    )
    probe = [dict(LEVEL), {**LEVEL, "ph": 8.6}, {**LEVEL, "ph": 6.1, "chlorine_mg_l": 0.1}]
    first = fit_model(window).score(probe)
    again = fit_model(window).score(probe)
    assert np.array_equal(first, again)  # the same window, the same model: an alert can be explained later
    other = fit_model(dataclasses.replace(window, generation=window.generation + 1)).score(probe)
    assert not np.array_equal(first, other)  # another generation (or sensor): other trees
    # An explicit seed in the model parameters wins.
    pinned = dataclasses.replace(window, model_params={**window.model_params, "random_state": 7})
    moved = dataclasses.replace(pinned, generation=window.generation + 1)
    assert np.array_equal(fit_model(pinned).score(probe), fit_model(moved).score(probe))


def test_refit_schedule_and_in_flight_protocol() -> None:
    s = Sensor(seed=3)
    bank = DetectorBank(config(warmup=100, window=800, refit_every=300))
    det = bank.sensor(s.site, s.sensor_id)
    bank.process(s.readings(99))
    assert not det.needs_refit
    bank.process(s.readings(1))
    assert det.needs_refit
    window = det.training_window()
    assert window.values.shape == (100, 4) and window.generation == 1
    assert not det.needs_refit, "a fit in flight is not requested twice"
    bank.process(s.readings(150))
    assert not det.needs_refit
    det.install(det.fit_new_model(window))
    bank.process(s.readings(60))  # buffer 310 >= 2 x 100: early models are replaced soon
    assert det.needs_refit
    windows = bank.due_refits()
    assert [w.generation for w in windows] == [2]
    det.abandon_refit()
    assert not det.needs_refit  # fresh counter: the next try waits for refit_every more readings
    bank.process(s.readings(300))
    assert det.needs_refit
    assert bank.refit_due_now() == 1 and det.generation == 2
    bank.process(s.readings(800))  # the ring buffer wraps: window is the newest 800, oldest first
    w = det.training_window()
    assert w.values.shape[0] == 800


def test_batch_and_one_by_one_processing_agree() -> None:
    s = Sensor(seed=4)
    warm = s.readings(400)
    tail = s.readings(300)
    for i in (30, 31, 32, 90, 200):
        tail[i]["metrics"]["chlorine_mg_l"] = 2.5
    for i in range(150, 170):  # a level shift
        tail[i]["metrics"]["turbidity_ntu"] = 0.6
    results = []
    states = []
    for batch_size in (1, 2, 7, 300):
        bank = DetectorBank(config())
        bank.process(warm)
        bank.refit_due_now()
        got = []
        for k in range(0, len(tail), batch_size):
            got += bank.process(tail[k : k + batch_size])
        results.append([(a["seq"], a["rule"], a["score"]) for a in got])
        det = bank.sensor(s.site, s.sensor_id)
        states.append((det._hist.copy(), det._buffer.copy(), det._last.copy(), det._run.copy(), det._buf_pos))
    assert results[0] == results[1] == results[2] == results[3]
    # A few normal readings at a time take the compiled path; a batch with a flagged reading takes the general
    # one: same baselines, same training window, same stuck-run state.
    for other in states[1:]:
        for a, b in zip(states[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
    seqs = {seq for seq, _, _ in results[0]}
    assert {tail[i]["seq"] for i in (30, 31, 32, 90, 200)} <= seqs
    assert {tail[i]["seq"] for i in range(150, 170)} <= seqs, "a level shift alerts while it lasts"
    assert len(seqs) <= 5 + 20 + 2


def test_a_sensors_few_normal_readings_are_accepted_in_one_compiled_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import analytics.detector as detector_module

    s = Sensor(seed=8)
    bank = warmed_bank(s)
    det = bank.sensor(s.site, s.sensor_id)
    general: list[int] = []
    real = detector_module.segment_scores

    def spy(values: Any, *args: Any) -> Any:
        general.append(len(values))
        return real(values, *args)

    monkeypatch.setattr(detector_module, "segment_scores", spy)
    seen, pos = det.readings_seen, det._buf_pos
    for _ in range(20):  # a gateway's batch: two readings of this sensor at a time
        assert bank.process(s.readings(2)) == []
    assert general == []  # never the general path
    assert det.readings_seen == seen + 40 and det._buf_pos == (pos + 40) % det.config.window
    pair = s.readings(2)
    pair[1]["metrics"]["chlorine_mg_l"] = 2.5
    out = bank.process(pair)
    assert [a["seq"] for a in out] == [pair[1]["seq"]]  # flagged by the general path, which scored the pair
    assert general and general[0] == 2
    general.clear()
    too_many = s.readings(det.config.max_replay + 1)  # a backlog: the general path, in segments
    assert bank.process(too_many) == []
    assert general


def test_level_shift_that_persists_is_rebaselined() -> None:
    s = Sensor(seed=5)
    bank = warmed_bank(s, rebaseline_after=30)
    LEVEL["flow_m3_h"] = 480.0
    try:
        out = bank.process(s.readings(200))
    finally:
        LEVEL["flow_m3_h"] = 400.0
    assert 30 <= len(out) <= 32  # alerts until the new level is taken as normal


def test_end_of_a_followed_drift_costs_one_alert() -> None:
    s = Sensor(seed=6)
    bank = warmed_bank(s)
    # A slow upward drift the short-term baseline follows without alerting...
    drift = []
    for k in range(120):
        drift.append(s.reading(ph=round(7.4 + 0.004 * k + 0.02 * float(s.rng.normal()), 4)))
    assert bank.process(drift) == []
    # ...then the sensor snaps back into its normal range: one alert, confirmed by the next reading as a
    # recovery, and the baseline follows at once instead of alerting until rebaseline_after.
    assert len(bank.process(s.readings(100))) == 1


def test_shift_learned_during_warmup_costs_one_alert_when_it_ends() -> None:
    # The first model is trained on both levels, so its range cannot tell which one is normal; but the sensor
    # returns to a level it held within the hour, which the next reading confirms.
    s = Sensor(seed=14)
    bank = DetectorBank(config(rebaseline_after=25))
    rows = s.readings(260)
    for r in rows[150:]:
        r["metrics"]["ph"] = round(r["metrics"]["ph"] + 0.5, 4)  # during warm-up: accepted, even trained on
    for k in range(0, 260, 20):
        bank.process(rows[k : k + 20])
        bank.refit_due_now()
    assert bank.sensor(s.site, s.sensor_id).model is not None
    out = bank.process(s.readings(100))  # the shift ends
    assert len(out) == 1
    assert all(
        a["explanation"][0] == {"metric": "ph", "value": a["metrics"]["ph"], "direction": "low"} for a in out
    )


def test_a_long_fault_on_one_metric_does_not_freeze_the_others() -> None:
    s = Sensor(seed=15)
    bank = warmed_bank(s, rebaseline_after=500)
    rows = s.readings(60)
    for k, r in enumerate(rows):
        r["metrics"]["chlorine_mg_l"] = round(r["metrics"]["chlorine_mg_l"] + 0.6, 4)  # a 60-reading shift
        r["metrics"]["flow_m3_h"] = round(r["metrics"]["flow_m3_h"] + k * 0.8, 1)  # demand rising meanwhile
    out = bank.process(rows)
    assert len(out) == 60 and all(a["explanation"][0]["metric"] == "chlorine_mg_l" for a in out)
    after = s.readings(30)
    for r in after:
        r["metrics"]["flow_m3_h"] = round(r["metrics"]["flow_m3_h"] + 48.0, 1)  # demand stays up
    assert bank.process(after) == [], "flow kept its baseline moving while chlorine was faulty"


def test_jump_across_a_silence_is_not_an_anomaly() -> None:
    s = Sensor(seed=7)
    bank = warmed_bank(s)
    s.ts += 15 * 60_000  # 15 minutes silent, during which demand changed
    LEVEL["flow_m3_h"] = 430.0
    try:
        out = bank.process(s.readings(30))
    finally:
        LEVEL["flow_m3_h"] = 400.0
    assert out == []


def test_stuck_metric_raises_warnings() -> None:
    s = Sensor(seed=8)
    bank = warmed_bank(s)
    det = bank.sensor(s.site, s.sensor_id)
    assert det.model is not None
    need = int(det.model.stuck_run_[det.model.metrics_.index("flow_m3_h")])
    assert need >= 2
    out = bank.process([s.reading(flow_m3_h=401.25) for _ in range(need + 5)])
    assert [a["rule"] for a in out] == ["stuck"] * 6
    assert out[0]["seq"] == s.seq - 6
    assert out[0]["severity"] == "warning" and out[0]["explanation"][0]["metric"] == "flow_m3_h"


def test_a_run_at_a_floor_the_sensor_saturates_at_is_not_stuck() -> None:
    # Raw-water chlorine hovers near 0 mg/L and reads exactly 0 now and then: long runs of 0 are normal there.
    s = Sensor(seed=16)
    rng = np.random.default_rng(16)

    def low_chlorine() -> dict[str, Any]:
        return s.reading(chlorine_mg_l=max(0.0, round(float(rng.normal(0.02, 0.01)), 3)))

    bank = DetectorBank(config())
    for _ in range(12):
        bank.process([low_chlorine() for _ in range(50)])
        bank.refit_due_now()
    model = bank.sensor(s.site, s.sensor_id).model
    assert model is not None and model.saturated_lo_[model.metrics_.index("chlorine_mg_l")] == 0.0
    assert bank.process([s.reading(chlorine_mg_l=0.0) for _ in range(40)]) == []
    # Frozen anywhere else, it is stuck.
    out = bank.process([s.reading(chlorine_mg_l=0.031) for _ in range(40)])
    assert out and {a["rule"] for a in out} == {"stuck"}


def test_at_most_one_anomaly_per_reading_duplicates_and_stale_readings() -> None:
    s = Sensor(seed=9)
    bank = warmed_bank(s)
    det = bank.sensor(s.site, s.sensor_id)
    bad = s.reading(ph=-1.0)
    batch = [bad, dict(bad), *s.readings(5)]
    out = bank.process(batch)
    assert [a["alert_id"] for a in out] == [f"plant-1:s-0001:{bad['seq']}"]
    buffered = det.n_buffered
    # Redelivered (seq already seen): judged the same way, but not learned from again.
    again = bank.process([bad, batch[3]])
    assert [a["alert_id"] for a in again] == [out[0]["alert_id"]]
    assert det.n_buffered == buffered
    late_spike = dict(batch[4], metrics=dict(batch[4]["metrics"], ph=9.0))
    assert [a["rule"] for a in bank.process([late_spike])] == ["model"]


def test_sensors_are_independent_and_output_keeps_input_order() -> None:
    a, b = Sensor(seed=10, sensor_id="s-a"), Sensor(seed=11, sensor_id="s-b")
    bank = DetectorBank(config())
    mixed = [r for pair in zip(a.readings(300), b.readings(300), strict=True) for r in pair]
    bank.process(mixed)
    assert bank.refit_due_now() == 2
    rows = [a.reading(ph=20.0), b.reading(), b.reading(ph=-3.0), a.reading()]
    out = bank.process(rows)
    assert [(x["sensor_id"], x["seq"]) for x in out] == [("s-a", rows[0]["seq"]), ("s-b", rows[2]["seq"])]


def test_a_loaded_model_alerts_without_warmup() -> None:
    s = Sensor(seed=12)
    bank = warmed_bank(s)
    model = bank.sensor(s.site, s.sensor_id).model
    assert model is not None
    restored = SensorModel.from_bytes(model.to_bytes())
    fresh = SensorDetector(s.site, s.sensor_id, config())
    fresh.install(restored)
    assert fresh.generation == int(model.model_version_.rsplit(":", 1)[1]) and not fresh.needs_refit
    out = fresh.process([s.reading(), s.reading(), s.reading(ph=8.4)])
    assert [x["rule"] for _, x in out] == ["model"]


def test_missing_metrics_and_new_metric_names() -> None:
    s = Sensor(seed=13)
    bank = warmed_bank(s)
    rows = s.readings(10)
    del rows[3]["metrics"]["ph"]
    rows[4]["metrics"] = {"flow_m3_h": 400.0}
    rows[5]["metrics"]["orp_mv"] = 650.0  # a metric the model has never seen
    assert bank.process(rows) == []


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        DetectorConfig(warmup=500, window=100)


def _gap_rows_reference(det: SensorDetector, deltas: list[int], ts: list[int]) -> list[bool]:
    """The gap rule as first written: the median interval sorted afresh for every reading."""
    out = [False] * len(ts)
    prev = det._last_ts
    for i, t in enumerate(ts):
        if prev is not None:
            delta = t - prev
            if len(deltas) >= 8:
                typical = sorted(deltas)[len(deltas) // 2]
                out[i] = delta > det.config.gap_factor * max(typical, 1)
            if delta > 0 and not out[i]:
                deltas.append(delta)
                if len(deltas) > 32:
                    del deltas[0]
        prev = t if prev is None else max(prev, t)
    det._last_ts = prev
    return out


def test_the_gap_rule_keeps_its_median_interval_incrementally() -> None:
    rng = np.random.default_rng(3)
    fast, slow = SensorDetector("p", "s", config()), SensorDetector("p", "s", config())
    deltas: list[int] = []
    t = T0
    flagged = 0
    for _ in range(300):
        ts = []
        for _ in range(int(rng.integers(1, 6))):
            step = int(
                rng.choice([10_000, 10_000, 9_000, 12_000, 0, -5_000, 200_000])
            )  # repeats, late, silences
            t += step
            ts.append(t)
        got = fast._gap_rows(ts)
        assert got == _gap_rows_reference(slow, deltas, ts)
        flagged += sum(got)
        assert list(fast._deltas) == deltas and fast._deltas_sorted == sorted(deltas)
    assert 8 <= len(deltas) <= 32 and flagged > 10
