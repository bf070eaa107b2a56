"""The fleet model: reproducible, contract-valid, labelled at the configured rate, physically sensible."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict

import numpy as np
import pytest

from handoff.models import GatewayBatch, SensorReading
from simulators.fleet import (
    ANOMALY_CLASSES,
    METRICS,
    PHYSICAL_LIMITS,
    Fleet,
    LabelledReading,
    ReadingBatch,
    format_ts,
)
from simulators.publisher import encode_batch, encode_reading

DAY_S = 86_400


def _day(seed: int = 11, **kw: object) -> Fleet:
    params: dict[str, object] = {"sites": 4, "sensors_per_site": 10, "interval_s": 20.0, "anomaly_rate": 0.02}
    params.update(kw)
    return Fleet(seed=seed, **params)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def day() -> tuple[Fleet, list[LabelledReading]]:
    fleet = _day()
    return fleet, fleet.simulate(DAY_S)


def _outside(metric: str, value: float) -> bool:
    lo, hi = PHYSICAL_LIMITS[metric]
    return value < lo or value > hi


def test_same_seed_same_readings_and_labels(day: tuple[Fleet, list[LabelledReading]]) -> None:
    fleet, readings = day
    again = _day()
    # Time sliced differently (odd chunks) must not change a single reading, label or emission order.
    assert again.simulate(DAY_S, chunk_s=777.7) == readings
    assert again.ground_truth == fleet.ground_truth
    assert again.episodes == fleet.episodes
    assert again.quirks == fleet.quirks
    assert len(readings) > 150_000


def test_different_seed_differs(day: tuple[Fleet, list[LabelledReading]]) -> None:
    _, readings = day
    other = _day(seed=12).simulate(DAY_S)
    assert [r.metrics for r in other[:100]] != [r.metrics for r in readings[:100]]
    assert {r.key for r in other if r.label} != {r.key for r in readings if r.label}


def test_arrays_and_objects_agree() -> None:
    a = _day(seed=5).simulate_arrays(3600)
    b = _day(seed=5).simulate(3600)
    assert a.to_readings() == b
    assert np.array_equal(a.column("ph"), np.array([r.metrics["ph"] for r in b]))


def test_every_payload_is_a_contract_reading(day: tuple[Fleet, list[LabelledReading]]) -> None:
    _, readings = day
    for r in readings[:: max(1, len(readings) // 5000)]:
        topic, payload = encode_reading(r)
        model = SensorReading.model_validate_json(payload)
        assert topic == f"wd/{model.site}/{model.sensor_id}/telemetry"
        assert (model.site, model.sensor_id, model.seq) == r.key
        assert set(model.metrics) == set(METRICS)
        assert "label" not in payload.decode() and "emit" not in payload.decode()


def test_gateway_batches_are_contract_batches(day: tuple[Fleet, list[LabelledReading]]) -> None:
    _, readings = day
    groups: dict[tuple[str, str], list[LabelledReading]] = defaultdict(list)
    for r in readings[:20_000]:
        groups[(r.site, r.gateway_id)].append(r)
    for (site, gateway), rs in groups.items():
        for i in range(0, len(rs), 1000):
            topic, payload = encode_batch(site, gateway, rs[i : i + 1000])
            assert len(payload) <= 512 * 1024
            batch = GatewayBatch.model_validate_json(payload)
            assert topic == f"wd/{site}/{gateway}/batch"
            assert batch.gateway_id == gateway
            assert {x.site for x in batch.readings} == {site}


def test_ts_is_rfc3339_with_milliseconds() -> None:
    assert format_ts(1_764_572_400_123) == "2025-12-01T07:00:00.123Z"
    assert format_ts(1_764_572_400_000) == "2025-12-01T07:00:00.000Z"


def test_anomalies_of_every_class_at_about_the_configured_rate(
    day: tuple[Fleet, list[LabelledReading]],
) -> None:
    fleet, readings = day
    originals = [r for r in readings if not r.repeat]
    labelled = Counter(r.label for r in originals if r.label is not None)
    share = sum(labelled.values()) / len(originals)
    assert 0.012 < share < 0.03, share  # configured 0.02
    for cls in ANOMALY_CLASSES:
        # Equal shares by default: each class near a fifth of the labelled readings.
        # Long episodes (drift, stuck, level shift) come in few, so their share varies more.
        assert 0.05 < labelled[cls] / sum(labelled.values()) < 0.5, (cls, labelled)
        assert fleet.labelled_episodes(cls)
    assert fleet.injected == labelled
    assert all((r.label is None) == (r.anomaly_metric is None) for r in readings)
    affected = Counter(r.anomaly_metric for r in originals if r.label is not None)
    assert set(affected) == set(METRICS)  # anomalies hit every metric
    assert fleet.ground_truth == {r.key: r.label for r in originals if r.label is not None}


def test_zero_anomaly_rate_labels_nothing() -> None:
    readings = _day(anomaly_rate=0.0).simulate(6 * 3600)
    assert all(r.label is None for r in readings)


def test_out_of_range_is_physically_impossible_and_nothing_else_is(
    day: tuple[Fleet, list[LabelledReading]],
) -> None:
    _, readings = day
    oor = [r for r in readings if r.label == "out_of_range"]
    assert oor
    for r in oor:
        assert r.anomaly_metric is not None and _outside(r.anomaly_metric, r.metrics[r.anomaly_metric]), r
        assert sum(_outside(m, v) for m, v in r.metrics.items()) == 1, r
    for r in readings:
        if r.label != "out_of_range":
            assert not any(_outside(m, v) for m, v in r.metrics.items()), r


def test_stuck_sensors_flat_line(day: tuple[Fleet, list[LabelledReading]]) -> None:
    fleet, readings = day
    by_sensor: dict[tuple[str, str], list[LabelledReading]] = defaultdict(list)
    for r in readings:
        if not r.repeat:
            by_sensor[(r.site, r.sensor_id)].append(r)
    checked = 0
    for ep in fleet.labelled_episodes("stuck"):
        seqs = sorted(by_sensor[(ep.site, ep.sensor_id)], key=lambda r: r.seq)
        run = [r.metrics[ep.metric] for r in seqs if r.label == "stuck" and r.ts_ms >= ep.start_ts_ms][:10]
        if len(run) >= 5:
            assert len(set(run)) == 1, (ep, run)
            checked += 1
    assert checked


def test_spikes_stand_out(day: tuple[Fleet, list[LabelledReading]]) -> None:
    fleet, readings = day
    by_key = {r.key: r for r in readings if not r.repeat}
    by_ts = {(r.site, r.sensor_id, r.ts_ms): r for r in by_key.values()}
    jumps = []
    for ep in fleet.labelled_episodes("spike"):
        spike = by_ts.get((ep.site, ep.sensor_id, ep.start_ts_ms))
        before = by_key.get((ep.site, ep.sensor_id, spike.seq - 1)) if spike else None
        if spike is None or before is None:
            continue  # the spike fell in a silent period
        assert spike.label == "spike"
        jumps.append(abs(spike.metrics[ep.metric] - before.metrics[ep.metric]) / abs(ep.magnitude))
    assert len(jumps) > 20
    # Most spikes move the value by about their magnitude (clipping at 0 can shorten a few).
    assert np.median(jumps) > 0.5


def test_quirks_late_repeated_silent_and_seq_order(day: tuple[Fleet, list[LabelledReading]]) -> None:
    fleet, readings = day
    assert (
        fleet.quirks["late"]
        and fleet.quirks["reconnect"]
        and fleet.quirks["silent"]
        and fleet.quirks["repeat"]
    )
    assert any(r.emit_ms > r.ts_ms + 1000 for r in readings)  # late: ts older than when it is sent
    assert all(r.emit_ms >= r.ts_ms for r in readings)
    emits = [r.emit_ms for r in readings]
    assert emits == sorted(emits)
    originals = {r.key: r for r in readings if not r.repeat}
    repeats = [r for r in readings if r.repeat]
    assert repeats and all(originals[r.key].metrics == r.metrics for r in repeats)
    last: dict[tuple[str, str], int] = {}
    gaps = 0
    for r in readings:
        sensor = (r.site, r.sensor_id)
        prev = last.get(sensor)
        # A device sends in seq order; a repeat re-sends the seq it just sent.
        assert prev is None or r.seq == prev + 1 or (r.repeat and r.seq == prev), (sensor, prev, r)
        last[sensor] = r.seq
    by_sensor: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in originals.values():
        by_sensor[(r.site, r.sensor_id)].append(r.ts_ms)
    for ts in by_sensor.values():
        gaps += sum(1 for a, b in itertools.pairwise(ts) if b - a > 30_000)  # interval 20 s
    assert gaps  # silent periods leave holes in time, not in seq


def test_no_quirks_means_on_time_and_once() -> None:
    readings = _day(quirk_rate=0.0).simulate(6 * 3600)
    assert all(r.emit_ms == r.ts_ms and not r.repeat for r in readings)
    assert len(readings) == 40 * 6 * 3600 // 20


def test_signals_are_plausible_and_correlated() -> None:
    fleet = Fleet(sites=2, sensors_per_site=3, interval_s=60.0, anomaly_rate=0.0, seed=3, rain_per_day=1.5)
    batch = fleet.simulate_arrays(3 * DAY_S)
    for s in fleet.sensors:
        v = batch.values[batch.sensor == s.index]
        corr = np.corrcoef(v.T)
        flow, pres, turb, cl = (
            METRICS.index(m) for m in ("flow_m3_h", "pressure_bar", "turbidity_ntu", "chlorine_mg_l")
        )
        assert corr[flow, pres] < -0.5, s  # more demand, less pressure
        if s.stage != "intake":
            assert corr[turb, cl] < -0.3, s  # rain: turbidity up, free chlorine down
        ph = v[:, METRICS.index("ph")]
        assert ph.min() > 6.0 and ph.max() < 9.0
        temp = v[:, METRICS.index("temperature_c")]
        assert temp.min() > 3.0 and temp.max() < 28.0
        # Daily cycle: flow at the morning peak well above the night minimum.
        hours = (batch.ts_ms[batch.sensor == s.index] // 3_600_000) % 24
        assert v[(hours >= 7) & (hours < 9), flow].mean() > 1.3 * v[(hours >= 2) & (hours < 5), flow].mean()


def test_for_rate_and_validation() -> None:
    fleet = Fleet.for_rate(400.0, sites=4, sensors_per_site=25)
    assert fleet.interval_s == pytest.approx(0.25)
    assert fleet.rate == pytest.approx(400.0)
    with pytest.raises(ValueError):
        Fleet(anomaly_rate=0.9)
    with pytest.raises(ValueError):
        Fleet(anomaly_mix={"nonsense": 1.0})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        fleet.step(fleet.now_ms - 1)


def test_anomaly_mix_selects_classes() -> None:
    fleet = _day(anomaly_mix={"spike": 1.0})
    readings = fleet.simulate(6 * 3600)
    assert {r.label for r in readings} == {None, "spike"}


def test_iter_arrays_chunks_add_up() -> None:
    whole = _day(seed=9).simulate_arrays(7200)
    fleet = _day(seed=9)
    parts = list(fleet.iter_arrays(7200, chunk_s=600))
    assert len(parts) == 12
    joined = ReadingBatch.concat(fleet.sensors, parts)
    assert np.array_equal(joined.values, whole.values) and np.array_equal(joined.seq, whole.seq)
    assert np.array_equal(joined.label, whole.label) and np.array_equal(
        joined.anomaly_metric, whole.anomaly_metric
    )
