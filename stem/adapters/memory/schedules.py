"""In-process schedule store: entries and their run history in dicts."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime

from stem._time import utcnow
from stem.adapters._beat import (
    check_batch,
    check_history_max,
    check_limit,
    is_due,
    ms_time,
    run_applied,
    upserted,
)
from stem.beat.entry import MarkRun, ScheduleEntry, ScheduleRun
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
        return (await self.mark_runs([MarkRun(run, expected_version, next_run_at, jitter_ms,
                                              disable)]))[0]

    async def mark_runs(self, runs: Sequence[MarkRun]) -> list[ScheduleEntry | None]:
        """Record each run whose entry is still at its expected version, under one lock."""
        batch = check_batch(runs)
        now = utcnow()
        out: list[ScheduleEntry | None] = []
        with self._lock:
            for item in batch:
                run = item.run
                entry = self._entries.get(run.entry_id)
                if entry is None or entry.version != item.expected_version:
                    out.append(None)
                    continue
                stored = run_applied(entry, run, next_run_at=item.next_run_at,
                                     jitter_ms=item.jitter_ms, disable=item.disable, now=now)
                self._entries[entry.id] = stored
                history = self._history.setdefault(entry.id, [])
                history.insert(0, ScheduleRun(
                    run.entry_id, ms_time(run.scheduled_at) or run.scheduled_at,
                    ms_time(run.executed_at) or run.executed_at, run.success,
                    run.duration_ms, run.error))
                del history[self.history_max:]
                out.append(stored.copy())
        return out

    async def history(self, entry_id: str, limit: int = 50) -> list[ScheduleRun]:
        """The latest runs, newest first."""
        check_limit(limit)
        with self._lock:
            return list(self._history.get(entry_id, ()))[:limit]

    async def close(self) -> None:
        """Nothing to close (the data outlives it)."""
