"""The SQLite store: one database handle (one connection on its own thread) per URL."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence

from stem.adapters._shared import check_namespace
from stem.adapters._store import BaseStore
from stem.envelope import Envelope
from stem.ports import DEFAULT_RESULT_TTL, Delivery
from stem.status import TaskStatus

from ._db import Database, dead_letter_retention_from_url, immediate, path_from_url
from .backend import SqliteBackend
from .broker import SqliteBroker, leases_of
from .groups import SqliteGroupStore
from .locks import SqliteLockStore
from .ratelimit import SqliteRateLimiter
from .schedules import SqliteScheduleStore


class SqliteStore(BaseStore[SqliteBroker, SqliteBackend]):
    """Broker, result backend, lock and schedule stores on one SQLite file, sharing one
    connection.

    Results and acks of a batch go in one transaction (:meth:`ack_with_results`).
    """

    def __init__(self, url: str, *, namespace: str = "stem") -> None:
        super().__init__(url, check_namespace(namespace))
        self.path = path_from_url(url)
        self.dead_letter_retention = dead_letter_retention_from_url(url)
        self.db = Database(self.path)

    def _make_broker(self) -> SqliteBroker:
        return SqliteBroker(self.path, namespace=self.namespace, db=self.db,
                            dead_letter_retention=self.dead_letter_retention)

    def _make_backend(self) -> SqliteBackend:
        return SqliteBackend(self.path, namespace=self.namespace, db=self.db)

    def _make_groups(self) -> SqliteGroupStore:
        return SqliteGroupStore(self.path, namespace=self.namespace, db=self.db)

    def _make_locks(self) -> SqliteLockStore:
        return SqliteLockStore(self.path, namespace=self.namespace, db=self.db)

    def _make_schedules(self) -> SqliteScheduleStore:
        return SqliteScheduleStore(self.path, namespace=self.namespace, db=self.db)

    def _make_rate_limiter(self) -> SqliteRateLimiter:
        return SqliteRateLimiter(self.db, namespace=self.namespace)

    async def _close_shared(self) -> None:
        await self.db.close()

    async def migrate(self) -> list[int]:
        """Create every part's tables now (they are also created on first use)."""
        _ = self.broker, self.backend, self.locks, self.schedules
        await self.db.run(lambda conn: conn.execute("SELECT 1").fetchone())
        return []

    async def ack_with_results(
        self,
        deliveries: Sequence[Delivery],
        statuses: Sequence[tuple[TaskStatus, float | None]],
        *,
        default_ttl: float = DEFAULT_RESULT_TTL,
    ) -> None:
        """Write ``statuses`` and ack ``deliveries`` in one ``BEGIN IMMEDIATE`` transaction."""
        broker, backend = self.broker, self.backend
        rows = backend.rows(statuses, default_ttl)
        leases = leases_of(deliveries)

        def write(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                if rows:
                    backend.write_rows(conn, rows)
                if leases:
                    broker.delete_leased(conn, leases)

        await self.db.run(write)
        backend.written(statuses)


    async def publish_new(
        self,
        items: Sequence[tuple[Envelope, TaskStatus, float | None]],
        *,
        default_ttl: float = DEFAULT_RESULT_TTL,
        locks: Mapping[str, tuple[str, float]] | None = None,
    ) -> set[str]:
        """Insert each new id's status and job in one ``BEGIN IMMEDIATE`` transaction;
        ids that already have a status are skipped, and so are ids whose lock (in
        ``locks``) another owner holds (see stem.ports.AtomicPublishStore)."""
        if not items:
            return set()
        broker, backend = self.broker, self.backend
        envelopes = [e for e, _, _ in items]
        jobs = broker.jobs_of(envelopes)
        rows = backend.rows([(s, ttl) for _, s, ttl in items], default_ttl)
        lock_store = self.locks if locks else None
        assert lock_store is None or isinstance(lock_store, SqliteLockStore)

        def write(conn: sqlite3.Connection) -> set[str]:
            with immediate(conn):
                nonlocal rows
                if locks and lock_store is not None:
                    # The write lock is held: check-then-act is safe inside it.
                    live = backend.live_ids(conn, list(locks))
                    denied = {task_id for task_id, (key, ttl) in locks.items()
                              if task_id in live
                              or not lock_store.acquire_in(conn, key, task_id, ttl)}
                    rows = [r for r in rows if r[0] not in denied]
                added = backend.add_rows(conn, rows)
                fresh = [job for job, e in zip(jobs, envelopes, strict=True) if e.id in added]
                if fresh:
                    broker.insert_jobs(conn, fresh)
                return added

        added = await self.db.run(write)
        if added:
            broker.published()
        return added


def store_from_url(url: str, *, namespace: str = "stem") -> SqliteStore:
    """A :class:`SqliteStore` on the file named by ``url`` (nothing opened yet)."""
    return SqliteStore(url, namespace=namespace)
