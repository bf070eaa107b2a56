"""Stream producer: XADD JSON payloads in the field ``payload``, singly or pipelined, with optional trimming."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import redis.asyncio as aredis

from handoff.errors import PayloadTooLarge
from handoff.keys import PAYLOAD_FIELD

#: Payloads above this size are refused: large context travels by URL (see :mod:`handoff.offload`).
MAX_PAYLOAD_BYTES = 500 * 1000

Payload = bytes | Mapping[str, Any]


def encode(payload: Payload, limit: int = MAX_PAYLOAD_BYTES) -> bytes:
    """JSON-encode ``payload`` (bytes pass through) and enforce the size limit."""
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    if len(data) > limit:
        raise PayloadTooLarge(len(data), limit)
    return data


def minid_for_age(max_age_ms: int, now_ms: int | None = None) -> str:
    """The MINID that keeps entries younger than ``max_age_ms``."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    return f"{max(0, now - max_age_ms)}-0"


class StreamProducer:
    """Appends entries to one stream.

    ``max_age_ms`` trims by MINID (time window) and ``maxlen`` by length; ``approx`` uses ``~`` so Redis trims
    whole radix-tree nodes only, which is far cheaper and never trims more than asked.
    """

    def __init__(
        self,
        redis: aredis.Redis,
        stream: str,
        *,
        max_age_ms: int | None = None,
        maxlen: int | None = None,
        approx: bool = True,
        limit: int = MAX_PAYLOAD_BYTES,
    ) -> None:
        if max_age_ms is not None and maxlen is not None:
            raise ValueError("trim by max_age_ms or by maxlen, not both")
        self.redis = redis
        self.stream = stream
        self.max_age_ms = max_age_ms
        self.maxlen = maxlen
        self.approx = approx
        self.limit = limit

    def xadd_args(self, data: bytes, now_ms: int | None = None) -> list[Any]:
        """The XADD command for ``data`` (used directly by atomic emit-and-ack)."""
        args: list[Any] = ["XADD", self.stream]
        if self.max_age_ms is not None:
            args += ["MINID", "~" if self.approx else "=", minid_for_age(self.max_age_ms, now_ms)]
        elif self.maxlen is not None:
            args += ["MAXLEN", "~" if self.approx else "=", self.maxlen]
        args += ["*", PAYLOAD_FIELD, data]
        return args

    async def add(self, payload: Payload) -> str:
        """Append one entry; returns its ID."""
        entry_id = await self.redis.execute_command(*self.xadd_args(encode(payload, self.limit)))  # type: ignore[no-untyped-call]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def add_many(self, payloads: Iterable[Payload]) -> list[str]:
        """Append many entries in one pipelined round trip (not a transaction); returns their IDs in order."""
        encoded = [encode(p, self.limit) for p in payloads]
        if not encoded:
            return []
        now_ms = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for data in encoded:
                pipe.execute_command(*self.xadd_args(data, now_ms))
            ids = await pipe.execute()
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
