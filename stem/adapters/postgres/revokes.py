"""The Postgres revoke store: one row per task id in ``stem_revokes`` (migration 7).

An upsert is one ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO UPDATE ... WHERE
stem_revokes.version < EXCLUDED.version`` statement, so the higher version wins
whatever the order of writers. ``changed_since`` is one range read on the version
index.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from stem._time import utcnow
from stem.revoke import RevokeEntry

from ._pool import Connector

_UPSERT = """
INSERT INTO {s}.stem_revokes AS r (task_id, namespace, terminate, reason, requested_by,
                                   issued_at, expires_at, version)
SELECT * FROM unnest($1::text[], $2::text[], $3::boolean[], $4::text[], $5::text[],
                     $6::timestamptz[], $7::timestamptz[], $8::bigint[])
ON CONFLICT (task_id) DO UPDATE SET
    namespace = EXCLUDED.namespace, terminate = EXCLUDED.terminate,
    reason = EXCLUDED.reason, requested_by = EXCLUDED.requested_by,
    issued_at = EXCLUDED.issued_at, expires_at = EXCLUDED.expires_at,
    version = EXCLUDED.version, updated_at = now()
WHERE r.version < EXCLUDED.version
"""
_SELECT = """
SELECT task_id, namespace, terminate, reason, requested_by, issued_at, expires_at, version
FROM {s}.stem_revokes WHERE version > $1 ORDER BY version
"""
_PRUNE = "DELETE FROM {s}.stem_revokes WHERE expires_at <= $1"


def _entry(row: Any) -> RevokeEntry:
    return RevokeEntry(task_id=row["task_id"], version=row["version"],
                       issued_at=row["issued_at"], terminate=row["terminate"],
                       reason=row["reason"], requested_by=row["requested_by"],
                       expires_at=row["expires_at"], namespace=row["namespace"])


class PostgresRevokeStore:
    """:class:`stem.ports.RevokeStore` on a Postgres schema."""

    def __init__(self, connector: Connector, *, namespace: str = "stem") -> None:
        self._db = connector
        self.namespace = namespace
        schema = connector.settings.quoted_schema
        self._upsert = _UPSERT.replace("{s}", schema)
        self._select = _SELECT.replace("{s}", schema)
        self._prune = _PRUNE.replace("{s}", schema)

    def __repr__(self) -> str:
        return f"PostgresRevokeStore({self._db.settings.display!r})"

    async def upsert_many(self, entries: Sequence[RevokeEntry]) -> None:
        if not entries:
            return
        # One row per task id in a statement (ON CONFLICT cannot touch a row twice).
        best: dict[str, RevokeEntry] = {}
        for e in entries:
            if e.task_id not in best or e.version > best[e.task_id].version:
                best[e.task_id] = e
        es = list(best.values())
        args = ([e.task_id for e in es], [self.namespace for _ in es],
                [e.terminate for e in es], [e.reason for e in es],
                [e.requested_by for e in es], [e.issued_at for e in es],
                [e.expires_at for e in es], [e.version for e in es])
        await self._db.run(lambda c: c.execute(self._upsert, *args))

    async def entries(self) -> list[RevokeEntry]:
        return await self.changed_since(-(2**63))

    async def changed_since(self, version: int) -> list[RevokeEntry]:
        rows = await self._db.run(lambda c: c.fetch(self._select, version))
        return [_entry(r) for r in rows]

    async def prune_expired(self, now: datetime | None = None) -> int:
        at = now or utcnow()
        status = await self._db.run(lambda c: c.execute(self._prune, at))
        return int(status.rsplit(" ", 1)[-1])

    async def close(self) -> None:
        """The pool is the store's: nothing of our own to release."""
