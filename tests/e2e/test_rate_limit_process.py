"""A rate limit holds across worker processes: three real workers share one 20/s
limit (on Redis and on Postgres) and together start the task at 20/s, not 60/s."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import stem
from stem import TaskState
from tests.e2e import ratelimit_app
from tests.helpers import WorkerProcesses, eventually
from tests.services import drop_pg_schema, drop_redis_keys

pytestmark = pytest.mark.slow

N = 300
RATE = 20.0


@pytest.fixture(params=["redis", "postgres"])
async def store(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[str]:
    name = request.param
    base = request.getfixturevalue(f"{name}_url")
    yield base
    if name == "redis":
        await drop_redis_keys(base, namespace)
    else:
        await drop_pg_schema(base, namespace)


async def _finished(app: stem.Stem, ids: list[str]) -> dict[str, stem.TaskStatus] | None:
    got = await app.backend.get_many(ids)
    if len(got) == len(ids) and all(s.state.is_terminal for s in got.values()):
        return got
    return None


async def test_three_workers_share_one_limit(store: str, namespace: str,
                                             tmp_path: Path) -> None:
    workers = WorkerProcesses(tmp_path)
    env = {"STEM_BROKER_URL": store, "STEM_RESULT_BACKEND_URL": "", "STEM_NAMESPACE": namespace}
    producer = stem.Stem("producer", broker=store, namespace=namespace)
    try:
        await producer.broker.ping()  # migrations done before three workers race for them
        for _ in range(3):
            workers.start("tests.e2e.ratelimit_app:app", "-c", "16", env=env)
        ids = await producer.enqueue_many([ratelimit_app.limited.call() for _ in range(N)])
        statuses = await eventually(lambda: _finished(producer, ids), timeout=60,
                                    interval=0.25)
    finally:
        workers.kill_all()
        await producer.close()
    assert all(s.state is TaskState.SUCCEEDED and s.attempt == 0 for s in statuses.values())
    runs = sorted(s.payload for s in statuses.values())
    assert len({pid for _, pid in runs}) >= 2, "the work was not shared between workers"
    starts = [t for t, _ in runs]
    # The first 20 pass at once (the burst); then one every 50 ms, whoever runs them.
    steady = starts[int(RATE):]
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    print(f"measured {rate:.2f}/s over {steady[-1] - steady[0]:.2f}s after the burst")
    assert abs(rate - RATE) <= RATE * 0.10, rate
