"""The SQLite revoke store: one row per task id in ``<ns>_revokes``.

The upsert is one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE version <
excluded.version`` per entry in one ``BEGIN IMMEDIATE`` transaction, so the higher
version wins whatever the order of writers. ``version`` is indexed: the worker's
"changed since" poll is one index range read.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import datetime

from stem._time import to_epoch, utcnow
from stem.revoke import RevokeEntry

from ._db import Database, ensure_schema, immediate, quote, table_prefix

SCHEMA_VERSION = 1


class SqliteRevokeStore:
    """:class:`stem.ports.RevokeStore` on one SQLite file that several processes share."""

    def __init__(self, db: Database, *, namespace: str = "stem") -> None:
        self._db = db
        self.namespace = namespace
        self._name = f"{table_prefix(namespace)}_revokes"
        self._table = quote(self._name)
        db.add_setup(self._create)

    def __repr__(self) -> str:
        return f"SqliteRevokeStore({self._db.path!r})"

    def _create(self, conn: sqlite3.Connection) -> None:
        ensure_schema(conn, self._name, SCHEMA_VERSION, [
            f"CREATE TABLE IF NOT EXISTS {self._table} (task_id TEXT PRIMARY KEY, "
            "version INTEGER NOT NULL, expires_at REAL, data TEXT NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS {quote(self._name + '_version')} "
            f"ON {self._table} (version)",
        ])

    async def upsert_many(self, entries: Sequence[RevokeEntry]) -> None:
        rows = [(e.task_id, e.version,
                 None if e.expires_at is None else to_epoch(e.expires_at),
                 json.dumps(e.with_namespace(self.namespace).to_json()))
                for e in entries]
        if not rows:
            return
        t = self._table

        def write(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                conn.executemany(
                    f"INSERT INTO {t} (task_id, version, expires_at, data) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (task_id) DO UPDATE SET version = excluded.version, "
                    "expires_at = excluded.expires_at, data = excluded.data "
                    "WHERE version < excluded.version", rows)

        await self._db.run(write)

    async def _select(self, version: int) -> list[RevokeEntry]:
        t = self._table
        rows = await self._db.run(lambda conn: conn.execute(
            f"SELECT data FROM {t} WHERE version > ? ORDER BY version", (version,)).fetchall())
        return [RevokeEntry.from_json(json.loads(r[0])) for r in rows]

    async def entries(self) -> list[RevokeEntry]:
        return await self._select(-(2**63))

    async def changed_since(self, version: int) -> list[RevokeEntry]:
        return await self._select(version)

    async def prune_expired(self, now: datetime | None = None) -> int:
        at = to_epoch(now or utcnow())
        t = self._table

        def write(conn: sqlite3.Connection) -> int:
            with immediate(conn):
                return conn.execute(f"DELETE FROM {t} WHERE expires_at <= ?", (at,)).rowcount

        return await self._db.run(write)

    async def close(self) -> None:
        """The connection is the store's: nothing of our own to release."""
