"""The worker pipeline, in process, on the memory adapters."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import pytest

import stem
from stem import ExponentialJitterRetryStrategy, TaskState, WaitTimeoutError
from stem.envelope import Envelope
from tests.helpers import eventually, running_worker


@pytest.fixture
def app(namespace: str) -> stem.Stem:
    return stem.Stem("t", broker=f"memory://{namespace}", backend=f"memory://{namespace}")


async def test_enqueue_by_name_and_typed_then_wait(app: stem.Stem) -> None:
    @app.task(name="math.add")
    async def add(x: int, y: int = 1) -> int:
        return x + y

    async with running_worker(app):
        id1 = await app.enqueue("math.add", 2, y=3)
        id2 = await add.enqueue(10)
        r1, r2 = await app.wait(id1, timeout=5), await add.wait(id2, timeout=5)
    assert (r1.state, r1.value, r1.attempt) == (TaskState.SUCCEEDED, 5, 0)
    assert r2.value == 11


async def test_bad_arguments_raise_before_anything_is_published(app: stem.Stem) -> None:
    @app.task(name="one")
    def one(x: int) -> int:
        return x

    with pytest.raises(stem.TaskArgumentError, match="one"):
        await app.enqueue("one", 1, 2)
    assert (await app.broker.stats("default")).pending == 0


async def test_sync_handler_runs_in_a_thread_with_context(app: stem.Stem) -> None:
    loop_thread = threading.get_ident()

    @app.task(name="sync")
    def sync(ctx: stem.TaskContext, x: int) -> dict[str, object]:
        ctx.meta["seen"] = True
        return {"thread_differs": threading.get_ident() != loop_thread, "id": ctx.id, "x": x}

    async with running_worker(app):
        tid = await app.enqueue("sync", x=4)
        res = await app.wait(tid, timeout=5)
    assert res.value == {"thread_differs": True, "id": tid, "x": 4}
    assert res.meta["seen"] is True


async def test_failures_retry_with_growing_delays_then_fail(app: stem.Stem) -> None:
    attempts: list[float] = []

    @app.task(name="flaky", max_retries=3,
              retry_strategy=ExponentialJitterRetryStrategy(base=0.05, jitter=False))
    async def flaky(ctx: stem.TaskContext) -> None:
        attempts.append(time.monotonic())
        raise ValueError(f"boom {ctx.attempt}")

    async with running_worker(app):
        tid = await app.enqueue("flaky")
        res = await app.wait(tid, timeout=10)
    assert res.state is TaskState.FAILED and res.attempt == 3
    assert res.error is not None and res.error.type == "ValueError"
    assert res.error.message == "boom 3" and "Traceback" in (res.error.stack or "")
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(attempts) == 4
    for gap, expected in zip(gaps, [0.05, 0.1, 0.2], strict=True):
        assert gap >= expected * 0.95


async def test_explicit_retry_with_countdown_then_success(app: stem.Stem) -> None:
    @app.task(name="again", max_retries=1)
    async def again(ctx: stem.TaskContext) -> str:
        if ctx.attempt == 0:
            raise stem.Retry(countdown=0.05)
        return f"ok on {ctx.attempt}"

    async with running_worker(app):
        res = await app.wait(await app.enqueue("again"), timeout=5)
    assert (res.state, res.value, res.attempt) == (TaskState.SUCCEEDED, "ok on 1", 1)


async def test_unknown_task_and_bad_args_are_dead_lettered_with_failed_status(app: stem.Stem) -> None:
    @app.task(name="known")
    def known(x: int) -> int:
        return x

    async with running_worker(app):
        unknown = Envelope(name="nobody.home", args={})
        bad_args = Envelope(name="known", args={"y": 1})
        await app.broker.publish([unknown, bad_args])
        r1 = await app.wait(unknown.id, timeout=5)
        r2 = await app.wait(bad_args.id, timeout=5)
        await app.broker.publish_raw("default", b"{not json")
        ok = await app.wait(await app.enqueue("known", 1), timeout=5)  # still serving
        dead = await eventually(lambda: app.broker.dead_letters("default"))
        dead = await eventually(
            lambda: _at_least(app.broker.dead_letters("default"), 3), timeout=5)
    assert r1.state is TaskState.FAILED and r1.error is not None
    assert r1.error.type == "UnknownTaskError" and "nobody.home" in r1.error.message
    assert r2.error is not None and r2.error.type == "TaskArgumentError"
    assert ok.value == 1
    reasons = sorted(d.reason for d in dead)
    assert any("unknown task" in r for r in reasons)
    assert any("undecodable" in r for r in reasons)
    assert any("bad arguments" in r for r in reasons)


async def _at_least(coro: object, n: int) -> object:
    items = await coro  # type: ignore[misc]
    return items if len(items) >= n else None


async def test_progress_is_visible_while_running(app: stem.Stem) -> None:
    release = asyncio.Event()

    @app.task(name="long")
    async def long(ctx: stem.TaskContext) -> str:
        ctx.progress(40, data={"step": "half"})
        await release.wait()
        return "done"

    async with running_worker(app):
        tid = await app.enqueue("long")
        status = await eventually(lambda: _progress(app, tid))
        assert status.state is TaskState.RUNNING
        assert status.meta["progress"] == {"percent": 40.0, "data": {"step": "half"}}
        release.set()
        res = await app.wait(tid, timeout=5)
    assert res.value == "done" and res.progress == {"percent": 40.0, "data": {"step": "half"}}


async def _progress(app: stem.Stem, tid: str) -> object:
    s = await app.backend.get(tid)
    return s if s is not None and "progress" in s.meta else None


async def test_child_tasks_from_async_and_sync_handlers(app: stem.Stem) -> None:
    @app.task(name="child")
    async def child(n: int) -> int:
        return n * 2

    @app.task(name="parent")
    async def parent(ctx: stem.TaskContext) -> str:
        return await ctx.enqueue("child", 21)

    @app.task(name="sync_parent")
    def sync_parent(ctx: stem.TaskContext) -> str:
        return ctx.enqueue_sync(child, n=5)

    async with running_worker(app):
        cid = (await app.wait(await app.enqueue("parent"), timeout=5)).value
        cid2 = (await app.wait(await app.enqueue("sync_parent"), timeout=5)).value
        assert (await app.wait(cid, timeout=5)).value == 42
        assert (await app.wait(cid2, timeout=5)).value == 10


async def test_long_task_lease_is_renewed_automatically(app: stem.Stem) -> None:
    runs: list[int] = []

    @app.task(name="slow", visibility_timeout=0.2)
    async def slow(ctx: stem.TaskContext) -> str:
        runs.append(ctx.attempt)
        await asyncio.sleep(1.0)  # five visibility timeouts: the thing under test
        return "ok"

    async with running_worker(app, concurrency=4):
        res = await app.wait(await app.enqueue("slow"), timeout=5)
    assert res.value == "ok" and runs == [0]


async def test_redelivery_of_a_finished_task_is_skipped(app: stem.Stem) -> None:
    runs: list[str] = []

    @app.task(name="once")
    async def once(ctx: stem.TaskContext) -> None:
        runs.append(ctx.id)

    # A worker that stored the result and died before acking: its lease runs out and
    # the message is delivered again, flagged as a redelivery.
    env = Envelope(name="once", args={}, visibility_timeout=0.2)
    await app.broker.publish([env])
    [ghost] = await app.broker.fetch(["default"], 1, block=1, consumer="ghost")
    assert ghost.redelivered is False
    await app.backend.set_many([(stem.TaskStatus(env.id, TaskState.SUCCEEDED, payload="done"),
                                 None)])
    async with running_worker(app):
        await eventually(lambda: _empty(app))
    assert runs == []
    status = await app.backend.get(env.id)
    assert status is not None and status.payload == "done"


async def _empty(app: stem.Stem) -> bool:
    s = await app.broker.stats("default")
    return s.pending == 0 and s.in_flight == 0


async def test_wait_times_out_with_clear_error(app: stem.Stem) -> None:
    with pytest.raises(WaitTimeoutError):
        await app.wait("never", timeout=0.1)


async def test_concurrent_enqueues_coalesce_into_few_publishes(app: stem.Stem) -> None:
    @app.task(name="n")
    async def n(i: int) -> int:
        return i

    calls: list[int] = []
    original = app.broker.publish

    async def counting(envs: list[Envelope]) -> None:
        calls.append(len(envs))
        await asyncio.sleep(0.001)  # a network round trip, during which calls queue up
        await original(envs)

    app.broker.publish = counting  # type: ignore[method-assign]
    ids = await asyncio.gather(*(app.enqueue("n", i) for i in range(200)))
    # The first call goes at once; the 199 made while it was in flight go together.
    assert len(set(ids)) == 200 and calls == [1, 199]


async def test_graceful_stop_drains_in_flight(app: stem.Stem) -> None:
    started = asyncio.Event()

    @app.task(name="work")
    async def work() -> str:
        started.set()
        await asyncio.sleep(0.3)
        return "finished"

    async with running_worker(app) as worker:
        tid = await app.enqueue("work")
        await asyncio.wait_for(started.wait(), 5)
        worker.request_stop()
    status = await app.backend.get(tid)
    assert status is not None and status.state is TaskState.SUCCEEDED


async def test_lifecycle_signals_fire(app: stem.Stem) -> None:
    from stem import signals

    seen: list[tuple[str, object]] = []

    def on_retry(sender: object, *, envelope: Envelope, delay: float, **_: object) -> None:
        seen.append(("retry", envelope.attempt))

    async def on_success(sender: object, *, envelope: Envelope, **_: object) -> None:
        seen.append(("success", envelope.attempt))

    def broken(sender: object, **_: object) -> None:
        raise RuntimeError("observers never break processing")

    @app.task(name="sig", max_retries=1)
    async def sig(ctx: stem.TaskContext) -> None:
        if ctx.attempt == 0:
            raise stem.Retry(countdown=0)

    signals.task_retry.connect(on_retry)
    signals.task_success.connect(on_success)
    signals.task_prerun.connect(broken)
    try:
        async with running_worker(app):
            res = await app.wait(await app.enqueue("sig"), timeout=5)
            await eventually(lambda: _has(seen, "success"))
    finally:
        signals.task_retry.disconnect(on_retry)
        signals.task_success.disconnect(on_success)
        signals.task_prerun.disconnect(broken)
    assert res.state is TaskState.SUCCEEDED
    assert seen == [("retry", 0), ("success", 1)]


async def _has(seen: list[tuple[str, object]], kind: str) -> bool:
    return any(k == kind for k, _ in seen)


async def test_retry_budget_by_name_uses_handler_options_unless_call_overrides(
        app: stem.Stem) -> None:
    runs: list[int] = []

    @app.task(name="budget", max_retries=2,
              retry_strategy=ExponentialJitterRetryStrategy(base=0.01, jitter=False))
    async def budget(ctx: stem.TaskContext) -> None:
        runs.append(ctx.attempt)
        raise RuntimeError("no")

    producer = stem.Stem("p", broker=app.broker, backend=app.backend)  # knows no tasks
    async with running_worker(app):
        by_name = await app.wait(await producer.enqueue("budget"), timeout=5)
        call = app.definition("budget").call().with_options(max_retries=0)
        explicit = await app.wait(await producer.enqueue_call(call), timeout=5)
    assert by_name.attempt == 2 and explicit.attempt == 0
    assert runs == [0, 1, 2, 0]


async def test_extend_lease_and_heartbeat_reach_the_broker(app: stem.Stem) -> None:
    extended: list[tuple[str, float]] = []
    original = app.broker.extend_lease

    async def spy(deliveries: list[object], seconds: float) -> None:
        extended.extend((d.envelope.id, seconds) for d in deliveries)  # type: ignore[attr-defined]
        await original(deliveries, seconds)  # type: ignore[arg-type]

    app.broker.extend_lease = spy  # type: ignore[method-assign]

    @app.task(name="lease", visibility_timeout=60)
    def lease(ctx: stem.TaskContext) -> None:
        ctx.extend_lease(120)
        ctx.heartbeat()

    async with running_worker(app):
        tid = await app.enqueue("lease")
        await app.wait(tid, timeout=5)
        await eventually(lambda: _count(extended, 2))
    assert (tid, 120) in extended and (tid, 60) in extended


async def _count(items: list[object], n: int) -> bool:
    return len(items) >= n


async def test_unserialisable_args_fail_only_their_own_caller(app: stem.Stem) -> None:
    @app.task(name="j")
    async def j(x: object) -> None: ...

    results = await asyncio.gather(app.enqueue("j", 1), app.enqueue("j", {1, 2}),
                                   app.enqueue("j", 3), return_exceptions=True)
    assert isinstance(results[1], stem.TaskArgumentError)
    assert isinstance(results[0], str) and isinstance(results[2], str)
    assert (await app.broker.stats("default")).pending == 2


async def test_status_meta_carries_the_dart_worker_keys(app: stem.Stem) -> None:
    @app.task(name="m", queue="default")
    async def m() -> int:
        return 1

    async with running_worker(app, consumer_name="w1"):
        res = await app.wait(await app.enqueue("m"), timeout=5)
    assert res.meta["task"] == "m" and res.meta["queue"] == "default"
    assert res.meta["worker"] == "w1"
    assert res.meta["startedAt"] <= res.meta["completedAt"]
