"""stem.testing for users: eager mode, make_context, direct calls, use_memory."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

import stem
from stem import signals
from stem.retry import RetryStrategy
from stem.testing import eager, make_context, use_memory
from tests.helpers import running_worker


class _Slow(RetryStrategy):
    """An hour between attempts: eager mode must not wait for it."""

    def next_delay(self, attempt: int, exc: BaseException) -> float:
        return 3600.0


def _app(namespace: str, **kwargs: Any) -> stem.Stem:
    url = f"memory://{namespace}"
    return stem.Stem("eager", broker=url, backend=url, **kwargs)


async def test_eager_enqueue_runs_and_stores_the_result_as_a_worker_does(namespace: str) -> None:
    app = _app(namespace, eager=True)
    assert app.eager

    @app.task(name="math.add")
    async def add(x: int, y: int = 1) -> int:
        return x + y

    task_id = await add.enqueue(2, y=3)
    result = await add.wait(task_id)  # no timeout: the status is already terminal
    assert result.state is stem.TaskState.SUCCEEDED and result.value == 5
    assert result.meta["worker"] == "eager" and result.meta["task"] == "math.add"
    assert "completedAt" in result.meta and "startedAt" in result.meta
    got = await app.get_result(task_id)
    assert got is not None and got.value == 5
    ids = await app.enqueue_many([add.call(1), add.call(10, y=10)])
    assert [(await app.wait(i)).value for i in ids] == [2, 20]


async def test_eager_retries_without_sleeping_and_leaves_the_retried_status(
        namespace: str) -> None:
    app = _app(namespace, eager=True)
    seen: list[tuple[int, str | None, Any]] = []

    @app.task(name="flaky", max_retries=3, retry_strategy=_Slow())
    async def flaky(ctx: stem.TaskContext, n: int) -> str:
        before = await app.get_result(ctx.id)
        assert before is not None
        seen.append((ctx.attempt, before.state.value, before.meta.get("retryDelayMs")))
        if ctx.attempt < 2:
            raise ValueError(f"boom {ctx.attempt}")
        return f"ok {n}"

    started = time.monotonic()
    task_id = await flaky.enqueue(7)
    assert time.monotonic() - started < 5  # the hour-long backoff was not slept
    result = await flaky.wait(task_id)
    assert result.value == "ok 7" and result.attempt == 2
    # Each retry saw the retried status of the attempt before (the running status is
    # written in the next flush, as in a worker, so attempt 0 still sees queued).
    assert seen == [(0, "queued", None), (1, "retried", 3_600_000), (2, "retried", 3_600_000)]


async def test_a_failing_task_does_not_raise_at_enqueue_unless_propagating(
        namespace: str) -> None:
    app = _app(namespace, eager=True)

    @app.task(name="refund", max_retries=1, retry_strategy=_Slow())
    async def refund(order: str) -> str:
        raise LookupError(f"no order {order}")

    task_id = await refund.enqueue("o-1")
    result = await app.wait(task_id)
    assert result.state is stem.TaskState.FAILED and result.attempt == 1
    assert str(result.error) == "LookupError: no order o-1" and "failedAt" in result.meta
    with pytest.raises(stem.TaskFailedError):
        await refund.wait(task_id, raise_on_failure=True)

    with eager(app, propagate=True):
        with pytest.raises(LookupError, match="no order o-2"):
            await refund.enqueue("o-2")
    propagating = _app(namespace + "p", eager=True, eager_propagates=True)
    propagating.register(refund)
    with pytest.raises(LookupError):
        await refund.enqueue("o-3")
    with pytest.raises(stem.ConfigurationError, match="needs eager=True"):
        stem.Stem("x", broker="memory://x", backend="memory://x", eager_propagates=True)


async def test_eager_encodes_and_converts_arguments_as_a_worker_does(namespace: str) -> None:
    app = _app(namespace, eager=True)
    got: list[Any] = []

    @app.task(name="billing.due")
    async def due(when: datetime, amount: Decimal) -> str:
        got.append((when, amount))
        return when.isoformat()

    when = datetime(2025, 1, 31, tzinfo=UTC)
    task_id = await due.enqueue(when, str(Decimal("9.99")))  # type: ignore[arg-type]
    assert (await app.wait(task_id)).value == "2025-01-31T00:00:00+00:00"
    assert got == [(when, Decimal("9.99"))]

    # A value JSON cannot carry fails the enqueue itself, as without eager mode.
    with pytest.raises(stem.TaskArgumentError, match="argument 'amount'"):
        await due.enqueue(when, Decimal("1"))
    # A value that does not convert fails the task (dead-lettered by a worker), not the enqueue.
    bad = await app.enqueue("billing.due", "not-a-date", "1")
    result = await app.wait(bad)
    assert result.failed and result.error is not None
    assert result.error.type == "TaskArgumentError" and "deadLetterReason" in result.meta
    with eager(app, propagate=True), pytest.raises(stem.TaskFailedError, match="when"):
        await app.enqueue("billing.due", "not-a-date", "1")


async def test_an_explicit_task_id_runs_once_and_an_expired_task_is_cancelled(
        namespace: str) -> None:
    app = _app(namespace, eager=True)
    runs: list[str] = []

    @app.task(name="once")
    async def once(key: str) -> str:
        runs.append(key)
        return key

    call = once.call("k").with_options(task_id="fixed-id")
    assert await app.enqueue_call(call) == "fixed-id"
    assert await app.enqueue_call(call) == "fixed-id"
    assert runs == ["k"]
    late = await app.enqueue("once", "late", expires=datetime.now(UTC) - timedelta(seconds=1))
    result = await app.wait(late)
    assert result.state is stem.TaskState.CANCELLED and result.meta["stem.expired"]
    assert runs == ["k"]


async def test_eager_children_progress_and_signals(namespace: str) -> None:
    app = _app(namespace, eager=True)

    @app.task(name="child")
    def child(n: int) -> int:
        return n * 2

    @app.task(name="parent.async")
    async def parent(ctx: stem.TaskContext) -> str:
        ctx.progress(50, {"step": 1})
        ctx.heartbeat()
        return await ctx.enqueue("child", 21)

    @app.task(name="parent.sync")
    def parent_sync(ctx: stem.TaskContext) -> str:
        return ctx.enqueue_sync(child, 4)

    events: list[str] = []

    def on_success(sender: Any, envelope: stem.Envelope, **_: Any) -> None:
        events.append(envelope.name)

    signals.task_success.connect(on_success)
    try:
        pid = await parent.enqueue()
        result = await app.wait(pid)
        assert result.meta["progress"] == {"percent": 50.0, "data": {"step": 1}}
        child_result = await app.wait(result.value)
        assert child_result.value == 42
        sid = await parent_sync.enqueue()
        assert (await app.wait((await app.wait(sid)).value)).value == 8
    finally:
        signals.task_success.disconnect(on_success)
    assert events == ["child", "parent.async", "child", "parent.sync"]


async def test_eager_applies_time_limits_and_runs_process_tasks_in_process(
        namespace: str) -> None:
    app = _app(namespace, eager=True)

    @app.task(name="slow", soft_time_limit=0.05)
    async def slow() -> str:
        await asyncio.sleep(30)
        return "never"

    @app.task(name="pooled", isolation="process")
    def pooled(x: int) -> int:
        return x + 1

    result = await app.wait(await slow.enqueue())
    assert result.failed and result.error is not None
    assert result.error.type == "SoftTimeLimitExceeded"
    assert (await app.wait(await pooled.enqueue(1))).value == 2


def test_eager_from_sync_code(namespace: str) -> None:
    app = _app(namespace)

    @app.task(name="sync.greet")
    def greet(name: str) -> str:
        return f"hi {name}"

    try:
        with eager(app) as same:
            assert same is app and app.eager
            task_id = greet.delay("ada")
            assert greet.wait_sync(task_id).value == "hi ada"
        assert not app.eager
    finally:
        app.close_sync()


async def test_eager_blocks_nest_and_restore(namespace: str) -> None:
    app = _app(namespace)
    async with eager(app):
        with eager(app, propagate=True):
            assert app.eager
        assert app.eager
    assert not app.eager


# -- make_context --------------------------------------------------------------------------


async def test_make_context_records_what_the_handler_did() -> None:
    app = stem.Stem("ctx", broker="memory://ctx-unused", backend="memory://ctx-unused")

    @app.task(name="email.send")
    async def send(to: str) -> str:
        return to

    @app.task(name="report")
    async def report(ctx: stem.TaskContext, rows: int) -> str:
        ctx.progress(10)
        ctx.heartbeat()
        ctx.extend_lease(120)
        ctx.meta["rows"] = rows
        child = await ctx.enqueue("email.send", "a@example.com")
        return f"{ctx.id} {ctx.attempt} {ctx.envelope.meta['tenant']} {child}"

    ctx = make_context(task_id="t-1", attempt=2, meta={"tenant": "acme"}, app=app)
    out = await report.func(ctx, 5)  # type: ignore[misc]
    calls = ctx.calls
    assert out == f"t-1 2 acme {calls.ids[0]}"
    assert calls.progress == [(10.0, None)] and calls.leases == [None, 120]
    assert calls.heartbeats == 1 and ctx.meta == {"rows": 5}
    assert [(c.name, c.args) for c in calls.enqueued] == [("email.send", {"to": "a@example.com"})]
    assert calls.enqueued[0].headers["stem-parent-id"] == "t-1"
    assert await app.backend.get(calls.ids[0]) is None  # not eager: nothing published
    with pytest.raises(stem.ConfigurationError):
        ctx.extend_lease(-1)

    with eager(app):
        ctx = make_context(meta={"tenant": "b"}, app=app)
        await report.func(ctx, 1)  # type: ignore[misc]
        assert (await app.wait(ctx.calls.ids[0])).value == "a@example.com"


def test_make_context_from_a_sync_handler() -> None:
    ctx = make_context(name="sync.task")
    assert ctx.name == "sync.task" and ctx.attempt == 0 and ctx.id
    child_id = ctx.enqueue_sync("some.task", x=1)
    assert ctx.calls.ids == [child_id] and ctx.calls.enqueued[0].args == {"x": 1}


# -- direct calls -----------------------------------------------------------------------------


async def test_calling_a_task_runs_its_handler() -> None:
    app = stem.Stem("direct", broker="memory://direct-unused", backend="memory://direct-unused")

    @app.task(name="charge")
    def charge(amount: int, rate: float) -> dict[str, Any]:
        return {"total": amount * rate}

    @app.task(name="acharge")
    async def acharge(amount: int) -> int:
        return amount * 2

    @app.task(name="with.ctx")
    def with_ctx(ctx: stem.TaskContext, n: int) -> str:
        ctx.progress(100)
        return f"{ctx.name} {n} {len(ctx.calls.progress)}"  # type: ignore[attr-defined]

    assert charge(2, 1.5) == {"total": 3.0}
    coro = acharge(4)
    assert asyncio.iscoroutine(coro) and await coro == 8
    assert with_ctx(3) == "with.ctx 3 1"
    assert await app.backend.get("anything") is None
    with pytest.raises(stem.ConfigurationError, match="no handler"):
        stem.TaskDefinition("remote.only", params=("x",))(1)


# -- use_memory ----------------------------------------------------------------------------


async def test_use_memory_rebinds_an_app_and_restores_it(namespace: str, tmp_path: Any) -> None:
    db = tmp_path / "real.db"
    app = stem.Stem("mine", broker=f"sqlite:///{db}", namespace=namespace)

    @app.task(name="mine.echo")
    async def echo(x: int) -> int:
        return x

    with use_memory(app) as url:
        assert url.startswith("memory://") and app.broker_url == app.backend_url == url
        async with running_worker(app):
            task_id = await echo.enqueue(3)
            assert (await echo.wait(task_id, timeout=10)).value == 3
        assert type(app.broker).__name__ == "MemoryBroker"
    assert app.broker_url == f"sqlite:///{db}"
    assert type(app.broker).__name__ == "SqliteBroker"
    assert not db.exists()  # the real store was never touched
    with pytest.raises(stem.ConfigurationError):
        with use_memory(app, "redis://nope"):
            pass
    await app.close()
