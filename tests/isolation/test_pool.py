"""The process pool with real child processes and real signals (in-process worker)."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

import stem
from stem import TaskState, signals
from stem.worker import Worker
from stem.worker.pool import ProcessPool
from tests.helpers import running_worker
from tests.isolation.conftest import alive, read_marks, ready_pool, until
from tests.isolation.iso_app import SPEC

Timeouts = list[tuple[str, float, bool]]


def pool_of(worker: Worker) -> ProcessPool:
    pool = worker.executor.process_pool
    assert pool is not None
    return pool


async def test_runaway_def_task_is_killed_at_its_hard_limit_and_the_pool_recovers(
        app: stem.Stem, marks: Path, timeouts: Timeouts) -> None:
    """``while True: pass`` with time_limit=1 and max_retries=1: two attempts, both killed."""
    async with running_worker(app, app_spec=SPEC, pool_size=2) as worker:
        pool = await ready_pool(worker)
        tid = await app.enqueue("iso.spin")
        [(spinner, started)] = await until(lambda: read_marks(marks, "spin", tid))
        # While one child spins, the worker keeps serving other tasks on the other.
        ids = [await app.enqueue("iso.add", i, 1) for i in range(20)]
        served = [await app.wait(i, timeout=10) for i in ids]
        assert [r.value for r in served] == [i + 1 for i in range(20)]
        assert time.time() - started < 1.0, "other tasks waited for the runaway one"
        res = await app.wait(tid, timeout=15)
        ended = time.time()
        runs = read_marks(marks, "spin", tid)
        # The pool has its full size again, without the killed children.
        await until(lambda: pool.ready_count == 2 and len(pool.pids) == 2)
        assert not {pid for pid, _ in runs} & set(pool.pids)
        after = await app.wait(await app.enqueue("iso.pid"), timeout=10)
        assert after.value in pool.pids
    assert res.state is TaskState.FAILED and res.attempt == 1  # retried once, as configured
    assert res.error is not None and res.error.type == "TimeLimitExceeded"
    assert f"child pid {runs[1][0]} was killed" in res.error.message
    assert len(runs) == 2 and runs[0][0] == spinner and runs[0][0] != runs[1][0]
    # Each attempt was stopped within ~1.5 s of its start (the second after a 0.05 s delay).
    assert runs[1][1] - runs[0][1] < 1.5 + 0.05
    assert ended - runs[1][1] < 1.5
    assert [t for t in timeouts if t[0] == tid] == [(tid, 1.0, True)] * 2
    for pid, _ in runs:
        await until(lambda pid=pid: not alive(pid), timeout=5)


async def test_child_ignoring_sigterm_is_sigkilled_after_the_grace(
        app: stem.Stem, marks: Path) -> None:
    async with running_worker(app, app_spec=SPEC, pool_size=1) as worker:
        await ready_pool(worker)
        tid = await app.enqueue("iso.stubborn")
        t0 = time.monotonic()
        res = await app.wait(tid, timeout=10)
        assert time.monotonic() - t0 < 1.2  # the attempt ends at the limit, not after the kill
        [(pid, _)] = read_marks(marks, "stubborn", tid)
        await until(lambda: not alive(pid), timeout=5)  # SIGTERM ignored: SIGKILL after 1 s
        await until(lambda: pool_of(worker).ready_count == 1)
        ok = await app.wait(await app.enqueue("iso.add", 2, 2), timeout=10)
    assert res.error is not None and res.error.type == "TimeLimitExceeded"
    assert ok.value == 4


async def test_hard_limit_interrupts_a_blocking_call_and_runs_finally_blocks(
        app: stem.Stem, marks: Path, timeouts: Timeouts) -> None:
    """The worker stops the task at its hard limit over its private channel: SystemExit is
    raised in the handler even while it blocks in ``time.sleep``, so cleanup runs."""
    async with running_worker(app, app_spec=SPEC, pool_size=1) as worker:
        pool = await ready_pool(worker)
        tid = await app.enqueue("iso.cleanup")
        res = await app.wait(tid, timeout=10)
        [(pid, cleaned)] = await until(lambda: read_marks(marks, "cleanup", tid), timeout=5)
        await until(lambda: not alive(pid), timeout=5)
        await until(lambda: pool.ready_count == 1)
        ok = await app.wait(await app.enqueue("iso.add", 2, 3), timeout=10)
    [(started_pid, started)] = read_marks(marks, "cleanup-start", tid)
    assert res.error is not None and res.error.type == "TimeLimitExceeded"
    assert started_pid == pid and cleaned - started < 0.5 + pool.config.kill_grace
    assert [t for t in timeouts if t[0] == tid] == [(tid, 0.5, True)]
    assert ok.value == 5


async def test_children_ignore_sigterm_and_sigint_from_their_process_group(
        app: stem.Stem, marks: Path) -> None:
    """What ``kill -TERM -PGID`` or Ctrl-C delivers to each child, busy or idle, changes
    nothing: the running task succeeds, no child is lost, the pool keeps serving."""
    async with running_worker(app, app_spec=SPEC, pool_size=2) as worker:
        pool = await ready_pool(worker)
        tid = await app.enqueue("iso.nap", seconds=1.0)
        [(busy, _)] = await until(lambda: read_marks(marks, "nap", tid))
        pids = list(pool.pids)
        for sig in (signal.SIGTERM, signal.SIGINT):
            for pid in pids:
                os.kill(pid, sig)
        res = await app.wait(tid, timeout=10)
        after = [await app.wait(await app.enqueue("iso.pid"), timeout=10) for _ in range(4)]
        assert sorted(pool.pids) == sorted(pids) and pool.lost == 0
    assert busy in pids
    assert (res.state, res.value) == (TaskState.SUCCEEDED, busy)
    assert {r.value for r in after} <= set(pids)


async def test_a_tasks_own_subprocesses_get_default_sigterm_and_sigint(app: stem.Stem) -> None:
    """The child drops group signals with a handler, not SIG_IGN and not a blocked mask,
    neither of which a task's own subprocesses should inherit."""
    async with running_worker(app, app_spec=SPEC, pool_size=1):
        res = await app.wait(await app.enqueue("iso.subprocess_signals"), timeout=30)
    assert res.state is TaskState.SUCCEEDED, res.error
    assert (res.value["term"], res.value["int"]) == ("default", "KeyboardInterrupt")
    assert not {signal.SIGTERM, signal.SIGINT} & set(res.value["blocked"])


@pytest.mark.parametrize(("task", "how"), [("iso.crash_exit", "code 1"),
                                            ("iso.crash_segv", "signal SIGSEGV")])
async def test_crashing_child_fails_only_its_attempt_with_worker_lost_error(
        app: stem.Stem, marks: Path, task: str, how: str) -> None:
    async with running_worker(app, app_spec=SPEC, pool_size=2, concurrency=40) as worker:
        pool = await ready_pool(worker)
        # Enqueued together, so some of these queue behind the crash in the same child.
        calls = [app.definition(task).call()] + [
            app.definition("iso.add").call(i, 0) for i in range(30)]
        ids = await app.enqueue_many(calls)
        results = [await app.wait(i, timeout=15) for i in ids]
        await until(lambda: pool.ready_count == 2)
        later = [await app.wait(await app.enqueue("iso.add", i, 100), timeout=10)
                 for i in range(5)]
    crashed, rest = results[0], results[1:]
    [(pid, _)] = read_marks(marks, "crash", ids[0])
    assert crashed.state is TaskState.FAILED and crashed.error is not None
    assert crashed.error.type == "WorkerLostError"
    assert f"child pid {pid} exited with {how}" in crashed.error.message
    assert [r.value for r in rest] == list(range(30))  # nothing else lost or failed
    assert [r.value for r in later] == [100, 101, 102, 103, 104]
    assert pool.lost == 1


async def test_max_tasks_per_child_recycles_children_without_losing_tasks(
        app: stem.Stem) -> None:
    async with running_worker(app, app_spec=SPEC, pool_size=2, max_tasks_per_child=10,
                              concurrency=8) as worker:
        ids = [await app.enqueue("iso.pid") for _ in range(50)]
        results = [await app.wait(i, timeout=20) for i in ids]
        pool = pool_of(worker)
        await until(lambda: pool.ready_count == 2)
    assert all(r.state is TaskState.SUCCEEDED for r in results)
    per_child = Counter(r.value for r in results)
    assert sum(per_child.values()) == 50
    assert max(per_child.values()) <= 10 and len(per_child) >= 5
    assert pool.recycled >= 4 and pool.lost == 0


async def test_max_memory_per_child_recycles_a_child_that_grew(app: stem.Stem) -> None:
    async with running_worker(app, app_spec=SPEC, pool_size=1,
                              max_memory_per_child=100 * 1024) as worker:
        small = await app.wait(await app.enqueue("iso.pid"), timeout=10)
        again = await app.wait(await app.enqueue("iso.pid"), timeout=10)
        grown = await app.wait(await app.enqueue("iso.hog", mb=120), timeout=10)
        fresh = await app.wait(await app.enqueue("iso.pid"), timeout=10)
        recycled = pool_of(worker).recycled
    assert small.value == again.value == grown.value  # under the limit: kept
    assert fresh.value != grown.value and recycled == 1


async def test_context_calls_in_a_child_are_applied_by_the_worker(app: stem.Stem) -> None:
    progress: list[tuple[str, float]] = []

    def on_progress(sender: object, *, envelope: stem.Envelope, percent: float,
                    **_: object) -> None:
        progress.append((envelope.id, percent))

    signals.task_progress.connect(on_progress)
    try:
        async with running_worker(app, app_spec=SPEC, pool_size=1) as worker:
            tid = await app.enqueue("iso.report")
            res = await app.wait(tid, timeout=10)
            enqueued = await app.wait(res.value, timeout=10)
            res_async = await app.wait(await app.enqueue("iso.report_async"), timeout=10)
            enqueued_async = await app.wait(res_async.value["child"], timeout=10)
            pids = pool_of(worker).pids
    finally:
        signals.task_progress.disconnect(on_progress)
    assert res.state is TaskState.SUCCEEDED
    assert res.meta["written"] == "in the child"
    assert res.meta["progress"] == {"percent": 50.0, "data": {"step": "half"}}
    assert progress == [(tid, 50.0)]
    assert (enqueued.state, enqueued.value) == (TaskState.SUCCEEDED, 3)
    assert res_async.value["pid"] in pids and enqueued_async.value == 5


async def test_errors_retries_and_results_cross_the_process_boundary(app: stem.Stem) -> None:
    async with running_worker(app, app_spec=SPEC, pool_size=2) as worker:
        boom = await app.wait(await app.enqueue("iso.boom"), timeout=10)
        retried = await app.wait(await app.enqueue("iso.retry_once"), timeout=10)
        not_json = await app.wait(await app.enqueue("iso.not_json"), timeout=10)
        in_child = await app.wait(await app.enqueue("iso.async_pid"), timeout=10)
        pids = pool_of(worker).pids
    assert boom.state is TaskState.FAILED and boom.error is not None
    assert (boom.error.type, boom.error.message) == ("ValueError", "boom from the child")
    assert "iso_app.py" in (boom.error.stack or "") and "Traceback" in (boom.error.stack or "")
    assert (retried.state, retried.value, retried.attempt) == (TaskState.SUCCEEDED, 1, 1)
    assert not_json.error is not None and not_json.error.type == "PayloadEncodingError"
    assert in_child.value in pids and in_child.value != os.getpid()


@pytest.mark.parametrize("task", ["iso.soft_sync", "iso.soft_async_proc"])
async def test_soft_limit_in_a_child_is_raised_in_the_handler_and_signalled_once(
        app: stem.Stem, timeouts: Timeouts, task: str) -> None:
    limit = app.tasks[task].options.soft_time_limit
    assert limit is not None
    async with running_worker(app, app_spec=SPEC, pool_size=1) as worker:
        tid = await app.enqueue(task)
        res = await app.wait(tid, timeout=10)
        pids = pool_of(worker).pids
    assert res.state is TaskState.SUCCEEDED, res.error
    assert res.value["caught"] == "SoftTimeLimitExceeded"
    assert res.value["pid"] in pids  # ran in the child, which is still serving
    assert limit <= res.value["after"] < limit + 0.5
    assert [t for t in timeouts if t[0] == tid] == [(tid, limit, False)]


async def test_soft_limit_of_one_task_never_hits_the_next_one(
        app: stem.Stem, timeouts: Timeouts) -> None:
    """Tasks that finish before their soft limit leave no timer armed for the next task."""
    limited = app.definition("iso.sleepy").call(seconds=0).with_options(soft_time_limit=0.1)
    async with running_worker(app, app_spec=SPEC, pool_size=1):
        ids = await app.enqueue_many([limited] * 5)
        after = await app.enqueue("iso.sleepy", seconds=0.4)
        results = [await app.wait(i, timeout=10) for i in [*ids, after]]
    assert all(r.state is TaskState.SUCCEEDED for r in results), results
    assert timeouts == []


async def test_shutdown_kills_children_still_running_abandoned_work(app: stem.Stem) -> None:
    async with running_worker(app, app_spec=SPEC, pool_size=1, shutdown_grace=0.3) as worker:
        pids = list((await ready_pool(worker)).pids)
        await app.enqueue("iso.sleepy", seconds=30)
        await until(lambda: worker._active)
    for pid in pids:
        await until(lambda pid=pid: not alive(pid), timeout=10)
    stats = await app.broker.stats("default")
    assert stats.pending == 1  # handed back for another worker


async def test_a_child_that_cannot_import_the_app_fails_worker_start(app: stem.Stem) -> None:
    worker = Worker(app, app_spec="tests.isolation.no_such_module:app", pool_size=1, block_time=0.1)
    t0 = time.monotonic()
    with pytest.raises(stem.ConfigurationError, match="no_such_module"):
        await worker.run()
    assert time.monotonic() - t0 < 10


async def test_ignore_result_and_a_future_deadline_through_the_pool(app: stem.Stem) -> None:
    """The child re-prepares the envelope: it honours ignore_result and does not judge the
    deadline again (the parent did, just before sending it)."""
    async with running_worker(app, app_spec=SPEC, pool_size=1) as worker:
        await ready_pool(worker)
        ignored = await app.enqueue("iso.add", 1, 2, ignore_result=True)
        kept = await app.enqueue("iso.add", 2, 2, expires=60)
        ignored_result = await app.wait(ignored, timeout=15)
        kept_result = await app.wait(kept, timeout=15)
    assert (ignored_result.state, ignored_result.raw_payload) == (TaskState.SUCCEEDED, None)
    assert (kept_result.state, kept_result.value) == (TaskState.SUCCEEDED, 4)


async def test_retry_rules_apply_to_errors_raised_in_a_child(app: stem.Stem) -> None:
    # The exception cannot cross the process boundary: the child sends the names of its
    # class and bases, whether it is retryable and a Reject's reason.
    attempts: Counter[str] = Counter()

    def count(sender: object, *, envelope: stem.Envelope, **_: object) -> None:
        attempts[envelope.args["kind"]] += 1

    signals.task_prerun.connect(count)
    try:
        async with running_worker(app, app_spec=SPEC, pool_size=1):
            ids = {k: await app.enqueue("iso.judged", kind=k)
                   for k in ("reject", "fatal", "missing", "io")}
            for tid in ids.values():
                res = await app.wait(tid, timeout=20)
                assert res.state is TaskState.FAILED
    finally:
        signals.task_prerun.disconnect(count)
    assert attempts == {"reject": 1, "fatal": 1, "missing": 1, "io": 2}
    dead = {d.id: (d.reason, d.meta.get("error"))
            for d in await app.broker.dead_letters("default")}
    assert dead == {ids["reject"]: ("refused in the child", None),
                    ids["io"]: ("max-retries-exhausted",
                                "ConnectionResetError: retried: an OSError")}
