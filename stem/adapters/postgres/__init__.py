"""Postgres adapters (asyncpg): a ``SKIP LOCKED`` broker with LISTEN/NOTIFY wake-ups
a result backend, and the beat's lock and schedule stores, in one schema that is created and migrated on first connect.

URLs are ``postgres://`` or ``postgresql://``; Stem reads and removes these query
parameters before the rest goes to asyncpg:

- ``schema`` — the schema holding Stem's tables (default: the namespace, ``stem``);
- ``pool_size`` — most connections in the store's pool (default 10);
- ``connect_timeout`` — seconds to wait for a connection (default 5).
"""

from __future__ import annotations

from stem.adapters.postgres.backend import PostgresResultBackend
from stem.adapters.postgres.broker import PostgresBroker
from stem.adapters.postgres.locks import PostgresLockStore
from stem.adapters.postgres.schedules import PostgresScheduleStore
from stem.adapters.postgres.store import PostgresStore, store_from_url

__all__ = [
    "PostgresBroker",
    "PostgresLockStore",
    "PostgresResultBackend",
    "PostgresScheduleStore",
    "PostgresStore",
    "backend_from_url",
    "broker_from_url",
    "migrate",
    "store_from_url",
]


def broker_from_url(url: str, *, namespace: str = "stem") -> PostgresBroker:
    """Build (without connecting) the broker for a ``postgres://`` URL."""
    return PostgresBroker(url, namespace=namespace)


def backend_from_url(url: str, *, namespace: str = "stem") -> PostgresResultBackend:
    """Build (without connecting) the result backend for a ``postgres://`` URL."""
    return PostgresResultBackend(url, namespace=namespace)


async def migrate(url: str, *, namespace: str = "stem") -> list[int]:
    """Create or upgrade Stem's tables in the URL's schema (what ``stem migrate`` runs).

    Returns the migration versions applied now (empty when already current). Safe to
    run while workers are running and from several processes at once.
    """
    async with PostgresStore(url, namespace=namespace) as store:
        applied: list[int] = await store.migrate()
        return applied
