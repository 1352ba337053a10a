"""Postgres group store: ``stem_groups`` and ``stem_group_members`` (migration 4).

Recording a member and updating the counters is one statement: the member row is
inserted unless its index has one, and only then the group row's counters move (the
row lock serialises concurrent members, and each sees the counters after its own
change). The chord claim is one conditional UPDATE. Expired groups are invisible at
once and deleted (their members by cascade) a few at a time on later creates.
"""

from __future__ import annotations

from typing import Any

import orjson

from stem.adapters.postgres._pool import Connector
from stem.groups import GroupMember, GroupProgress, GroupRecord, dump_meta


class PostgresGroupStore:
    """A :class:`stem.ports.GroupStore` on a Postgres schema (see the module docstring)."""

    def __init__(self, connector: Connector) -> None:
        self._db = connector
        s = connector.settings.quoted_schema
        self._purge = (f"DELETE FROM {s}.stem_groups WHERE id IN (SELECT id FROM "
                       f"{s}.stem_groups WHERE expires_at <= now() LIMIT 100)")
        self._create = (
            f"INSERT INTO {s}.stem_groups (id, expected, meta, expires_at) "
            "VALUES ($1, $2, $3, now() + make_interval(secs => $4)) "
            "ON CONFLICT (id) DO NOTHING RETURNING id")
        self._add = f"""
            WITH g AS (
                SELECT id FROM {s}.stem_groups WHERE id = $1 AND expires_at > now()
            ), ins AS (
                INSERT INTO {s}.stem_group_members (group_id, idx, data)
                SELECT id, $2, $3 FROM g
                ON CONFLICT DO NOTHING RETURNING 1
            ), upd AS (
                UPDATE {s}.stem_groups SET completed = completed + 1, failed = failed + $4
                WHERE id = $1 AND EXISTS (SELECT 1 FROM ins)
                RETURNING expected, completed, failed
            )
            SELECT expected, completed, failed, true AS added FROM upd
            UNION ALL
            SELECT expected, completed, failed, false FROM {s}.stem_groups
            WHERE id = $1 AND expires_at > now() AND NOT EXISTS (SELECT 1 FROM ins)"""
        self._claim = (
            f"UPDATE {s}.stem_groups SET claimed = true WHERE id = $1 AND NOT claimed "
            "AND failed = 0 AND completed >= expected AND expires_at > now() RETURNING id")
        self._get = (
            f"SELECT expected, completed, failed, claimed, meta, created_at, expires_at "
            f"FROM {s}.stem_groups WHERE id = $1 AND expires_at > now()")
        self._members = (f"SELECT data FROM {s}.stem_group_members WHERE group_id = $1 "
                         "ORDER BY idx")

    def __repr__(self) -> str:
        return f"PostgresGroupStore({self._db.settings.display!r})"

    async def create(self, group_id: str, expected: int, meta: dict[str, Any],
                     ttl: float) -> bool:
        """Insert the record unless a live one exists."""
        raw = dump_meta(meta)

        async def op(conn: Any) -> bool:
            async with conn.transaction():
                await conn.execute(self._purge)  # expired records, this one included
                return await conn.fetchval(self._create, group_id, expected, raw,
                                           float(ttl)) is not None

        return await self._db.run(op)

    async def add_result(self, group_id: str, member: GroupMember) -> GroupProgress | None:
        """Record the member once and return the counters (one statement)."""
        raw = member.to_json()
        failed = int(member.state.value != "succeeded")
        row = await self._db.run(
            lambda conn: conn.fetchrow(self._add, group_id, member.index, raw, failed))
        if row is None:
            return None
        return GroupProgress(row[0], row[1], row[2], bool(row[3]))

    async def claim_callback(self, group_id: str) -> bool:
        """True for the one caller whose UPDATE matched."""
        return await self._db.run(lambda conn: conn.fetchval(self._claim, group_id)) is not None

    async def get(self, group_id: str) -> GroupRecord | None:
        """The record and its members in index order."""

        async def op(conn: Any) -> GroupRecord | None:
            row = await conn.fetchrow(self._get, group_id)
            if row is None:
                return None
            members = [GroupMember.from_json(bytes(r[0]))
                       for r in await conn.fetch(self._members, group_id)]
            return GroupRecord(group_id, row[0], orjson.loads(bytes(row[4])), members,
                               row[1], row[2], row[3], row[5], row[6])

        return await self._db.run(op)

    async def close(self) -> None:
        """Nothing of its own: the store's pool closes with the store."""
