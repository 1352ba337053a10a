"""What every schedule store does to an entry on a write, once (memory and file stores;
SQL and Redis stores do the same in one statement or script).

These are pure functions on :class:`ScheduleEntry` values: the store supplies the
atomicity (a lock, a transaction), these the rules of the ``ScheduleStore`` port.
"""

from __future__ import annotations

from datetime import datetime

from stem.beat.entry import ScheduleEntry, ScheduleRun
from stem.errors import ScheduleConflictError

__all__ = ["HISTORY_LIMIT", "after_mark_run", "after_upsert", "is_due"]

#: Runs kept per entry (Dart's history stream is trimmed to about 1000).
HISTORY_LIMIT = 1000


def after_upsert(existing: ScheduleEntry | None, entry: ScheduleEntry,
                 expected_version: int | None, now: datetime) -> ScheduleEntry:
    """The entry as stored by ``upsert``: the version check, ``version + 1``,
    ``created_at`` kept (or set), ``updated_at = now``."""
    actual = None if existing is None else existing.version
    if expected_version is not None and (actual or 0) != expected_version:
        raise ScheduleConflictError(entry.id, expected_version, actual)
    created = existing.created_at if existing is not None and existing.created_at else None
    return entry.copy(version=(actual or 0) + 1, created_at=created or entry.created_at or now,
                      updated_at=now)


def after_mark_run(entry: ScheduleEntry, run: ScheduleRun, *, next_run_at: datetime | None,
                   jitter_ms: int, disable: bool, now: datetime) -> ScheduleEntry:
    """The entry as stored by ``mark_run`` (the version was checked by the caller)."""
    drift = round((run.executed_at - run.scheduled_at).total_seconds() * 1000)
    changes: dict[str, object] = {
        "last_run_at": run.executed_at,
        "next_run_at": None if disable else next_run_at,
        "enabled": entry.enabled and not disable,
        "total_run_count": entry.total_run_count + 1,
        "drift_ms": drift,
        "last_jitter_ms": jitter_ms,
        "version": entry.version + 1,
        "updated_at": now,
    }
    if run.success:
        changes.update(last_success_at=run.executed_at, last_error=None)
    else:
        changes.update(last_error_at=run.executed_at, last_error=run.error or "error")
    return entry.copy(**changes)


def is_due(entry: ScheduleEntry, now: datetime) -> bool:
    """Enabled and ``next_run_at <= now``."""
    return entry.enabled and entry.next_run_at is not None and entry.next_run_at <= now
