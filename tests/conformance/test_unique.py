"""Unique tasks on every adapter: one pending task per (task, queue, arguments), the
lock held across retries and released when the task ends, and the race from several
processes at once."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.synchronize
from collections.abc import AsyncIterator
from typing import Any

import pytest

import stem
from stem._time import from_iso, utcnow
from stem.app import Stem
from stem.status import TaskState
from stem.testing import eventually
from tests.helpers import running_worker

Q = "unique-q"


def make_app(broker: str, namespace: str, backend: str | None = None) -> Stem:
    app = Stem("unique", broker=broker, backend=backend, namespace=namespace, default_queue=Q)
    runs: list[int] = []
    gate = asyncio.Event()
    app.runs = runs  # type: ignore[attr-defined]
    app.gate = gate  # type: ignore[attr-defined]

    @app.task(name="charge", unique=True, unique_for=60)
    async def charge(order: int, amount: float = 1.0) -> int:
        runs.append(order)
        return order

    @app.task(name="flaky", unique=True, unique_for=60, max_retries=1)
    async def flaky(ctx: stem.TaskContext, order: int) -> int:
        runs.append(order)
        if ctx.attempt == 0:
            await gate.wait()
            raise RuntimeError("first attempt fails")
        return order

    @app.task(name="keyed", unique=True, unique_key=lambda args: f"customer-{args['customer']}")
    async def keyed(customer: str, note: str) -> str:
        return note

    @app.task(name="doomed", unique=True, max_retries=0)
    async def doomed(order: int) -> None:
        raise ValueError("no")

    return app


@pytest.fixture(params=["shared", "two-step"])
async def app(request: pytest.FixtureRequest, store_url: str, namespace: str
              ) -> AsyncIterator[Stem]:
    backend = store_url if request.param == "shared" else f"memory://{namespace}-results"
    a = make_app(store_url, namespace, backend)
    try:
        yield a
    finally:
        await a.close()


async def pending(app: Stem) -> int:
    return (await app.broker.stats(Q)).pending


async def test_an_equal_call_returns_the_pending_task(app: Stem) -> None:
    charge = app.tasks["charge"]
    first = await app.enqueue_call(charge.call(7, amount=9.5))
    again = await app.enqueue_call(charge.call(amount=9.5, order=7))  # same args, any order
    other = await app.enqueue_call(charge.call(8, amount=9.5))
    assert again == first and other != first
    assert await pending(app) == 2
    ids = await app.enqueue_many([charge.call(7, amount=9.5), charge.call(9)])
    assert ids[0] == first and ids[1] not in (first, other)
    assert await pending(app) == 3
    env_meta = (await app.get_result(first)).meta  # type: ignore[union-attr]
    assert env_meta["stem.unique.owner"] == first and env_meta["stem.unique.key"]


async def duplicates_of(app: Stem, task_id: str) -> list[dict[str, Any]]:
    status = await app.backend.get(task_id)
    assert status is not None
    found: list[dict[str, Any]] = status.meta.get("stem.unique.duplicates", [])
    return found


async def test_a_duplicate_is_recorded_on_the_pending_task_and_counted(app: Stem) -> None:
    charge = app.tasks["charge"]
    first = await app.enqueue_call(charge.call(11).with_options(headers={"trace": "t-1"}))
    again = await app.enqueue_call(charge.call(11).with_options(
        headers={"trace": "t-2", "X-Api-Key": "k", "Authorization": "Bearer s"},
        meta={"source": "retry-button"}))
    assert again == first and await pending(app) == 1
    (entry,) = await duplicates_of(app, first)
    assert set(entry) == {"taskId", "timestamp", "headers", "meta"}
    assert entry["taskId"] != first  # the id the duplicate would have had
    assert abs((from_iso(entry["timestamp"]) - utcnow()).total_seconds()) < 60
    assert entry["headers"]["trace"] == "t-2"
    assert not {"X-Api-Key", "Authorization"} & set(entry["headers"])
    assert entry["meta"]["source"] == "retry-button"
    assert entry["meta"]["stem.unique.owner"] == entry["taskId"]
    status = await app.backend.get(first)  # the rest of the status is untouched
    assert status is not None and status.state is TaskState.QUEUED
    assert status.meta["stem.unique.owner"] == first and "source" not in status.meta

    # A batch, and twenty at once (coalesced into one publish): every one is recorded.
    assert await app.enqueue_many([charge.call(11), charge.call(11)]) == [first, first]
    ids = await asyncio.gather(*(app.enqueue_call(charge.call(11)) for _ in range(20)))
    assert set(ids) == {first} and await pending(app) == 1
    entries = await duplicates_of(app, first)
    assert len(entries) == 23 and len({e["taskId"] for e in entries}) == 23
    assert app.stats.deduplicated == {"charge": 23}

    # The worker's writes are never undone by a record: the task ends succeeded.
    async with running_worker(app, queues=[Q]):
        assert (await app.wait(first, timeout=10)).value == 11


async def test_recording_a_duplicate_is_best_effort(app: Stem, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    charge = app.tasks["charge"]
    first = await app.enqueue_call(charge.call(12))

    async def down(*args: object, **kwargs: object) -> bool:
        raise stem.ServiceUnavailableError("result backend down")

    monkeypatch.setattr(app.backend, "append_meta", down)
    with caplog.at_level(logging.INFO, logger="stem"):
        assert await app.enqueue_call(charge.call(12)) == first
    assert "task.duplicate_not_recorded" in caplog.text and "task.deduplicated" in caplog.text
    assert app.stats.deduplicated["charge"] == 1
    monkeypatch.undo()
    assert await duplicates_of(app, first) == []


async def test_the_lock_is_released_when_the_task_succeeds(app: Stem) -> None:
    charge = app.tasks["charge"]
    first = await app.enqueue_call(charge.call(1))
    async with running_worker(app, queues=[Q]):
        await app.wait(first, timeout=10)

        async def released() -> bool:
            return await app.locks.owner_of("stem:unique:" + app._unique_key(charge.call(1))
                                            ) is None

        await eventually(released, timeout=10)
        second = await app.enqueue_call(charge.call(1))
        assert second != first
        assert (await app.wait(second, timeout=10)).value == 1
    assert app.runs == [1, 1]  # type: ignore[attr-defined]


async def test_the_lock_is_held_across_a_retry_and_released_on_final_failure(app: Stem) -> None:
    flaky, doomed = app.tasks["flaky"], app.tasks["doomed"]
    first = await app.enqueue_call(flaky.call(5))
    async with running_worker(app, queues=[Q]):
        async def started() -> bool:
            return app.runs == [5]  # type: ignore[attr-defined]

        await eventually(started, timeout=10)
        app.gate.set()  # type: ignore[attr-defined]

        async def retried() -> bool:
            res = await app.get_result(first)
            return res is not None and res.state in (TaskState.RETRIED, TaskState.SUCCEEDED)

        await eventually(retried, timeout=10)
        assert await app.enqueue_call(flaky.call(5)) == first  # still held while retrying
        assert (await app.wait(first, timeout=10)).value == 5

        failed = await app.enqueue_call(doomed.call(3))
        assert (await app.wait(failed, timeout=10)).state is TaskState.FAILED

        async def released() -> bool:
            key = "stem:unique:" + app._unique_key(doomed.call(3))
            return await app.locks.owner_of(key) is None

        await eventually(released, timeout=10)
        assert await app.enqueue_call(doomed.call(3)) != failed


async def test_a_task_key_and_a_call_key(app: Stem) -> None:
    keyed, charge = app.tasks["keyed"], app.tasks["charge"]
    a = await app.enqueue_call(keyed.call("c1", "first"))
    b = await app.enqueue_call(keyed.call("c1", "second note, same customer"))
    c = await app.enqueue_call(keyed.call("c2", "first"))
    assert a == b != c
    d = await app.enqueue_call(charge.call(1).with_options(unique_key="refund-1"))
    e = await app.enqueue_call(charge.call(2).with_options(unique_key="refund-1"))
    assert d == e


async def test_unique_for_bounds_the_lock(app: Stem) -> None:
    charge = app.tasks["charge"]
    first = await app.enqueue_call(charge.call(4).with_options(unique_for=0.3))

    async def free_again() -> bool:
        return await app.enqueue_call(charge.call(4).with_options(unique_for=0.3)) != first

    await eventually(free_again, timeout=10)


async def test_non_unique_and_bad_options() -> None:
    with pytest.raises(stem.ConfigurationError, match="unique_for must be"):
        Stem("x", broker="memory://u-bad").task(name="t", unique=True, unique_for=-1)(
            lambda: None)
    with pytest.raises(stem.ConfigurationError, match="unique_for needs unique=True"):
        Stem("x", broker="memory://u-bad").task(name="t", unique_for=5)(lambda: None)


def _enqueue_same(url: str, namespace: str, start: multiprocessing.synchronize.Event,
                  out: multiprocessing.Queue[list[str]]) -> None:
    app = make_app(url, namespace)

    async def go() -> list[str]:
        charge = app.tasks["charge"]
        ids = await asyncio.gather(*(app.enqueue_call(charge.call(42, amount=2.0))
                                     for _ in range(10)))
        await app.close()
        return list(ids)

    start.wait(30)
    out.put(asyncio.run(go()))


def test_fifty_enqueues_from_five_processes_make_one_task(process_shared_url: str,
                                                          namespace: str) -> None:
    store_url = process_shared_url
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    out: multiprocessing.Queue[list[str]] = ctx.Queue()
    procs = [ctx.Process(target=_enqueue_same, args=(store_url, namespace, start, out))
             for _ in range(5)]
    for p in procs:
        p.start()
    start.set()
    ids = [i for _ in procs for i in out.get(timeout=60)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(ids) == 50 and len(set(ids)) == 1

    async def check() -> None:
        app = make_app(store_url, namespace)
        try:
            assert await pending(app) == 1
            # Each of the 49 duplicates is on the task's status, whichever process sent it.
            entries = await duplicates_of(app, ids[0])
            assert len({e["taskId"] for e in entries}) == len(entries) == 49
        finally:
            await app.close()

    asyncio.run(check())
