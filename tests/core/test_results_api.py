"""Results and errors: ``wait(..., raise_on_failure=True)``, ``unwrap()``, ``str(TaskError)``."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path

import pytest

import stem
from stem import TaskError, TaskFailedError, TaskResult, TaskState
from tests.helpers import running_worker


@pytest.fixture(params=["memory", "sqlite"])
def app(request: pytest.FixtureRequest, namespace: str, tmp_path: Path) -> stem.Stem:
    url = f"memory://{namespace}" if request.param == "memory" else \
        f"sqlite:///{tmp_path / 'stem.db'}"
    app = stem.Stem("results", broker=url, backend=url)

    @app.task(name="ok")
    async def ok(x: int) -> int:
        return x * 2

    @app.task(name="boom", max_retries=0)
    async def boom(amount: int) -> int:
        raise ValueError(f"bad amount {amount}\nsecond line")

    return app


async def test_wait_raise_on_failure_carries_the_remote_error(app: stem.Stem) -> None:
    boom = app.tasks["boom"]
    async with running_worker(app):
        tid = await app.enqueue("boom", 7)
        with pytest.raises(TaskFailedError) as info:
            await app.wait(tid, timeout=10, raise_on_failure=True)
        exc = info.value
        assert (exc.task_id, exc.state, exc.type) == (tid, TaskState.FAILED, "ValueError")
        assert exc.message == "bad amount 7\nsecond line"
        assert exc.stack is not None and "raise ValueError" in exc.stack
        assert str(exc) == f"task {tid} failed: ValueError: bad amount 7 second line"
        assert isinstance(exc, stem.StemError)
        # the task's own wait, and the default (no raise) keep returning the result
        with pytest.raises(TaskFailedError, match="ValueError"):
            await boom.wait(tid, timeout=10, raise_on_failure=True)
        res = await app.wait(tid, timeout=10)
        assert res.failed and res.error is not None and res.error.type == "ValueError"
        with pytest.raises(TaskFailedError) as again:
            res.unwrap()
        assert again.value.stack == exc.stack


async def test_raise_on_failure_returns_a_success(app: stem.Stem) -> None:
    ok = app.tasks["ok"]
    async with running_worker(app):
        tid = await ok.enqueue(21)
        res = await ok.wait(tid, timeout=10, raise_on_failure=True)
        assert res.value == 42 and res.unwrap() == 42
        assert (await app.wait(tid, timeout=10, raise_on_failure=True)).unwrap() == 42


async def test_sync_waits_raise_on_failure(app: stem.Stem) -> None:
    boom, ok = app.tasks["boom"], app.tasks["ok"]
    async with running_worker(app):
        bad = await boom.enqueue(1)
        good = await ok.enqueue(2)
        await app.wait(bad, timeout=10)
        await app.wait(good, timeout=10)

    def sync_side() -> None:
        with pytest.raises(TaskFailedError, match="ValueError: bad amount 1"):
            app.wait_sync(bad, 10, raise_on_failure=True)
        with pytest.raises(TaskFailedError, match="ValueError: bad amount 1"):
            boom.wait_sync(bad, 10, raise_on_failure=True)
        assert ok.wait_sync(good, 10, raise_on_failure=True).value == 4
        app.close_sync()

    await asyncio.to_thread(sync_side)


def test_unwrap_of_each_state() -> None:
    assert TaskResult("a", TaskState.SUCCEEDED, value=3).unwrap() == 3
    err = TaskError("TaskExpired", "not started before its expiry", stack=None)
    with pytest.raises(TaskFailedError) as info:
        TaskResult("b", TaskState.CANCELLED, error=err).unwrap()
    assert str(info.value) == "task b cancelled: TaskExpired: not started before its expiry"
    assert info.value.stack is None and info.value.error is err
    with pytest.raises(TaskFailedError, match="no error recorded"):
        TaskResult("c", TaskState.FAILED).unwrap()
    for state in (TaskState.QUEUED, TaskState.RUNNING, TaskState.RETRIED):
        with pytest.raises(stem.StemError, match="has not finished") as not_done:
            TaskResult("d", state).unwrap()
        assert not isinstance(not_done.value, TaskFailedError)


def test_task_failed_error_pickles() -> None:
    exc = TaskFailedError("x", TaskState.FAILED, TaskError("KeyError", "'k'", "tb"))
    back = pickle.loads(pickle.dumps(exc))
    assert (str(back), back.type, back.stack) == (str(exc), "KeyError", "tb")


def test_str_of_task_error_is_one_line_type_and_message() -> None:
    err = TaskError("ValueError", "boom\n  more detail\n", stack="Traceback ...\nValueError: boom")
    assert str(err) == "ValueError: boom more detail"
    assert err.stack is not None and err.stack.startswith("Traceback")
    assert str(TaskError("Timeout", "")) == "Timeout"
    assert str(TaskError.from_exception(KeyError("k"))) == "KeyError: 'k'"
