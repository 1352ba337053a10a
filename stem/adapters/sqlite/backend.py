"""SQLite result backend: one row per task id with an expiry time."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from stem._time import now_epoch
from stem.adapters._shared import Waiter, check_max_items, meta_appended
from stem.adapters._waiting import Watch, wait_for_terminal
from stem.ports import DEFAULT_RESULT_TTL
from stem.status import TaskState, TaskStatus

from ._db import (
    WAIT_POLL_INTERVAL,
    Database,
    chunks,
    ensure_schema,
    hub_for,
    immediate,
    placeholders,
    quote,
    table_prefix,
)

SCHEMA_VERSION = 1

#: How often (seconds) a write also deletes expired rows.
PURGE_INTERVAL = 60.0

_TERMINAL = tuple(s.value for s in TaskState if s.is_terminal)


class SqliteBackend:
    """A :class:`stem.ports.ResultBackend` on a SQLite file that several processes share.

    Expired rows are never returned and are deleted by a write at most every
    ``PURGE_INTERVAL`` seconds. ``wait()`` is woken at once by a write from the same
    process; writes from other processes are found by one batched query every
    ``WAIT_POLL_INTERVAL`` seconds for all the ids this process is waiting on.
    """

    def __init__(
        self, path: str, *, namespace: str = "stem", default_ttl: float = DEFAULT_RESULT_TTL,
        db: Database | None = None,
    ) -> None:
        self.path = path
        self.default_ttl = default_ttl
        prefix = table_prefix(namespace)
        self._prefix = prefix
        self._results = quote(f"{prefix}_results")
        # A store passes the database its parts share (one connection); alone, own one.
        self._owns_db = db is None
        self._db = Database(path) if db is None else db
        self._db.add_setup(self._create)
        self._hub = hub_for(path, prefix)
        self._next_purge = 0.0

    def __repr__(self) -> str:
        return f"SqliteBackend({self.path!r})"

    def _create(self, conn: sqlite3.Connection) -> None:
        r, p = self._results, self._prefix
        ensure_schema(
            conn,
            f"{p}_results",
            SCHEMA_VERSION,
            [
                f"""CREATE TABLE IF NOT EXISTS {r} (
                    id TEXT PRIMARY KEY,
                    state TEXT NOT NULL,
                    data BLOB NOT NULL,
                    expires_at REAL NOT NULL
                ) WITHOUT ROWID""",
                f"CREATE INDEX IF NOT EXISTS {quote(p + '_results_expires')} ON {r} (expires_at)",
            ],
        )

    async def ping(self) -> None:
        """Open (creating if needed) the file and its table."""
        await self._db.run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def set_many(self, items: Sequence[tuple[TaskStatus, float | None]]) -> None:
        """Upsert statuses in one transaction; terminal ones wake local waiters."""
        if not items:
            return
        rows = self.rows(items, self.default_ttl)

        def write(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                self.write_rows(conn, rows)

        await self._db.run(write)
        self.written(items)

    @staticmethod
    def rows(items: Sequence[tuple[TaskStatus, float | None]], default_ttl: float
             ) -> list[tuple[str, str, bytes, float]]:
        """Statuses encoded for :meth:`write_rows` (done off the database thread)."""
        return [(s.id, s.state.value, s.to_json(), default_ttl if ttl is None else ttl)
                for s, ttl in items]

    def write_rows(self, conn: sqlite3.Connection, rows: list[tuple[str, str, bytes, float]]
                   ) -> None:
        """Upsert encoded statuses inside the caller's transaction (the store's atomic
        ack shares it); purges expired rows at most every ``PURGE_INTERVAL``."""
        now = now_epoch()
        conn.executemany(
            f"INSERT OR REPLACE INTO {self._results} (id, state, data, expires_at) "
            "VALUES (?, ?, ?, ?)",
            [(i, state, data, now + ttl) for i, state, data, ttl in rows],
        )
        if now >= self._next_purge:
            conn.execute(f"DELETE FROM {self._results} WHERE expires_at <= ?", (now,))
            # Set before the commit: at worst one purge is skipped, never repeated per write.
            self._next_purge = now + PURGE_INTERVAL

    async def add_many(self, items: Sequence[tuple[TaskStatus, float | None]]) -> set[str]:
        """Insert the statuses whose id has none (or an expired one), in one transaction;
        return the ids inserted."""
        if not items:
            return set()
        rows = self.rows(items, self.default_ttl)

        def write(conn: sqlite3.Connection) -> set[str]:
            with immediate(conn):
                return self.add_rows(conn, rows)

        added = await self._db.run(write)
        self.written([(s, t) for s, t in items if s.id in added])
        return added

    def add_rows(self, conn: sqlite3.Connection, rows: list[tuple[str, str, bytes, float]]
                 ) -> set[str]:
        """Insert-if-absent inside the caller's transaction (an expired row counts as
        absent); the ids actually written."""
        now = now_epoch()
        first: dict[str, tuple[str, str, bytes, float]] = {}
        for row in rows:
            first.setdefault(row[0], row)  # a repeated id keeps its first status
        added: set[str] = set()
        # Many rows per statement (RETURNING names the ones written): one statement per
        # row costs as much again as the rows themselves.
        for part in chunks(list(first.values()), 200):
            values = ", ".join(["(?, ?, ?, ?)"] * len(part))
            params: list[object] = []
            for i, state, data, ttl in part:
                params += (i, state, data, now + ttl)
            params.append(now)
            cur = conn.execute(
                f"INSERT INTO {self._results} (id, state, data, expires_at) VALUES {values} "
                "ON CONFLICT (id) DO UPDATE SET state = excluded.state, data = excluded.data, "
                "expires_at = excluded.expires_at WHERE expires_at <= ? RETURNING id", params)
            added.update(r[0] for r in cur.fetchall())
        return added

    def live_ids(self, conn: sqlite3.Connection, task_ids: Sequence[str]) -> set[str]:
        """The ids among ``task_ids`` with an unexpired status (inside the caller's
        transaction)."""
        now = now_epoch()
        found: set[str] = set()
        for part in chunks(list(task_ids)):
            found.update(r[0] for r in conn.execute(
                f"SELECT id FROM {self._results} WHERE id IN ({placeholders(len(part))}) "
                "AND expires_at > ?", (*part, now)))
        return found

    async def forget_many(self, task_ids: Sequence[str]) -> None:
        """Delete these statuses."""
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return
        table = self._results

        def delete(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                for part in chunks(ids):
                    conn.execute(f"DELETE FROM {table} WHERE id IN ({placeholders(len(part))})",
                                 tuple(part))

        await self._db.run(delete)

    async def append_meta(self, task_id: str, key: str, item: dict[str, Any], *,
                          max_items: int = 100) -> bool:
        """Append ``item`` to ``meta[key]``: read and rewrite the row in one
        ``BEGIN IMMEDIATE`` transaction (no other process writes in between); the state
        and expiry stay."""
        check_max_items(max_items)
        table = self._results

        def append(conn: sqlite3.Connection) -> bool:
            with immediate(conn):
                row = conn.execute(f"SELECT data FROM {table} WHERE id = ? AND expires_at > ?",
                                   (task_id, now_epoch())).fetchone()
                if row is None:
                    return False
                conn.execute(f"UPDATE {table} SET data = ? WHERE id = ?",
                             (meta_appended(row[0], key, item, max_items), task_id))
                return True

        return await self._db.run(append)

    def written(self, items: Sequence[tuple[TaskStatus, float | None]]) -> None:
        """After a commit: wake this process's waiters on the terminal statuses."""
        self._hub.results_done([s.id for s, _ in items if s.state.is_terminal])

    async def get(self, task_id: str) -> TaskStatus | None:
        """The stored status, or None if unknown or expired."""
        found = await self.get_many([task_id])
        return found.get(task_id)

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskStatus]:
        """Statuses of the ids that exist and have not expired."""
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return {}
        table = self._results

        def read(conn: sqlite3.Connection) -> list[tuple[str, bytes]]:
            now = now_epoch()
            out: list[tuple[str, bytes]] = []
            for part in chunks(ids):
                out.extend(
                    conn.execute(
                        f"SELECT id, data FROM {table} "
                        f"WHERE id IN ({placeholders(len(part))}) AND expires_at > ?",
                        (*part, now),
                    ).fetchall()
                )
            return out

        return {i: TaskStatus.from_json(data) for i, data in await self._db.run(read)}

    def _poll_watched(self, conn: sqlite3.Connection) -> None:
        """Wake local waiters whose task another process finished (one query for all)."""
        hub = self._hub
        mono = time.monotonic()
        with hub.lock:
            # Many concurrent waits share one poll per interval instead of one each.
            if mono - hub.last_result_poll < WAIT_POLL_INTERVAL / 2:
                return
            hub.last_result_poll = mono
        ids = hub.watched_results()
        now = now_epoch()
        done: list[str] = []
        for part in chunks(ids):
            done.extend(
                row[0]
                for row in conn.execute(
                    f"SELECT id FROM {self._results} WHERE id IN ({placeholders(len(part))}) "
                    f"AND state IN ({placeholders(len(_TERMINAL))}) AND expires_at > ?",
                    (*part, *_TERMINAL, now),
                )
            )
        hub.results_done(done)

    async def wait(self, task_id: str, timeout: float | None) -> TaskStatus | None:
        """Return the terminal status once stored, or None when ``timeout`` passes first.

        A write by this process wakes the waiter at once; writes by other processes
        are found by one query per ``WAIT_POLL_INTERVAL`` shared by every waiter.
        """

        async def arm() -> Watch:
            return _HubWatch(self, task_id)

        return await wait_for_terminal(arm, lambda: self.get(task_id), timeout)

    async def close(self) -> None:
        """Close the connection and its thread (the backend reopens them if used again)."""
        if self._owns_db:
            await self._db.close()


class _HubWatch:
    """A :class:`~stem.adapters._waiting.Watch` on the process-wide hub of the file."""

    def __init__(self, backend: SqliteBackend, task_id: str) -> None:
        self._backend = backend
        self._task_id = task_id
        self._waiter: Waiter = backend._hub.watch_result(task_id)

    async def changed(self, seconds: float | None) -> bool:
        step = WAIT_POLL_INTERVAL if seconds is None else min(WAIT_POLL_INTERVAL, seconds)
        woken = await self._waiter.wait(step)
        if not woken and (seconds is None or step < seconds):
            await self._backend._db.run(self._backend._poll_watched)
            woken = await self._waiter.wait(0)
        if woken:
            self._waiter = self._backend._hub.watch_result(self._task_id, self._waiter)
        return woken

    async def close(self) -> None:
        self._backend._hub.unwatch_result(self._task_id, self._waiter)
