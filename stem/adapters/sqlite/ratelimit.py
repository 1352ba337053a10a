"""The SQLite rate limiter: GCRA state in ``<ns>_rate_limits``, one ``BEGIN IMMEDIATE``
transaction per acquisition (so processes sharing the file share the limit)."""

from __future__ import annotations

import sqlite3
import time

from stem.ports import RateLimitDecision
from stem.ratelimit import gcra_many

from ._db import Database, ensure_schema, immediate, quote, table_prefix

SCHEMA_VERSION = 1


class SqliteRateLimiter:
    """:class:`stem.ports.RateLimiter` on one SQLite file (the host's clock)."""

    def __init__(self, db: Database, *, namespace: str = "stem") -> None:
        self._db = db
        self._prefix = table_prefix(namespace)
        self._table = quote(f"{self._prefix}_rate_limits")
        db.add_setup(self._create)

    def __repr__(self) -> str:
        return f"SqliteRateLimiter({self._db.path!r})"

    def _create(self, conn: sqlite3.Connection) -> None:
        ensure_schema(conn, f"{self._prefix}_rate_limits", SCHEMA_VERSION, [
            f"CREATE TABLE IF NOT EXISTS {self._table} "
            "(key TEXT PRIMARY KEY, tat REAL NOT NULL)",
        ])

    async def acquire(self, key: str, limit: int, period: float, *, max_wait: float = 0.0
                      ) -> RateLimitDecision:
        return (await self.acquire_many(key, limit, period, 1, max_wait=max_wait))[0]

    async def acquire_many(self, key: str, limit: int, period: float, count: int, *,
                           max_wait: float = 0.0) -> list[RateLimitDecision]:
        table = self._table

        def step(conn: sqlite3.Connection) -> list[RateLimitDecision]:
            with immediate(conn):  # the write lock first: read-compute-write is atomic
                row = conn.execute(f"SELECT tat FROM {table} WHERE key = ?", (key,)).fetchone()
                new_tat, decisions = gcra_many(None if row is None else row[0], time.time(),
                                               limit, period, count, max_wait)
                if new_tat is not None:
                    conn.execute(
                        f"INSERT INTO {table} (key, tat) VALUES (?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET tat = excluded.tat", (key, new_tat))
            return decisions

        return await self._db.run(step)

    async def close(self) -> None:
        """The connection is the store's: nothing of our own to release."""
