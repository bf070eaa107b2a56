"""Prometheus metrics of the alerting crew (CONTRACT.md section 7, plus our own).

Module-level so every part of the crew shares one registry entry per name; the crew's entry point serves them.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

#: Final outcome of each SMS: ``accepted``, ``unknown``, ``rejected``, ``dry_run`` (contract metric).
SMS_TOTAL = Counter("wd_sms_total", "SMS by final outcome", ["outcome"])
# Exported at 0 from the start, so that increase() sees the first unknown outcome (alert rule in deploy/rules.yml).
for _outcome in ("accepted", "unknown", "rejected", "dry_run"):
    SMS_TOTAL.labels(_outcome)

#: Reading timestamp (``ts_ms``) to SMS accepted by Twilio or printed by the dry run (contract metric).
ALERT_LATENCY = Histogram(
    "wd_alert_latency_seconds",
    "Reading timestamp to SMS accepted (or printed in dry run)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600),
)

#: Unknown outcomes by cause (``5xx``, ``timeout``, ``connection``, ``stale_claim``): sent or not, we cannot tell.
SMS_UNKNOWN = Counter("wd_sms_unknown_total", "SMS with an unknown outcome, never resent", ["reason"])

#: Send attempts that were refused before sending and will be retried (``429``, ``connect``, ``auth``).
SMS_RETRIES = Counter("wd_sms_retries_total", "SMS attempts refused before sending, retried", ["reason"])

#: Provider latency of one send attempt.
SMS_SEND_SECONDS = Histogram(
    "wd_sms_send_seconds",
    "Duration of one send attempt to the SMS provider",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

ALERTS_FOLDED = Counter(
    "wd_alerts_folded_total", "Anomalies folded into an earlier alert of the same sensor and metric"
)
ALERTS_THROTTLED = Counter(
    "wd_alerts_throttled_total", "Anomalies not sent because their sensor keeps firing"
)
ALERTS_UNROUTED = Counter("wd_alerts_unrouted_total", "Anomalies that matched no route")
ALERTS_DEFERRED = Counter("wd_alerts_deferred_total", "SMS deferred durably", ["reason"])
ESCALATIONS = Counter("wd_escalations_total", "Escalations fired (alert unacknowledged in time)")
ACKS = Counter("wd_acks_total", "Alerts acknowledged by SMS reply")
WEBHOOK_REJECTED = Counter("wd_webhook_rejected_total", "Inbound webhook requests refused", ["reason"])
