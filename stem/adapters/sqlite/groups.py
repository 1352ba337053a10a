"""SQLite group store: a groups table and a members table, each change one write
transaction (``BEGIN IMMEDIATE``), so processes sharing the file count every member
once and claim a chord once."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Any

import orjson

from stem._time import now_epoch
from stem.groups import GroupMember, GroupProgress, GroupRecord, dump_meta

from ._db import Database, ensure_schema, immediate, quote, table_prefix

SCHEMA_VERSION = 1


class SqliteGroupStore:
    """A :class:`stem.ports.GroupStore` on a SQLite file (see the module docstring)."""

    def __init__(self, path: str, *, namespace: str = "stem", db: Database | None = None
                 ) -> None:
        self.path = path
        prefix = table_prefix(namespace)
        self._prefix = prefix
        self._groups = quote(f"{prefix}_groups")
        self._members = quote(f"{prefix}_group_members")
        self._owns_db = db is None
        self._db = Database(path) if db is None else db
        self._db.add_setup(self._create)

    def __repr__(self) -> str:
        return f"SqliteGroupStore({self.path!r})"

    def _create(self, conn: sqlite3.Connection) -> None:
        g, m, p = self._groups, self._members, self._prefix
        ensure_schema(conn, f"{p}_groups", SCHEMA_VERSION, [
            f"""CREATE TABLE IF NOT EXISTS {g} (
                id TEXT PRIMARY KEY,
                expected INTEGER NOT NULL,
                completed INTEGER NOT NULL DEFAULT 0,
                failed INTEGER NOT NULL DEFAULT 0,
                claimed INTEGER NOT NULL DEFAULT 0,
                meta BLOB NOT NULL,
                created_at REAL NOT NULL,
                expires_at REAL NOT NULL
            ) WITHOUT ROWID""",
            f"""CREATE TABLE IF NOT EXISTS {m} (
                group_id TEXT NOT NULL,
                idx INTEGER NOT NULL,
                data BLOB NOT NULL,
                PRIMARY KEY (group_id, idx)
            ) WITHOUT ROWID""",
        ])

    def _purge(self, conn: sqlite3.Connection, group_id: str, now: float) -> None:
        """Drop ``group_id``'s record if it expired (inside the caller's transaction)."""
        if conn.execute(f"DELETE FROM {self._groups} WHERE id = ? AND expires_at <= ?",
                        (group_id, now)).rowcount:
            conn.execute(f"DELETE FROM {self._members} WHERE group_id = ?", (group_id,))

    async def create(self, group_id: str, expected: int, meta: dict[str, Any],
                     ttl: float) -> bool:
        """Insert the record unless one exists (an expired one is replaced)."""
        raw = dump_meta(meta)

        def write(conn: sqlite3.Connection) -> bool:
            now = now_epoch()
            with immediate(conn):
                self._purge(conn, group_id, now)
                # Expired records of other groups go a few at a time, here (creates are rare).
                old = [r[0] for r in conn.execute(
                    f"SELECT id FROM {self._groups} WHERE expires_at <= ? LIMIT 100", (now,))]
                for gid in old:
                    self._purge(conn, gid, now)
                return conn.execute(
                    f"INSERT OR IGNORE INTO {self._groups} (id, expected, meta, created_at, "
                    "expires_at) VALUES (?, ?, ?, ?, ?)",
                    (group_id, expected, raw, now, now + ttl)).rowcount == 1

        return await self._db.run(write)

    async def add_result(self, group_id: str, member: GroupMember) -> GroupProgress | None:
        """Insert the member row if its index has none; bump the counters if it was new."""
        raw = member.to_json()
        failed = int(member.state.value != "succeeded")

        def write(conn: sqlite3.Connection) -> GroupProgress | None:
            now = now_epoch()
            with immediate(conn):
                row = conn.execute(
                    f"SELECT expected, completed, failed FROM {self._groups} "
                    "WHERE id = ? AND expires_at > ?", (group_id, now)).fetchone()
                if row is None:
                    return None
                added = conn.execute(
                    f"INSERT OR IGNORE INTO {self._members} (group_id, idx, data) "
                    "VALUES (?, ?, ?)", (group_id, member.index, raw)).rowcount == 1
                expected, completed, nfailed = row
                if added:
                    conn.execute(f"UPDATE {self._groups} SET completed = completed + 1, "
                                 "failed = failed + ? WHERE id = ?", (failed, group_id))
                    completed, nfailed = completed + 1, nfailed + failed
                return GroupProgress(expected, completed, nfailed, added)

        return await self._db.run(write)

    async def claim_callback(self, group_id: str) -> bool:
        """One conditional UPDATE: claimed only when complete, all succeeded, unclaimed."""

        def write(conn: sqlite3.Connection) -> bool:
            with immediate(conn):
                return conn.execute(
                    f"UPDATE {self._groups} SET claimed = 1 WHERE id = ? AND claimed = 0 "
                    "AND failed = 0 AND completed >= expected AND expires_at > ?",
                    (group_id, now_epoch())).rowcount == 1

        return await self._db.run(write)

    async def get(self, group_id: str) -> GroupRecord | None:
        """The record and its members in index order."""

        def read(conn: sqlite3.Connection) -> GroupRecord | None:
            row = conn.execute(
                f"SELECT expected, completed, failed, claimed, meta, created_at, expires_at "
                f"FROM {self._groups} WHERE id = ? AND expires_at > ?",
                (group_id, now_epoch())).fetchone()
            if row is None:
                return None
            members = [GroupMember.from_json(r[0]) for r in conn.execute(
                f"SELECT data FROM {self._members} WHERE group_id = ? ORDER BY idx",
                (group_id,))]
            expected, completed, failed, claimed, meta, created, expires = row
            return GroupRecord(group_id, expected, orjson.loads(meta), members, completed,
                               failed, bool(claimed), datetime.fromtimestamp(created, UTC),
                               datetime.fromtimestamp(expires, UTC))

        return await self._db.run(read)

    async def close(self) -> None:
        """Close the database handle if this store owns it."""
        if self._owns_db:
            await self._db.close()
