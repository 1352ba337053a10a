"""Postgres lock store: one row per held key in ``stem_locks`` of the schema.

Each operation is one conditional statement (acquire is ``INSERT ... ON CONFLICT DO
UPDATE ... WHERE`` the lease ran out or the owner is the same), so of any number of
concurrent acquirers exactly one gets a row back. Expiry is the server's clock.
"""

from __future__ import annotations

import time

from stem.adapters._beat import check_ttl
from stem.adapters.postgres._pool import Connector, parse_url
from stem.adapters.postgres._sql import LockStatements

#: Seconds between two purges of rows whose lease ran out (done by an acquire).
PURGE_INTERVAL = 300.0


class PostgresLockStore:
    """A :class:`stem.ports.LockStore` on a Postgres schema."""

    def __init__(self, url: str, *, namespace: str = "stem",
                 connector: Connector | None = None) -> None:
        self.settings = parse_url(url, namespace)
        self.namespace = namespace
        self._owns_db = connector is None
        self._db = Connector(self.settings, "lock store") if connector is None else connector
        self._sql = LockStatements(self.settings.quoted_schema)
        self._next_purge = 0.0

    def __repr__(self) -> str:
        return f"PostgresLockStore({self.settings.display!r}, schema={self.settings.schema!r})"

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """One upsert that only takes a free, expired or own key."""
        seconds = check_ttl(ttl)
        got = await self._db.run(lambda c: c.fetchval(self._sql.acquire, key, owner, seconds))
        if time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + PURGE_INTERVAL
            await self._db.run(lambda c: c.execute(self._sql.purge))
        return got is not None

    async def renew(self, key: str, owner: str, ttl: float) -> bool:
        """Move ``owner``'s unexpired lease to ``ttl`` seconds from now."""
        seconds = check_ttl(ttl)
        status = await self._db.run(lambda c: c.execute(self._sql.renew, key, owner, seconds))
        return bool(status.endswith(" 1"))

    async def release(self, key: str, owner: str) -> bool:
        """Delete the row if ``owner`` holds an unexpired lease on it."""
        status = await self._db.run(lambda c: c.execute(self._sql.release, key, owner))
        return bool(status.endswith(" 1"))

    async def owner_of(self, key: str) -> str | None:
        """The holder of an unexpired lease on ``key``."""
        owner = await self._db.run(lambda c: c.fetchval(self._sql.owner_of, key))
        return None if owner is None else str(owner)

    async def close(self) -> None:
        """Close the pool if this lock store owns it (a store's closes with it)."""
        if self._owns_db:
            await self._db.close()
