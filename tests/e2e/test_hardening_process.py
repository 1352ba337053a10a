"""Issue 9 (hardening) against a real ``stem worker start`` process.

Hostile envelopes written straight into storage must not wedge the worker, a worker
must dead-letter oversized bytes unparsed, and a stop while the result store is down
must end within the grace with exit 1 and one line saying how much was left.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import orjson
import pytest

import stem
from stem import TaskState
from tests import services
from tests.e2e.conftest import read_marks
from tests.helpers import WorkerProcesses, eventually, wait_until

pytestmark = pytest.mark.slow

APP = "tests.e2e.hostile_app:app"
Start = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerProcesses]:
    w = WorkerProcesses(tmp_path)
    yield w
    w.kill_all()


@pytest.fixture
def start(workers: WorkerProcesses, sqlite_url: str, marks: Path) -> Start:
    def start(*args: str, backend: str = "", **env: str) -> subprocess.Popen[bytes]:
        return workers.start(APP, *args, env={
            "STEM_BROKER_URL": sqlite_url, "STEM_RESULT_BACKEND_URL": backend,
            "E2E_MARK_DIR": str(marks), **env})
    return start


@pytest.fixture
async def producer(sqlite_url: str) -> AsyncIterator[stem.Stem]:
    app = stem.Stem("producer", broker=sqlite_url, backend=sqlite_url,
                    namespace="hostile")  # the worker's app: Stem("hostile")
    yield app
    await app.close()


async def _stats(app: stem.Stem, **want: int) -> bool:
    s = await app.broker.stats("default")
    return all(getattr(s, k) == v for k, v in want.items())


def _raw(**fields: object) -> bytes:
    return orjson.dumps({"args": {}, **fields})


async def test_hostile_retry_fields_do_not_wedge_a_worker_process(start: Start,
                                                                  producer: stem.Stem) -> None:
    # One slot, no prefetch: before the fix two such deliveries stopped all fetching.
    proc = start("--concurrency", "1", "--prefetch-multiplier", "1")
    hostile = {
        "overflow": _raw(id="overflow", name="h.fail", attempt=1100, maxRetries=2000),
        "budget": _raw(id="budget", name="h.fail", meta={"__stemMaxRetries": "x"}),
        "countdown": _raw(id="countdown", name="h.far", maxRetries=3),
        "lease": _raw(id="lease", name="h.add", args={"x": 1, "y": 1}, visibilityTimeout=0),
    }
    for raw in hostile.values():
        await producer.broker.publish_raw("default", raw)
    ok = await producer.wait(await producer.enqueue("h.add", x=2, y=3), timeout=30)
    assert ok.value == 5
    await eventually(lambda: _stats(producer, pending=0, in_flight=0, dead=2, delayed=2),
                     timeout=20)
    states = {k: (await producer.backend.get(k)) for k in hostile}
    assert {k: s.state if s else None for k, s in states.items()} == {
        "overflow": TaskState.RETRIED, "budget": TaskState.FAILED,
        "countdown": TaskState.RETRIED, "lease": TaskState.FAILED}
    assert proc.poll() is None


async def test_a_worker_process_dead_letters_oversized_bytes_unparsed(
        start: Start, producer: stem.Stem) -> None:
    start(STEM_MAX_PAYLOAD_BYTES="4096")
    big = _raw(id="big", name="h.add", args={"x": 1, "y": 2, "pad": "z" * 8000})
    await producer.broker.publish_raw("default", big)
    ok = await producer.wait(await producer.enqueue("h.add", x=1, y=1), timeout=30)
    assert ok.value == 2
    await eventually(lambda: _stats(producer, pending=0, in_flight=0, dead=1), timeout=20)
    [dead] = await producer.broker.dead_letters("default")
    assert dead.reason == (f"undecodable envelope: envelope is {len(big)} bytes, over the "
                           "4096-byte payload limit (STEM_MAX_PAYLOAD_BYTES)")
    assert await producer.backend.get("big") is None


@pytest.fixture
def doomed_redis() -> str:
    """A redis-server of this test's own, which the test shuts down."""
    return services.start_redis()[0]


async def _shutdown_redis(url: str) -> None:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    try:
        await r.execute_command("SHUTDOWN", "NOSAVE")
    except Exception:  # the server closes the connection as it goes: that is the answer
        pass
    finally:
        await r.aclose()


async def test_stop_while_the_result_store_is_down_ends_within_the_grace(
        start: Start, producer: stem.Stem, marks: Path, doomed_redis: str, tmp_path: Path
) -> None:
    grace = 2.0
    proc = start("--grace", str(grace), backend=doomed_redis)
    tid = await producer.enqueue("h.slow", seconds=1.0)
    wait_until(lambda: read_marks(marks, "slow", tid), timeout=20)
    await _shutdown_redis(doomed_redis)  # the task's result now has nowhere to go
    stopped_at = time.monotonic()
    proc.terminate()
    code = proc.wait(grace + 20)  # before the fix: forever, retrying the result write
    took = time.monotonic() - stopped_at
    log = (tmp_path / "worker-0.log").read_text()
    assert code == 1, log
    assert took < grace + 8, took
    last = log.strip().splitlines()[-1]
    assert last.startswith("stem: error: worker stopped with 1 unsettled delivery"), log
    # Left to its lease: still in the queue, so another worker will run it.
    s = await producer.broker.stats("default")
    assert s.pending + s.in_flight == 1 and s.dead == 0
