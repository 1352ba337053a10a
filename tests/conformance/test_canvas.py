"""Canvas on every adapter, with an in-process worker: links, chains, groups, chords,
batches, and the follow-ups' idempotency when a parent is delivered again."""

from __future__ import annotations

from typing import Any

import pytest

import stem
from stem.app import Stem
from stem.canvas import chain, chord, group
from stem.envelope import Envelope
from stem.status import TaskState
from stem.worker import canvas_hooks
from stem.worker.processor import Success
from tests.helpers import running_worker

pytestmark = pytest.mark.asyncio


@pytest.fixture
def app(store_url: str, namespace: str) -> Stem:
    app = Stem("canvas", broker=store_url, namespace=namespace)
    app.ran = []  # type: ignore[attr-defined]
    flaky_attempts: dict[str, int] = {}

    @app.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="mul")
    async def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="boom")
    async def boom(x: int) -> int:
        raise ValueError(f"boom on {x}")

    @app.task(name="record")
    async def record(value: Any, tag: str = "") -> str:
        app.ran.append((tag, value))  # type: ignore[attr-defined]
        return tag

    @app.task(name="flaky", max_retries=2)
    async def flaky(key: str) -> str:
        flaky_attempts[key] = flaky_attempts.get(key, 0) + 1
        if flaky_attempts[key] == 1:
            raise stem.Retry(countdown=0.01)
        return key

    @app.task(name="total")
    async def total(results: list[int], offset: int = 0) -> int:
        app.ran.append(("total", results))  # type: ignore[attr-defined]
        return sum(results) + offset

    return app


async def test_a_chain_passes_each_result_to_the_next_step(app: Stem) -> None:
    add, mul = app.tasks["add"], app.tasks["mul"]
    async with running_worker(app):
        result = await chain(add.s(2, 2), add.s(4), mul.s(10)).enqueue()
        last = await result.wait(timeout=15)
    assert last.value == 80 and await result.failed_step() is None
    assert len(result.task_ids) == 3 and result.id.startswith("chain-")
    second = await app.get_result(result.task_ids[1])
    assert second is not None and second.meta["stem.parentTaskId"] == result.task_ids[0]
    assert second.meta["chainIndex"] == 1


async def test_an_immutable_step_ignores_the_previous_result(app: Stem) -> None:
    add = app.tasks["add"]
    async with running_worker(app):
        result = await (add.s(1, 1) | add.si(5, 5) | add.s(1)).enqueue()
        assert (await result.wait(timeout=15)).value == 11


async def test_a_failing_step_stops_the_chain_and_says_which(app: Stem) -> None:
    add, boom, record = app.tasks["add"], app.tasks["boom"], app.tasks["record"]
    async with running_worker(app):
        result = await chain(add.s(1, 1), boom.s(), record.s(tag="never")).enqueue()
        last = await result.wait(timeout=15)
        failed = await result.failed_step()
    assert last.state is TaskState.CANCELLED and last.error is not None
    assert last.error.type == "ChainAborted" and "step 1 of 3" in last.error.message
    assert failed is not None and failed[0] == 1 and failed[1].failed
    assert failed[1].error is not None and failed[1].error.message == "boom on 2"
    assert app.ran == []  # type: ignore[attr-defined]


async def test_a_group_returns_every_result_in_signature_order(app: Stem) -> None:
    add = app.tasks["add"]
    async with running_worker(app, concurrency=32):
        result = await group(add.s(i, 1000) for i in range(200)).enqueue()
        results = await result.wait(timeout=30)
    assert [r.value for r in results] == [i + 1000 for i in range(200)]
    assert await result.counts() == {"succeeded": 200}
    member = await app.get_result(result.task_ids[7])
    assert member is not None and member.meta["groupId"] == result.id
    record = await result.record()
    assert record is not None and record.completed == 200 and record.state == "succeeded"


async def test_a_chord_calls_back_once_with_the_ordered_results(app: Stem) -> None:
    add, total = app.tasks["add"], app.tasks["total"]
    async with running_worker(app, concurrency=16):
        result = await chord([add.s(i, 0) for i in range(40)], total.s(offset=1)).enqueue()
        callback = await result.callback_result(timeout=30)
    assert callback.value == sum(range(40)) + 1
    assert app.ran == [("total", list(range(40)))]  # type: ignore[attr-defined]
    record = await app.get_group(result.id)
    assert record is not None and record.claimed and record.state == "succeeded"


async def test_a_chord_with_a_failing_member_never_calls_back(app: Stem) -> None:
    add, boom, total = app.tasks["add"], app.tasks["boom"], app.tasks["total"]
    async with running_worker(app):
        members = [add.s(1, 1), boom.s(7), add.s(2, 2)]
        result = await chord(members, total.s()).enqueue()
        callback = await result.callback_result(timeout=15)
        await result.wait(timeout=15)
    assert callback.state is TaskState.FAILED and callback.error is not None
    assert callback.error.type == "ChordFailed"
    assert callback.meta["stem.chord.failedTaskId"] == result.task_ids[1]
    assert callback.meta["stem.chord.failedIndex"] == 1
    assert "boom on 7" in callback.error.message
    record = await app.get_group(result.id)
    assert record is not None and record.state == "failed" and not record.claimed
    assert ("total", [2, 14, 4]) not in app.ran  # type: ignore[attr-defined]
    assert all(tag != "total" for tag, _ in app.ran)  # type: ignore[attr-defined]


async def test_links_fire_on_the_right_outcome_only(app: Stem) -> None:
    add, boom, record, flaky = (app.tasks[n] for n in ("add", "boom", "record", "flaky"))
    ok = add.s(2, 3).link(record.s(tag="ok")).link_error(record.s(tag="err-on-ok"))
    bad = boom.s(1).link(record.s(tag="ok-on-bad")).link_error(record.s(tag="err"))
    retried = flaky.s("k").link(record.s(tag="after-retry")).link_error(
        record.s(tag="err-on-retry"))
    async with running_worker(app):
        ids = [await ok.enqueue(), await bad.enqueue(), await retried.enqueue()]
        for task_id in ids:
            await app.wait(task_id, timeout=15)
        link_ids = [stem.canvas.derived_id(ids[0], "link", 0),
                    stem.canvas.derived_id(ids[1], "link-error", 0),
                    stem.canvas.derived_id(ids[2], "link", 0)]
        for task_id in link_ids:
            assert (await app.wait(task_id, timeout=15)).succeeded
    assert sorted(app.ran) == sorted([("ok", 5), ("err", ids[1]), ("after-retry", "k")])  # type: ignore[attr-defined]
    child = await app.get_result(link_ids[0])
    assert child is not None and child.meta["stem.parentTaskId"] == ids[0]
    assert child.meta["stem.rootTaskId"] == ids[0]


async def test_links_on_any_enqueue(app: Stem) -> None:
    add, record = app.tasks["add"], app.tasks["record"]
    async with running_worker(app):
        call = add.call(1, 2).with_options(link=record.s(tag="via-call"))
        task_id = await app.enqueue_call(call)
        by_name = await app.enqueue("add", 3, 4, link=record.si("fixed", tag="by-name"))
        for parent in (task_id, by_name):
            await app.wait(stem.canvas.derived_id(parent, "link", 0), timeout=15)
    assert sorted(app.ran) == [("by-name", "fixed"), ("via-call", 3)]  # type: ignore[attr-defined]


async def test_a_redelivered_parent_enqueues_its_follow_ups_once(app: Stem) -> None:
    """What a worker crash between the follow-ups and the ack comes down to."""
    add, record, total = app.tasks["add"], app.tasks["record"], app.tasks["total"]
    env = app.build_envelope(add.call(1, 1).with_options(link=[record.s(tag="x")]))
    outcome = Success(2, "json")
    for _ in range(3):
        await canvas_hooks.run(app, env, outcome, redelivered=True)
    link_id = stem.canvas.derived_id(env.id, "link", 0)
    assert (await app.broker.stats("default")).pending == 1
    assert (await app.get_result(link_id)) is not None
    # A chord whose last member is recorded twice (and claimed by neither second call).
    result = await chord([add.s(1, 1)], total.s()).enqueue()
    await app.broker.purge("default")
    member = await app.get_result(result.task_ids[0])
    assert member is not None
    envelope = Envelope(name="add", id=result.task_ids[0], meta=dict(member.meta))
    await canvas_hooks.run(app, envelope, Success(2, "json"), redelivered=False)
    await canvas_hooks.run(app, envelope, Success(2, "json"), redelivered=False)
    await canvas_hooks.run(app, envelope, Success(2, "json"), redelivered=True)
    assert (await app.broker.stats("default")).pending == 1  # one callback


async def test_a_batch_is_idempotent_and_inspected(app: Stem) -> None:
    add, boom = app.tasks["add"], app.tasks["boom"]
    sigs = [add.s(1, 1), add.s(2, 2), boom.s(3)]
    first = await app.submit_batch(sigs, batch_id="batch-1")
    again = await app.submit_batch(sigs, batch_id="batch-1")
    assert first == again and len(first.task_ids) == 3
    assert (await app.broker.stats("default")).pending == 3
    status = await app.inspect_batch("batch-1")
    assert status is not None and status.state == "pending" and status.pending == 3
    async with running_worker(app):
        for task_id in first.task_ids:
            await app.wait(task_id, timeout=15)
    status = await app.inspect_batch("batch-1")
    assert status is not None and status.state == "partial"
    assert status.counts == {"succeeded": 2, "failed": 1}
    assert status.failed_task_ids == [first.task_ids[2]]
    assert await app.inspect_batch("nope") is None
    fresh = await app.submit_batch([add.s(5, 5)])
    assert fresh.batch_id.startswith("batch-")


async def test_signatures_check_options_and_arguments(app: Stem) -> None:
    add = app.tasks["add"]
    with pytest.raises(stem.ConfigurationError):
        add.s(1).set(priority=42)
    with pytest.raises(stem.TaskArgumentError):
        chain(add.s(1, 2), add.s(1, 2, 3))  # built lazily: the error comes at enqueue
        await chain(add.s(1, 2), add.s(1, 2, 3)).enqueue()
    sig = add.s(1).set(queue="q", countdown=1).set(meta={"a": 1})
    assert sig.options["queue"] == "q" and sig.options["meta"] == {"a": 1}


async def test_members_that_end_without_running_still_settle_the_workflow(app: Stem) -> None:
    # A member dead-lettered before its handler (no such task here) fails its chord;
    # an expired chain step stops the chain; neither leaves a workflow waiting forever.
    from datetime import UTC, datetime, timedelta

    add, total, record = app.tasks["add"], app.tasks["total"], app.tasks["record"]
    ghost = app.definition("nobody.handles.this")
    gone = datetime.now(UTC) - timedelta(seconds=1)
    async with running_worker(app):
        result = await chord([add.s(1, 1), ghost.si(), add.s(2, 2)], total.s()).enqueue()
        callback = await result.callback_result(timeout=15)
        assert callback.state is TaskState.FAILED and callback.error is not None
        assert callback.meta["stem.chord.failedIndex"] == 1
        assert "nobody.handles.this" in callback.error.message

        steps = chain(add.s(1, 2), add.s(10).set(expires=gone), add.s(100))
        chained = await steps.enqueue()
        last = await chained.wait(timeout=15)
        assert last.state is TaskState.CANCELLED

        dead = ghost.si().link_error(record.s(tag="ghost-failed"))
        dead_id = await dead.enqueue()
        assert (await app.wait(dead_id, timeout=15)).state is TaskState.FAILED
        err_id = stem.canvas.derived_id(dead_id, "link-error", 0)
        assert (await app.wait(err_id, timeout=15)).value == "ghost-failed"
    assert all(tag != "total" for tag, _ in app.ran)  # type: ignore[attr-defined]
