"""Stream and consumer-group statistics over ``redis.asyncio``, for metrics, ``waterdoctor status`` and retention.

One call, :func:`stream_stats`, reads everything an operator or a gauge needs about a stream in two pipelined round
trips (plus a bounded count when the group lag has to be computed), on Redis 7.0 and Valkey 8 alike:

* the stream: length, memory (``MEMORY USAGE ... SAMPLES n``), first/last entry IDs and their ages;
* each group: consumers with their idle time and pending count, pending count, last-delivered-id, entries-read,
  lag, and the oldest pending entry (ID, age, idle time since its last delivery, deliveries).

Ages are measured against the server clock (``TIME``), because entry IDs carry the server's milliseconds: a skewed
clock on the operator's laptop must not make a fresh stream look an hour old.

Why lag is computed and not simply read from ``XINFO GROUPS``: Redis 7.0 (and Valkey 8) report ``lag`` as nil after
an XDEL past the group's position, for a group created at ``$`` or set with ``XGROUP SETID``, and report a number that
is too high once entries the group never read were trimmed (the server counts them as still owed). So lag is
counted exactly whenever that is cheap (see :func:`group_lag`) and the server value is only a fallback.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import redis.asyncio as aredis
from redis.exceptions import NoPermissionError, ResponseError

from handoff.errors import HandoffError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LAG_COUNT_CAP",
    "ConsumerStats",
    "GroupStats",
    "LagSource",
    "StreamStats",
    "TrimBound",
    "count_entries",
    "format_id",
    "group_lag",
    "id_ms",
    "next_id",
    "oldest_needed_id",
    "parse_id",
    "safe_trim_bound",
    "server_time_ms",
    "stream_stats",
]

#: Default bound on the entries counted to compute one group's lag. Counting goes over the smaller side of the
#: stream around the group's last-delivered-id, in server-side chunks, so this caps the server work per group.
DEFAULT_LAG_COUNT_CAP: Final = 10_000
_COUNT_CHUNK: Final = 5_000
_MAX_SEQ: Final = 2**64 - 1

#: Where a lag figure comes from: ``exact`` (counted, or derived exactly from the stream's ends), ``server``
#: (``XINFO GROUPS`` lag, used past the count cap), ``estimated`` (past the cap and the server gave nil).
LagSource = Literal["exact", "server", "estimated"]

# Counts entries of KEYS[1] in [ARGV[1], ARGV[2]] up to ARGV[3] on the server, so only a number crosses the wire;
# XLEN rides along so that "length minus entries at or before the position" is taken at one instant.
_COUNT_LUA: Final = """
local r = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', tonumber(ARGV[3]))
local n = #r
local last = ''
if n > 0 then last = r[n][1] end
return {n, last, redis.call('XLEN', KEYS[1])}
"""


# --- Stream IDs ------------------------------------------------------------------------------------------------


def parse_id(entry_id: str | bytes) -> tuple[int, int]:
    """``"1764572400125-3"`` -> ``(1764572400125, 3)``; a bare ``"ms"`` means sequence 0."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(ms: int, seq: int = 0) -> str:
    return f"{ms}-{seq}"


def id_ms(entry_id: str | bytes) -> int:
    """The millisecond part of a stream ID: when the server added the entry (for ``*`` IDs)."""
    return parse_id(entry_id)[0]


def next_id(entry_id: str | bytes) -> str:
    """The smallest ID strictly greater than ``entry_id``."""
    ms, seq = parse_id(entry_id)
    return format_id(ms + 1, 0) if seq == _MAX_SEQ else format_id(ms, seq + 1)


# --- Data ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    """One consumer of a group (``XINFO CONSUMERS``)."""

    name: str
    pending: int
    #: Milliseconds since the consumer's last attempted interaction (a blocked read with nothing to read counts).
    idle_ms: int
    #: Milliseconds since its last successful read; Redis >= 7.2 and Valkey only, ``None`` on Redis 7.0.
    inactive_ms: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pending": self.pending,
            "idle_ms": self.idle_ms,
            "inactive_ms": self.inactive_ms,
        }


@dataclass(frozen=True, slots=True)
class GroupStats:
    """One consumer group of a stream."""

    stream: str
    name: str
    consumers: tuple[ConsumerStats, ...]
    #: Entries delivered to the group and not yet acknowledged (its PEL size).
    pending: int
    last_delivered_id: str
    #: The server's entries-read counter (``None`` when the server does not know it).
    entries_read: int | None
    #: Entries in the stream after ``last_delivered_id``: not yet delivered to any consumer of the group.
    lag: int
    lag_source: LagSource
    #: The lag exactly as ``XINFO GROUPS`` reported it (``None`` = nil), for comparison and debugging.
    server_lag: int | None
    oldest_pending_id: str | None = None
    #: Server time minus the ID's milliseconds: how long ago the oldest unacknowledged entry was added.
    oldest_pending_age_ms: int | None = None
    #: Milliseconds since that entry was last delivered (XPENDING idle); resets on every redelivery or claim.
    oldest_pending_idle_ms: int | None = None
    oldest_pending_deliveries: int | None = None

    @property
    def lag_exact(self) -> bool:
        return self.lag_source == "exact"

    @property
    def idle_ms(self) -> int | None:
        """The smallest idle time over the group's consumers: how recently anyone read; ``None`` if no consumers."""
        return min((c.idle_ms for c in self.consumers), default=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "name": self.name,
            "consumers": [c.to_json() for c in self.consumers],
            "pending": self.pending,
            "last_delivered_id": self.last_delivered_id,
            "entries_read": self.entries_read,
            "lag": self.lag,
            "lag_source": self.lag_source,
            "server_lag": self.server_lag,
            "oldest_pending_id": self.oldest_pending_id,
            "oldest_pending_age_ms": self.oldest_pending_age_ms,
            "oldest_pending_idle_ms": self.oldest_pending_idle_ms,
            "oldest_pending_deliveries": self.oldest_pending_deliveries,
            "idle_ms": self.idle_ms,
        }


@dataclass(frozen=True, slots=True)
class StreamStats:
    """A stream and its groups, as seen at ``server_time_ms``. A missing key gives ``exists=False``, length 0."""

    name: str
    exists: bool
    server_time_ms: int
    length: int = 0
    #: ``MEMORY USAGE`` in bytes (sampled: see ``memory_samples`` of :func:`stream_stats`); ``None`` if missing.
    memory_bytes: int | None = None
    first_entry_id: str | None = None
    last_entry_id: str | None = None
    last_generated_id: str | None = None
    first_entry_age_ms: int | None = None
    last_entry_age_ms: int | None = None
    entries_added: int | None = None
    max_deleted_entry_id: str | None = None
    groups: tuple[GroupStats, ...] = field(default_factory=tuple)

    def group(self, name: str) -> GroupStats | None:
        """The group called ``name``, or ``None``."""
        return next((g for g in self.groups if g.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "exists": self.exists,
            "server_time_ms": self.server_time_ms,
            "length": self.length,
            "memory_bytes": self.memory_bytes,
            "first_entry_id": self.first_entry_id,
            "last_entry_id": self.last_entry_id,
            "last_generated_id": self.last_generated_id,
            "first_entry_age_ms": self.first_entry_age_ms,
            "last_entry_age_ms": self.last_entry_age_ms,
            "entries_added": self.entries_added,
            "max_deleted_entry_id": self.max_deleted_entry_id,
            "groups": [g.to_json() for g in self.groups],
        }


# --- Reading ---------------------------------------------------------------------------------------------------


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _opt_s(value: Any) -> str | None:
    return None if value is None else _s(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _age(now_ms: int, entry_id: str | None) -> int | None:
    # Clamped at 0: an explicit future ID (or a clock step) must not give negative ages to gauges.
    return None if entry_id is None else max(0, now_ms - id_ms(entry_id))


async def server_time_ms(r: aredis.Redis) -> int:
    """The server clock in epoch milliseconds (``TIME``)."""
    sec, usec = await r.time()
    return int(sec) * 1000 + int(usec) // 1000


async def stream_stats(
    r: aredis.Redis,
    stream: str,
    *,
    memory_samples: int = 5,
    lag_count_cap: int = DEFAULT_LAG_COUNT_CAP,
    groups: bool = True,
) -> StreamStats:
    """Statistics of ``stream`` and (unless ``groups=False``) of each of its consumer groups.

    ``memory_samples`` is passed to ``MEMORY USAGE ... SAMPLES`` (0 = every node, exact but O(nodes)).
    ``lag_count_cap`` bounds the entries counted per group to compute lag (see :func:`group_lag`); 0 never counts.
    A key that does not exist gives ``exists=False``; a key of another type raises :class:`HandoffError`.
    """
    async with r.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.xinfo_stream(stream)
        pipe.memory_usage(stream, samples=memory_samples)
        if groups:
            pipe.xinfo_groups(stream)
        replies = await pipe.execute(raise_on_error=False)
    if isinstance(replies[0], Exception):  # e.g. an ACL user without TIME: say so, do not crash on unpacking
        raise HandoffError(f"cannot read the server clock (TIME): {replies[0]}") from replies[0]
    sec, usec = replies[0]
    now_ms = int(sec) * 1000 + int(usec) // 1000
    info = replies[1]
    if isinstance(info, ResponseError):
        if "no such key" in str(info).lower():
            return StreamStats(name=stream, exists=False, server_time_ms=now_ms)
        raise HandoffError(f"cannot read stream {stream}: {info}") from info
    first = info.get("first-entry")
    last = info.get("last-entry")
    first_id = _s(first[0]) if first else None
    last_id = _s(last[0]) if last else None
    memory = replies[2]
    stats = StreamStats(
        name=stream,
        exists=True,
        server_time_ms=now_ms,
        length=int(info["length"]),
        memory_bytes=None if isinstance(memory, Exception) else _opt_int(memory),
        first_entry_id=first_id,
        last_entry_id=last_id,
        last_generated_id=_opt_s(info.get("last-generated-id")),
        first_entry_age_ms=_age(now_ms, first_id),
        last_entry_age_ms=_age(now_ms, last_id),
        entries_added=_opt_int(info.get("entries-added")),
        max_deleted_entry_id=_opt_s(info.get("max-deleted-entry-id")),
    )
    if not groups:
        return stats
    raw_groups = replies[3]
    if isinstance(raw_groups, Exception):
        raise HandoffError(f"cannot read groups of {stream}: {raw_groups}") from raw_groups
    group_list = list(raw_groups)
    if not group_list:
        return stats
    async with r.pipeline(transaction=False) as pipe:
        for g in group_list:
            name = _s(g["name"])
            pipe.xinfo_consumers(stream, name)
            pipe.xpending(stream, name)
            pipe.xpending_range(stream, name, min="-", max="+", count=1)
        replies = await pipe.execute()
    out: list[GroupStats] = []
    for i, g in enumerate(group_list):
        consumers_raw, summary, oldest_rows = replies[3 * i : 3 * i + 3]
        out.append(
            await _group_stats(r, stats, g, consumers_raw, summary, oldest_rows, lag_count_cap=lag_count_cap)
        )
    return dataclasses.replace(stats, groups=tuple(out))


async def _group_stats(
    r: aredis.Redis,
    stream: StreamStats,
    g: Mapping[str, Any],
    consumers_raw: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    oldest_rows: Sequence[Mapping[str, Any]],
    *,
    lag_count_cap: int,
) -> GroupStats:
    consumers = tuple(
        ConsumerStats(
            name=_s(c["name"]),
            pending=int(c["pending"]),
            idle_ms=int(c["idle"]),
            inactive_ms=_opt_int(c.get("inactive")),
        )
        for c in consumers_raw
    )
    oldest = oldest_rows[0] if oldest_rows else None
    oldest_id = _opt_s(summary.get("min")) if summary.get("pending") else None
    if oldest is not None:
        oldest_id = _s(oldest["message_id"])
    last_delivered = _s(g["last-delivered-id"])
    server_lag = _opt_int(g.get("lag"))
    lag, source = await group_lag(
        r,
        stream,
        last_delivered,
        server_lag=server_lag,
        entries_read=_opt_int(g.get("entries-read")),
        count_cap=lag_count_cap,
    )
    return GroupStats(
        stream=stream.name,
        name=_s(g["name"]),
        consumers=consumers,
        pending=int(g["pending"]),
        last_delivered_id=last_delivered,
        entries_read=_opt_int(g.get("entries-read")),
        lag=lag,
        lag_source=source,
        server_lag=server_lag,
        oldest_pending_id=oldest_id,
        oldest_pending_age_ms=_age(stream.server_time_ms, oldest_id),
        oldest_pending_idle_ms=None if oldest is None else int(oldest["time_since_delivered"]),
        oldest_pending_deliveries=None if oldest is None else int(oldest["times_delivered"]),
    )


async def group_lag(
    r: aredis.Redis,
    stream: StreamStats,
    last_delivered_id: str,
    *,
    server_lag: int | None,
    entries_read: int | None,
    count_cap: int = DEFAULT_LAG_COUNT_CAP,
) -> tuple[int, LagSource]:
    """Entries of ``stream`` with an ID greater than ``last_delivered_id``, and where the figure comes from.

    Exact without counting when the stream is empty, the group is at or past the last entry (0), or the group is
    before the first entry (the whole length). Otherwise the smaller side of the stream around the position is
    counted on the server, at most ``count_cap`` entries, in chunks of a few thousand (each chunk is one short
    script, so a big count never blocks the server for long). Past the cap: the server's lag if it gave one
    (``server``), else ``entries-added - entries-read`` (an upper bound: deleted entries count) or, without
    entries-read, the share of the ID time span after the position (``estimated``).
    """
    length = stream.length
    ld = parse_id(last_delivered_id)
    if length == 0 or stream.last_entry_id is None or stream.first_entry_id is None:
        return 0, "exact"
    if ld >= parse_id(stream.last_entry_id):
        return 0, "exact"
    if ld < parse_id(stream.first_entry_id):
        return length, "exact"
    estimate = _estimate_lag(stream, ld, server_lag, entries_read)
    if count_cap > 0:
        if estimate <= length // 2:
            n, complete, _ = await count_entries(r, stream.name, "(" + last_delivered_id, "+", count_cap)
            if complete:
                return n, "exact"
        else:
            n, complete, xlen = await count_entries(r, stream.name, "-", last_delivered_id, count_cap)
            if complete:
                return max(0, xlen - n), "exact"
    if server_lag is not None:
        return server_lag, "server"
    return estimate, "estimated"


def _estimate_lag(
    stream: StreamStats, ld: tuple[int, int], server_lag: int | None, entries_read: int | None
) -> int:
    length = stream.length
    if server_lag is not None:
        return min(server_lag, length)
    if entries_read is not None and stream.entries_added is not None:
        return max(0, min(length, stream.entries_added - entries_read))
    assert stream.first_entry_id is not None and stream.last_entry_id is not None
    first_ms, last_ms = id_ms(stream.first_entry_id), id_ms(stream.last_entry_id)
    if last_ms <= first_ms:
        return length // 2
    share = (last_ms - ld[0]) / (last_ms - first_ms)
    return max(0, min(length, math.ceil(length * share)))


async def count_entries(
    r: aredis.Redis, stream: str, start: str, end: str, cap: int
) -> tuple[int, bool, int]:
    """Count entries of ``stream`` in the XRANGE interval ``start``..``end`` (``(`` = exclusive), up to ``cap``.

    Returns ``(count, complete, xlen)``: ``complete`` is False when more than ``cap`` entries lie in the range
    (then ``count`` is ``cap + 1``); ``xlen`` is the stream length at the last chunk. Counting runs in a server-side
    script so no payload crosses the wire; where scripting is not permitted (an ACL without EVAL), it falls back
    to paging XRANGE from the client.
    """
    script = r.register_script(_COUNT_LUA)
    total = 0
    xlen = 0
    lo = start
    use_script = True
    while True:
        want = min(_COUNT_CHUNK, cap + 1 - total)
        if want <= 0:
            return total, False, xlen
        if use_script:
            try:
                n_raw, last_raw, xlen_raw = await script(keys=[stream], args=[lo, end, want])
                n, last, xlen = int(n_raw), _s(last_raw), int(xlen_raw)
            except NoPermissionError:
                logger.info("scripting not permitted; counting %s by paging XRANGE", stream)
                use_script = False
                continue
        else:
            async with r.pipeline(transaction=False) as pipe:
                pipe.xrange(stream, lo, end, count=want)
                pipe.xlen(stream)
                rows, xlen = await pipe.execute()
            n = len(rows)
            last = _s(rows[-1][0]) if rows else ""
        total += n
        if n < want:
            return total, True, xlen
        lo = "(" + last


# --- Retention bound -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrimBound:
    """Where trimming may go: ``XTRIM MINID minid`` removes only entries no live group still needs."""

    #: Trim entries with an ID strictly below this.
    minid: str
    #: What the age policy alone asked for.
    policy_minid: str
    #: Live groups that pushed ``minid`` below the policy (their undelivered or pending work is older).
    held_back_by: tuple[str, ...] = ()
    #: Groups idle past the cap that *would* have held trimming back and no longer do (their work may be lost).
    ignored: tuple[str, ...] = ()
    #: Per group: the lowest ID it still needs (``min(next(last-delivered-id), oldest pending id)``).
    group_bounds: Mapping[str, str] = field(default_factory=dict)

    @property
    def held_back(self) -> bool:
        return bool(self.held_back_by)


def oldest_needed_id(group: GroupStats) -> str:
    """The lowest ID ``group`` may still need: its oldest pending entry, or else the first one not yet delivered."""
    undelivered = next_id(group.last_delivered_id)
    if group.oldest_pending_id is not None and parse_id(group.oldest_pending_id) < parse_id(undelivered):
        return group.oldest_pending_id
    return undelivered


def safe_trim_bound(
    policy_minid: str,
    groups: Iterable[GroupStats],
    *,
    idle_cap_ms: int | None,
    idle_overrides: Mapping[str, int] | None = None,
) -> TrimBound:
    """The MINID to trim to: the policy's, lowered to what each live group still owes.

    A group is live while some consumer's idle time is below ``idle_cap_ms`` (``None``: every group is live). A
    group with no consumers has no idle time: it counts as live unless ``idle_overrides`` gives one (the retention
    loop passes how long it has watched the group sit without consumers), so a group created a moment before its
    first read is never trimmed under. A group idle past the cap stops holding trimming back and is listed in
    ``ignored`` when that actually lets trimming pass its position.
    """
    policy = parse_id(policy_minid)
    bound = policy
    held: list[str] = []
    ignored: list[str] = []
    bounds: dict[str, str] = {}
    overrides = idle_overrides or {}
    for g in groups:
        need = oldest_needed_id(g)
        bounds[g.name] = need
        need_key = parse_id(need)
        if need_key >= policy:
            continue  # nothing the policy would trim is still owed to this group
        idle = g.idle_ms if g.consumers else overrides.get(g.name)
        live = idle_cap_ms is None or idle is None or idle < idle_cap_ms
        if live:
            held.append(g.name)
            bound = min(bound, need_key)
        else:
            ignored.append(g.name)
    return TrimBound(
        minid=format_id(*bound),
        policy_minid=format_id(*policy),
        held_back_by=tuple(held),
        ignored=tuple(ignored),
        group_bounds=bounds,
    )
