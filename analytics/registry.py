"""Model registry in Redis: every analytics process shares, persists and reloads per-sensor models.

A model is stored as its bytes (:meth:`SensorModel.to_bytes`: no pickle; library versions inside, checked on
load) under ``wd:_model:{site}:{sensor_id}``, and its generation in the hash ``wd:_model:generations``. A save only
replaces a model with a *newer* generation (compare-and-set in one Lua script), so two processes refitting the same
sensor cannot roll each other back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import redis.asyncio as aredis

from analytics.model import ModelFormatError, SensorModel
from handoff import keys

logger = logging.getLogger(__name__)

GENERATIONS_KEY = keys.MODEL_GENERATIONS

# KEYS: model key, generations hash; ARGV: field, generation, bytes. Returns 1 when stored.
_SAVE_LUA = """
local current = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '-1')
if tonumber(ARGV[2]) <= current then return 0 end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


def sensor_field(site: str, sensor_id: str) -> str:
    return f"{site}:{sensor_id}"


def model_key(site: str, sensor_id: str) -> str:
    return keys.MODELS_PREFIX + sensor_field(site, sensor_id)


def generation_of(model: SensorModel) -> int:
    """The generation in ``model_version_`` (``{site}:{sensor_id}:{generation}``)."""
    try:
        return int(str(model.model_version_).rsplit(":", 1)[-1])
    except ValueError:
        return 0


class ModelRegistry:
    def __init__(self, redis: aredis.Redis) -> None:
        self.redis = redis
        self._save = redis.register_script(_SAVE_LUA)

    async def save(self, site: str, sensor_id: str, model: SensorModel, blob: bytes | None = None) -> bool:
        """Store ``model`` unless a newer generation is already stored. Returns True when stored.

        ``blob``: ``model.to_bytes()`` when the caller already has it (it costs ~7 ms of CPU: do it off the loop).
        """
        field = sensor_field(site, sensor_id)
        stored = await self._save(
            keys=[model_key(site, sensor_id), GENERATIONS_KEY],
            args=[field, generation_of(model), model.to_bytes() if blob is None else blob],
        )
        return bool(stored)

    async def generations(self, sensors: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Stored generation per sensor (sensors without a stored model are left out)."""
        if not sensors:
            return {}
        values = await self.redis.hmget(GENERATIONS_KEY, [sensor_field(s, i) for s, i in sensors])
        return {sensor: int(v) for sensor, v in zip(sensors, values, strict=True) if v is not None}

    async def sensors(self) -> list[tuple[str, str]]:
        """Every sensor with a stored model."""
        fields = await self.redis.hkeys(GENERATIONS_KEY)
        out = []
        for f in fields:
            text = f.decode() if isinstance(f, bytes) else str(f)
            site, sep, sensor_id = text.partition(":")  # ids are [A-Za-z0-9_-]: the first colon separates
            if sep:
                out.append((site, sensor_id))
        return out

    async def load_many(self, sensors: Iterable[tuple[str, str]]) -> dict[tuple[str, str], SensorModel]:
        """Models stored for ``sensors``; unreadable or incompatible ones are skipped (and refitted later)."""
        wanted = list(sensors)
        if not wanted:
            return {}
        blobs = await self.redis.mget([model_key(s, i) for s, i in wanted])
        out: dict[tuple[str, str], SensorModel] = {}
        for sensor, blob in zip(wanted, blobs, strict=True):
            if not isinstance(blob, bytes):  # absent (or a client decoding replies: models are binary)
                continue
            try:
                out[sensor] = SensorModel.from_bytes(blob)
            except ModelFormatError as exc:
                logger.warning("stored model of %s:%s not usable (%s); it will be refitted", *sensor, exc)
        return out
