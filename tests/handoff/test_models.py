"""Contract models and the JSON Schema files exported from them."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from handoff import schemas
from handoff.models import Anomaly, NormalizedReading, SensorReading
from handoff.settings import MqttEndpoint, Settings, mask_phone


def test_schema_files_are_current() -> None:
    rendered = schemas.render()
    for name, text in rendered.items():
        on_disk = (schemas.SCHEMA_DIR / name).read_text()
        assert on_disk == text, f"schemas/{name} is stale: run python -m handoff.schemas --write"
    assert schemas.main([]) == 0


def test_schema_check_reports_stale_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert schemas.main(["--write", "--dir", str(tmp_path)]) == 0
    (tmp_path / "anomaly.json").write_text("{}")
    assert schemas.main(["--dir", str(tmp_path)]) == 1


def test_contract_example_anomaly_validates() -> None:
    example = {
        "alert_id": "plant-7:s-0042:1234", "site": "plant-7", "sensor_id": "s-0042", "seq": 1234,
        "ts_ms": 1764572400123, "detected_ms": 1764572400131, "score": 0.71, "threshold": 0.62,
        "severity": "warning", "model_version": "plant-7:s-0042:3", "reading_entry_id": "1764572400125-0",
        "metrics": {"ph": 4.1, "turbidity_ntu": 0.4},
        "explanation": [{"metric": "ph", "value": 4.1, "direction": "low"}],
    }  # fmt: skip
    assert Anomaly.model_validate(example).explanation[0].direction == "low"
    schema = json.loads((schemas.SCHEMA_DIR / "anomaly.json").read_text())
    assert set(schema["required"]) == set(example)


@pytest.mark.parametrize(
    "bad",
    [
        {"site": "a*b"},
        {"seq": -1},
        {"seq": 2**63},
        {"metrics": {}},
        {"metrics": {"PH": 7.0}},
        {"metrics": {"ph": float("nan")}},
    ],
)
def test_sensor_reading_rules(bad: dict[str, object]) -> None:
    good = {
        "site": "plant-7",
        "sensor_id": "s-1",
        "seq": 1,
        "ts": "2026-12-01T07:00:00Z",
        "metrics": {"ph": 7.0},
    }
    SensorReading.model_validate(good)
    with pytest.raises(ValidationError):
        SensorReading.model_validate({**good, **bad})


def test_normalized_reading_is_strict() -> None:
    with pytest.raises(ValidationError):
        NormalizedReading.model_validate(
            {
                "site": "a",
                "sensor_id": "b",
                "seq": 1,
                "ts_ms": 1,
                "received_ms": 1,
                "metrics": {"ph": 1},
                "x": 1,
            }
        )


def test_settings_read_contract_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WD_REDIS_URL", "rediss://u:p@h:6380/1")
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "AC1")
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "sekrit")
    monkeypatch.setenv("WD_ANOMALY_RETENTION_DAYS", "7")
    s = Settings()
    assert s.redis_url == "rediss://u:p@h:6380/1"
    assert s.twilio_configured and s.anomaly_retention_days == 7
    assert "sekrit" not in repr(s)
    monkeypatch.setenv("WD_REDIS_URL", "http://nope")
    with pytest.raises(ValidationError, match="WD_REDIS_URL"):
        Settings()


def test_missing_urls_give_clear_errors() -> None:
    from handoff.errors import ConfigError

    s = Settings(redis_url=None, mqtt_url=None)
    with pytest.raises(ConfigError, match="waterdoctor up"):
        s.require_redis_url()
    with pytest.raises(ConfigError, match="WD_MQTT_URL"):
        s.require_mqtt()


def test_mqtt_url_parsing_keeps_password_secret() -> None:
    ep = MqttEndpoint.parse("mqtts://dev%2F1:pa%40ss@broker.example:8884")
    assert (ep.host, ep.port, ep.tls, ep.username) == ("broker.example", 8884, True, "dev/1")
    assert ep.password is not None and ep.password.get_secret_value() == "pa@ss"
    assert "pa@ss" not in repr(ep)
    assert MqttEndpoint.parse("mqtt://h").port == 1883


def test_phone_masking() -> None:
    assert mask_phone("+15551230001") == "+1555***0001"
