"""Errors of the alerting crew, rooted at :class:`handoff.errors.HandoffError`."""

from __future__ import annotations

from handoff.errors import ConfigError, HandoffError


class AlertingError(HandoffError):
    """Root of every error raised by :mod:`alerting`."""


class RoutingError(ConfigError, AlertingError):
    """The routing file is missing, unreadable or invalid; the message names the file, line and field."""


class InvalidAnomaly(AlertingError):
    """A payload handed to the dispatcher is not a contract anomaly (it can never be sent; dead-letter it)."""
