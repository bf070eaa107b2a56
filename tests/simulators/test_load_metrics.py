"""The load report's diagnostics: fits scraped from a crew, stores per reading, server stalls, the host's speed."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
import redis
from prometheus_client import CollectorRegistry, Counter, start_http_server

from handoff import keys
from simulators import hostspeed
from simulators.fleet import LabelledReading
from simulators.load import (
    HostSpeedMeter,
    _entry_ms,
    _utc_ms,
    aof_rewrites,
    metric_sum,
    redis_stalls,
    slow_commands,
    sms_report,
    stored_counts,
    wait_drained,
)
from simulators.publisher import PublishLog
from waterdoctor.embedded import RedisServer, free_port


def test_metric_sum_adds_the_matching_labelled_samples_only() -> None:
    registry = CollectorRegistry()
    fits = Counter("wd_analytics_model_fits_total", "Models fitted", ["outcome"], registry=registry)
    other = Counter(
        "wd_analytics_model_fits_other_total", "Not the same metric", ["outcome"], registry=registry
    )
    fits.labels("ok").inc(7)
    fits.labels("failed").inc(2)
    other.labels("ok").inc(100)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        assert metric_sum(port, "wd_analytics_model_fits_total", 'outcome="ok"') == 7
        assert metric_sum(port, "wd_analytics_model_fits_total") == 9  # every outcome
        assert metric_sum(port, "wd_no_such_metric") == 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert metric_sum(port, "wd_analytics_model_fits_total") is None  # nothing answers: unknown, not zero


def as_text(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def test_stored_counts_reports_duplicates_and_the_first_store_and_receipt_of_each_reading(
    redis_only_url: str,
) -> None:
    def reading(seq: int, received_ms: int) -> dict[str, object]:
        return {
            "site": "p",
            "sensor_id": "s",
            "seq": seq,
            "ts_ms": 1,
            "received_ms": received_ms,
            "metrics": {},
        }

    r = redis.Redis.from_url(redis_only_url)
    try:
        r.delete(keys.READINGS)
        first = r.xadd(
            keys.READINGS, {"payload": orjson.dumps({"readings": [reading(1, 100), reading(2, 100)]})}
        )
        second = r.xadd(keys.READINGS, {"payload": orjson.dumps({"readings": [reading(2, 250)]})})
        stored_ms: dict[tuple[str, str, int], int] = {}
        received_ms: dict[tuple[str, str, int], int] = {}
        counts = stored_counts(r, stored_ms, received_ms)
    finally:
        r.delete(keys.READINGS)
        r.close()
    assert counts == {("p", "s", 1): 1, ("p", "s", 2): 2}
    entry_ms = _entry_ms(as_text(first))
    assert entry_ms is not None
    assert stored_ms == {("p", "s", 1): entry_ms, ("p", "s", 2): entry_ms}  # the first copy's entry id time
    assert (_entry_ms(as_text(second)) or 0) >= entry_ms
    assert received_ms == {("p", "s", 1): 100, ("p", "s", 2): 100}  # when ingest first took it


def test_wait_drained_returns_when_analytics_was_seen_idle_and_every_reading_counted(
    redis_only_url: str,
) -> None:
    def entry(n: int) -> dict[str, bytes]:
        readings = [{"site": "p", "sensor_id": "s", "seq": i, "ts_ms": 1, "metrics": {}} for i in range(n)]
        return {"payload": orjson.dumps({"readings": readings})}

    r = redis.Redis.from_url(redis_only_url)
    try:
        r.delete(keys.READINGS)
        r.xadd(keys.READINGS, entry(3))
        r.xgroup_create(keys.READINGS, keys.GROUP_ANALYTICS, id="0")
        # Delivered and not acknowledged: analytics still owes it.
        delivered = r.xreadgroup(keys.GROUP_ANALYTICS, "c", {keys.READINGS: ">"}, count=10)
        assert wait_drained(r, 3, 0.3) is None
        r.xack(keys.READINGS, keys.GROUP_ANALYTICS, delivered[0][1][0][0])
        # Acknowledged, but the stream holds fewer readings than the broker acknowledged: not drained either.
        assert wait_drained(r, 5, 0.3) is None
        # A newer entry that analytics was not handed yet (lag > 0).
        r.xadd(keys.READINGS, entry(2))
        assert wait_drained(r, 5, 0.3) is None
        for _stream, entries in r.xreadgroup(keys.GROUP_ANALYTICS, "c", {keys.READINGS: ">"}, count=10):
            r.xack(keys.READINGS, keys.GROUP_ANALYTICS, *[entry_id for entry_id, _fields in entries])
        before = time.monotonic()
        idle_at = wait_drained(r, 5, 5)
    finally:
        r.delete(keys.READINGS)
        r.close()
    assert idle_at is not None
    assert before <= idle_at <= time.monotonic()


def keep_busy(r: redis.Redis, ms: int) -> None:
    """Keep the server busy for ``ms`` milliseconds in one command (a script spinning on ``TIME``)."""
    spin = (
        "local t = redis.call('TIME'); local t0 = t[1] * 1e6 + t[2]; "
        "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - t0 > tonumber(ARGV[1])"
    )
    r.eval(spin, 0, ms * 1000)


def test_redis_stalls_reports_the_servers_own_latency_events_since_a_moment(redis_only_url: str) -> None:
    r = redis.Redis.from_url(redis_only_url)
    try:
        r.config_set("latency-monitor-threshold", 5)
        r.latency_reset()
        since = time.time() - 1
        keep_busy(r, 30)  # a "command" event
        stalls = redis_stalls(r, since)
        later = redis_stalls(r, time.time() + 5)  # nothing happened after that moment
        before = redis_stalls(r, since - 10, since - 5)  # nor before
    finally:
        r.config_set("latency-monitor-threshold", 0)
        r.latency_reset()
        r.close()
    assert stalls["command"]["count"] == 1
    assert stalls["command"]["max_ms"] >= 30
    assert later == {}
    assert before == {}


def test_slow_commands_names_the_command_and_client_of_each_slow_call(redis_only_url: str) -> None:
    r = redis.Redis.from_url(redis_only_url, client_name="wd-test-slow")
    try:
        r.config_set("slowlog-log-slower-than", 5000)
        r.slowlog_reset()
        since = time.time() - 1
        keep_busy(r, 20)
        r.ping()  # fast: not logged
        slow = slow_commands(r, since)
        later = slow_commands(r, time.time() + 5)
    finally:
        r.config_set("slowlog-log-slower-than", 10000)
        r.slowlog_reset()
        r.close()
    assert list(slow) == ["EVAL local (wd-test-slow)"]
    assert slow["EVAL local (wd-test-slow)"]["count"] == 1
    assert slow["EVAL local (wd-test-slow)"]["max_ms"] >= 20
    assert later == {}


def test_host_speed_summary_compares_the_window_with_the_fastest_sample_of_the_run() -> None:
    samples = [(100.0, 3.0), (101.0, 6.0), (102.0, 9.0), (103.0, 4.0), (200.0, 2.0)]
    summary = hostspeed.summarize(samples, 100.5, 103.0)
    assert summary == {"unit_ms_p50": 6.0, "unit_ms_max": 9.0, "best_ms": 2.0, "slowdown": 3.0, "n": 3}
    assert hostspeed.summarize(samples, 300.0, 400.0) is None


def test_host_speed_meter_samples_until_stopped(tmp_path: Path) -> None:
    meter = HostSpeedMeter(tmp_path)
    started = time.time()
    try:
        time.sleep(1.2)
    finally:
        meter.close()
    samples = hostspeed.read(meter.out)
    assert meter.proc.returncode == 0  # left on SIGTERM
    assert len(samples) >= 2
    assert all(started - 1 <= at <= time.time() and ms > 0 for at, ms in samples)
    summary = meter.summary(started - 1, time.time())
    assert summary is not None and summary["n"] == len(samples) and summary["slowdown"] >= 1.0


def test_sms_report_names_the_slowest_sms_and_splits_it_at_pubsub() -> None:
    log = PublishLog()

    def reading(seq: int) -> LabelledReading:
        return LabelledReading("p", "s", seq, 0, {"ph": 7.0}, None, 0, False, "g")

    base = 1_796_000_000_000.0
    log.record([reading(1), reading(2), reading(3)], base)
    accepted = [  # (alert_id, phone, accepted at, epoch s)
        ("p:s:1", "+1", (base + 20) / 1000),
        ("p:s:2", "+1", (base + 90) / 1000),
        ("p:s:3", "+1", (base + 40) / 1000),
        ("p:s:3", "+2", (base + 45) / 1000),
    ]
    arrivals = {"p:s:1": base + 10, "p:s:2": base + 30}  # p:s:3 never seen on Pub/Sub
    report = sms_report(accepted, log, exclude={("p", "s", 1)}, arrivals=arrivals)
    assert report["latency_ms"]["n"] == 3  # the excluded (warm-up) reading is not counted
    assert report["alerting_hop_ms"]["max"] == 60
    slowest = report["slowest"]
    assert [s["alert_id"] for s in slowest] == ["p:s:2", "p:s:3", "p:s:3"]
    assert slowest[0] == {
        "ms": 90, "alert_id": "p:s:2", "published": _utc_ms(base), "to_pubsub_ms": 30, "hop_ms": 60,
    }  # fmt: skip
    assert slowest[1]["ms"] == 45 and slowest[1]["to_pubsub_ms"] is None and slowest[1]["hop_ms"] is None


@pytest.mark.parametrize("kind", ["redis", "valkey"])
def test_aof_rewrites_reads_each_rewrite_window_from_the_servers_log(kind: str, tmp_path: Path) -> None:
    with RedisServer(kind, data_dir=tmp_path, appendonly=True) as server:  # type: ignore[arg-type]
        r = redis.Redis.from_url(server.url)
        try:
            r.mset({f"k{i}": i for i in range(20)})
            before = time.time()
            r.config_set("rdb-key-save-delay", 10_000)  # 10 ms per key: a rewrite of ~0.2 s
            r.bgrewriteaof()
            time.sleep(0.05)
            while r.info("persistence")["aof_rewrite_in_progress"]:
                time.sleep(0.01)
            after = time.time()
        finally:
            r.close()
        log = server.data_dir / f"{server.name}.log"
        windows = aof_rewrites(log, before - 1, after + 1)
        assert aof_rewrites(log, after + 5, after + 10) == []  # none later
    assert len(windows) == 1
    start, end = windows[0]
    assert before - 0.01 <= start < end <= after + 0.01  # the log has milliseconds
    assert end - start >= 0.15


def test_aof_rewrites_ends_a_rewrite_still_running_at_the_window_end(tmp_path: Path) -> None:
    log = tmp_path / "redis.log"
    log.write_text(
        "1:M 07 Dec 2026 18:52:27.948 * Background append only file rewriting started by pid 7\n"
        "7:C 07 Dec 2026 18:52:28.100 * Fork CoW for AOF rewrite: current 5 MB, peak 5 MB, average 3 MB\n"
    )
    start = time.mktime(time.strptime("07 Dec 2026 18:52:27", "%d %b %Y %H:%M:%S")) + 0.948
    assert aof_rewrites(log, start - 10, start + 2) == [(start, start + 2)]
    assert aof_rewrites(tmp_path / "missing.log", 0, start) == []


def test_sms_report_flags_the_slowest_whose_way_overlapped_a_rewrite() -> None:
    log = PublishLog()
    base = 1_796_670_000_000.0

    def reading(seq: int) -> LabelledReading:
        return LabelledReading("p", "s", seq, 0, {"ph": 7.0}, None, 0, False, "g")

    sent = {1: (0, 300), 2: (1200, 50), 3: (-1000, 40), 4: (2200, 40)}  # seq: (published, ms), ms after base
    for seq, (at, _ms) in sent.items():
        log.record([reading(seq)], base + at)
    accepted = [(f"p:s:{seq}", "+1", (base + at + ms) / 1000) for seq, (at, ms) in sent.items()]
    rewrite = [((base + 148) / 1000, (base + 1645) / 1000)]
    report = sms_report(accepted, log, exclude=set(), rewrites=rewrite)
    flags = {s["alert_id"]: s["in_rewrite"] for s in report["slowest"]}
    assert flags == {
        "p:s:1": True,  # published before, still on its way when it started
        "p:s:2": True,  # published during
        "p:s:3": False,  # done before it started
        "p:s:4": False,  # after it ended
    }
    assert "in_rewrite" not in sms_report(accepted, log, exclude=set())["slowest"][0]  # rewrites unknown
