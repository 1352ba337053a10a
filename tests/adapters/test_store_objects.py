"""Stores built on the application's own connections, and apps built from objects."""

from __future__ import annotations

import asyncpg
import pytest
import redis.asyncio as aioredis

import stem
from stem.adapters import store_from_url
from stem.adapters.memory import MemoryBroker
from stem.adapters.postgres import PostgresStore
from stem.adapters.redis import RedisStore
from stem.envelope import Envelope
from tests.services import drop_pg_schema, drop_redis_keys


def test_a_broker_object_without_a_backend_is_an_error() -> None:
    with pytest.raises(stem.ConfigurationError, match="backend="):
        stem.Stem("t", broker=MemoryBroker("x"))


async def test_a_broker_object_with_a_backend_url_works(namespace: str) -> None:
    app = stem.Stem("t", broker=MemoryBroker(namespace), backend=f"memory://{namespace}")
    assert app.shared_store is None  # no atomic ack across an object and a store
    await app.broker.publish([Envelope(name="t")])
    await app.close()


async def test_an_app_gets_one_store_per_distinct_url(namespace: str) -> None:
    app = stem.Stem("t", broker=f"memory://{namespace}a", backend=f"memory://{namespace}b",
                    namespace=namespace)
    assert app.broker_store is not app.backend_store and app.shared_store is None
    assert app.store_for(f"memory://{namespace}a") is app.broker_store
    await app.close()


async def test_postgres_store_on_the_applications_pool(postgres_url: str, namespace: str
                                                       ) -> None:
    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema={namespace}"
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=2)
    try:
        async with PostgresStore(url, namespace=namespace, pool=pool) as store:
            await store.broker.publish([Envelope(name="t", queue="q")])  # migrates first
            assert (await store.broker.stats("q")).pending == 1
            # Between operations the store holds none of the application's connections
            # (its own pool keeps one checked out; a pool it was given is never kept).
            assert pool.get_idle_size() == pool.get_size()
        # The store closed its own LISTEN connection but left the pool to its owner.
        assert not pool._closed
        async with pool.acquire() as conn:
            n = await conn.fetchval(f'SELECT count(*) FROM "{namespace}".stem_jobs')
        assert n == 1
    finally:
        await pool.close()
        await drop_pg_schema(postgres_url, namespace)


async def test_redis_store_on_the_applications_client(redis_url: str, namespace: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with RedisStore(redis_url, namespace=namespace, client=client) as store:
            await store.broker.publish([Envelope(name="t", queue="q")])
            assert (await store.broker.stats("q")).pending == 1
        assert await client.ping()  # still open: the application closes it
    finally:
        await client.aclose()
        await drop_redis_keys(redis_url, namespace)


async def test_store_from_url_picks_the_adapter_by_scheme(tmp_path: object) -> None:
    from stem.adapters.memory import MemoryStore
    from stem.adapters.sqlite import SqliteStore

    assert isinstance(store_from_url("memory://x"), MemoryStore)
    assert isinstance(store_from_url("sqlite:///x.db"), SqliteStore)
    with pytest.raises(stem.ConfigurationError, match="unsupported scheme"):
        store_from_url("amqp://guest:secret@h/")
