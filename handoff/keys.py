"""Every Redis key, consumer group and Pub/Sub channel name, in one place (CONTRACT.md section 3).

Crews import names from here and never spell a key themselves. A future Redis Cluster layout shards readings by a
hash tag of the site; keep every use of a stream name going through this module so that change stays local.
"""

from __future__ import annotations

from typing import Final

READINGS: Final = "wd:readings:v1"
ANOMALIES: Final = "wd:anomalies:v1"
ALERTS_CHANNEL: Final = "wd:alerts:v1"
QUARANTINE: Final = "wd:quarantine:v1"
DEAD: Final = "wd:dead:v1"

GROUP_ANALYTICS: Final = "analytics"
GROUP_ALERTING: Final = "alerting"

#: Entry field that carries the JSON payload in every stream of the contract.
PAYLOAD_FIELD: Final = "payload"

#: Every stream of the contract, for status and retention.
STREAMS: Final = (READINGS, ANOMALIES, QUARANTINE, DEAD)

#: Private (non-contract) keys, all under one prefix.
PRIVATE_PREFIX: Final = "wd:_"
INGEST_SEEN_PREFIX: Final = "wd:_seen:"  # per-sensor dedupe state
MODELS_PREFIX: Final = "wd:_model:"  # persisted per-sensor models: wd:_model:{site}:{sensor_id}
MODEL_GENERATIONS: Final = "wd:_model:generations"  # hash: "{site}:{sensor_id}" -> stored model generation
SMS_LEDGER_PREFIX: Final = "wd:_sms:"  # alert_id x phone dispatch records
SMS_RATE_PREFIX: Final = (
    "wd:_rate:"  # send-rate slots shared by alerting processes: wd:_rate:{phone}, wd:_rate:*
)
CONSUMER_HEARTBEAT_PREFIX: Final = "wd:_hb:"  # liveness of consumers, for retention and claims


def private(*parts: str) -> str:
    """Build a private key from parts: ``private("model", "plant-7:s-1")`` -> ``wd:_model:plant-7:s-1``."""
    return PRIVATE_PREFIX + ":".join(parts)
