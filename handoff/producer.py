"""Stream producer: XADD JSON payloads in the field ``payload``, singly or in batches, with optional trimming.

Batches go through one Lua script per chunk (:data:`_ADD_MANY_LUA`) rather than a pipeline of XADD commands: a
pipeline costs the client a packed command and a parsed reply per entry (about 15 us in redis.asyncio), the
script one argument per entry and one reply per chunk. Measured in ``benchmarks/bench_handoff.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import redis.asyncio as aredis

from handoff._wire import RawRedis, Script
from handoff.errors import PayloadTooLarge
from handoff.keys import PAYLOAD_FIELD

#: Payloads above this size are refused: large context travels by URL (see :mod:`handoff.offload`).
MAX_PAYLOAD_BYTES = 500 * 1000

Payload = bytes | Mapping[str, Any]

#: A script call appends at most this many entries, and this many payload bytes (one entry may exceed it alone):
#: it blocks the server while it runs (about 2 us per entry) and its arguments sit in one query buffer.
CHUNK_ENTRIES = 1000
CHUNK_BYTES = 4 * 1024 * 1024

# KEYS[1] = stream; ARGV = n, the n trim arguments, the field name, then one payload per entry. Returns the IDs.
_ADD_MANY_LUA = """
local n = tonumber(ARGV[1])
local cmd = {'XADD', KEYS[1]}
for k = 1, n do cmd[2 + k] = ARGV[1 + k] end
cmd[n + 3] = '*'
cmd[n + 4] = ARGV[n + 2]
local last = n + 5
local ids = {}
for i = n + 3, #ARGV do
  cmd[last] = ARGV[i]
  ids[i - n - 2] = redis.call(unpack(cmd))
end
return ids
"""
_ADD_MANY = Script(_ADD_MANY_LUA)


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
        self._raw = RawRedis(redis)

    def _trim_args(self, now_ms: int | None) -> list[Any]:
        if self.max_age_ms is not None:
            return ["MINID", "~" if self.approx else "=", minid_for_age(self.max_age_ms, now_ms)]
        if self.maxlen is not None:
            return ["MAXLEN", "~" if self.approx else "=", self.maxlen]
        return []

    def xadd_args(self, data: bytes, now_ms: int | None = None) -> list[Any]:
        """The XADD command for ``data`` (used directly by atomic emit-and-ack)."""
        return ["XADD", self.stream, *self._trim_args(now_ms), "*", PAYLOAD_FIELD, data]

    async def add(self, payload: Payload) -> str:
        """Append one entry; returns its ID."""
        raw = self._raw
        (entry_id,) = await raw.call(raw.pack(self.xadd_args(encode(payload, self.limit))))
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def add_many(self, payloads: Iterable[Payload]) -> list[str]:
        """Append many entries in one round trip; returns their IDs in order.

        Entries are added in chunks (:data:`CHUNK_ENTRIES`, :data:`CHUNK_BYTES`), one script call each, all sent
        in one write. Each chunk is appended as a unit (no other client's entry lands in the middle of it); the
        batch as a whole is not a transaction: if a call fails, earlier chunks stay added.
        """
        limit = self.limit
        encoded = [p if type(p) is bytes and len(p) <= limit else encode(p, limit) for p in payloads]
        if not encoded:
            return []
        trim = self._trim_args(int(time.time() * 1000))
        head = [len(trim), *trim, PAYLOAD_FIELD]
        calls: list[list[Any]] = []
        start = 0
        while start < len(encoded):
            end, size = start, 0
            # Chunk by count and bytes; one entry always goes in, however large (the size limit bounds it).
            while end < len(encoded) and end - start < CHUNK_ENTRIES:
                size += len(encoded[end])
                if size > CHUNK_BYTES and end > start:
                    break
                end += 1
            calls.append([*head, *encoded[start:end]])
            start = end
        replies = await self._raw.evalsha(_ADD_MANY, [self.stream], calls)
        return [i.decode() if isinstance(i, bytes) else str(i) for reply in replies for i in reply]
