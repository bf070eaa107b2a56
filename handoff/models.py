"""Pydantic v2 models of every payload in CONTRACT.md sections 2 and 3.

These are the reference definitions: JSON Schema files exported from them live in ``schemas/`` for crews in other
languages (``python -m handoff.schemas --write`` regenerates them; a test fails when they are stale). Hot paths may
use faster hand-written validation, but must accept and produce exactly what these models describe.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
MetricName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
Seq = Annotated[int, Field(ge=0, le=2**63 - 1)]
EpochMs = Annotated[int, Field(ge=0)]
Metrics = Annotated[dict[MetricName, float], Field(min_length=1, max_length=32)]

_strict = ConfigDict(extra="forbid", allow_inf_nan=False)


class SensorReading(BaseModel):
    """A reading as a sensor publishes it on ``wd/{site}/{sensor_id}/telemetry`` (unknown keys ignored)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    site: Identifier
    sensor_id: Identifier
    seq: Seq
    ts: str | float = Field(description="RFC 3339 with offset, or epoch seconds")
    metrics: Metrics


class GatewayBatch(BaseModel):
    """A gateway message on ``wd/{site}/{gateway_id}/batch``: 1 to 1000 readings of the topic's site."""

    model_config = ConfigDict(extra="ignore")

    gateway_id: Identifier
    readings: list[SensorReading] = Field(min_length=1, max_length=1000)


class NormalizedReading(BaseModel):
    """A reading after ingest: integer epoch milliseconds for both clocks."""

    model_config = _strict

    site: Identifier
    sensor_id: Identifier
    seq: Seq
    ts_ms: EpochMs
    received_ms: EpochMs
    metrics: Metrics


class ReadingsEntry(BaseModel):
    """Payload of one ``wd:readings:v1`` entry: the accepted readings of one MQTT message."""

    model_config = _strict

    readings: list[NormalizedReading] = Field(min_length=1)


class Explanation(BaseModel):
    model_config = _strict

    metric: MetricName
    value: float
    direction: Literal["high", "low"]


class Anomaly(BaseModel):
    """Payload of ``wd:anomalies:v1`` entries and ``wd:alerts:v1`` messages. ``score``: higher is more anomalous."""

    # Optional fields may be added (e.g. ``replayed``), so unknown keys are kept.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    alert_id: str = Field(description="{site}:{sensor_id}:{seq}")
    site: Identifier
    sensor_id: Identifier
    seq: Seq
    ts_ms: EpochMs
    detected_ms: EpochMs
    score: float
    threshold: float
    severity: Literal["warning", "critical"]
    model_version: str
    reading_entry_id: str
    metrics: dict[MetricName, float]
    explanation: list[Explanation]


QuarantineReason = Literal[
    "invalid_json",
    "schema",
    "non_finite",
    "too_large",
    "topic_mismatch",
    "bad_identifier",
    "clock_skew",
    "rate_limited",
    "stale_seq",
]


class QuarantineEntry(BaseModel):
    """Payload of ``wd:quarantine:v1``: why a message (or one reading of a batch) was refused."""

    model_config = _strict

    reason: QuarantineReason
    detail: str
    topic: str
    received_ms: EpochMs
    raw_b64: str = Field(description="base64 of the first 4 KiB of the payload")


class DeadLetter(BaseModel):
    """Payload of ``wd:dead:v1``: an entry a consumer group gave up on after too many deliveries."""

    model_config = ConfigDict(extra="allow")

    stream: str
    group: str
    entry_id: str
    deliveries: int = Field(ge=0)
    error: str
    payload: str = Field(description="the original entry's payload field, verbatim")


def alert_id(site: str, sensor_id: str, seq: int) -> str:
    """The deterministic id of the anomaly a reading may yield."""
    return f"{site}:{sensor_id}:{seq}"


SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "sensor_reading": SensorReading,
    "gateway_batch": GatewayBatch,
    "readings_entry": ReadingsEntry,
    "anomaly": Anomaly,
    "quarantine_entry": QuarantineEntry,
    "dead_letter": DeadLetter,
}
