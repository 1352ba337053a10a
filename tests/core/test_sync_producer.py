"""Producing from sync code and from several event loops, on every adapter.

``app.enqueue_sync`` / ``task.delay`` run on the app's background event loop (an anyio
blocking portal); the app keeps its stores per event loop, so ``asyncio.run`` twice
works, and a forked child gets a portal and connections of its own.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import stem
from tests.conformance.conftest import ADAPTERS, adapter_url
from tests.helpers import running_worker, wait_until

SERVER_ADAPTERS = [a for a in ADAPTERS if a != "memory"]  # a forked child shares no memory


def make_app(url: str, namespace: str) -> tuple[stem.Stem, set[str]]:
    """An app with one task ``add`` that records the ids it ran."""
    app = stem.Stem("sync", broker=url, namespace=namespace)
    seen: set[str] = set()
    lock = threading.Lock()

    @app.task(name="add")
    async def add(ctx: stem.TaskContext, x: int, y: int = 1) -> int:
        with lock:
            seen.add(ctx.id)
        return x + y

    return app, seen


@contextmanager
def worker_thread(app: stem.Stem, **kwargs: object) -> Iterator[None]:
    """Run an in-process worker for ``app`` on an event loop in a background thread."""
    ready = threading.Event()
    state: dict[str, object] = {}

    async def main() -> None:
        stop = asyncio.Event()
        state["loop"], state["stop"] = asyncio.get_running_loop(), stop
        async with running_worker(app, **kwargs):  # type: ignore[arg-type]
            ready.set()
            await stop.wait()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by the test below
            state["error"] = exc
            ready.set()

    t = threading.Thread(target=run, name="test-worker")
    t.start()
    assert ready.wait(30), "worker did not start"
    assert "error" not in state, state.get("error")
    try:
        yield
    finally:
        loop, stop = state["loop"], state["stop"]
        loop.call_soon_threadsafe(stop.set)  # type: ignore[attr-defined]
        t.join(30)
        assert not t.is_alive()
        assert "error" not in state, state.get("error")


@pytest.fixture(params=ADAPTERS)
def url(request: pytest.FixtureRequest, namespace: str, tmp_path: Path) -> str:
    return adapter_url(request.param, namespace, tmp_path, request)


@pytest.fixture(params=SERVER_ADAPTERS)
def server_url(request: pytest.FixtureRequest, namespace: str, tmp_path: Path) -> str:
    return adapter_url(request.param, namespace, tmp_path, request)


def test_sync_enqueue_from_8_threads_x_100_all_complete(url: str, namespace: str) -> None:
    app, seen = make_app(url, namespace)
    add = app.tasks["add"]
    ids: list[list[str]] = [[] for _ in range(8)]

    def produce(n: int) -> None:
        for i in range(100):
            # All three spellings: delay, task.enqueue_sync, app.enqueue_sync by name.
            if i % 3 == 0:
                ids[n].append(add.delay(i))
            elif i % 3 == 1:
                ids[n].append(add.enqueue_sync(i, y=2))
            else:
                ids[n].append(app.enqueue_sync("add", x=i))

    try:
        with worker_thread(app, concurrency=50):
            threads = [threading.Thread(target=produce, args=(n,)) for n in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            all_ids = {i for chunk in ids for i in chunk}
            assert len(all_ids) == 800
            wait_until(lambda: seen >= all_ids, timeout=60)
            last = app.wait_sync(ids[7][-1], timeout=10)
            assert (last.state, last.value) == (stem.TaskState.SUCCEEDED, 99 + 1)  # delay(99)
            typed = add.wait_sync(ids[0][0], timeout=10)
            assert typed.value == 0 + 1
            assert app.get_result_sync(ids[3][1]) is not None
        assert seen == all_ids
    finally:
        app.close_sync()


def test_one_app_from_two_event_loops_in_turn(url: str, namespace: str) -> None:
    app, seen = make_app(url, namespace)
    add = app.tasks["add"]

    async def first() -> str:
        return await add.enqueue(1)  # no worker yet: stays queued

    async def second(earlier: str) -> tuple[stem.TaskResult[int], stem.TaskResult[int]]:
        async with running_worker(app):
            later = await add.enqueue(2, y=3)
            return await add.wait(earlier, timeout=10), await add.wait(later, timeout=10)

    earlier = asyncio.run(first())
    r1, r2 = asyncio.run(second(earlier))
    assert (r1.value, r2.value) == (2, 5)
    # Each loop's stores were closed and dropped when asyncio.run shut it down.
    assert len(app._loops) == 0
    assert len(seen) == 2
    third = asyncio.run(first())  # and a third loop, after both closed
    third_result = asyncio.run(app.get_result(third))
    assert third_result is not None and third_result.state is stem.TaskState.QUEUED  # no worker
    assert len(app._loops) == 0


async def test_sync_calls_inside_a_running_loop_raise_a_clear_error(namespace: str) -> None:
    app, _ = make_app(f"memory://{namespace}", namespace)
    add = app.tasks["add"]
    calls = {
        "app.enqueue_sync": lambda: app.enqueue_sync("add", x=1),
        "task.delay": lambda: add.delay(1),
        "task.enqueue_sync": lambda: add.enqueue_sync(1),
        "app.enqueue_call_sync": lambda: app.enqueue_call_sync(add.call(1)),
        "app.enqueue_many_sync": lambda: app.enqueue_many_sync([add.call(1)]),
        "app.wait_sync": lambda: app.wait_sync("x", 1),
        "task.wait_sync": lambda: add.wait_sync("x", 1),
        "app.get_result_sync": lambda: app.get_result_sync("x"),
        "app.close_sync": app.close_sync,
    }
    for what, call in calls.items():
        with pytest.raises(stem.SyncCallInLoopError, match=r"use `await .*\(.*\)`"):
            call()
        assert isinstance(stem.SyncCallInLoopError("x"), RuntimeError), what
    with pytest.raises(stem.SyncCallInLoopError, match="await"):
        stem.enqueue_sync("add", x=1)
    assert (await app.broker.stats("default")).pending == 0  # nothing was published


def test_a_forked_child_enqueues_with_its_own_portal(server_url: str, namespace: str) -> None:
    app, seen = make_app(server_url, namespace)
    add = app.tasks["add"]
    before = add.delay(1)  # the parent's portal and connections exist before the fork
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: enqueue from sync code, close its portal, exit
        code = 1
        try:
            os.close(read_end)
            tid = add.delay(41)
            app.close_sync()
            os.write(write_end, tid.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    child_id = os.read(read_end, 200).decode()
    os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0
    try:
        after = add.delay(2)  # the parent's connections still work
        with worker_thread(app):
            wait_until(lambda: seen >= {before, child_id, after}, timeout=30)
            assert app.wait_sync(child_id, timeout=10).value == 42
    finally:
        app.close_sync()
