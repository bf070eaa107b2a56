"""Retention: trim every stream of the contract by age, never past work a live consumer group still owes.

Run it with ``waterdoctor retention``; embed it with :class:`Retention` and :func:`default_policies`.
"""

from __future__ import annotations

from retention.policy import RetentionPolicy, default_policies, format_duration, parse_duration
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
