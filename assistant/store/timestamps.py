"""Timestamps as the store records them: ISO 8601 in UTC, so they sort as text and read in any zone."""

from __future__ import annotations

from datetime import datetime, timezone


def now() -> str:
    """The current time, to the millisecond (ordering never relies on it: ids do that)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
