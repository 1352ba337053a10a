"""The pytest plugin used as a user would: fixtures only, no Stem internals.

``tests/plugin/conftest.py`` overrides ``stem_app`` with the project's own app
(``shop_app.app``), rebound by ``stem_app_factory`` to this test's memory store.
"""

from __future__ import annotations

import pytest

import stem
from stem.testing import make_context
from stem.testing.pytest_plugin import StemAppFactory
from stem.worker import Worker
from tests.plugin.shop_app import app, charge, send_email


async def test_a_real_worker_runs_the_projects_tasks(stem_app: stem.Stem,
                                                     stem_worker: Worker,
                                                     stem_memory_url: str) -> None:
    assert stem_app is app and app.broker_url == stem_memory_url
    task_id = await charge.enqueue(3, 1.5)
    result = await charge.wait(task_id, timeout=10)
    assert result.value == {"amount": 3, "total": 4.5}
    assert result.meta["worker"] == stem_worker.consumer_name
    assert "payments" in stem_worker.queues


async def test_failures_are_stored(stem_app: stem.Stem, stem_worker: Worker) -> None:
    # No retries for this call: the worker would back off between attempts.
    task_id = await stem_app.enqueue_call(charge.call(-1, 1.0).with_options(max_retries=0))
    with pytest.raises(stem.TaskFailedError, match="cannot charge -1"):
        await charge.wait(task_id, timeout=30, raise_on_failure=True)


async def test_eager_through_the_factory(stem_app_factory: StemAppFactory) -> None:
    shop = stem_app_factory(app, eager=True)
    task_id = await send_email.enqueue("a@example.com")
    result = await shop.wait(task_id)
    assert result.value == "sent to a@example.com"
    assert result.meta["progress"] == {"percent": 100.0, "data": {"to": "a@example.com"}}


async def test_eager_propagates(stem_app_factory: StemAppFactory) -> None:
    stem_app_factory(app, eager_propagates=True)
    with pytest.raises(ValueError, match="cannot charge -5"):
        await charge.enqueue(-5, 1.0)


def test_the_app_is_back_to_its_own_configuration_outside_the_fixtures() -> None:
    assert not app.eager and not app.broker_url.startswith("memory://")


async def test_unit_test_of_a_handler() -> None:
    assert charge(2, 2.0) == {"amount": 2, "total": 4.0}
    ctx = make_context(name="email.send")
    assert await send_email.func(ctx, "b@example.com") == "sent to b@example.com"
    assert ctx.calls.progress == [(100.0, {"to": "b@example.com"})]

