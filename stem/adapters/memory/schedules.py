"""In-process schedule store: entries and their run history in dicts."""

from __future__ import annotations

import threading
from datetime import datetime

from stem._time import utcnow
from stem.adapters._beat import (
    check_history_max,
    check_limit,
    drift_ms,
    is_due,
    ms_time,
    run_applied,
    upserted,
)
from stem.beat.entry import ScheduleEntry, ScheduleRun
from stem.ports import DEFAULT_SCHEDULE_HISTORY


class MemoryScheduleStore:
    """A :class:`stem.ports.ScheduleStore` for one process; thread-safe, shared by name.

    Entries are copied in and out, so a caller's edits never change the stored ones
    without a write. The port's rules (versions, times to the millisecond, what
    ``mark_run`` writes) are :mod:`stem.adapters._beat`'s, as in every other store.
    """

    def __init__(self, name: str = "default", *,
                 history_max: int = DEFAULT_SCHEDULE_HISTORY) -> None:
        self.name = name
        self.history_max = check_history_max(history_max)
        self._lock = threading.Lock()
        self._entries: dict[str, ScheduleEntry] = {}
        self._history: dict[str, list[ScheduleRun]] = {}  # newest first

    def __repr__(self) -> str:
        return f"MemoryScheduleStore({self.name!r})"

    async def get(self, entry_id: str) -> ScheduleEntry | None:
        """One entry, or None."""
        with self._lock:
            entry = self._entries.get(entry_id)
            return None if entry is None else entry.copy()

    async def entries(self) -> list[ScheduleEntry]:
        """Every entry, ordered by id."""
        with self._lock:
            return [self._entries[k].copy() for k in sorted(self._entries)]

    async def upsert(self, entry: ScheduleEntry, *, expected_version: int | None = None
                     ) -> ScheduleEntry:
        """Create or replace ``entry`` (optimistic with ``expected_version``)."""
        now = utcnow()
        with self._lock:
            stored = upserted(self._entries.get(entry.id), entry, expected_version, now)
            self._entries[entry.id] = stored
            return stored.copy()

    async def remove(self, entry_id: str) -> bool:
        """Delete the entry and its history."""
        with self._lock:
            self._history.pop(entry_id, None)
            return self._entries.pop(entry_id, None) is not None

    async def due(self, now: datetime, limit: int = 100) -> list[ScheduleEntry]:
        """Enabled entries with ``next_run_at <= now`` (the caller's clock), soonest first."""
        check_limit(limit)
        with self._lock:
            due = [e for e in self._entries.values() if is_due(e, now)]
            due.sort(key=lambda e: (e.next_run_at, e.id))
            return [e.copy() for e in due[:limit]]

    async def mark_run(self, run: ScheduleRun, *, expected_version: int,
                       next_run_at: datetime | None, jitter_ms: int = 0,
                       disable: bool = False) -> ScheduleEntry | None:
        """Record a dispatch if the entry is still at ``expected_version``."""
        now = utcnow()
        drift_ms(run)  # a bad run fails before anything changes
        kept = ScheduleRun(run.entry_id, ms_time(run.scheduled_at) or run.scheduled_at,
                           ms_time(run.executed_at) or run.executed_at, run.success,
                           run.duration_ms, run.error)
        with self._lock:
            entry = self._entries.get(run.entry_id)
            if entry is None or entry.version != expected_version:
                return None
            stored = run_applied(entry, run, next_run_at=next_run_at, jitter_ms=jitter_ms,
                                 disable=disable, now=now)
            self._entries[entry.id] = stored
            history = self._history.setdefault(entry.id, [])
            history.insert(0, kept)
            del history[self.history_max:]
            return stored.copy()

    async def history(self, entry_id: str, limit: int = 50) -> list[ScheduleRun]:
        """The latest runs, newest first."""
        check_limit(limit)
        with self._lock:
            return list(self._history.get(entry_id, ()))[:limit]

    async def close(self) -> None:
        """Nothing to close (the data outlives it)."""
