"""SQLite schedule store: entries in ``<ns>_schedules``, run history in
``<ns>_schedule_runs``.

An entry row keeps the Dart ``ScheduleEntry`` JSON (``data``) next to the columns
queries need (``version``, ``enabled``, ``next_run_at`` in epoch milliseconds, with a
partial index for :meth:`SqliteScheduleStore.due`). Each write is one ``BEGIN
IMMEDIATE`` transaction: the version check, the write and the history row commit
together, and no other process writes in between. Runs beyond ``history_max`` are
deleted every few runs of an entry (:func:`stem.adapters._beat.trim_period`); reads stop
at the bound.
"""

from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from stem._time import from_iso, utcnow
from stem.adapters._beat import (
    check_batch,
    check_history_max,
    check_limit,
    epoch_ms,
    from_ms,
    run_applied,
    stored_entry,
    trim_period,
)
from stem.beat.entry import MarkRun, ScheduleEntry, ScheduleRun
from stem.errors import ScheduleConflictError
from stem.ports import DEFAULT_SCHEDULE_HISTORY

from ._db import Database, ensure_schema, immediate, quote, table_prefix

SCHEMA_VERSION = 1

class SqliteScheduleStore:
    """A :class:`stem.ports.ScheduleStore` on a SQLite file that several processes share."""

    def __init__(self, path: str, *, namespace: str = "stem", db: Database | None = None,
                 history_max: int = DEFAULT_SCHEDULE_HISTORY) -> None:
        self.path = path
        self.history_max = check_history_max(history_max)
        prefix = table_prefix(namespace)
        self._prefix = prefix
        self._entries = quote(f"{prefix}_schedules")
        self._runs = quote(f"{prefix}_schedule_runs")
        self._owns_db = db is None
        self._db = Database(path) if db is None else db
        self._db.add_setup(self._create)

    def __repr__(self) -> str:
        return f"SqliteScheduleStore({self.path!r})"

    def _create(self, conn: sqlite3.Connection) -> None:
        e, r, p = self._entries, self._runs, self._prefix
        ensure_schema(conn, f"{p}_schedules", SCHEMA_VERSION, [
            f"""CREATE TABLE IF NOT EXISTS {e} (
                id TEXT PRIMARY KEY,
                version INTEGER NOT NULL,
                enabled INTEGER NOT NULL,
                next_run_at INTEGER,
                data BLOB NOT NULL
            ) WITHOUT ROWID""",
            f"CREATE INDEX IF NOT EXISTS {quote(p + '_schedules_due')} ON {e} "
            "(next_run_at, id) WHERE enabled = 1 AND next_run_at IS NOT NULL",
            f"""CREATE TABLE IF NOT EXISTS {r} (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                entry_id TEXT NOT NULL,
                scheduled_at INTEGER NOT NULL,
                executed_at INTEGER NOT NULL,
                success INTEGER NOT NULL,
                duration_ms INTEGER NOT NULL,
                error TEXT
            )""",
            f"CREATE INDEX IF NOT EXISTS {quote(p + '_schedule_runs_entry')} ON {r} "
            "(entry_id, seq)",
        ])

    # -- rows ----------------------------------------------------------------------

    @staticmethod
    def _decode(version: int, data: bytes | str) -> ScheduleEntry:
        entry = ScheduleEntry.from_json(data)
        entry.version = int(version)
        return entry

    def _write(self, conn: sqlite3.Connection, entry: ScheduleEntry) -> None:
        conn.execute(
            f"INSERT OR REPLACE INTO {self._entries} (id, version, enabled, next_run_at, data) "
            "VALUES (?, ?, ?, ?, ?)",
            (entry.id, entry.version, int(entry.enabled),
             None if entry.next_run_at is None else epoch_ms(entry.next_run_at),
             entry.to_json()),
        )

    def _read(self, conn: sqlite3.Connection, entry_id: str) -> tuple[int, bytes] | None:
        row = conn.execute(f"SELECT version, data FROM {self._entries} WHERE id = ?",
                           (entry_id,)).fetchone()
        return None if row is None else (int(row[0]), row[1])

    # -- the ScheduleStore protocol --------------------------------------------------

    async def get(self, entry_id: str) -> ScheduleEntry | None:
        """One entry, or None."""
        row = await self._db.run(lambda conn: self._read(conn, entry_id))
        return None if row is None else self._decode(*row)

    async def entries(self) -> list[ScheduleEntry]:
        """Every entry, ordered by id (byte order)."""
        rows = await self._db.run(lambda conn: conn.execute(
            f"SELECT version, data FROM {self._entries} ORDER BY id").fetchall())
        return [self._decode(v, d) for v, d in rows]

    async def upsert(self, entry: ScheduleEntry, *, expected_version: int | None = None
                     ) -> ScheduleEntry:
        """Check the version and write, in one ``BEGIN IMMEDIATE`` transaction."""
        now = utcnow()

        def write(conn: sqlite3.Connection) -> ScheduleEntry:
            with immediate(conn):
                row = self._read(conn, entry.id)
                actual = None if row is None else row[0]
                if expected_version is not None and (
                    actual != expected_version if expected_version else row is not None
                ):
                    raise ScheduleConflictError(entry.id, expected_version, actual)
                created: datetime | None = entry.created_at
                if row is not None:
                    stored_created = orjson.loads(row[1]).get("createdAt")
                    if isinstance(stored_created, str):
                        created = from_iso(stored_created)
                out = stored_entry(entry, version=(actual or 0) + 1, created_at=created,
                                   updated_at=now)
                self._write(conn, out)
                return out

        return await self._db.run(write)

    async def remove(self, entry_id: str) -> bool:
        """Delete the entry and its runs in one transaction."""

        def write(conn: sqlite3.Connection) -> bool:
            with immediate(conn):
                gone = conn.execute(f"DELETE FROM {self._entries} WHERE id = ?",
                                    (entry_id,)).rowcount
                conn.execute(f"DELETE FROM {self._runs} WHERE entry_id = ?", (entry_id,))
            return bool(gone)

        return await self._db.run(write)

    async def due(self, now: datetime, limit: int = 100) -> list[ScheduleEntry]:
        """Enabled entries with ``next_run_at <= now`` (the caller's clock), soonest first."""
        check_limit(limit)
        cutoff = epoch_ms(now)
        rows = await self._db.run(lambda conn: conn.execute(
            f"SELECT version, data FROM {self._entries} "
            "WHERE enabled = 1 AND next_run_at IS NOT NULL AND next_run_at <= ? "
            "ORDER BY next_run_at, id LIMIT ?", (cutoff, limit)).fetchall())
        return [self._decode(v, d) for v, d in rows]

    async def mark_run(self, run: ScheduleRun, *, expected_version: int,
                       next_run_at: datetime | None, jitter_ms: int = 0,
                       disable: bool = False) -> ScheduleEntry | None:
        """Check the version, update the entry, add the run and trim the history, in one
        ``BEGIN IMMEDIATE`` transaction."""
        return (await self.mark_runs([MarkRun(run, expected_version, next_run_at, jitter_ms,
                                              disable)]))[0]

    async def mark_runs(self, runs: Sequence[MarkRun]) -> list[ScheduleEntry | None]:
        """:meth:`mark_run` for every run of the batch, in one ``BEGIN IMMEDIATE``
        transaction."""
        batch = check_batch(runs)  # a bad run fails before the transaction
        if not batch:
            return []
        now = utcnow()
        bound = self.history_max
        period = trim_period(bound)
        entries, runs_table = self._entries, self._runs

        def write(conn: sqlite3.Connection) -> list[ScheduleEntry | None]:
            out: list[ScheduleEntry | None] = []
            applied: list[tuple[Any, ...]] = []
            with immediate(conn):
                for item in batch:
                    run = item.run
                    row = self._read(conn, run.entry_id)
                    if row is None or row[0] != item.expected_version:
                        out.append(None)
                        continue
                    stored = run_applied(self._decode(*row), run, next_run_at=item.next_run_at,
                                         jitter_ms=item.jitter_ms, disable=item.disable, now=now)
                    out.append(stored)
                    applied.append((
                        run.entry_id, epoch_ms(run.scheduled_at), epoch_ms(run.executed_at),
                        int(run.success), int(run.duration_ms), run.error))
                    conn.execute(
                        f"UPDATE {entries} SET version = ?, enabled = ?, next_run_at = ?, "
                        "data = ? WHERE id = ?",
                        (stored.version, int(stored.enabled),
                         None if stored.next_run_at is None else epoch_ms(stored.next_run_at),
                         stored.to_json(), stored.id))
                conn.executemany(
                    f"INSERT INTO {runs_table} (entry_id, scheduled_at, executed_at, success, "
                    "duration_ms, error) VALUES (?, ?, ?, ?, ?, ?)", applied)
                # Every few runs of an entry (its phase set by its id) its runs beyond
                # the bound go: finding the bound reads the entry's whole history.
                conn.executemany(
                    f"DELETE FROM {runs_table} WHERE entry_id = ?1 AND seq <= (SELECT seq "
                    f"FROM {runs_table} WHERE entry_id = ?1 ORDER BY seq DESC LIMIT 1 "
                    "OFFSET ?2)", [(e.id, bound) for e in out
                                   if e is not None and (e.total_run_count + zlib.crc32(
                                       e.id.encode())) % period == 0])
            return out

        return await self._db.run(write)

    async def history(self, entry_id: str, limit: int = 50) -> list[ScheduleRun]:
        """The entry's latest runs, newest first."""
        bounded = min(check_limit(limit), self.history_max)  # runs beyond await their trim
        rows = await self._db.run(lambda conn: conn.execute(
            f"SELECT scheduled_at, executed_at, success, duration_ms, error FROM {self._runs} "
            "WHERE entry_id = ? ORDER BY seq DESC LIMIT ?", (entry_id, bounded)).fetchall())
        return [ScheduleRun(entry_id, from_ms(s), from_ms(e), bool(ok), int(d), err)
                for s, e, ok, d, err in rows]

    async def close(self) -> None:
        """Close the connection if this schedule store owns it."""
        if self._owns_db:
            await self._db.close()
