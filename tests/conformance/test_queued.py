"""The producer's half of a task's life, on every adapter: the ``queued`` status written
at publish, an explicit ``task_id`` as an idempotency key, and ``wait()`` on an id
nobody enqueued.

Each check runs on one shared store (atomic publish where the adapter has it) and, for
the two-step path (statuses first, then the envelopes), with the result backend on a
separate in-memory store.
"""

from __future__ import annotations

import asyncio
import decimal
import multiprocessing
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from stem.app import Stem
from stem.errors import TaskArgumentError, TaskNotFoundError, WaitTimeoutError
from stem.ports import AtomicPublishStore, Store
from stem.status import TaskState
from tests.helpers import running_worker

Q = "queued-q"


@pytest.fixture(params=["shared", "two-step"])
async def app(request: pytest.FixtureRequest, store_url: str, namespace: str
              ) -> AsyncIterator[Stem]:
    """An app on the adapter under test: broker and backend from one store, or the
    backend on another store (so publishing takes the two-step path)."""
    backend = store_url if request.param == "shared" else f"memory://{namespace}-results"
    a = Stem("queued", broker=store_url, backend=backend, namespace=namespace,
             default_queue=Q)
    calls: list[int] = []
    a.calls = calls  # type: ignore[attr-defined]

    @a.task(name="work")
    async def work(n: int) -> int:
        calls.append(n)
        return n * 2

    try:
        yield a
    finally:
        await a.close()


async def test_a_fresh_id_is_queued_at_once(app: Stem) -> None:
    task_id = await app.enqueue("work", 3)
    res = await app.get_result(task_id)
    assert res is not None and res.state is TaskState.QUEUED and res.attempt == 0
    # The meta the Dart producer writes with its queued status.
    assert res.meta["queue"] == Q and res.meta["maxRetries"] == 0
    assert res.meta["__stemResultEncoder"] == "json" and res.meta["stem.task"] == "work"
    assert await app.get_result("never-enqueued") is None


async def test_a_delayed_task_stays_queued_until_due(app: Stem) -> None:
    task_id = await app.enqueue("work", 1, countdown=3600)
    res = await app.get_result(task_id)
    assert res is not None and res.state is TaskState.QUEUED
    assert (await app.broker.stats(Q)).delayed == 1


async def test_an_explicit_task_id_is_published_once(app: Stem) -> None:
    definition = app.tasks["work"]
    ids = [await app.enqueue_call(definition.call(n).with_options(task_id="order-42"))
           for n in (1, 2, 3)]
    ids += await app.enqueue_many(
        [definition.call(n).with_options(task_id="order-42") for n in (4, 5)])
    assert ids == ["order-42"] * 5
    assert (await app.broker.stats(Q)).pending == 1
    async with running_worker(app, queues=[Q]):
        res = await app.wait("order-42", timeout=10)
    # The first enqueue's arguments won; the later ones were dropped.
    assert res.value == 2 and app.calls == [1]  # type: ignore[attr-defined]


async def test_an_id_that_finished_does_not_run_again(app: Stem) -> None:
    call = app.tasks["work"].call(7).with_options(task_id="once")
    await app.enqueue_call(call)
    async with running_worker(app, queues=[Q]):
        await app.wait("once", timeout=10)
        assert await app.enqueue_call(app.tasks["work"].call(8).with_options(task_id="once")
                                      ) == "once"
        assert (await app.broker.stats(Q)).pending == 0
    res = await app.wait("once", timeout=1)
    assert res.value == 14 and app.calls == [7]  # type: ignore[attr-defined]


async def test_a_batch_with_a_repeated_id_publishes_it_once(app: Stem) -> None:
    d = app.tasks["work"]
    await app.enqueue_many([d.call(1).with_options(task_id="dup"), d.call(2),
                            d.call(3).with_options(task_id="dup")])
    assert (await app.broker.stats(Q)).pending == 2


async def test_concurrent_enqueues_of_one_id_publish_once(app: Stem) -> None:
    d = app.tasks["work"]
    ids = await asyncio.gather(*(app.enqueue_call(d.call(n).with_options(task_id="racy"))
                                 for n in range(20)))
    assert set(ids) == {"racy"}
    assert (await app.broker.stats(Q)).pending == 1


async def test_a_failed_publish_leaves_no_status(app: Stem) -> None:
    # The arguments cannot be encoded: nothing is published, and the id stays free.
    bad = app.tasks["work"].call(decimal.Decimal(1)).with_options(task_id="free")  # type: ignore[arg-type]
    with pytest.raises(TaskArgumentError):
        await app.enqueue_call(bad)
    assert await app.get_result("free") is None
    await app.enqueue_call(app.tasks["work"].call(1).with_options(task_id="free"))
    assert (await app.broker.stats(Q)).pending == 1


async def test_wait_without_timeout_on_an_unknown_id_says_so(app: Stem) -> None:
    with pytest.raises(TaskNotFoundError, match="never enqueued"):
        await app.wait("nobody-enqueued-this")
    with pytest.raises(WaitTimeoutError):
        await app.wait("nobody-enqueued-this", timeout=0.2)


async def test_publish_new_is_one_atomic_step(store: Store) -> None:
    if not isinstance(store, AtomicPublishStore):
        return  # optional: the app then writes statuses, then publishes
    app = Stem("queued", broker=store, default_queue=Q)

    @app.task(name="work")
    async def work(n: int) -> int:
        return n

    items = app._queued_items([app.build_envelope(work.call(n).with_options(task_id=f"a{n}"))
                               for n in range(3)])
    assert await store.publish_new(items) == {"a0", "a1", "a2"}
    again = app._queued_items([app.build_envelope(work.call(n).with_options(task_id=f"a{n}"))
                               for n in range(2, 5)])
    assert await store.publish_new(again) == {"a3", "a4"}
    assert (await store.broker.stats(Q)).pending == 5
    assert set(await store.backend.get_many([f"a{n}" for n in range(5)])) == {
        f"a{n}" for n in range(5)}


def _enqueue_ids(url: str, namespace: str, start: multiprocessing.synchronize.Event,
                 ids: list[str]) -> None:
    """In a child process: enqueue ``ids`` (after ``start``), all at once."""
    app = Stem("queued", broker=url, namespace=namespace, default_queue=Q)

    @app.task(name="work")
    async def work(n: int) -> int:
        return n

    async def go() -> None:
        await asyncio.gather(*(app.enqueue_call(work.call(i).with_options(task_id=task_id))
                               for i, task_id in enumerate(ids)))
        await app.close()

    start.wait(30)
    asyncio.run(go())


def test_two_processes_enqueueing_the_same_ids_publish_each_once(
    process_shared_url: str, namespace: str, tmp_path: Path
) -> None:
    store_url = process_shared_url
    ids = [f"p-{i}" for i in range(40)]
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_enqueue_ids, args=(store_url, namespace, start, ids))
             for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0

    async def check() -> None:
        app = Stem("queued", broker=store_url, namespace=namespace, default_queue=Q)
        try:
            assert (await app.broker.stats(Q)).pending == len(ids)
            found = await app.backend.get_many(ids)
            assert set(found) == set(ids)
            assert {s.state for s in found.values()} == {TaskState.QUEUED}
        finally:
            await app.close()

    asyncio.run(check())
