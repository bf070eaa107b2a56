"""Retention policies: how long each stream of the contract keeps its entries, and duration parsing for the CLI."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from handoff import keys
from handoff.settings import Settings

__all__ = [
    "DEFAULT_DEAD_WINDOW_MS",
    "DEFAULT_QUARANTINE_WINDOW_MS",
    "DEFAULT_READINGS_WINDOW_MS",
    "RetentionPolicy",
    "default_policies",
    "format_duration",
    "parse_duration",
]

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
DEFAULT_READINGS_WINDOW_MS = 24 * HOUR_MS
DEFAULT_QUARANTINE_WINDOW_MS = 7 * DAY_MS
DEFAULT_DEAD_WINDOW_MS = 30 * DAY_MS

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": HOUR_MS, "d": DAY_MS, "w": 7 * DAY_MS}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str) -> int:
    """``"90s"``, ``"15m"``, ``"2h"``, ``"7d"``, ``"1h30m"``, ``"1500ms"`` or plain seconds -> milliseconds."""
    t = text.strip().lower().replace(" ", "")
    if not t:
        raise ValueError("empty duration")
    try:
        return round(float(t) * 1000)
    except ValueError:
        pass
    pos = 0
    total = 0.0
    for m in _PART.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS_MS[m.group(2)]
        pos = m.end()
    if pos != len(t) or pos == 0:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 2h, 7d, 1h30m)")
    return round(total)


def format_duration(ms: int | float | None) -> str:
    """A short human form: ``950ms``, ``42s``, ``3m20s``, ``5h02m``, ``12d04h``; ``-`` for ``None``."""
    if ms is None:
        return "-"
    ms = int(ms)
    if ms < 1000:
        return f"{ms}ms"
    s = ms // 1000
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Keep entries of ``stream`` younger than ``max_age_ms`` (by the millisecond part of their IDs)."""

    stream: str
    max_age_ms: int

    def __post_init__(self) -> None:
        if self.max_age_ms <= 0:
            raise ValueError(f"retention window of {self.stream} must be positive")


def default_policies(
    settings: Settings,
    *,
    readings_ms: int = DEFAULT_READINGS_WINDOW_MS,
    anomalies_ms: int | None = None,
    quarantine_ms: int = DEFAULT_QUARANTINE_WINDOW_MS,
    dead_ms: int = DEFAULT_DEAD_WINDOW_MS,
) -> Sequence[RetentionPolicy]:
    """One policy per contract stream; anomalies keep ``WD_ANOMALY_RETENTION_DAYS`` unless overridden."""
    anomalies = anomalies_ms if anomalies_ms is not None else round(settings.anomaly_retention_days * DAY_MS)
    return (
        RetentionPolicy(keys.READINGS, readings_ms),
        RetentionPolicy(keys.ANOMALIES, anomalies),
        RetentionPolicy(keys.QUARANTINE, quarantine_ms),
        RetentionPolicy(keys.DEAD, dead_ms),
    )
