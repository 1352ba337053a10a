"""What every lock and schedule store computes the same way (adapter-neutral, so the
adapters share it without importing each other): argument checks, the millisecond
rule for stored times, and what ``mark_run`` and ``upsert`` write.

Stores do the compare-and-write atomically in the store (a script, one statement, one
``BEGIN IMMEDIATE`` transaction); these helpers only compute values. The stores that
keep entries as Python values (memory, and the beat's file store) use
:func:`upserted`, :func:`run_applied` and :func:`is_due` whole, so there is one
implementation of the port's rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from stem._time import utcnow
from stem.beat.entry import MarkRun, ScheduleEntry, ScheduleRun
from stem.errors import ScheduleConflictError

__all__ = [
    "check_batch",
    "check_history_max",
    "check_limit",
    "check_ttl",
    "drift_ms",
    "epoch_ms",
    "from_ms",
    "is_due",
    "ms_time",
    "run_applied",
    "stored_entry",
    "trim_period",
    "upserted",
]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def check_ttl(ttl: float) -> float:
    """A lock lease length: positive and finite seconds, else ValueError."""
    if not isinstance(ttl, int | float) or not 0 < ttl < math.inf:
        raise ValueError(f"a lock ttl must be a positive number of seconds, got {ttl!r}")
    return float(ttl)


def check_limit(limit: int) -> int:
    """A page size: a whole number >= 0, else ValueError."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ValueError(f"limit must be a whole number >= 0, got {limit!r}")
    return limit


def check_history_max(bound: int) -> int:
    """Runs kept per entry: a whole number >= 1, else ValueError."""
    if not isinstance(bound, int) or isinstance(bound, bool) or bound < 1:
        raise ValueError(f"history_max must be a whole number >= 1, got {bound!r}")
    return bound


def ms_time(dt: datetime | None) -> datetime | None:
    """``dt`` as aware UTC cut to the millisecond (what every schedule store keeps;
    naive values are taken as UTC)."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    elif dt.tzinfo is not UTC:
        dt = dt.astimezone(UTC)
    micro = dt.microsecond - dt.microsecond % 1000
    if micro != dt.microsecond:
        dt = datetime(dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second, micro,
                      tzinfo=UTC)
    return dt


def epoch_ms(dt: datetime) -> int:
    """Whole milliseconds since the epoch (naive ``dt`` is UTC); exact, no float."""
    aware = ms_time(dt)
    assert aware is not None
    delta = aware - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def from_ms(ms: int) -> datetime:
    """Aware UTC datetime for whole epoch milliseconds; exact, no float."""
    return _EPOCH + timedelta(milliseconds=ms)


def drift_ms(run: ScheduleRun) -> int:
    """``executed_at - scheduled_at`` in whole milliseconds."""
    return epoch_ms(run.executed_at) - epoch_ms(run.scheduled_at)


def trim_period(history_max: int) -> int:
    """Every how many runs of an entry a SQL store deletes its runs beyond
    ``history_max`` (a tenth of the bound, at most 100): finding the bound reads the
    whole history, so doing it on every run would cost ``history_max`` reads per run.
    The store's reads stop at the bound, so the extra rows are never seen."""
    return max(1, min(100, history_max // 10))


def check_batch(runs: Sequence[MarkRun]) -> list[MarkRun]:
    """A ``mark_runs`` batch as a list: ValueError if an entry id appears twice; a run
    whose times cannot be stored fails here, before anything is written."""
    batch = list(runs)
    seen: set[str] = set()
    for item in batch:
        if item.entry_id in seen:
            raise ValueError(f"mark_runs: entry {item.entry_id!r} appears twice in one batch")
        seen.add(item.entry_id)
        drift_ms(item.run)
    return batch


_TIME_FIELDS = ("expire_at", "next_run_at", "last_run_at", "last_success_at", "last_error_at",
                "created_at", "updated_at")


def stored_entry(entry: ScheduleEntry, *, version: int, created_at: datetime | None,
                 updated_at: datetime) -> ScheduleEntry:
    """``entry`` as an upsert stores it: times cut to the millisecond, ``version``,
    ``created_at`` (now when None) and ``updated_at`` set."""
    out = entry.copy(version=version, created_at=created_at or updated_at,
                     updated_at=updated_at)
    for name in _TIME_FIELDS:
        setattr(out, name, ms_time(getattr(out, name)))
    return out


def run_applied(entry: ScheduleEntry, run: ScheduleRun, *, next_run_at: datetime | None,
                jitter_ms: int, disable: bool, now: datetime | None = None) -> ScheduleEntry:
    """``entry`` after ``mark_run`` recorded ``run`` (see stem.ports.ScheduleStore)."""
    executed = ms_time(run.executed_at)
    out = entry.copy(
        last_run_at=executed,
        next_run_at=None if disable else ms_time(next_run_at),
        enabled=entry.enabled and not disable,
        total_run_count=entry.total_run_count + 1,
        drift_ms=drift_ms(run),
        last_jitter_ms=jitter_ms,
        version=entry.version + 1,
        updated_at=ms_time(now or utcnow()),
    )
    if run.success:
        out.last_success_at = executed
        out.last_error = None
    else:
        out.last_error = run.error
        out.last_error_at = executed
    return out


def upserted(existing: ScheduleEntry | None, entry: ScheduleEntry,
             expected_version: int | None, now: datetime) -> ScheduleEntry:
    """``entry`` as ``upsert`` stores it over ``existing`` (None: a new entry): the
    version check (ScheduleConflictError), ``version = stored + 1`` (``entry.version``
    is not read), ``created_at`` kept, ``updated_at = now``, times to the millisecond."""
    actual = None if existing is None else existing.version
    if expected_version is not None and (actual or 0) != expected_version:
        raise ScheduleConflictError(entry.id, expected_version, actual)
    created = existing.created_at if existing is not None else entry.created_at
    return stored_entry(entry, version=(actual or 0) + 1, created_at=created,
                        updated_at=ms_time(now) or now)


def is_due(entry: ScheduleEntry, now: datetime) -> bool:
    """Enabled with ``next_run_at <= now`` (``now`` is the caller's clock, to the ms)."""
    cutoff = ms_time(now)
    return (entry.enabled and entry.next_run_at is not None and cutoff is not None
            and entry.next_run_at <= cutoff)
