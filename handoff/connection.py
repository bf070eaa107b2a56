"""Redis connections: one place that turns a URL into a client, with bounded, logged retries at start-up."""

from __future__ import annotations

import asyncio
import logging
import random

import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from handoff.errors import RedisUnavailable

logger = logging.getLogger(__name__)


def redis_from_url(url: str, *, name: str = "waterdoctor", **kwargs: object) -> aredis.Redis:
    """A client for ``redis://``, ``rediss://`` (TLS) or ``unix://`` URLs; credentials come from the URL."""
    options: dict[str, object] = {
        "client_name": name,
        "socket_keepalive": True,
        "health_check_interval": 15,
        "socket_connect_timeout": 5,
    }
    options.update(kwargs)
    return aredis.Redis.from_url(url, **options)  # type: ignore[arg-type]


async def connect(
    url: str, *, name: str = "waterdoctor", attempts: int = 30, **kwargs: object
) -> aredis.Redis:
    """Connect and PING, retrying with jittered backoff; raises :class:`RedisUnavailable` past ``attempts``."""
    client = redis_from_url(url, name=name, **kwargs)
    delay = 0.1
    for attempt in range(1, attempts + 1):
        try:
            await client.ping()
            return client
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if attempt == attempts:
                await client.aclose()
                raise RedisUnavailable(f"cannot reach Redis at {_redact(url)}: {exc}") from exc
            logger.warning(
                "redis at %s not reachable (%s), attempt %d/%d", _redact(url), exc, attempt, attempts
            )
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")  # pragma: no cover


def _redact(url: str) -> str:
    """The URL without its password, for log lines."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':***@' if user else '***@'}{host}"
