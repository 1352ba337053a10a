"""Canvas across real worker processes on SQLite, Redis and Postgres: a chain outlives
its producer, a chord over four workers calls back exactly once with ordered results,
and a SIGKILLed worker mid-chord changes nothing but the time it takes."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import stem
from stem.canvas import ChainResult, chord, derived_id
from tests.e2e import canvas_app
from tests.helpers import WorkerProcesses, eventually
from tests.services import drop_pg_schema, drop_redis_keys

pytestmark = pytest.mark.slow

APP = "tests.e2e.canvas_app:app"


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def url(request: pytest.FixtureRequest, namespace: str, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        u = f"sqlite:///{tmp_path / 'stem.db'}"
        conn = sqlite3.connect(canvas_app.side_path(u))
        conn.execute("CREATE TABLE side_effects (run TEXT NOT NULL)")
        conn.commit()
        conn.close()
        yield u
    elif request.param == "redis":
        base = request.getfixturevalue("redis_url")
        yield base + "?claim_interval=0.25"
        asyncio.run(drop_redis_keys(base, namespace))
    else:
        base = request.getfixturevalue("postgres_url")
        yield base
        asyncio.run(drop_pg_schema(base, namespace))


@pytest.fixture
async def app(url: str, namespace: str) -> AsyncIterator[stem.Stem]:
    a = canvas_app.make_app(url, namespace)
    await a.store_for(url).migrate()
    if url.startswith("postgres"):
        import asyncpg

        conn = await asyncpg.connect(url)
        await conn.execute(f'CREATE TABLE "{namespace}".side_effects (run text NOT NULL)')
        await conn.close()
    yield a
    await a.close()


@pytest.fixture
def workers(url: str, namespace: str, tmp_path: Path) -> Iterator[WorkerProcesses]:
    procs = WorkerProcesses(tmp_path)
    procs.env = {"STEM_BROKER_URL": url, "STEM_RESULT_BACKEND_URL": "",  # type: ignore[attr-defined]
                 "STEM_NAMESPACE": namespace,
                 # Redis: without Stem's own options; Postgres: whole, as the query may
                 # name the server (an embedded one's socket directory and port).
                 "CANVAS_SIDE_URL": url if url.startswith("postgres") else url.split("?")[0]}
    yield procs
    procs.kill_all()


def start(workers: WorkerProcesses, *args: str) -> subprocess.Popen[bytes]:
    return workers.start(APP, "--concurrency", "16", *args, env=workers.env)  # type: ignore[attr-defined]


async def runs(url: str, namespace: str, run: str) -> int:
    """How many times the chord callback of ``run`` ran (its side effect)."""
    if url.startswith("redis"):
        import redis.asyncio as redis

        client = redis.Redis.from_url(url.split("?")[0])
        try:
            return int(await client.get(f"{namespace}:side:{run}") or 0)
        finally:
            await client.aclose()
    if url.startswith("postgres"):
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            return int(await conn.fetchval(
                f'SELECT count(*) FROM "{namespace}".side_effects WHERE run = $1', run))
        finally:
            await conn.close()
    conn2 = sqlite3.connect(canvas_app.side_path(url), timeout=30)
    try:
        return int(conn2.execute("SELECT count(*) FROM side_effects WHERE run = ?",
                                 (run,)).fetchone()[0])
    finally:
        conn2.close()


async def run_chord(app: stem.Stem, url: str, namespace: str, n: int, delay: float = 0.0
                    ) -> stem.canvas.ChordResult:
    member, collect = app.tasks["c.member"], app.tasks["c.collect"]
    run = uuid.uuid4().hex
    return await chord([member.s(i, delay) for i in range(n)], collect.s(run=run)).enqueue()


async def check_once(app: stem.Stem, url: str, namespace: str,
                     result: stem.canvas.ChordResult, n: int, timeout: float = 60) -> None:
    callback = await result.callback_result(timeout=timeout)
    assert callback.succeeded, callback.error
    assert callback.value == {"n": n, "ordered": True}
    record = await app.get_group(result.id)
    assert record is not None and record.claimed and record.completed == n
    run_id = record.meta["stem.chord.callback"]["args"]["run"]  # the callback's argument
    # Give a duplicate callback (there must be none) the time to show up.
    await asyncio.sleep(0.3)
    assert await runs(url, namespace, run_id) == 1


async def test_a_chain_completes_after_its_producer_exited(
        app: stem.Stem, url: str, namespace: str, workers: WorkerProcesses) -> None:
    chain_id = f"chain-{uuid.uuid4()}"
    script = (
        "import asyncio, sys\n"
        "from stem.canvas import chain\n"
        "from tests.e2e.canvas_app import make_app\n"
        "app = make_app(sys.argv[1], sys.argv[2])\n"
        "add = app.tasks['c.add']\n"
        "async def main():\n"
        "    await chain(add.s(1, 1), add.s(1), add.s(1), add.s(1), add.s(1))"
        ".enqueue(chain_id=sys.argv[3])\n"
        "asyncio.run(main())\n")
    producer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, url, namespace, chain_id, cwd=WorkerProcesses.ROOT,
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(producer.communicate(), 60)
    assert producer.returncode == 0, err.decode()
    start(workers)
    ids = [derived_id(chain_id, i) for i in range(5)]
    result = await ChainResult(app, chain_id, ids).wait(timeout=60)
    assert result.succeeded and result.value == 6


async def test_chords_over_four_workers_call_back_exactly_once(
        app: stem.Stem, url: str, namespace: str, workers: WorkerProcesses) -> None:
    for _ in range(4):
        start(workers)
    full = await run_chord(app, url, namespace, 300)
    await check_once(app, url, namespace, full, 300, timeout=120)
    for _ in range(19):  # smaller chords, many times: races between completions
        result = await run_chord(app, url, namespace, 60)
        await check_once(app, url, namespace, result, 60)


async def test_a_worker_killed_mid_chord(
        app: stem.Stem, url: str, namespace: str, workers: WorkerProcesses) -> None:
    victim = start(workers)
    start(workers)
    result = await run_chord(app, url, namespace, 200, delay=0.1)

    async def some_done() -> bool:
        record = await app.get_group(result.id)
        return record is not None and record.completed >= 40

    await eventually(some_done, timeout=60)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    record = await app.get_group(result.id)
    assert record is not None and record.completed < 200  # killed mid-chord
    start(workers)
    await check_once(app, url, namespace, result, 200, timeout=120)
