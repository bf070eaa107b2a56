"""Prometheus metrics of the ingest crew (CONTRACT.md section 7 plus ingest's own).

The crew adds up counts per flush and increments each metric once per flush: a prometheus_client ``inc()`` takes a
lock, too costly to do per reading at 100k readings/s.
"""

from __future__ import annotations

from typing import get_args

from prometheus_client import Counter, Gauge, Histogram

from handoff.models import QuarantineReason

READINGS = Counter("wd_ingest_readings_total", "Readings stored in wd:readings:v1 (new, after dedupe)")
QUARANTINED = Counter(
    "wd_quarantined_total", "Messages or batch readings written to wd:quarantine:v1, by reason", ["reason"]
)
for _reason in get_args(QuarantineReason):
    QUARANTINED.labels(_reason)  # exported at 0 from the start, so increase() sees the first one
MESSAGES = Counter("wd_ingest_messages_total", "MQTT messages processed (written and acknowledged)")
ACKED = Counter("wd_ingest_acked_total", "PUBACKs sent after the write")
DUPLICATES = Counter(
    "wd_ingest_duplicates_total", "Readings dropped because (site, sensor_id, seq) was already stored"
)
RATE_LIMITED = Counter("wd_ingest_rate_limited_total", "Readings dropped by the per-device rate limit")
STALE = Counter(
    "wd_ingest_stale_seq_total", "Readings too far below their sensor's highest seq to dedupe (quarantined)"
)
REDIS_ERRORS = Counter("wd_ingest_redis_errors_total", "Flushes that failed against Redis and were retried")
FLUSH_MESSAGES = Histogram(
    "wd_ingest_flush_messages",
    "MQTT messages per flush",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000),
)
FLUSH_SECONDS = Histogram(
    "wd_ingest_flush_seconds",
    "Time from taking a flush's messages to acknowledging them (validation + Redis round trip)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
BACKPRESSURE = Gauge(
    "wd_ingest_backpressure",
    "1 while ingest holds intake because analytics lags or Redis memory is near its limit",
)
MQTT_CONNECTED = Gauge("wd_ingest_mqtt_connected", "1 while connected to the broker")
HELD = Gauge("wd_ingest_held_messages", "MQTT messages received and not yet acknowledged")
