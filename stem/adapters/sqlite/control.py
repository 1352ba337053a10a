"""SQLite control channel (``<ns>_control``: an append-only log read by position) and
heartbeat store (``<ns>_workers``).

SQLite has one writer at a time, so row ids are committed in order and "after id N"
never skips a message. Readers poll every :data:`POLL` seconds (processes sharing a
file have no wake-up between them); messages older than :data:`KEEP_SECONDS` are
deleted by the publishes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

from ._db import Database, ensure_schema, immediate, quote, table_prefix

SCHEMA_VERSION = 1
#: Seconds between two looks for new messages while a read waits.
POLL = 0.1
#: Seconds a control message is kept.
KEEP_SECONDS = 300.0


class SqliteControlChannel:
    """:class:`stem.ports.ControlChannel` on a SQLite file."""

    def __init__(self, db: Database, *, namespace: str = "stem") -> None:
        self._db = db
        self._name = f"{table_prefix(namespace)}_control"
        self._table = quote(self._name)
        db.add_setup(self._create)

    def __repr__(self) -> str:
        return f"SqliteControlChannel({self._db.path!r})"

    def _create(self, conn: sqlite3.Connection) -> None:
        ensure_schema(conn, self._name, SCHEMA_VERSION, [
            f"CREATE TABLE IF NOT EXISTS {self._table} (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "body BLOB NOT NULL, created_at REAL NOT NULL)",
        ])

    async def position(self) -> str:
        t = self._table
        row = await self._db.run(lambda c: c.execute(f"SELECT max(id) FROM {t}").fetchone())
        return str(row[0] or 0)

    async def publish(self, message: bytes) -> None:
        t = self._table

        def write(conn: sqlite3.Connection) -> None:
            now = time.time()
            with immediate(conn):
                conn.execute(f"INSERT INTO {t} (body, created_at) VALUES (?, ?)", (message, now))
                conn.execute(f"DELETE FROM {t} WHERE created_at < ?", (now - KEEP_SECONDS,))

        await self._db.run(write)

    async def read(self, after: str, timeout: float) -> tuple[str, list[bytes]]:
        t, start = self._table, int(after)
        deadline = time.monotonic() + timeout
        while True:
            rows = await self._db.run(lambda c: c.execute(
                f"SELECT id, body FROM {t} WHERE id > ? ORDER BY id LIMIT 500",
                (start,)).fetchall())
            if rows:
                return str(rows[-1][0]), [bytes(r[1]) for r in rows]
            left = deadline - time.monotonic()
            if left <= 0:
                return after, []
            await asyncio.sleep(min(POLL, left))

    async def close(self) -> None:
        """The connection is the store's."""


class SqliteHeartbeatStore:
    """:class:`stem.ports.HeartbeatStore` on a SQLite file."""

    def __init__(self, db: Database, *, namespace: str = "stem") -> None:
        self._db = db
        self._name = f"{table_prefix(namespace)}_workers"
        self._table = quote(self._name)
        db.add_setup(self._create)

    def _create(self, conn: sqlite3.Connection) -> None:
        ensure_schema(conn, self._name, SCHEMA_VERSION, [
            f"CREATE TABLE IF NOT EXISTS {self._table} (worker_id TEXT PRIMARY KEY, "
            "body BLOB NOT NULL, expires_at REAL NOT NULL)",
        ])

    async def put(self, worker_id: str, heartbeat: bytes, ttl: float) -> None:
        t = self._table

        def write(conn: sqlite3.Connection) -> None:
            now = time.time()
            with immediate(conn):
                conn.execute(f"INSERT INTO {t} (worker_id, body, expires_at) VALUES (?, ?, ?) "
                             "ON CONFLICT (worker_id) DO UPDATE SET body = excluded.body, "
                             "expires_at = excluded.expires_at", (worker_id, heartbeat, now + ttl))
                conn.execute(f"DELETE FROM {t} WHERE expires_at <= ?", (now,))

        await self._db.run(write)

    async def current(self) -> list[bytes]:
        t = self._table
        rows = await self._db.run(lambda c: c.execute(
            f"SELECT body FROM {t} WHERE expires_at > ? ORDER BY worker_id",
            (time.time(),)).fetchall())
        return [bytes(r[0]) for r in rows]

    async def remove(self, worker_id: str) -> None:
        t = self._table

        def write(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                conn.execute(f"DELETE FROM {t} WHERE worker_id = ?", (worker_id,))

        await self._db.run(write)

    async def close(self) -> None:
        """The connection is the store's."""
