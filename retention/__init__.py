"""Retention: trim every stream of the contract by age, never past work a live consumer group still owes.

Run it with ``waterdoctor retention``; embed it with :class:`Retention` and :func:`default_policies`. The trimmer
(which pulls in redis and prometheus_client) is imported on first use, so the CLI's parser stays quick to build.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from retention.policy import RetentionPolicy, default_policies, format_duration, parse_duration

if TYPE_CHECKING:
    from retention.trimmer import Retention, RetentionConfig, TrimReport

__all__ = [
    "Retention",
    "RetentionConfig",
    "RetentionPolicy",
    "TrimReport",
    "default_policies",
    "format_duration",
    "parse_duration",
]

_LAZY = {"Retention", "RetentionConfig", "TrimReport"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from retention import trimmer

        return getattr(trimmer, name)
    raise AttributeError(f"module 'retention' has no attribute {name!r}")
