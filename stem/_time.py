"""Wire time helpers: ISO-8601 strings as the Dart Stem reads and writes them.

Values we create are written as UTC with millisecond precision
(``2025-01-02T03:04:05.678Z``). The Dart Stem writes ``DateTime.toIso8601String()``:
milliseconds always, three more digits when the microseconds are not zero, and a
``Z`` only for UTC values (releases before its UTC clock wrote local time with no
offset). A time read from the wire remembers its text (:class:`WireTime`), so an
envelope that passes through a Python worker unchanged is re-encoded exactly as
it arrived.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, SupportsIndex


class WireTime(datetime):
    """An aware UTC datetime parsed from the wire that keeps the text it came from.

    :func:`to_iso` writes :attr:`wire_text` back unchanged. Anything derived from
    it (arithmetic, ``replace``, ``astimezone`` to another zone) is a new value
    without the text and is formatted the usual way.
    """

    #: The exact string this value was parsed from (None on derived values).
    wire_text: str | None = None

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        # datetime pickles subclasses through their constructor, which would drop
        # the text; keep it so a value sent to a pool process re-encodes the same.
        return (_rebuild_wire_time, (self.isoformat(), self.wire_text))


def _rebuild_wire_time(exact: str, text: str | None) -> WireTime:
    value = datetime.fromisoformat(exact)
    out = WireTime(value.year, value.month, value.day, value.hour, value.minute,
                   value.second, value.microsecond, tzinfo=UTC)
    out.wire_text = text
    return out


def utcnow() -> datetime:
    """Current time as an aware UTC datetime."""
    return datetime.now(UTC)


def to_iso(dt: datetime) -> str:
    """Format ``dt`` for the wire.

    A :class:`WireTime` is written back as it was read; anything else as
    ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (naive datetimes are taken as UTC).
    """
    if type(dt) is WireTime and dt.wire_text is not None:
        return dt.wire_text
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    elif dt.utcoffset():
        dt = dt.astimezone(UTC)
    return dt.isoformat(timespec="milliseconds")[:23] + "Z"


#: The last UTC ('Z') text parsed and its value: the envelopes of one bulk enqueue carry
#: the same ``enqueuedAt`` text (stamped once per millisecond), and a worker decodes
#: them one after another. Values are immutable, so sharing one is safe.
_last_iso: tuple[str, datetime] = ("", datetime(1970, 1, 1, tzinfo=UTC))


def from_iso(value: str) -> datetime:
    """Parse an ISO-8601 string into an aware UTC :class:`WireTime`.

    A value without an offset is local time, as Dart's ``DateTime.parse`` reads it
    (older Dart producers wrote ``DateTime.now()`` that way). Raises ValueError.
    """
    global _last_iso
    last_text, last = _last_iso
    if value == last_text:
        return last
    out = WireTime.fromisoformat(value)
    if out.tzinfo is not UTC:  # the common 'Z' case needs no conversion
        # A naive datetime's astimezone() interprets it in the local zone.
        utc = out.astimezone(UTC)
        out = WireTime(utc.year, utc.month, utc.day, utc.hour, utc.minute, utc.second,
                       utc.microsecond, tzinfo=UTC)
    out.wire_text = value
    if value.endswith("Z"):  # not local time, whose meaning the process's zone decides
        _last_iso = (value, out)
    return out


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


_iso_second: tuple[int, str] = (0, "")
_iso_ms: tuple[int, str] = (0, "")


def now_iso() -> str:
    """The current UTC time in the wire format, cheaply (the worker stamps every status,
    twice per task).

    The whole stamp is reused within one millisecond (a busy worker stamps dozens per
    millisecond) and the ``YYYY-MM-DDTHH:MM:SS`` prefix within one second; the tuple
    swaps are atomic, so threads may call this too.
    """
    global _iso_second, _iso_ms
    t = time.time()
    ms = int(t * 1000)
    last_ms, text = _iso_ms
    if ms == last_ms:
        return text
    sec = ms // 1000
    cached, prefix = _iso_second
    if sec != cached:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _iso_second = (sec, prefix)
    text = f"{prefix}.{ms - sec * 1000:03d}Z"
    _iso_ms = (ms, text)
    return text


_wire_ms: tuple[int, WireTime | None] = (0, None)
#: The current second's fields and text (a producer sending one by one misses the
#: millisecond cache on every call; the second changes a thousand times less often).
_wire_sec: tuple[int, tuple[int, int, int, int, int, int], str] = (-1, (0, 0, 0, 0, 0, 0), "")


def wire_now() -> WireTime:
    """The current UTC time at millisecond precision (what the wire keeps), as a
    :class:`WireTime` whose text is already set, so :func:`to_iso` costs nothing.

    What a producer stamps ``enqueuedAt`` with: formatting a fresh datetime for each
    envelope was a fifth of a bulk enqueue's CPU. One value is shared by every call
    within the same millisecond (datetimes are immutable).
    """
    global _wire_ms, _wire_sec
    ms = int(time.time() * 1000)
    last, value = _wire_ms
    if ms == last and value is not None:
        return value
    sec, milli = divmod(ms, 1000)
    cached_sec, fields, text = _wire_sec
    if sec != cached_sec:
        parts = time.gmtime(sec)
        fields = (parts.tm_year, parts.tm_mon, parts.tm_mday, parts.tm_hour, parts.tm_min,
                  parts.tm_sec)
        text = time.strftime("%Y-%m-%dT%H:%M:%S", parts)
        _wire_sec = (sec, fields, text)
    year, month, day, hour, minute, second = fields
    value = WireTime(year, month, day, hour, minute, second, milli * 1000, tzinfo=UTC)
    value.wire_text = f"{text}.{milli:03d}Z"
    _wire_ms = (ms, value)
    return value
