"""Wire time helpers: ISO-8601 UTC with millisecond precision, as the Dart Stem writes."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def utcnow() -> datetime:
    """Current time as an aware UTC datetime."""
    return datetime.now(UTC)


def to_iso(dt: datetime) -> str:
    """Format ``dt`` as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (naive datetimes are taken as UTC)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    elif dt.utcoffset():
        dt = dt.astimezone(UTC)
    return dt.isoformat(timespec="milliseconds")[:23] + "Z"


def from_iso(value: str) -> datetime:
    """Parse an ISO-8601 string; a value without an offset is taken as UTC."""
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt


def to_epoch(dt: datetime) -> float:
    """Seconds since the epoch for ``dt``."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def from_epoch(ts: float) -> datetime:
    """Aware UTC datetime for epoch seconds."""
    return datetime.fromtimestamp(ts, UTC)


def now_epoch() -> float:
    """Wall-clock epoch seconds (what delayed delivery and leases compare against)."""
    return time.time()
