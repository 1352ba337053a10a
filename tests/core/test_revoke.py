"""Revocation in an in-process worker (memory): a revoked task never runs and is stored
``cancelled`` with the revoke meta; a terminate revoke stops an inline async task and a
thread task at its next heartbeat; a unique task's lock is released."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import stem
from stem import TaskState
from stem.testing import eventually
from tests.helpers import running_worker


@pytest.fixture
def app(namespace: str) -> stem.Stem:
    return stem.Stem("t", broker=f"memory://{namespace}", backend=f"memory://{namespace}",
                     namespace=namespace)


async def _state(app: stem.Stem, task_id: str, state: TaskState) -> stem.TaskStatus | None:
    status = await app.backend.get(task_id)
    return status if status is not None and status.state is state else None


async def test_a_revoked_queued_or_delayed_task_never_runs(app: stem.Stem) -> None:
    ran: list[str] = []
    revoked: list[dict[str, Any]] = []

    @app.task(name="t.work")
    async def work(tag: str) -> str:
        ran.append(tag)
        return tag

    def on_revoked(sender: object, **kw: Any) -> None:
        revoked.append(kw)

    stem.signals.task_revoked.connect(on_revoked)
    try:
        queued = await work.enqueue("queued")
        delayed = await app.enqueue_call(work.call("delayed").with_options(countdown=0.5))
        await app.revoke([queued, delayed], reason="bad input", requested_by="ops")
        kept = await work.enqueue("kept")
        async with running_worker(app):
            status = await eventually(lambda: _state(app, delayed, TaskState.CANCELLED))
            assert await eventually(lambda: _state(app, kept, TaskState.SUCCEEDED))
            assert await _state(app, queued, TaskState.CANCELLED)
    finally:
        stem.signals.task_revoked.disconnect(on_revoked)
    assert ran == ["kept"]
    meta = status.meta
    assert meta["revoked"] is True and meta["revokedReason"] == "bad input"
    assert meta["revokedBy"] == "ops" and meta["revokedAt"]
    assert status.error is not None and status.error.type == "TaskRevoked"
    assert {kw["envelope"].id for kw in revoked} == {queued, delayed}
    assert not any(kw["terminated"] for kw in revoked)
    assert (await app.broker.stats("default")).pending == 0


async def test_a_running_worker_applies_a_new_revoke_within_a_second(app: stem.Stem) -> None:
    @app.task(name="t.work")
    async def work() -> None:
        return None

    async with running_worker(app):
        await asyncio.sleep(0.05)  # the worker has loaded the (empty) store
        task_id = await app.enqueue_call(work.call().with_options(countdown=1.2))
        await app.revoke(task_id)
        assert await eventually(lambda: _state(app, task_id, TaskState.CANCELLED), timeout=5)


async def test_terminate_cancels_an_inline_async_task(app: stem.Stem) -> None:
    started = asyncio.Event()

    @app.task(name="t.spin")
    async def spin() -> None:
        started.set()
        await asyncio.Event().wait()  # never set: runs until cancelled

    async with running_worker(app) as worker:
        task_id = await spin.enqueue()
        await asyncio.wait_for(started.wait(), 5)
        t0 = time.monotonic()
        await app.revoke(task_id, terminate=True, reason="stuck")
        status = await eventually(lambda: _state(app, task_id, TaskState.CANCELLED), timeout=5)
        assert time.monotonic() - t0 < 2
        assert status.meta["revoked"] is True and status.meta["revokedReason"] == "stuck"
        assert not worker.running.by_id
    assert (await app.broker.stats("default")).in_flight == 0


async def test_terminate_reaches_a_task_run_after_others_in_the_same_slot(
        app: stem.Stem) -> None:
    # One slot and a backlog: the worker runs the deliveries one after another in the
    # same asyncio task. A terminate must stop the one running now, and the slot must go
    # on with the rest.
    started = asyncio.Event()

    @app.task(name="t.quick")
    async def quick(n: int) -> int:
        return n

    @app.task(name="t.spin")
    async def spin() -> None:
        started.set()
        await asyncio.Event().wait()

    first = [await quick.enqueue(i) for i in range(3)]
    stuck = await spin.enqueue()
    after = [await quick.enqueue(i) for i in range(3, 6)]
    async with running_worker(app, concurrency=1, prefetch_multiplier=8):
        await asyncio.wait_for(started.wait(), 5)
        await app.revoke(stuck, terminate=True)
        for task_id in first + after:
            assert await eventually(lambda t=task_id: _state(app, t, TaskState.SUCCEEDED))
        assert await _state(app, stuck, TaskState.CANCELLED)


async def test_terminate_stops_a_thread_task_at_its_next_heartbeat(app: stem.Stem) -> None:
    started = threading.Event()
    stopped: list[BaseException] = []

    @app.task(name="t.loop")
    def loop(ctx: stem.TaskContext) -> None:
        started.set()
        try:
            while True:
                ctx.heartbeat()
                time.sleep(0.02)
        except BaseException as exc:
            stopped.append(exc)
            raise

    async with running_worker(app):
        task_id = await loop.enqueue()
        await asyncio.to_thread(started.wait, 5)
        await app.revoke(task_id, terminate=True)
        status = await eventually(lambda: _state(app, task_id, TaskState.CANCELLED), timeout=5)
    assert [type(e) for e in stopped] == [stem.TaskRevokedError]
    assert status.meta["revoked"] is True and status.meta["revokedTerminate"] is True


async def test_a_revoke_without_terminate_lets_a_running_task_finish(app: stem.Stem) -> None:
    started, go = asyncio.Event(), asyncio.Event()

    @app.task(name="t.slow")
    async def slow() -> str:
        started.set()
        await go.wait()
        return "done"

    async with running_worker(app):
        task_id = await slow.enqueue()
        await asyncio.wait_for(started.wait(), 5)
        await app.revoke(task_id)
        await asyncio.sleep(0.8)  # the worker has synced the revoke meanwhile
        go.set()
        assert await eventually(lambda: _state(app, task_id, TaskState.SUCCEEDED))


async def test_a_revoked_unique_task_releases_its_lock(app: stem.Stem) -> None:
    @app.task(name="t.once", unique=True, unique_for=600)
    async def once(n: int) -> int:
        return n

    first = await app.enqueue_call(once.call(1).with_options(countdown=0.3))
    await app.revoke(first)
    async with running_worker(app):
        await eventually(lambda: _state(app, first, TaskState.CANCELLED))
        second = await once.enqueue(1)  # the lock is free again: a new task
        assert second != first
        assert await eventually(lambda: _state(app, second, TaskState.SUCCEEDED))
