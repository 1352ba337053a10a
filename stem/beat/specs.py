"""Schedule specs: when an entry runs, in the Dart Stem's spec JSON, and the next-run rule.

A spec is stored as JSON with a ``kind``:

- ``{"kind": "interval", "everyMs": 30000, "startAt"?: ISO, "endAt"?: ISO}``, or the
  string ``"every:30s"`` (units ``ms``, ``s``, ``m``, ``h``, ``d``; ``s`` when none);
- ``{"kind": "cron", "expression": "*/5 * * * *"}``, or any other string: five fields
  (minute hour day-of-month month day-of-week, weekday 0-6 with 7 = Sunday), evaluated
  in the entry's IANA ``timezone`` (UTC when it has none);
- ``{"kind": "clocked", "runAt": ISO, "runOnce": true}``: once, at ``runAt``;
- ``{"kind": "solar", "event": "sunrise"|"sunset"|"noon", "latitude": .., "longitude": ..,
  "offsetMs"?: ..}`` (needs ``astral``: ``pip install 'stem-tasks[solar]'``);
- ``{"kind": "calendar", "months"?, "weekdays"?, "monthdays"?, "hours"?, "minutes"?}``:
  lists of numbers compiled to a cron expression (a missing list is ``*``).

:func:`next_run` is the one rule every store and beat follows: the first time strictly
after ``after``. The beat calls it with the time it dispatched, so a beat that was down
for several periods fires an overdue entry once, then resumes the schedule.

Daylight-saving time (cron and calendar specs): a wall time that does not exist (the
spring-forward gap) fires at the first instant after the gap; a wall time that happens
twice (the fall-back hour) fires once, at its first occurrence.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from stem._time import from_iso, to_iso
from stem.errors import ConfigurationError

if TYPE_CHECKING:
    from stem.beat.entry import ScheduleEntry

__all__ = [
    "CalendarSpec", "ClockedSpec", "CronSpec", "IntervalSpec", "SolarSpec", "Spec",
    "describe", "next_fire", "next_run", "normalize_spec", "parse_duration", "parse_spec",
    "spec_to_json", "zone",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.I)
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
#: How far a cron or solar search looks before giving up (Dart: one year of minutes).
SEARCH_DAYS = 366 * 5


def parse_duration(value: Any, *, default_unit: str = "s", what: str = "duration") -> int:
    """A duration in milliseconds from ``"30s"``, ``"250ms"``, ``"5m"``, ``"1h"``, ``"1d"``,
    a number in ``default_unit`` or a :class:`timedelta`; ConfigurationError otherwise."""
    if isinstance(value, timedelta):
        ms = value.total_seconds() * 1000
    elif isinstance(value, bool):
        raise ConfigurationError(f"{what}: expected a duration like '30s', got {value!r}")
    elif isinstance(value, int | float):
        ms = float(value) * _UNIT_MS[default_unit]
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        ms = float(m.group(1)) * _UNIT_MS[(m.group(2) or default_unit).lower()]
    else:
        raise ConfigurationError(
            f"{what}: expected a duration like '30s', '250ms', '5m', '1h' or '1d', got {value!r}")
    if not math.isfinite(ms) or ms < 0:
        raise ConfigurationError(f"{what}: must be a finite duration >= 0, got {value!r}")
    return round(ms)


def zone(name: str | None) -> tzinfo:
    """The IANA time zone ``name`` (UTC for None); ConfigurationError when unknown."""
    if name is None or name in ("UTC", "Etc/UTC", "Z"):
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(f"unknown time zone {name!r} (expected an IANA name such as "
                                 "'Europe/Paris')") from None


# -- the spec kinds ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IntervalSpec:
    """Every ``every_ms`` milliseconds, optionally only between ``start_at`` and ``end_at``."""

    every_ms: int
    start_at: datetime | None = None
    end_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CronSpec:
    """A classic five-field cron expression, in the entry's time zone."""

    expression: str


@dataclass(frozen=True, slots=True)
class ClockedSpec:
    """Once at ``run_at`` (``run_once``: the entry is disabled after it ran)."""

    run_at: datetime
    run_once: bool = True


@dataclass(frozen=True, slots=True)
class SolarSpec:
    """A daily sun event at a place (UTC instants; the time zone does not matter)."""

    event: str
    latitude: float
    longitude: float
    offset_ms: int = 0


@dataclass(frozen=True, slots=True)
class CalendarSpec:
    """Cron by lists of numbers; None means every value of that field."""

    months: tuple[int, ...] | None = None
    weekdays: tuple[int, ...] | None = None
    monthdays: tuple[int, ...] | None = None
    hours: tuple[int, ...] | None = None
    minutes: tuple[int, ...] | None = None

    def to_cron(self) -> CronSpec:
        """The equivalent cron spec (``*`` for a missing list; minute 0 when only coarser
        fields are given would change the meaning, so a missing ``minutes`` is ``*``)."""
        def field(values: tuple[int, ...] | None) -> str:
            return "*" if values is None else ",".join(str(v) for v in values)
        return CronSpec(" ".join(field(v) for v in (self.minutes, self.hours, self.monthdays,
                                                    self.months, self.weekdays)))


Spec = IntervalSpec | CronSpec | ClockedSpec | SolarSpec | CalendarSpec

_WEEKDAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_CAL_RANGES = {"months": (1, 12), "weekdays": (0, 7), "monthdays": (1, 31),
               "hours": (0, 23), "minutes": (0, 59)}


def _fail(where: str, message: str) -> ConfigurationError:
    return ConfigurationError(f"{where}: {message}")


def _time(value: Any, where: str, key: str) -> datetime:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise _fail(where, f"{key!r} must be an aware datetime, got the naive {value}")
        return value.astimezone(UTC)
    if isinstance(value, str):
        try:
            return from_iso(value)
        except ValueError:
            pass
    raise _fail(where, f"{key!r} must be an ISO-8601 time, got {value!r}")


def _number(value: Any, where: str, key: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or not low <= value <= high:
        raise _fail(where, f"{key!r} must be a number in {low:g}..{high:g}, got {value!r}")
    return float(value)


def _check_cron(expression: str, where: str) -> CronSpec:
    fields = expression.split()
    if len(fields) != 5:
        raise _fail(where, f"cron expression {expression!r} must have exactly 5 fields "
                           f"(minute hour day-of-month month day-of-week), got {len(fields)}")
    try:
        CronSim(expression, datetime(2000, 1, 1))
    except (CronSimError, ValueError) as exc:
        raise _fail(where, f"bad cron expression {expression!r}: {exc}") from None
    return CronSpec(" ".join(fields))


def parse_spec(spec: Any, *, entry_id: str | None = None) -> Spec:
    """Read a spec (Dart JSON object, ``"every:30s"`` or a cron string).

    Raises ConfigurationError naming the entry and what is wrong.
    """
    where = f"schedule entry {entry_id!r}" if entry_id is not None else "schedule spec"
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower().startswith("every:"):
            ms = parse_duration(text[6:], what=f"{where}: interval {text!r}")
            if ms <= 0:
                raise _fail(where, f"interval {text!r} must be longer than 0")
            return IntervalSpec(ms)
        return _check_cron(text, where)
    if not isinstance(spec, dict):
        raise _fail(where, f"a spec is a JSON object or a string, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind == "interval":
        raw = next((spec[k] for k in ("everyMs", "every_ms", "every") if k in spec), None)
        if raw is None:
            raise _fail(where, "an interval spec needs 'everyMs'")
        unit = "s" if "every" in spec and "everyMs" not in spec and "every_ms" not in spec \
            else "ms"
        ms = parse_duration(raw, default_unit=unit, what=f"{where}: 'everyMs'")
        if ms <= 0:
            raise _fail(where, f"'everyMs' must be > 0, got {raw!r}")
        start = _time(spec["startAt"], where, "startAt") if spec.get("startAt") else None
        end = _time(spec["endAt"], where, "endAt") if spec.get("endAt") else None
        if start is not None and end is not None and end < start:
            raise _fail(where, "'endAt' is before 'startAt'")
        return IntervalSpec(ms, start, end)
    if kind == "cron":
        expression = spec.get("expression")
        if not isinstance(expression, str):
            raise _fail(where, "a cron spec needs 'expression' (a string)")
        return _check_cron(expression, where)
    if kind == "clocked":
        if "runAt" not in spec:
            raise _fail(where, "a clocked spec needs 'runAt'")
        run_once = spec.get("runOnce", True)
        if not isinstance(run_once, bool):
            raise _fail(where, f"'runOnce' must be true or false, got {run_once!r}")
        return ClockedSpec(_time(spec["runAt"], where, "runAt"), run_once)
    if kind == "solar":
        event = spec.get("event")
        if event not in ("sunrise", "sunset", "noon"):
            raise _fail(where, f"'event' must be sunrise, sunset or noon, got {event!r}")
        lat = _number(spec.get("latitude"), where, "latitude", -90, 90)
        lon = _number(spec.get("longitude"), where, "longitude", -180, 180)
        offset = spec.get("offsetMs", 0) or 0
        if isinstance(offset, bool) or not isinstance(offset, int | float):
            raise _fail(where, f"'offsetMs' must be milliseconds, got {offset!r}")
        return SolarSpec(event, lat, lon, int(offset))
    if kind == "calendar":
        lists: dict[str, tuple[int, ...] | None] = {}
        for key, (low, high) in _CAL_RANGES.items():
            values = spec.get(key)
            if values is None or values == []:
                lists[key] = None
                continue
            if not isinstance(values, list):
                values = [values]
            out: list[int] = []
            for v in values:
                if key == "weekdays" and isinstance(v, str) and v[:3].lower() in _WEEKDAYS:
                    v = _WEEKDAYS[v[:3].lower()]
                if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                    raise _fail(where, f"calendar {key!r}: {v!r} is not in {low}..{high}")
                out.append(v)
            lists[key] = tuple(sorted(set(out)))
        cal = CalendarSpec(**lists)
        _check_cron(cal.to_cron().expression, where)
        return cal
    raise _fail(where, f"unknown spec kind {kind!r} (expected interval, cron, clocked, "
                       "solar or calendar)")


def spec_to_json(spec: Spec) -> dict[str, Any]:
    """The Dart spec JSON for ``spec``."""
    if isinstance(spec, IntervalSpec):
        out: dict[str, Any] = {"kind": "interval", "everyMs": spec.every_ms}
        if spec.start_at is not None:
            out["startAt"] = to_iso(spec.start_at)
        if spec.end_at is not None:
            out["endAt"] = to_iso(spec.end_at)
        return out
    if isinstance(spec, CronSpec):
        return {"kind": "cron", "expression": spec.expression}
    if isinstance(spec, ClockedSpec):
        return {"kind": "clocked", "runAt": to_iso(spec.run_at), "runOnce": spec.run_once}
    if isinstance(spec, SolarSpec):
        return {"kind": "solar", "event": spec.event, "latitude": spec.latitude,
                "longitude": spec.longitude, "offsetMs": spec.offset_ms}
    out = {"kind": "calendar"}
    for key in _CAL_RANGES:
        values = getattr(spec, key)
        if values is not None:
            out[key] = list(values)
    return out


def normalize_spec(spec: Any, *, entry_id: str | None = None) -> dict[str, Any]:
    """Any accepted spec form (also a number of seconds or a timedelta: an interval) as
    the JSON a store keeps; ConfigurationError when it is not a spec."""
    if isinstance(spec, timedelta) or (isinstance(spec, int | float)
                                       and not isinstance(spec, bool)):
        where = f"schedule entry {entry_id!r}" if entry_id is not None else "schedule spec"
        ms = parse_duration(spec, what=f"{where}: interval")
        if ms <= 0:
            raise _fail(where, f"interval must be longer than 0, got {spec!r}")
        return {"kind": "interval", "everyMs": ms}
    return spec_to_json(parse_spec(spec, entry_id=entry_id))


def describe(spec: Any) -> str:
    """A short human form: ``every 30s``, ``*/5 * * * *``, ``sunrise @40.71/-74.01``,
    ``once 2025-01-01T09:00:00.000Z`` (the raw value when it is not a valid spec)."""
    try:
        parsed = parse_spec(spec)
    except ConfigurationError:
        return str(spec)
    if isinstance(parsed, IntervalSpec):
        ms = parsed.every_ms
        for unit in ("d", "h", "m", "s"):
            if ms % _UNIT_MS[unit] == 0:
                return f"every {ms // _UNIT_MS[unit]}{unit}"
        return f"every {ms}ms"
    if isinstance(parsed, CronSpec):
        return parsed.expression
    if isinstance(parsed, ClockedSpec):
        return f"once {to_iso(parsed.run_at)}" if parsed.run_once else \
            f"at {to_iso(parsed.run_at)}"
    if isinstance(parsed, SolarSpec):
        text = f"{parsed.event} @{parsed.latitude:.2f}/{parsed.longitude:.2f}"
        return text + (f" {parsed.offset_ms:+d}ms" if parsed.offset_ms else "")
    return f"calendar {parsed.to_cron().expression}"


# -- next fire times --------------------------------------------------------------------


def _utc(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        raise ConfigurationError(f"schedule times must be aware datetimes, got the naive {dt}")
    return dt.astimezone(UTC)


def _exists(naive: datetime, tz: tzinfo) -> bool:
    aware = naive.replace(tzinfo=tz, fold=0)
    return aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == naive


def _resolve_wall(naive: datetime, tz: tzinfo) -> datetime:
    """The instant a wall time means: its first occurrence when it happens twice; the
    first instant after the gap when the clocks skip it."""
    if tz is UTC or _exists(naive, tz):
        return naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    # In a gap, fold=1 reads the wall time with the offset from after the jump (an
    # instant before the transition) and fold=0 with the one from before it (after the
    # transition): bisect between them for the transition itself, to the second.
    low = int(naive.replace(tzinfo=tz, fold=1).timestamp())
    high = int(naive.replace(tzinfo=tz, fold=0).timestamp())
    if low > high:
        low, high = high, low
    offset = datetime.fromtimestamp(high, tz).utcoffset()
    while high - low > 1:  # transitions fall on whole seconds
        mid = (low + high) // 2
        if datetime.fromtimestamp(mid, tz).utcoffset() == offset:
            high = mid
        else:
            low = mid
    return datetime.fromtimestamp(high, UTC)


def _cron_next(expression: str, after: datetime, tz: tzinfo) -> datetime | None:
    wall = after.astimezone(tz).replace(tzinfo=None)
    it = CronSim(expression, wall)  # naive: the wall-clock rules are ours (_resolve_wall)
    limit = wall + timedelta(days=SEARCH_DAYS)
    for naive in it:
        if naive > limit:
            return None
        instant = _resolve_wall(naive, tz)
        if instant > after:  # a wall time of the repeated hour's second pass is skipped
            return instant
    return None


def _solar_event(spec: SolarSpec, day: date) -> datetime | None:
    from stem._extras import require

    require("solar")
    from astral import Observer, sun

    observer = Observer(latitude=spec.latitude, longitude=spec.longitude)
    fn = {"sunrise": sun.sunrise, "sunset": sun.sunset, "noon": sun.noon}[spec.event]
    try:
        when: datetime = fn(observer, date=day, tzinfo=UTC)
    except ValueError:  # the sun never rises or sets that day (polar day or night)
        return None
    return when + timedelta(milliseconds=spec.offset_ms)


def _solar_next(spec: SolarSpec, after: datetime) -> datetime | None:
    day = after.date() - timedelta(days=2)
    for _ in range(SEARCH_DAYS):
        found = [t for d in (day, day + timedelta(days=1), day + timedelta(days=2))
                 if (t := _solar_event(spec, d)) is not None and t > after]
        if found:
            return min(found)
        day += timedelta(days=1)
    return None


def next_fire(spec: Spec, after: datetime, *, timezone: str | None = None,
              anchor: datetime | None = None, ran: bool = False) -> datetime | None:
    """The first fire time of ``spec`` strictly after ``after`` (aware UTC), or None when
    it will not fire again.

    ``anchor`` phase-locks an interval (a scheduled time it fires at: its ``startAt``,
    else the entry's previous scheduled time; without one, the first run is ``after +
    every``). ``ran``: a clocked spec has fired already (a run-once spec never fires
    again; one whose ``runAt`` passed fires once even when late).
    """
    after = _utc(after)
    if isinstance(spec, CalendarSpec):
        spec = spec.to_cron()
    if isinstance(spec, IntervalSpec):
        every = timedelta(milliseconds=spec.every_ms)
        base = spec.start_at or anchor
        if base is None:
            candidate = after + every
        elif base > after:
            candidate = base
        else:
            periods = (after - base) // every + 1
            candidate = base + periods * every
        if spec.end_at is not None and candidate > spec.end_at:
            return None
        return candidate
    if isinstance(spec, CronSpec):
        return _cron_next(spec.expression, after, zone(timezone))
    if isinstance(spec, ClockedSpec):
        if spec.run_at > after:
            return spec.run_at
        return None if ran else spec.run_at
    return _solar_next(spec, after)


def next_run(entry: ScheduleEntry, after: datetime) -> datetime | None:
    """The entry's next run strictly after ``after`` (its spec in its time zone), or None
    when it will not run again (a clocked run-once entry that ran, an interval past its
    ``endAt``, an entry past its ``expire_at``).

    An interval keeps its phase: it fires at ``startAt`` (or the entry's current
    ``next_run_at``) plus a whole number of periods, so dispatch delays do not add up.
    Raises ConfigurationError naming the entry when its spec or time zone is bad.
    """
    spec = parse_spec(entry.spec, entry_id=entry.id)
    try:
        when = next_fire(spec, after, timezone=entry.timezone, anchor=entry.next_run_at,
                         ran=entry.last_run_at is not None)
    except ConfigurationError as exc:
        raise ConfigurationError(f"schedule entry {entry.id!r}: {exc}") from None
    if when is not None and entry.expire_at is not None and when > entry.expire_at:
        return None
    return when
