"""Typed settings, read once at the entry point from the environment (CONTRACT.md section 1).

Crews receive a :class:`Settings` (or plain values taken from it) as arguments; nothing below the entry point reads
the environment. Secrets are :class:`~pydantic.SecretStr` so they never show in a repr or a log line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from handoff.errors import ConfigError


class Settings(BaseSettings):
    """Everything a crew may be configured with. Contract names first, then WaterDoctor's own ``WD_`` knobs."""

    model_config = SettingsConfigDict(env_prefix="WD_", extra="ignore", populate_by_name=True)

    redis_url: str | None = None
    mqtt_url: str | None = None
    twilio_account_sid: str | None = Field(
        default=None, validation_alias=AliasChoices("TWILIO_ACCOUNT_SID", "twilio_account_sid")
    )
    twilio_auth_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("TWILIO_AUTH_TOKEN", "twilio_auth_token")
    )
    sms_from: str | None = None
    twilio_base_url: str = "https://api.twilio.com"
    routing_file: Path | None = None
    anomaly_retention_days: float = Field(default=30.0, gt=0)

    # Hand-off tunables (not in the contract; safe defaults).
    max_deliveries: int = Field(default=5, ge=1)
    claim_idle_ms: int = Field(default=30_000, ge=100)
    object_store_url: str = "file://./.wd-data/blobs"

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("WD_REDIS_URL must start with redis://, rediss:// or unix://")
        return v

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("mqtt", "mqtts"):
            raise ValueError("WD_MQTT_URL must start with mqtt:// or mqtts://")
        return v

    @property
    def twilio_configured(self) -> bool:
        return bool(self.twilio_account_sid and self.twilio_auth_token)

    def require_redis_url(self) -> str:
        """The Redis URL, or a :class:`ConfigError` that tells the operator what to set."""
        if not self.redis_url:
            raise ConfigError(
                "WD_REDIS_URL is not set: point it at Redis or Valkey (redis://host:6379/0), "
                "or run `waterdoctor up`, which starts an embedded server"
            )
        return self.redis_url

    def require_mqtt(self) -> MqttEndpoint:
        if not self.mqtt_url:
            raise ConfigError(
                "WD_MQTT_URL is not set: point it at an MQTT broker (mqtt://host:1883), "
                "or run `waterdoctor up`, which starts an embedded broker"
            )
        return MqttEndpoint.parse(self.mqtt_url)


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    """A parsed ``mqtt://`` / ``mqtts://`` URL; the password is kept out of ``repr``."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: SecretStr | None = None

    @classmethod
    def parse(cls, url: str) -> MqttEndpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ConfigError(f"MQTT URL must start with mqtt:// or mqtts://, got scheme {parts.scheme!r}")
        tls = parts.scheme == "mqtts"
        if not parts.hostname:
            raise ConfigError("MQTT URL has no host")
        return cls(
            host=parts.hostname,
            port=parts.port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=SecretStr(unquote(parts.password)) if parts.password else None,
        )


def mask_phone(phone: str) -> str:
    """Mask a phone number for logs: ``+15551230001`` -> ``+1555***0001``."""
    if len(phone) <= 8:
        return "***"
    return phone[:5] + "***" + phone[-4:]
