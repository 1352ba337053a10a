"""Soft and hard time limits inline (asyncio) and in threads; where tasks run."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import stem
from stem import TaskState
from stem.worker.executor import Executor
from tests.helpers import running_worker
from tests.isolation.conftest import read_marks, ready_pool
from tests.isolation.iso_app import SPEC

Timeouts = list[tuple[str, float, bool]]


def test_where_tasks_run(app: stem.Stem) -> None:
    plain = Executor(threads=4, app=app)
    prefork = Executor(threads=4, app=app, pool_default=True)
    d = app.tasks
    # def: thread, unless it has a hard limit (a thread can't be killed) or --pool is on.
    assert plain.isolation_for(d["iso.thread_pid"], None) == "thread"
    assert plain.isolation_for(d["iso.thread_pid"], 1.0) == "process"
    assert prefork.isolation_for(d["iso.thread_pid"], None) == "process"
    # async def: inline, even with a hard limit or --pool (cancellation stops it).
    assert plain.isolation_for(d["iso.forever"], 1.0) == "inline"
    assert prefork.isolation_for(d["iso.soft_async"], None) == "inline"
    # explicit isolation always wins.
    assert prefork.isolation_for(d["iso.soft_sync_thread"], None) == "thread"
    assert plain.isolation_for(d["iso.async_pid"], None) == "process"


async def test_async_handler_awaiting_forever_is_cancelled_at_its_hard_limit(
        app: stem.Stem, marks: Path, timeouts: Timeouts) -> None:
    async with running_worker(app, app_spec=SPEC):
        tid = await app.enqueue("iso.forever")
        res = await app.wait(tid, timeout=10)
        ended = time.time()
        ok = await app.wait(await app.enqueue("iso.soft_async"), timeout=10)  # still serving
    [(_, started)] = read_marks(marks, "forever", tid)
    assert res.state is TaskState.FAILED and res.error is not None
    assert res.error.type == "TimeLimitExceeded"
    assert "hard time limit of 1 s" in res.error.message
    assert 0.9 <= ended - started < 1.5  # the mark is written just after the clock starts
    assert [t for t in timeouts if t[0] == tid] == [(tid, 1.0, True)]
    assert ok.state is TaskState.SUCCEEDED


async def test_hard_limit_wins_even_if_the_handler_swallows_the_cancellation(
        app: stem.Stem, timeouts: Timeouts) -> None:
    async with running_worker(app, app_spec=SPEC) as worker:
        await ready_pool(worker)
        t0 = time.monotonic()
        res = await app.wait(await app.enqueue("iso.swallow_cancel"), timeout=10)
    assert res.state is TaskState.FAILED and res.error is not None
    assert res.error.type == "TimeLimitExceeded"  # not the value it returned
    assert time.monotonic() - t0 < 1.5


@pytest.mark.parametrize("task", ["iso.soft_async", "iso.soft_sync_thread"])
async def test_soft_limit_is_raised_in_the_handler_which_can_still_return(
        app: stem.Stem, timeouts: Timeouts, task: str) -> None:
    limit = app.tasks[task].options.soft_time_limit
    async with running_worker(app, app_spec=SPEC):
        tid = await app.enqueue(task)
        res = await app.wait(tid, timeout=10)
    assert res.state is TaskState.SUCCEEDED, res.error
    assert res.value["caught"] == "SoftTimeLimitExceeded"
    assert res.value["pid"] == os.getpid()  # inline / thread: in the worker process
    assert limit is not None and limit <= res.value["after"] < limit + 0.5
    assert [t for t in timeouts if t[0] == tid] == [(tid, limit, False)]


async def test_soft_limit_through_gather_cancels_what_the_handler_awaited(
        app: stem.Stem, timeouts: Timeouts) -> None:
    async with running_worker(app, app_spec=SPEC):
        tid = await app.enqueue("iso.soft_async_gather")
        res = await app.wait(tid, timeout=10)
    assert (res.state, res.value) == (TaskState.SUCCEEDED, "cancelled")
    assert len([t for t in timeouts if t[0] == tid]) == 1


async def test_soft_limit_not_handled_fails_the_attempt_with_soft_time_limit_exceeded(
        app: stem.Stem, timeouts: Timeouts) -> None:
    async with running_worker(app, app_spec=SPEC):
        tid = await app.enqueue("iso.soft_ignored")
        res = await app.wait(tid, timeout=10)
    assert res.state is TaskState.FAILED and res.error is not None
    assert res.error.type == "SoftTimeLimitExceeded"
    assert "soft time limit of 0.2 s" in res.error.message
    # Soft only: the handler stopped at the soft limit, the hard one never fired.
    assert [t for t in timeouts if t[0] == tid] == [(tid, 0.2, False)]


async def test_per_call_time_limit_sends_a_plain_def_task_to_the_pool_and_kills_it(
        app: stem.Stem, timeouts: Timeouts) -> None:
    call = app.definition("iso.sleepy_default").call(seconds=30).with_options(time_limit=0.5)
    async with running_worker(app, app_spec=SPEC) as worker:
        await ready_pool(worker)
        t0 = time.monotonic()
        res = await app.wait(await app.enqueue_call(call), timeout=10)
        elapsed = time.monotonic() - t0
        pool = worker.executor.process_pool
        assert pool is not None
        ok = await app.wait(await app.enqueue("iso.sleepy_default", seconds=0), timeout=10)
    assert res.state is TaskState.FAILED and res.error is not None
    assert res.error.type == "TimeLimitExceeded" and elapsed < 1.5
    assert ok.value == os.getpid()  # without a limit it runs in a thread again


async def test_retry_with_time_limit_applies_to_the_next_attempt(
        app: stem.Stem, timeouts: Timeouts) -> None:
    async with running_worker(app, app_spec=SPEC):
        tid = await app.enqueue("iso.retry_with_limit")
        res = await app.wait(tid, timeout=10)
    assert res.state is TaskState.FAILED and res.attempt == 1
    assert res.error is not None and res.error.type == "TimeLimitExceeded"
    assert "0.5 s" in res.error.message
    assert [t for t in timeouts if t[0] == tid] == [(tid, 0.5, True)]


async def test_worker_stays_responsive_while_a_thread_ignores_its_hard_limit(
        app: stem.Stem) -> None:
    started: list[float] = []

    @app.task(name="iso.thread_sleeper", isolation="thread", time_limit=0.3)
    def thread_sleeper() -> str:
        started.append(time.monotonic())
        time.sleep(1.0)  # blocked in C: the injected TimeLimitExceeded waits for it
        return "done"

    async with running_worker(app, app_spec=SPEC):
        res = await app.wait(await app.enqueue("iso.thread_sleeper"), timeout=10)
        assert time.monotonic() - started[0] < 0.9  # the attempt ended at the limit, not at 1 s
        ok = await app.wait(await app.enqueue("iso.thread_pid"), timeout=10)
    assert res.error is not None and res.error.type == "TimeLimitExceeded"
    assert ok.state is TaskState.SUCCEEDED
