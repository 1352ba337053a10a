"""Postgres schedule store: ``stem_schedules`` (one row per entry, a column per field)
and ``stem_schedule_runs`` (the run history) in the schema.

Every write is one statement: an upsert guarded by the version it names (see
:class:`stem.adapters.postgres._sql.ScheduleStatements`), and ``mark_runs`` (``mark_run``
is a batch of one) as one CTE over arrays that updates each entry whose version still
matches and adds its run; every few runs of an entry
(:func:`stem.adapters._beat.trim_period`) it also deletes the runs beyond the newest
``history_max``, and :meth:`PostgresScheduleStore.history` never reads past that bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from stem._time import utcnow
from stem.adapters._beat import (
    check_batch,
    check_history_max,
    check_limit,
    drift_ms,
    ms_time,
    stored_entry,
    trim_period,
)
from stem.adapters.postgres._pool import Connector, parse_url
from stem.adapters.postgres._sql import SCHEDULE_COLUMNS, ScheduleStatements
from stem.beat.entry import MarkRun, ScheduleEntry, ScheduleRun
from stem.errors import ScheduleConflictError
from stem.ports import DEFAULT_SCHEDULE_HISTORY


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _loads(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def entry_params(entry: ScheduleEntry) -> list[Any]:
    """``entry``'s column values, in :data:`SCHEDULE_COLUMNS` order (times already cut to
    the millisecond by the caller)."""
    return [
        entry.id, entry.task, entry.queue, _json(entry.spec), _json(entry.args),
        _json(entry.kwargs), entry.enabled, entry.jitter_ms, entry.timezone, entry.expire_at,
        _json(entry.meta), entry.next_run_at, entry.last_run_at, entry.last_jitter_ms,
        entry.last_error, entry.last_success_at, entry.last_error_at, entry.total_run_count,
        entry.drift_ms, entry.created_at, entry.updated_at, _json(entry.extra),
    ]


def entry_of(row: Any) -> ScheduleEntry:
    """A row of ``SCHEDULE_COLUMNS`` + ``version`` as an entry."""
    r = dict(zip((*SCHEDULE_COLUMNS, "version"), row, strict=True))
    return ScheduleEntry(
        id=r["id"], task=r["task_name"], queue=r["queue"], spec=_loads(r["spec"]),
        args=_loads(r["args"]), kwargs=_loads(r["kwargs"]), enabled=r["enabled"],
        jitter_ms=r["jitter_ms"], timezone=r["timezone"], expire_at=r["expire_at"],
        meta=_loads(r["meta"]), next_run_at=r["next_run_at"], last_run_at=r["last_run_at"],
        last_jitter_ms=r["last_jitter_ms"], last_error=r["last_error"],
        last_success_at=r["last_success_at"], last_error_at=r["last_error_at"],
        total_run_count=r["total_run_count"], drift_ms=r["drift_ms"],
        created_at=r["created_at"], updated_at=r["updated_at"], version=r["version"],
        extra=_loads(r["extra"]),
    )


class PostgresScheduleStore:
    """A :class:`stem.ports.ScheduleStore` on a Postgres schema."""

    def __init__(self, url: str, *, namespace: str = "stem", connector: Connector | None = None,
                 history_max: int = DEFAULT_SCHEDULE_HISTORY) -> None:
        self.settings = parse_url(url, namespace)
        self.namespace = namespace
        self.history_max = check_history_max(history_max)
        self._owns_db = connector is None
        self._db = Connector(self.settings, "schedule store") if connector is None else connector
        self._sql = ScheduleStatements(self.settings.quoted_schema)

    def __repr__(self) -> str:
        return (f"PostgresScheduleStore({self.settings.display!r}, "
                f"schema={self.settings.schema!r})")

    async def get(self, entry_id: str) -> ScheduleEntry | None:
        """One entry, or None."""
        row = await self._db.run(lambda c: c.fetchrow(self._sql.get, entry_id))
        return None if row is None else entry_of(row)

    async def entries(self) -> list[ScheduleEntry]:
        """Every entry, ordered by id (byte order: the column is ``COLLATE "C"``)."""
        rows = await self._db.run(lambda c: c.fetch(self._sql.entries))
        return [entry_of(r) for r in rows]

    async def upsert(self, entry: ScheduleEntry, *, expected_version: int | None = None
                     ) -> ScheduleEntry:
        """One statement: unconditional upsert, insert-if-new (expected 0), or update of
        the expected version. A conflict then reads the stored version for the error."""
        now = ms_time(utcnow())
        assert now is not None
        draft = stored_entry(entry, version=0, created_at=entry.created_at, updated_at=now)
        params = entry_params(draft)
        if expected_version is None:
            sql, args = self._sql.put, params
        elif expected_version == 0:
            sql, args = self._sql.create, params
        else:
            sql, args = self._sql.replace, [*params, int(expected_version)]
        row = await self._db.run(lambda c: c.fetchrow(sql, *args))
        if row is None:
            actual = await self._db.run(lambda c: c.fetchval(self._sql.version, entry.id))
            raise ScheduleConflictError(entry.id, expected_version,
                                        None if actual is None else int(actual))
        draft.version, draft.created_at = int(row[0]), row[1]
        return draft

    async def remove(self, entry_id: str) -> bool:
        """Delete the entry; its runs go with it (``ON DELETE CASCADE``)."""
        status = await self._db.run(lambda c: c.execute(self._sql.remove, entry_id))
        return bool(status.endswith(" 1"))

    async def due(self, now: datetime, limit: int = 100) -> list[ScheduleEntry]:
        """Enabled entries with ``next_run_at <= now`` (the caller's clock), soonest first."""
        check_limit(limit)
        cutoff = ms_time(now)
        rows = await self._db.run(lambda c: c.fetch(self._sql.due, cutoff, limit))
        return [entry_of(r) for r in rows]

    async def mark_run(self, run: ScheduleRun, *, expected_version: int,
                       next_run_at: datetime | None, jitter_ms: int = 0,
                       disable: bool = False) -> ScheduleEntry | None:
        """One statement: the guarded update, the history row and the trim (a batch of
        one: see :meth:`mark_runs`)."""
        return (await self.mark_runs([MarkRun(run, expected_version, next_run_at, jitter_ms,
                                              disable)]))[0]

    async def mark_runs(self, runs: Sequence[MarkRun]) -> list[ScheduleEntry | None]:
        """One statement for the whole batch (arrays unnested in one CTE: the guarded
        updates, the history rows and the trims)."""
        batch = check_batch(runs)
        if not batch:
            return []
        args = (
            [m.entry_id for m in batch],
            [int(m.expected_version) for m in batch],
            [ms_time(m.run.executed_at) for m in batch],
            [ms_time(m.next_run_at) for m in batch],
            [bool(m.disable) for m in batch],
            [bool(m.run.success) for m in batch],
            [m.run.error for m in batch],
            [drift_ms(m.run) for m in batch],
            [int(m.jitter_ms) for m in batch],
            [ms_time(m.run.scheduled_at) for m in batch],
            [int(m.run.duration_ms) for m in batch],
            ms_time(utcnow()), self.history_max, trim_period(self.history_max),
        )
        rows = await self._db.run(lambda c: c.fetch(self._sql.mark_runs, *args))
        stored = {e.id: e for e in map(entry_of, rows)}
        return [stored.get(m.entry_id) for m in batch]

    async def history(self, entry_id: str, limit: int = 50) -> list[ScheduleRun]:
        """The entry's latest runs, newest first."""
        check_limit(limit)
        bounded = min(limit, self.history_max)  # runs beyond it await their trim
        rows = await self._db.run(lambda c: c.fetch(self._sql.history, entry_id, bounded))
        return [ScheduleRun(entry_id, r[0], r[1], r[2], int(r[3]), r[4]) for r in rows]

    async def close(self) -> None:
        """Close the pool if this schedule store owns it (a store's closes with it)."""
        if self._owns_db:
            await self._db.close()
