"""A worker whose broker and backend share a URL holds one pool and one LISTEN connection."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

import stem
from tests.helpers import eventually
from tests.services import drop_pg_schema

pytestmark = pytest.mark.postgres

POOL_SIZE = 2


async def _sample(admin: asyncpg.Connection, pid: int) -> dict[int, str]:
    """The connections of worker ``pid`` right now: backend pid -> its last query."""
    rows = await admin.fetch(
        "SELECT pid, query FROM pg_stat_activity WHERE application_name = $1", f"stem-{pid}")
    return {r["pid"]: (r["query"] or "").lstrip().upper() for r in rows}


def _listens(query: str) -> bool:
    return query.startswith("LISTEN")


async def _connections(admin: asyncpg.Connection, pid: int) -> tuple[int, int]:
    """(pooled, listening) connections of worker ``pid`` right now."""
    sample = await _sample(admin, pid)
    listening = sum(1 for q in sample.values() if _listens(q))
    return len(sample) - listening, listening


async def test_one_pool_and_one_listen_connection_per_url(
        postgres_url: str, namespace: str, start_worker: Callable[..., subprocess.Popen[bytes]],
        tmp_path: Path) -> None:
    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema={namespace}" \
          f"&pool_size={POOL_SIZE}"
    worker = start_worker("--concurrency", "32", url=url)
    app = stem.Stem("producer", broker=url, namespace=namespace)
    admin = await asyncpg.connect(postgres_url)
    try:
        # Results, acks, fetches and progress writes all at once: two pools (one per part)
        # would show up to twice POOL_SIZE; one store's pool never more than POOL_SIZE.
        calls = [app.definition("e2e.add").call(x=i, y=1) for i in range(400)]
        ids = await app.enqueue_many(calls)
        samples: list[dict[int, str]] = []
        deadline = time.monotonic() + 60
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            samples.append(await _sample(admin, worker.pid))
            done = await app.backend.get_many(list(pending))
            pending -= {i for i, s in done.items() if s.state.is_terminal}
            await asyncio.sleep(0.01)  # sampling interval, not synchronisation
        assert not pending, f"{len(pending)} tasks did not finish"

        async def listening_once() -> bool:
            return (await _connections(admin, worker.pid))[1] == 1

        await eventually(listening_once, timeout=10)
        # The LISTEN connection is the one whose last query was LISTEN at some point; a
        # sample taken while it was still connecting (no LISTEN yet) must not count it as
        # pooled. Pooled connections never LISTEN.
        listener = {p for sample in samples for p, q in sample.items() if _listens(q)}
        listener |= {p for p, q in (await _sample(admin, worker.pid)).items() if _listens(q)}
        pooled = max(len(set(sample) - listener) for sample in samples)
        assert 1 <= pooled <= POOL_SIZE, pooled  # one pool, never two
        assert len(listener) == 1, listener
    finally:
        await admin.close()
        await app.close()
        worker.terminate()
        worker.wait(20)
        await drop_pg_schema(postgres_url, namespace)
