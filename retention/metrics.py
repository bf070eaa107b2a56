"""Prometheus metrics of the retention crew (the stream and group gauges shared by every crew are in
:mod:`handoff.metrics`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TRIMMED = Counter("wd_retention_trimmed_total", "Entries removed from the stream by retention", ["stream"])
STREAM_MEMORY = Gauge("wd_stream_memory_bytes", "MEMORY USAGE of the stream (sampled)", ["stream"])
OLDEST_ENTRY_AGE = Gauge(
    "wd_stream_oldest_entry_age_seconds",
    "Age of the stream's first entry, from its ID (server clock)",
    ["stream"],
)
HELD_BACK = Gauge(
    "wd_retention_held_back",
    "1 while the group's undelivered or pending entries keep retention from trimming to its policy",
    ["stream", "group"],
)
GROUP_IGNORED = Gauge(
    "wd_retention_group_ignored",
    "1 while the group's consumers are idle past the cap and retention trims past work it still owes",
    ["stream", "group"],
)
RUNS = Counter("wd_retention_runs_total", "Retention passes over every stream", ["outcome"])
LAST_SUCCESS = Gauge("wd_retention_last_success_timestamp_seconds", "Unix time of the last complete pass")
PASS_SECONDS = Histogram(
    "wd_retention_pass_seconds",
    "Duration of one retention pass over every stream",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
