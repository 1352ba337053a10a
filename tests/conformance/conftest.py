"""The conformance suite runs every test in this folder once per adapter.

The adapter-independent checks live in :mod:`stem.testing.conformance` (so an outside
adapter runs them too, see docs/conformance.md); this folder binds them to the
built-in adapters through the ``broker_factory`` / ``backend_factory`` fixtures, and
adds checks that need Stem's URLs or an app.

An adapter joins by adding its name to ADAPTERS and a branch to ``adapter_url``;
broker and backend come from one store per URL (``stem.adapters.store_from_url``),
exactly as an app builds them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from stem.adapters import store_from_url
from stem.ports import Broker, LockStore, ResultBackend, ScheduleStore, Store
from tests.services import drop_pg_schema, drop_redis_keys

ADAPTERS = ["memory", "sqlite", "postgres", "redis"]


def adapter_url(name: str, namespace: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """URL of a fresh, isolated store of adapter ``name`` for one test."""
    if name == "memory":
        return f"memory://{namespace}"
    if name == "sqlite":
        return f"sqlite:///{tmp_path / 'stem.db'}"
    if name == "postgres":
        # A schema per test, dropped once the adapters built on it are closed.
        base = request.getfixturevalue("postgres_url")
        request.addfinalizer(lambda: asyncio.run(drop_pg_schema(base, namespace)))
        return f"{base}{'&' if '?' in base else '?'}schema={namespace}"
    if name == "redis":
        # Keys are prefixed with the namespace (passed separately); a short claim
        # interval lets expired-lease tests see the reclaim quickly.
        base = request.getfixturevalue("redis_url")
        request.addfinalizer(lambda: asyncio.run(drop_redis_keys(base, namespace)))
        return f"{base}{'&' if '?' in base else '?'}claim_interval=0.05"
    raise AssertionError(f"no URL recipe for adapter {name!r}")


@pytest.fixture(params=ADAPTERS)
def store_url(request: pytest.FixtureRequest, namespace: str, tmp_path: Path) -> str:
    """One isolated store URL per adapter."""
    return adapter_url(request.param, namespace, tmp_path, request)


@pytest.fixture
async def store(store_url: str, namespace: str) -> AsyncIterator[Store]:
    """The store for an isolated URL (closed after the test)."""
    st = store_from_url(store_url, namespace=namespace)
    try:
        yield st
    finally:
        await st.close()


@pytest.fixture
def broker(store: Store) -> Broker:
    """The store's broker."""
    return store.broker


@pytest.fixture
def backend(store: Store) -> ResultBackend:
    """The store's result backend."""
    return store.backend


@pytest.fixture
def broker_factory(store: Store) -> Callable[[], Broker]:
    """What stem.testing.conformance.BrokerConformance builds its broker with."""
    return lambda: store.broker


@pytest.fixture
def backend_factory(store: Store) -> Callable[[], ResultBackend]:
    """What stem.testing.conformance.BackendConformance builds its backend with."""
    return lambda: store.backend


@pytest.fixture
def lock_store_factory(store: Store) -> Callable[[], LockStore]:
    """What stem.testing.conformance.LockConformance builds its lock store with."""
    return lambda: store.locks


@pytest.fixture
def schedule_store_factory(store: Store) -> Callable[[], ScheduleStore]:
    """What stem.testing.conformance.ScheduleStoreConformance builds its store with."""
    return lambda: store.schedules
