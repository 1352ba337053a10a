"""Expiry and ignored results on every adapter: both end in a stored status (cancelled,
or succeeded with a null payload) written with the ack, atomically where the store can."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from stem.app import Stem
from stem.status import TaskState
from tests.helpers import eventually, running_worker


@pytest.fixture
async def app(store_url: str, namespace: str) -> AsyncIterator[Stem]:
    app = Stem("t", broker=store_url, namespace=namespace)
    try:
        yield app
    finally:
        await app.close()


async def _queue_empty(app: Stem) -> bool:
    stats = await app.broker.stats("default")
    return stats.pending == stats.delayed == stats.in_flight == stats.dead == 0


async def test_an_expired_task_ends_cancelled_and_acked(app: Stem) -> None:
    ran: list[bool] = []

    @app.task(name="c.expired")
    async def expired() -> None:
        ran.append(True)

    async with running_worker(app):
        past = datetime.now(UTC) - timedelta(seconds=1)
        tid = await app.enqueue("c.expired", expires=past)
        res = await app.wait(tid, timeout=15)
        await eventually(lambda: _queue_empty(app), timeout=15)
    stored = await app.backend.get(tid)
    assert stored is not None and stored.state is TaskState.CANCELLED
    assert stored.error is not None and stored.error.type == "TaskExpired"
    assert stored.meta["stem.expired"] is True and "expiredAt" in stored.meta
    assert res.state is TaskState.CANCELLED and ran == []


async def test_an_ignored_result_is_stored_as_a_null_payload(app: Stem) -> None:
    @app.task(name="c.ignored", ignore_result=True)
    async def ignored() -> dict[str, int]:
        return {"big": 1}

    async with running_worker(app):
        tid = await app.enqueue("c.ignored")
        res = await app.wait(tid, timeout=15)
        await eventually(lambda: _queue_empty(app), timeout=15)
    stored = await app.backend.get(tid)
    assert stored is not None and stored.state is TaskState.SUCCEEDED
    assert stored.payload is None and stored.to_dict()["payload"] is None
    assert (res.state, res.value) == (TaskState.SUCCEEDED, None)
