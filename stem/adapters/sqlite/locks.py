"""SQLite lock store: one row per held key in ``<ns>_locks``.

Every operation is one conditional statement in one ``BEGIN IMMEDIATE`` transaction,
so two processes on the file cannot both take a key. Expiry is judged by this
host's clock (every process sharing a SQLite file runs on one host).
"""

from __future__ import annotations

import sqlite3

from stem._time import now_epoch
from stem.adapters._beat import check_ttl

from ._db import Database, ensure_schema, immediate, quote, table_prefix

SCHEMA_VERSION = 1
#: How often (seconds) an acquire also deletes rows whose lease ran out long ago.
PURGE_INTERVAL = 60.0


class SqliteLockStore:
    """A :class:`stem.ports.LockStore` on a SQLite file that several processes share."""

    def __init__(self, path: str, *, namespace: str = "stem", db: Database | None = None
                 ) -> None:
        self.path = path
        prefix = table_prefix(namespace)
        self._name = f"{prefix}_locks"
        self._table = quote(self._name)
        self._owns_db = db is None
        self._db = Database(path) if db is None else db
        self._db.add_setup(self._create)
        self._next_purge = 0.0

    def __repr__(self) -> str:
        return f"SqliteLockStore({self.path!r})"

    def _create(self, conn: sqlite3.Connection) -> None:
        ensure_schema(conn, self._name, SCHEMA_VERSION, [
            f"""CREATE TABLE IF NOT EXISTS {self._table} (
                key TEXT PRIMARY KEY,
                owner TEXT NOT NULL,
                expires_at REAL NOT NULL
            ) WITHOUT ROWID""",
        ])

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """Insert the key, or take it over when expired or already ``owner``'s."""
        seconds = check_ttl(ttl)
        t = self._table

        def write(conn: sqlite3.Connection) -> bool:
            now = now_epoch()
            with immediate(conn):
                taken = conn.execute(
                    f"INSERT INTO {t} (key, owner, expires_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, "
                    "expires_at = excluded.expires_at WHERE expires_at <= ? OR owner = ?",
                    (key, owner, now + seconds, now, owner),
                ).rowcount
                if now >= self._next_purge:
                    conn.execute(f"DELETE FROM {t} WHERE expires_at <= ?", (now - PURGE_INTERVAL,))
                    self._next_purge = now + PURGE_INTERVAL
            return bool(taken)

        return await self._db.run(write)

    async def renew(self, key: str, owner: str, ttl: float) -> bool:
        """Move ``owner``'s unexpired lease to ``ttl`` seconds from now."""
        seconds = check_ttl(ttl)
        t = self._table

        def write(conn: sqlite3.Connection) -> bool:
            now = now_epoch()
            with immediate(conn):
                return bool(conn.execute(
                    f"UPDATE {t} SET expires_at = ? WHERE key = ? AND owner = ? AND expires_at > ?",
                    (now + seconds, key, owner, now)).rowcount)

        return await self._db.run(write)

    async def release(self, key: str, owner: str) -> bool:
        """Delete the key if ``owner`` holds it (an expired lease is not held)."""
        t = self._table

        def write(conn: sqlite3.Connection) -> bool:
            now = now_epoch()
            with immediate(conn):
                return bool(conn.execute(
                    f"DELETE FROM {t} WHERE key = ? AND owner = ? AND expires_at > ?",
                    (key, owner, now)).rowcount)

        return await self._db.run(write)

    async def owner_of(self, key: str) -> str | None:
        """The holder of an unexpired lease on ``key``."""
        t = self._table

        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(f"SELECT owner FROM {t} WHERE key = ? AND expires_at > ?",
                               (key, now_epoch())).fetchone()
            return None if row is None else str(row[0])

        return await self._db.run(read)

    async def close(self) -> None:
        """Close the connection if this lock store owns it (a store's closes with it)."""
        if self._owns_db:
            await self._db.close()
