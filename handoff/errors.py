"""One exception root for the hand-off layer; third-party errors are translated with ``raise ... from``."""

from __future__ import annotations


class HandoffError(Exception):
    """Root of every error raised by :mod:`handoff`."""


class ConfigError(HandoffError):
    """Settings are missing or invalid; the message says which and how to fix it."""


class PayloadTooLarge(HandoffError):
    """A payload exceeds the stream size limit; large context travels by reference URL (see :mod:`handoff.offload`)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"payload is {size} bytes, over the {limit}-byte stream limit: store the bulk with "
            "handoff.offload.store_blob() and carry its URL instead"
        )
        self.size = size
        self.limit = limit


class RedisUnavailable(HandoffError):
    """Redis could not be reached within the retry budget."""
