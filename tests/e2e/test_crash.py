"""Crash safety on every durable broker: SIGKILL mid-run and dropped connections.

Nothing is lost: a second worker finishes everything the killed one had leased, each
task ends with one terminal status, and a task whose result the killed worker had
already stored is not run again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

import stem
from stem import TaskState
from stem.adapters.postgres._pool import parse_url
from tests import services
from tests.e2e import e2e_app
from tests.e2e.conftest import read_marks
from tests.helpers import eventually, wait_until
from tests.services import drop_pg_schema, drop_redis_keys

pytestmark = pytest.mark.slow

Start = Callable[..., subprocess.Popen[bytes]]
N = 200


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def store(request: pytest.FixtureRequest, namespace: str, sqlite_url: str) -> Iterator[str]:
    """A broker URL for one backend, isolated by the test's namespace."""
    if request.param == "sqlite":
        yield sqlite_url
    elif request.param == "redis":
        base = request.getfixturevalue("redis_url")
        yield base + "?claim_interval=0.25"
        asyncio.run(drop_redis_keys(base, namespace))
    else:
        base = request.getfixturevalue("postgres_url")
        yield base
        asyncio.run(drop_pg_schema(base, namespace))


@pytest.fixture
async def producer(store: str, namespace: str) -> AsyncIterator[stem.Stem]:
    app = stem.Stem("producer", broker=store, backend=store, namespace=namespace)
    yield app
    await app.broker.purge("default")
    await app.close()


@pytest.fixture
def worker_env(namespace: str) -> Iterator[None]:
    old = os.environ.get("STEM_NAMESPACE")
    os.environ["STEM_NAMESPACE"] = namespace
    yield
    if old is None:
        os.environ.pop("STEM_NAMESPACE", None)
    else:
        os.environ["STEM_NAMESPACE"] = old


async def _all_finished(app: stem.Stem, ids: list[str]) -> dict[str, stem.TaskStatus] | None:
    got = await app.backend.get_many(ids)
    if len(got) == len(ids) and all(s.state.is_terminal for s in got.values()):
        return got
    return None


def _started(marks: Path) -> int:
    return sum(1 for p in marks.iterdir() if p.name.startswith("start-"))


async def test_sigkill_mid_run_loses_nothing(store: str, producer: stem.Stem, marks: Path,
                                             start_worker: Start, worker_env: None) -> None:
    first = start_worker("-c", "20", url=store)
    ids = await producer.enqueue_many([e2e_app.work.call(seconds=0.1) for _ in range(N)])
    wait_until(lambda: _started(marks) >= N // 2, timeout=60, interval=0.005)
    first.send_signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    start_worker("-c", "20", url=store)
    statuses = await eventually(lambda: _all_finished(producer, ids), timeout=90, interval=0.2)
    assert all(s.state is TaskState.SUCCEEDED for s in statuses.values())
    rerun_after_store = []
    killed_pid = f"-{first.pid}-"
    for tid, status in statuses.items():
        done = read_marks(marks, "done", tid)
        assert done, f"{tid} succeeded without running"
        if killed_pid in status.meta["worker"] and len(done) > 1:
            rerun_after_store.append(tid)
    assert rerun_after_store == []
    stats = await producer.broker.stats("default")
    assert (stats.pending, stats.in_flight, stats.delayed, stats.dead) == (0, 0, 0, 0)


@pytest.fixture
def own_redis() -> Iterator[str]:
    """A redis-server of this test's own, so CLIENT KILL touches no other test."""
    url, _ = services.start_redis()
    yield url


async def _kill_redis_clients(url: str) -> int:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    try:
        killed = 0
        for kind in ("normal", "pubsub"):
            killed += int(await r.execute_command("CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes"))
        return killed
    finally:
        await r.aclose()


async def _kill_pg_backends(url: str, pid: int) -> int:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            f"stem-{pid}")
        return len(rows)
    finally:
        await conn.close()


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_dropped_connections_mid_run_recover(backend: str, request: pytest.FixtureRequest,
                                                   namespace: str, marks: Path,
                                                   start_worker: Start, worker_env: None) -> None:
    url = (request.getfixturevalue("own_redis") if backend == "redis"
           else request.getfixturevalue("postgres_url"))
    producer = stem.Stem("producer", broker=url, backend=url, namespace=namespace)
    try:
        worker = start_worker("-c", "10", url=url)
        ids = await producer.enqueue_many([e2e_app.work.call(seconds=0.02) for _ in range(N)])
        wait_until(lambda: _started(marks) >= N // 3, timeout=60, interval=0.005)
        if backend == "redis":
            killed = await _kill_redis_clients(url)
        else:
            killed = await _kill_pg_backends(parse_url(url).dsn, worker.pid)
        assert killed >= 1
        statuses = await eventually(lambda: _all_finished(producer, ids), timeout=90,
                                    interval=0.2)
        assert all(s.state is TaskState.SUCCEEDED for s in statuses.values())
        assert worker.poll() is None  # it recovered instead of dying
    finally:
        await producer.broker.purge("default")
        await producer.close()
        if backend == "postgres":
            await drop_pg_schema(url, namespace)
