"""The Store contract: one store per URL owns the connections its parts share."""

from __future__ import annotations

import asyncio

from stem.adapters import store_from_url
from stem.app import Stem
from stem.envelope import Envelope
from stem.ports import AtomicAckStore, Broker, LockStore, ResultBackend, ScheduleStore, Store
from stem.status import TaskState, TaskStatus


async def test_a_store_hands_out_one_broker_and_one_backend(store: Store) -> None:
    assert isinstance(store, Store)
    assert isinstance(store.broker, Broker) and isinstance(store.backend, ResultBackend)
    assert store.broker is store.broker and store.backend is store.backend
    assert isinstance(store.locks, LockStore) and isinstance(store.schedules, ScheduleStore)
    assert store.locks is store.locks and store.schedules is store.schedules
    await store.ping()


async def test_an_app_builds_one_store_per_url(store_url: str, namespace: str) -> None:
    app = Stem("t", broker=store_url, namespace=namespace)
    try:
        assert app.broker_store is app.backend_store is app.shared_store
        assert app.broker is app.broker_store.broker  # type: ignore[union-attr]
        assert app.backend is app.backend_store.backend  # type: ignore[union-attr]
    finally:
        await app.close()


async def test_an_app_takes_a_store_object(store: Store, namespace: str) -> None:
    app = Stem("t", broker=store, namespace=namespace)
    assert app.broker is store.broker and app.backend is store.backend
    assert app.shared_store is store


async def test_migrate_is_idempotent(store: Store) -> None:
    await store.migrate()
    assert await store.migrate() == []


async def test_the_store_is_usable_again_after_close(store: Store) -> None:
    await store.broker.publish([Envelope(name="t", queue="q")])
    await store.close()
    assert (await store.broker.stats("q")).pending == 1


async def test_async_with_closes_the_store(store_url: str, namespace: str) -> None:
    async with store_from_url(store_url, namespace=namespace) as st:
        await st.broker.publish([Envelope(name="t", queue="q")])
        assert (await st.broker.stats("q")).pending == 1


async def test_atomic_ack_writes_results_and_acks_together(store: Store) -> None:
    if not isinstance(store, AtomicAckStore):
        return  # an optional capability; the worker then writes results, then acks
    broker, backend = store.broker, store.backend
    await broker.publish([Envelope(name="t", queue="q"), Envelope(name="t", queue="q")])
    deliveries = await broker.fetch(["q"], 2, block=0, consumer="w")
    assert len(deliveries) == 2
    statuses = [(TaskStatus(d.envelope.id, TaskState.SUCCEEDED, payload=i), None)  # type: ignore[union-attr]
                for i, d in enumerate(deliveries)]
    waiting = asyncio.create_task(backend.wait(statuses[0][0].id, 5))
    await store.ack_with_results(deliveries, statuses)
    assert (await broker.stats("q")).in_flight == 0
    assert (await broker.stats("q")).pending == 0
    assert (await asyncio.wait_for(waiting, 5)) is not None
    assert len(await backend.get_many([s.id for s, _ in statuses])) == 2
