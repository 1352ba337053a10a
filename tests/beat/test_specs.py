"""Next fire times for every spec kind, DST rules, bad specs (stem.beat.specs)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from cronsim import CronSim
from hypothesis import given
from hypothesis import strategies as st

from stem.beat import ScheduleEntry
from stem.beat.specs import (
    CronSpec,
    IntervalSpec,
    describe,
    next_fire,
    next_run,
    normalize_spec,
    parse_spec,
)
from stem.errors import ConfigurationError

PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")
aware = st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2080, 1, 1),
                     timezones=st.just(UTC))


def local(dt: datetime | None, tz: ZoneInfo) -> str:
    assert dt is not None
    return dt.astimezone(tz).isoformat()


# -- interval ---------------------------------------------------------------------------


@given(every=st.integers(1, 10**9), after=aware, anchor=st.none() | aware)
def test_interval_is_strictly_after_and_keeps_its_phase(every: int, after: datetime,
                                                        anchor: datetime | None) -> None:
    when = next_fire(IntervalSpec(every), after, anchor=anchor)
    assert when is not None and when > after
    if anchor is None:
        assert when == after + timedelta(milliseconds=every)
    elif anchor > after:
        assert when == anchor
    else:
        steps = (when - anchor) / timedelta(milliseconds=every)
        assert steps == int(steps) and when - timedelta(milliseconds=every) <= after


def test_interval_forms_and_window() -> None:
    assert parse_spec("every:30s") == IntervalSpec(30_000)
    assert parse_spec("every:250ms") == IntervalSpec(250)
    assert parse_spec("every:5") == IntervalSpec(5_000)
    assert parse_spec({"kind": "interval", "every": "5m"}) == IntervalSpec(300_000)
    assert normalize_spec(90) == {"kind": "interval", "everyMs": 90_000}
    assert normalize_spec(timedelta(minutes=1)) == {"kind": "interval", "everyMs": 60_000}
    spec = parse_spec({"kind": "interval", "everyMs": 1000, "startAt": "2025-01-01T00:00:00Z",
                       "endAt": "2025-01-01T00:00:03Z"})
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    assert next_fire(spec, t0 - timedelta(days=1)) == t0                 # waits for startAt
    assert next_fire(spec, t0 + timedelta(seconds=1.5)) == t0 + timedelta(seconds=2)
    assert next_fire(spec, t0 + timedelta(seconds=3)) is None           # past endAt
    assert describe("every:90s") == "every 90s" and describe("every:2h") == "every 2h"


# -- cron -------------------------------------------------------------------------------

CRONS = ["*/5 * * * *", "0 9 * * 1-5", "30 2 * * *", "15 */3 1,15 * *", "0 0 29 2 *",
         "59 23 * 12 0", "0 12 * * 7", "*/7 4-6 * 1,6 *"]


@given(expr=st.sampled_from(CRONS), after=aware,
       tz=st.sampled_from(["UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe"]))
def test_cron_is_strictly_after_and_matches_its_fields(expr: str, after: datetime,
                                                       tz: str) -> None:
    when = next_fire(CronSpec(expr), after, timezone=tz)
    assert when is not None and when > after
    wall = when.astimezone(ZoneInfo(tz)).replace(tzinfo=None)
    # The wall time matches the expression, unless it stands in for a time in a DST
    # gap (then it is the first instant after that gap: within the hour after it).
    first_match = next(CronSim(expr, wall - timedelta(seconds=1)))
    assert first_match == wall or timedelta(0) < wall - first_match <= timedelta(hours=1)
    # Nothing fires in between: the previous matching wall time is not after `after`.
    previous = next(CronSim(expr, wall, reverse=True))
    prev_instant = previous.replace(tzinfo=ZoneInfo(tz), fold=0)
    assert prev_instant <= after or prev_instant.astimezone(UTC) > when - timedelta(hours=2)


def test_cron_spring_gap_fires_at_the_first_instant_after_it() -> None:
    before = datetime(2024, 3, 31, 1, 59, tzinfo=PARIS)   # clocks jump 02:00 -> 03:00
    assert local(next_fire(CronSpec("30 2 * * *"), before, timezone="Europe/Paris"), PARIS) \
        == "2024-03-31T03:00:00+02:00"
    # every quarter: 02:00-02:45 do not exist, so one fire at 03:00, then 03:15
    t = next_fire(CronSpec("*/15 * * * *"), before, timezone="Europe/Paris")
    assert local(t, PARIS) == "2024-03-31T03:00:00+02:00"
    assert t is not None
    assert local(next_fire(CronSpec("*/15 * * * *"), t, timezone="Europe/Paris"), PARIS) \
        == "2024-03-31T03:15:00+02:00"
    ny = datetime(2024, 3, 10, 1, 0, tzinfo=NEW_YORK)     # 02:00 -> 03:00
    assert local(next_fire(CronSpec("30 2 * * *"), ny, timezone="America/New_York"),
                 NEW_YORK) == "2024-03-10T03:00:00-04:00"


def test_cron_repeated_hour_fires_once_at_its_first_occurrence() -> None:
    t = datetime(2024, 10, 26, 23, 0, tzinfo=UTC)         # 01:00 CEST; 03:00 CEST -> 02:00 CET
    fires = []
    for _ in range(6):
        nxt = next_fire(CronSpec("30 2 * * *"), t, timezone="Europe/Paris")
        assert nxt is not None
        fires.append(local(nxt, PARIS))
        t = nxt
        if len(fires) == 2:
            break
    assert fires == ["2024-10-27T02:30:00+02:00", "2024-10-28T02:30:00+01:00"]
    t, quarter = datetime(2024, 10, 27, 0, 0, tzinfo=UTC), []   # 02:00 CEST
    for _ in range(6):
        nxt = next_fire(CronSpec("*/20 * * * *"), t, timezone="Europe/Paris")
        assert nxt is not None
        quarter.append(local(nxt, PARIS)[11:])
        t = nxt
    assert quarter == ["02:20:00+02:00", "02:40:00+02:00", "03:00:00+01:00",
                       "03:20:00+01:00", "03:40:00+01:00", "04:00:00+01:00"]


def test_cron_uses_the_entry_time_zone() -> None:
    entry = ScheduleEntry(id="tz", task="t", spec={"kind": "cron", "expression": "0 9 * * *"},
                          timezone="America/New_York")
    after = datetime(2025, 1, 15, 12, 0, tzinfo=UTC)
    assert next_run(entry, after) == datetime(2025, 1, 15, 14, 0, tzinfo=UTC)
    assert next_run(entry.copy(timezone=None), after) == datetime(2025, 1, 16, 9, 0, tzinfo=UTC)


# -- clocked, calendar, solar -----------------------------------------------------------


def test_clocked_fires_once_even_when_late() -> None:
    at = datetime(2025, 1, 1, 9, tzinfo=UTC)
    entry = ScheduleEntry(id="c", task="t", spec={"kind": "clocked", "runAt": "2025-01-01T09:00:00Z"})
    assert next_run(entry, at - timedelta(hours=1)) == at
    assert next_run(entry, at + timedelta(days=3)) == at      # never ran: fires once, late
    ran = entry.copy(last_run_at=at)
    assert next_run(ran, at) is None


def test_calendar_compiles_to_cron() -> None:
    spec = {"kind": "calendar", "weekdays": ["mon", 5], "hours": [9], "minutes": [0, 30]}
    parsed = parse_spec(spec)
    assert parsed.to_cron() == CronSpec("0,30 9 * * 1,5")  # type: ignore[union-attr]
    assert next_fire(parsed, datetime(2024, 6, 21, 9, 10, tzinfo=UTC)) \
        == datetime(2024, 6, 21, 9, 30, tzinfo=UTC)
    assert normalize_spec(spec)["weekdays"] == [1, 5]


@pytest.mark.parametrize(("event", "after", "expected"), [
    # New York, 2024-06-21 (NOAA solar calculator / timeanddate.com: 05:25, 12:57, 20:31 EDT)
    ("sunrise", datetime(2024, 6, 21, 4, 0, tzinfo=UTC), "2024-06-21T05:25"),
    ("noon", datetime(2024, 6, 21, 4, 0, tzinfo=UTC), "2024-06-21T12:57"),
    ("sunset", datetime(2024, 6, 21, 4, 0, tzinfo=UTC), "2024-06-21T20:31"),
])
def test_solar_matches_a_published_table(event: str, after: datetime, expected: str) -> None:
    spec = parse_spec({"kind": "solar", "event": event, "latitude": 40.7128,
                       "longitude": -74.0060})
    when = next_fire(spec, after)
    want = datetime.fromisoformat(expected).replace(tzinfo=NEW_YORK)
    assert when is not None and abs(when - want) <= timedelta(minutes=2)
    again = next_fire(spec, when)                            # strictly after: the next day
    assert again is not None and timedelta(hours=23) < again - when < timedelta(hours=25)


def test_solar_offset_and_polar_night() -> None:
    base = {"kind": "solar", "event": "sunrise", "latitude": 40.7128, "longitude": -74.006}
    after = datetime(2024, 6, 21, 4, 0, tzinfo=UTC)
    plain = next_fire(parse_spec(base), after)
    shifted = next_fire(parse_spec({**base, "offsetMs": -600_000}), after)
    assert plain is not None and shifted == plain - timedelta(minutes=10)
    # Tromsø has no sunrise in mid-December: the first one is in mid-January.
    north = parse_spec({**base, "latitude": 69.65, "longitude": 18.96})
    first = next_fire(north, datetime(2024, 12, 10, tzinfo=UTC))
    assert first is not None and datetime(2025, 1, 10, tzinfo=UTC) < first \
        < datetime(2025, 1, 20, tzinfo=UTC)


# -- bad specs --------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "says"), [
    ("* * *", "exactly 5 fields"),
    ("0 0 * * * *", "exactly 5 fields"),
    ("61 * * * *", "bad cron expression"),
    ("every:0s", "longer than 0"),
    ("every:soon", "duration"),
    ({"kind": "interval"}, "needs 'everyMs'"),
    ({"kind": "interval", "everyMs": 10, "startAt": "yesterday"}, "'startAt' must be an ISO"),
    ({"kind": "clocked"}, "needs 'runAt'"),
    ({"kind": "solar", "event": "dusk", "latitude": 1, "longitude": 2}, "sunrise, sunset"),
    ({"kind": "solar", "event": "noon", "latitude": 91, "longitude": 2}, "'latitude'"),
    ({"kind": "calendar", "hours": [24]}, "'hours': 24"),
    ({"kind": "weekly"}, "unknown spec kind"),
    (42, "JSON object or a string"),
])
def test_bad_specs_name_the_entry_and_the_problem(spec: object, says: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_spec(spec, entry_id="nightly")
    assert "'nightly'" in str(info.value) and says in str(info.value)


def test_unknown_time_zone_names_the_entry() -> None:
    entry = ScheduleEntry(id="z", task="t", spec={"kind": "cron", "expression": "* * * * *"},
                          timezone="Mars/Olympus")
    with pytest.raises(ConfigurationError, match=r"'z'.*Mars/Olympus"):
        next_run(entry, datetime(2025, 1, 1, tzinfo=UTC))


def test_expire_at_ends_the_schedule() -> None:
    entry = ScheduleEntry(id="x", task="t", spec={"kind": "interval", "everyMs": 60_000},
                          expire_at=datetime(2025, 1, 1, 0, 1, 30, tzinfo=UTC),
                          next_run_at=datetime(2025, 1, 1, tzinfo=UTC))
    assert next_run(entry, datetime(2025, 1, 1, 0, 0, 10, tzinfo=UTC)) \
        == datetime(2025, 1, 1, 0, 1, tzinfo=UTC)
    assert next_run(entry, datetime(2025, 1, 1, 0, 1, 10, tzinfo=UTC)) is None
