"""The Postgres store: one pool and one LISTEN connection per URL, for every part."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from stem.adapters._store import BaseStore
from stem.adapters.postgres import migrations
from stem.adapters.postgres._pool import Connector, ListenHub, parse_url, unavailable
from stem.adapters.postgres.backend import PostgresResultBackend
from stem.adapters.postgres.broker import PostgresBroker
from stem.adapters.postgres.groups import PostgresGroupStore
from stem.adapters.postgres.locks import PostgresLockStore
from stem.adapters.postgres.ratelimit import PostgresRateLimiter
from stem.adapters.postgres.schedules import PostgresScheduleStore
from stem.envelope import Envelope
from stem.ports import DEFAULT_RESULT_TTL, Delivery
from stem.status import TaskStatus


class PostgresStore(BaseStore[PostgresBroker, PostgresResultBackend]):
    """Broker, result backend, lock and schedule stores in one schema, sharing one pool
    and one LISTEN connection.

    ``pool=`` takes an ``asyncpg.Pool`` the application already has: the store runs
    Stem's migrations on it at first use and leaves closing it to the application
    (the LISTEN connection is still Stem's own, opened with the URL). Results and
    acks of a batch go in one statement (:meth:`ack_with_results`).
    """

    def __init__(self, url: str, *, namespace: str = "stem", pool: Any = None) -> None:
        self.settings = parse_url(url, namespace)  # checks the namespace and options
        super().__init__(url, namespace)
        self.connector = Connector(self.settings, "store", pool=pool)
        self.hub = ListenHub(self.connector)

    def _make_broker(self) -> PostgresBroker:
        return PostgresBroker(self.url, namespace=self.namespace, connector=self.connector,
                              hub=self.hub)

    def _make_backend(self) -> PostgresResultBackend:
        return PostgresResultBackend(self.url, namespace=self.namespace,
                                     connector=self.connector, hub=self.hub)

    def _make_groups(self) -> PostgresGroupStore:
        return PostgresGroupStore(self.connector)

    def _make_locks(self) -> PostgresLockStore:
        return PostgresLockStore(self.url, namespace=self.namespace, connector=self.connector)

    def _make_schedules(self) -> PostgresScheduleStore:
        return PostgresScheduleStore(self.url, namespace=self.namespace,
                                     connector=self.connector)

    def _make_rate_limiter(self) -> PostgresRateLimiter:
        return PostgresRateLimiter(self.connector)

    async def _close_shared(self) -> None:
        await self.hub.close()
        await self.connector.close()

    async def migrate(self) -> list[int]:
        """Create or upgrade Stem's tables in the schema now; return the versions applied.

        Safe while workers run and from several processes at once (advisory lock).
        """
        if self.connector._external is not None:
            async with self.connector._external.acquire() as conn:
                return await migrations.apply(conn, self.settings.quoted_schema)
        try:
            conn = await asyncpg.connect(self.settings.dsn,
                                         timeout=self.settings.connect_timeout)
        except Exception as exc:
            raise unavailable(self.settings, exc, "database") from exc
        try:
            return await migrations.apply(conn, self.settings.quoted_schema)
        finally:
            await conn.close()

    async def ack_with_results(
        self,
        deliveries: Sequence[Delivery],
        statuses: Sequence[tuple[TaskStatus, float | None]],
        *,
        default_ttl: float = DEFAULT_RESULT_TTL,
    ) -> None:
        """Write ``statuses`` and ack ``deliveries`` in one statement (one round-trip)."""
        await self.broker.ack_with_results(deliveries, statuses, default_ttl=default_ttl)


    async def publish_new(
        self,
        items: Sequence[tuple[Envelope, TaskStatus, float | None]],
        *,
        default_ttl: float = DEFAULT_RESULT_TTL,
        connection: Any = None,
        locks: Mapping[str, tuple[str, float]] | None = None,
    ) -> set[str]:
        """Write each new id's ``queued`` status and publish its job in one statement;
        ids that already have a status are skipped (stem.ports.AtomicPublishStore).

        ``connection``: do it inside the caller's transaction (``enqueue(connection=)``).
        """
        lock_sql = None
        if locks:
            lock_store = self.locks
            assert isinstance(lock_store, PostgresLockStore)
            lock_sql = lock_store._sql
        return await self.broker.publish_new(items, default_ttl=default_ttl,
                                             connection=connection, locks=locks,
                                             lock_sql=lock_sql)


def store_from_url(url: str, *, namespace: str = "stem") -> PostgresStore:
    """A :class:`PostgresStore` for a ``postgres://`` URL (not connected yet)."""
    return PostgresStore(url, namespace=namespace)
