"""The retention loop: trim every stream by its age policy, never past work a live consumer group still owes.

Each pass, per stream:

1. read :func:`handoff.stats.stream_stats` (server clock, groups, consumers, pending);
2. ask :func:`handoff.stats.safe_trim_bound` for the MINID: the policy's cut-off, lowered to the oldest entry any
   *live* group has pending or not yet been delivered. A group whose consumers have all been idle past
   ``idle_cap_ms`` stops holding trimming back; that is logged as a warning and shown by the
   ``wd_retention_group_ignored`` gauge every pass it happens, because it means that group loses work;
3. ``XTRIM MINID ~ <bound> LIMIT n`` in rounds (whole radix-tree nodes only: cheap, never below the bound, each
   round bounded so the server is never blocked for long) or ``XTRIM MINID = <bound>`` when exact trimming is
   asked for (tests, or an operator who wants the window to the millisecond).

Trimming is safe against consumers that move during a pass: a group only moves forward, so a bound computed a
moment earlier is at most more conservative than needed. Entries an ignored group held pending disappear from
under it; the hand-off worker drops such PEL references when it claims or re-reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from handoff.metrics import STREAM_LAG, STREAM_LENGTH, STREAM_OLDEST_PENDING, STREAM_PENDING
from handoff.producer import minid_for_age
from handoff.stats import StreamStats, TrimBound, parse_id, safe_trim_bound, stream_stats
from retention import metrics
from retention.policy import HOUR_MS, RetentionPolicy

logger = logging.getLogger(__name__)

__all__ = ["Retention", "RetentionConfig", "TrimReport"]

_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """How retention trims. Defaults suit production; tests use ``exact=True`` and short caps."""

    #: Seconds between passes.
    interval_s: float = 60.0
    #: A group whose consumers are all idle longer than this no longer holds trimming back (``None``: never).
    idle_cap_ms: int | None = 6 * HOUR_MS
    #: ``XTRIM MINID =`` (to the entry) instead of ``~`` (whole nodes, the default and far cheaper).
    exact: bool = False
    #: ``LIMIT`` of each approximate XTRIM: entries removed per round, bounding each command's run time.
    limit: int = 10_000
    #: Rounds per stream per pass; the rest waits for the next pass, so one huge backlog cannot stall the loop.
    max_rounds: int = 1_000
    #: ``MEMORY USAGE ... SAMPLES`` for the memory gauge.
    memory_samples: int = 5


@dataclass(frozen=True, slots=True)
class TrimReport:
    """What one pass did to one stream."""

    stream: str
    exists: bool
    policy_minid: str
    minid: str
    trimmed: int
    length_before: int
    length_after: int
    held_back_by: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    group_bounds: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "exists": self.exists,
            "policy_minid": self.policy_minid,
            "minid": self.minid,
            "trimmed": self.trimmed,
            "length_before": self.length_before,
            "length_after": self.length_after,
            "held_back_by": list(self.held_back_by),
            "ignored": list(self.ignored),
            "group_bounds": dict(self.group_bounds),
        }


class Retention:
    """Trims ``policies``' streams on ``redis``; call :meth:`run_once` for one pass or :meth:`run` to loop."""

    def __init__(
        self,
        redis: aredis.Redis,
        policies: Sequence[RetentionPolicy],
        config: RetentionConfig | None = None,
    ) -> None:
        self.redis = redis
        self.policies = tuple(policies)
        self.config = config or RetentionConfig()
        # When this process first saw each group without consumers (monotonic seconds): such a group has no idle
        # time of its own, so it holds trimming back until it has sat empty for the cap under our eyes.
        self._orphan_since: dict[tuple[str, str], float] = {}
        self._labels: dict[str, set[str]] = {}
        self._held: set[tuple[str, str]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Pass over every stream each ``interval_s`` until ``stop`` is set. Failures are logged and retried."""
        logger.info(
            "retention: %s; idle cap %s ms; %s trimming",
            ", ".join(f"{p.stream} {p.max_age_ms} ms" for p in self.policies),
            self.config.idle_cap_ms,
            "exact" if self.config.exact else "approximate",
        )
        while not stop.is_set():
            started = time.perf_counter()
            try:
                await self.run_once(stop)
            except _TRANSIENT as exc:
                metrics.RUNS.labels("error").inc()
                logger.warning("retention pass failed, Redis unavailable (%s); retrying next pass", exc)
            except ResponseError as exc:
                metrics.RUNS.labels("error").inc()
                logger.warning("retention pass failed (%s); retrying next pass", exc)
            except Exception:
                metrics.RUNS.labels("error").inc()
                logger.exception("retention pass failed unexpectedly; retrying next pass")
            finally:
                metrics.PASS_SECONDS.observe(time.perf_counter() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.interval_s)
        logger.info("retention stopped")

    async def run_once(self, stop: asyncio.Event | None = None) -> list[TrimReport]:
        """One pass over every stream; raises on Redis errors (the loop in :meth:`run` catches them)."""
        reports = []
        for policy in self.policies:
            if stop is not None and stop.is_set():
                break
            reports.append(await self.trim(policy, stop))
        metrics.RUNS.labels("ok").inc()
        metrics.LAST_SUCCESS.set(time.time())
        return reports

    async def trim(self, policy: RetentionPolicy, stop: asyncio.Event | None = None) -> TrimReport:
        """Trim one stream to its policy, as far as live groups allow; updates the metrics."""
        stats = await stream_stats(self.redis, policy.stream, memory_samples=self.config.memory_samples)
        bound = self._bound(policy, stats)
        trimmed = 0
        if stats.first_entry_id is not None and parse_id(stats.first_entry_id) < parse_id(bound.minid):
            trimmed = await self._xtrim(policy.stream, bound.minid, stop)
        after = stats
        if trimmed:
            metrics.TRIMMED.labels(policy.stream).inc(trimmed)
            after = await stream_stats(
                self.redis, policy.stream, memory_samples=self.config.memory_samples, groups=False
            )
            logger.info(
                "%s: trimmed %d entries below %s (%d left)", policy.stream, trimmed, bound.minid, after.length
            )
        self._observe(stats, after, bound)
        return TrimReport(
            stream=policy.stream,
            exists=stats.exists,
            policy_minid=bound.policy_minid,
            minid=bound.minid,
            trimmed=trimmed,
            length_before=stats.length,
            length_after=after.length,
            held_back_by=bound.held_back_by,
            ignored=bound.ignored,
            group_bounds=dict(bound.group_bounds),
        )

    def _bound(self, policy: RetentionPolicy, stats: StreamStats) -> TrimBound:
        now = time.monotonic()
        overrides: dict[str, int] = {}
        present = set()
        for g in stats.groups:
            key = (policy.stream, g.name)
            present.add(key)
            if g.consumers:
                self._orphan_since.pop(key, None)
            else:
                since = self._orphan_since.setdefault(key, now)
                overrides[g.name] = int((now - since) * 1000)
        for key in [k for k in self._orphan_since if k[0] == policy.stream and k not in present]:
            del self._orphan_since[key]
        bound = safe_trim_bound(
            minid_for_age(policy.max_age_ms, stats.server_time_ms),
            stats.groups,
            idle_cap_ms=self.config.idle_cap_ms,
            idle_overrides=overrides,
        )
        for name in bound.ignored:
            ignored = stats.group(name)
            logger.warning(
                "%s: group %s idle %s ms (cap %s ms) no longer holds trimming back; trimming past %s, "
                "entries it was owed are being removed",
                policy.stream,
                name,
                overrides.get(name) if ignored is None or not ignored.consumers else ignored.idle_ms,
                self.config.idle_cap_ms,
                bound.group_bounds.get(name),
            )
        for name in bound.held_back_by:
            if (policy.stream, name) not in self._held:
                logger.info(
                    "%s: group %s holds trimming back at %s (policy %s)",
                    policy.stream,
                    name,
                    bound.group_bounds[name],
                    bound.policy_minid,
                )
        self._held = {k for k in self._held if k[0] != policy.stream} | {
            (policy.stream, n) for n in bound.held_back_by
        }
        return bound

    async def _xtrim(self, stream: str, minid: str, stop: asyncio.Event | None) -> int:
        if self.config.exact:
            return int(await self.redis.xtrim(stream, minid=minid, approximate=False))
        total = 0
        for _ in range(self.config.max_rounds):
            n = int(await self.redis.xtrim(stream, minid=minid, approximate=True, limit=self.config.limit))
            total += n
            if n == 0 or (stop is not None and stop.is_set()):
                break
            await asyncio.sleep(0)  # let other work on this loop run between rounds
        return total

    def _observe(self, stats: StreamStats, after: StreamStats, bound: TrimBound) -> None:
        stream = stats.name
        STREAM_LENGTH.labels(stream).set(after.length)
        metrics.STREAM_MEMORY.labels(stream).set(after.memory_bytes or 0)
        metrics.OLDEST_ENTRY_AGE.labels(stream).set((after.first_entry_age_ms or 0) / 1000)
        names = {g.name for g in stats.groups}
        for g in stats.groups:
            metrics.HELD_BACK.labels(stream, g.name).set(1 if g.name in bound.held_back_by else 0)
            metrics.GROUP_IGNORED.labels(stream, g.name).set(1 if g.name in bound.ignored else 0)
            STREAM_LAG.labels(stream, g.name).set(g.lag)
            STREAM_PENDING.labels(stream, g.name).set(g.pending)
            STREAM_OLDEST_PENDING.labels(stream, g.name).set((g.oldest_pending_age_ms or 0) / 1000)
        # A deleted group must not leave its last value behind as if it were still current.
        for gone in self._labels.get(stream, set()) - names:
            for gauge in (
                metrics.HELD_BACK,
                metrics.GROUP_IGNORED,
                STREAM_LAG,
                STREAM_PENDING,
                STREAM_OLDEST_PENDING,
            ):
                with contextlib.suppress(KeyError):
                    gauge.remove(stream, gone)
        self._labels[stream] = names
