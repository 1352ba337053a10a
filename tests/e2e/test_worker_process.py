"""A real worker process on SQLite: results, retries, SIGKILL recovery, SIGTERM drain."""

from __future__ import annotations

import itertools
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

import stem
from stem import TaskState
from tests.e2e import e2e_app
from tests.e2e.conftest import read_marks
from tests.helpers import eventually, wait_until

pytestmark = pytest.mark.slow

Start = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
async def producer(sqlite_url: str) -> AsyncIterator[stem.Stem]:
    app = stem.Stem("producer", broker=sqlite_url, backend=sqlite_url,
                    namespace="e2e")  # the worker's app: Stem("e2e")
    yield app
    await app.close()


async def test_worker_process_runs_tasks_enqueued_by_name(start_worker: Start,
                                                          producer: stem.Stem) -> None:
    start_worker()
    ids = [await producer.enqueue("e2e.add", x=i, y=1) for i in range(20)]
    results = [await producer.wait(i, timeout=20) for i in ids]
    assert [r.value for r in results] == [i + 1 for i in range(20)]
    assert all(r.state is TaskState.SUCCEEDED for r in results)


async def test_failing_task_is_retried_with_growing_delays(start_worker: Start,
                                                           producer: stem.Stem,
                                                           marks: Path) -> None:
    start_worker()
    tid = await producer.enqueue("e2e.flaky")
    res = await producer.wait(tid, timeout=30)
    assert res.state is TaskState.FAILED and res.attempt == 3
    assert res.error is not None and res.error.message == "failed attempt 3"
    times = [ts for _, ts in read_marks(marks, "flaky", tid)]
    assert len(times) == 4  # first attempt + max_retries=3
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, delay in zip(gaps, [0.2, 0.4, 0.8], strict=True):
        assert gap >= delay
    assert gaps[0] < gaps[1] < gaps[2]


async def test_sigkill_mid_task_another_worker_finishes_it(start_worker: Start,
                                                           producer: stem.Stem,
                                                           marks: Path) -> None:
    first = start_worker()
    # Through the definition, so the envelope carries the task's 1.5 s visibility timeout.
    tid = await producer.enqueue_call(e2e_app.slow.call(seconds=2.0))
    wait_until(lambda: read_marks(marks, "slow", tid), timeout=20)
    first.send_signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    second = start_worker()
    res = await producer.wait(tid, timeout=30)
    runs = read_marks(marks, "slow", tid)
    assert res.state is TaskState.SUCCEEDED and res.value == second.pid
    assert [pid for pid, _ in runs] == [first.pid, second.pid]
    # The second run waited for the killed worker's lease (1.5 s) to expire.
    assert runs[1][1] - runs[0][1] >= 1.0


async def test_sigterm_drains_in_flight_work_and_exits_zero(start_worker: Start,
                                                            producer: stem.Stem,
                                                            marks: Path) -> None:
    proc = start_worker("--concurrency", "2", "--grace", "20")
    ids = [await producer.enqueue("e2e.slow", seconds=1.0) for _ in range(4)]
    started = wait_until(lambda: [i for i in ids if read_marks(marks, "slow", i)] or None,
                         timeout=20)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    statuses = {i: await producer.backend.get(i) for i in ids}
    finished = [i for i, s in statuses.items() if s and s.state is TaskState.SUCCEEDED]
    # Everything that had started finished; nothing new was fetched after SIGTERM.
    assert set(started) <= set(finished)
    assert len(finished) == 2
    stats = await producer.broker.stats("default")
    assert stats.pending == 2 and stats.in_flight == 0


async def test_malformed_input_goes_to_the_dlq_and_the_worker_keeps_going(
        start_worker: Start, producer: stem.Stem) -> None:
    start_worker()
    await producer.broker.publish_raw("default", b"\x00garbage")
    unknown = await producer.enqueue("e2e.nobody")
    res = await producer.wait(unknown, timeout=20)
    assert res.state is TaskState.FAILED and res.error is not None
    assert res.error.type == "UnknownTaskError"
    ok = await producer.wait(await producer.enqueue("e2e.add", x=1, y=1), timeout=20)
    assert ok.value == 2
    dead = await eventually(lambda: _two(producer), timeout=10)
    assert {("undecodable" in d.reason) for d in dead} == {True, False}


async def _two(app: stem.Stem) -> object:
    dead = await app.broker.dead_letters("default")
    return dead if len(dead) >= 2 else None


@pytest.mark.parametrize("spec,says", [
    ("tests.e2e.nope:app", "not found"),
    ("tests.e2e.e2e_app:nothing", "has no attribute 'nothing'"),
    ("tests.e2e.e2e_app:add", "not a stem.Stem app"),
])
def test_bad_app_exits_2_with_one_line(spec: str, says: str) -> None:
    import sys

    out = subprocess.run([sys.executable, "-m", "stem_cli", "worker", "start", "--app", spec],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and says in out.stderr
