"""Wire times: Dart's toIso8601String forms are read and written back exactly."""

from __future__ import annotations

import copy
import pickle
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from stem._time import WireTime, from_iso, to_iso


@pytest.mark.parametrize(
    "text",
    [
        "2026-03-21T10:15:30.123Z",         # Dart UTC, whole milliseconds
        "2026-03-21T10:15:30.123456Z",      # Dart UTC with microseconds
        "2026-03-21T10:15:30.000001Z",
        "2024-10-29T10:15:30.123456",       # older Dart: local time, no offset
        "2024-10-29T10:15:30.123",
        "2026-03-21T10:15:30+05:30",        # other writers
        "2026-03-21 10:15:30Z",
    ],
)
def test_read_values_are_written_back_verbatim(text: str) -> None:
    dt = from_iso(text)
    assert isinstance(dt, WireTime) and dt.tzinfo is UTC
    assert to_iso(dt) == text
    assert to_iso(pickle.loads(pickle.dumps(dt))) == text  # e.g. sent to a pool process
    assert to_iso(copy.deepcopy(dt)) == text


def test_values_we_create_use_milliseconds_and_z() -> None:
    assert to_iso(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)) == "2026-01-02T03:04:05.678Z"
    assert to_iso(datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05.000Z"  # naive = UTC
    plus2 = timezone(timedelta(hours=2))
    assert to_iso(datetime(2026, 1, 2, 5, 4, 5, tzinfo=plus2)) == "2026-01-02T03:04:05.000Z"


def test_derived_values_forget_the_text() -> None:
    dt = from_iso("2026-03-21T10:15:30.123456Z")
    assert to_iso(dt + timedelta(seconds=1)) == "2026-03-21T10:15:31.123Z"
    assert to_iso(dt.replace(microsecond=0)) == "2026-03-21T10:15:30.000Z"


def test_offsets_are_converted_to_utc() -> None:
    assert from_iso("2026-03-21T10:15:30+05:30") == datetime(2026, 3, 21, 4, 45, 30, tzinfo=UTC)


@pytest.fixture
def kolkata() -> Iterator[None]:
    """Run with the process's local zone at UTC+05:30 (no DST), then restore it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        yield
    finally:
        mp.undo()
        time.tzset()


@pytest.mark.usefixtures("kolkata")
def test_offsetless_time_is_local_time_as_in_dart() -> None:
    dt = from_iso("2024-10-29T10:15:30.123456")
    assert dt == datetime(2024, 10, 29, 4, 45, 30, 123456, tzinfo=UTC)
    assert to_iso(dt) == "2024-10-29T10:15:30.123456"


def test_garbage_raises_value_error() -> None:
    with pytest.raises(ValueError):
        from_iso("yesterday")


def test_wire_now_text_matches_its_value_across_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """wire_now caches the second's fields and the millisecond's value: each stamp's
    text is still exactly what to_iso writes for that instant, across a second boundary
    and a day boundary."""
    import stem._time as t

    clock = [1_767_225_599.998]  # 2025-12-31T23:59:59.998Z
    monkeypatch.setattr(t.time, "time", lambda: clock[0])
    seen = []
    for step in range(5):  # .998, .999, then 00:00:00.000, .001, .002 on the next day
        clock[0] = (1_767_225_599_998 + step + 0.5) / 1000  # mid-millisecond
        value = t.wire_now()
        plain = datetime(*value.timetuple()[:6], value.microsecond, tzinfo=UTC)
        assert value.wire_text == to_iso(plain) == t.wire_now().wire_text
        seen.append(value.wire_text)
    assert seen == ["2025-12-31T23:59:59.998Z", "2025-12-31T23:59:59.999Z",
                    "2026-01-01T00:00:00.000Z", "2026-01-01T00:00:00.001Z",
                    "2026-01-01T00:00:00.002Z"]


def test_a_repeated_text_reads_back_the_same_value() -> None:
    """from_iso reuses the value of the text it read last (a batch's envelopes share
    one enqueuedAt); a different text, or local time, is parsed afresh."""
    a = from_iso("2026-03-21T10:15:30.123Z")
    b = from_iso("2026-03-21T10:15:30.123Z")
    assert b is a and to_iso(b) == "2026-03-21T10:15:30.123Z"
    c = from_iso("2026-03-21T10:15:30.124Z")
    assert c is not a and c - a == timedelta(milliseconds=1)
    naive = from_iso("2026-03-21T10:15:30.123")
    assert from_iso("2026-03-21T10:15:30.123") is not naive  # local time: never shared
