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


async def _connections(admin: asyncpg.Connection, pid: int) -> tuple[int, int]:
    """(pooled, listening) connections of worker ``pid`` right now."""
    rows = await admin.fetch(
        "SELECT query FROM pg_stat_activity WHERE application_name = $1", f"stem-{pid}")
    listening = sum(1 for r in rows if (r["query"] or "").lstrip().upper().startswith("LISTEN"))
    return len(rows) - listening, listening


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
        most = (0, 0)
        deadline = time.monotonic() + 60
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            pooled, listening = await _connections(admin, worker.pid)
            most = (max(most[0], pooled), max(most[1], listening))
            done = await app.backend.get_many(list(pending))
            pending -= {i for i, s in done.items() if s.state.is_terminal}
            await asyncio.sleep(0.01)  # sampling interval, not synchronisation
        assert not pending, f"{len(pending)} tasks did not finish"

        async def listening_once() -> bool:
            return (await _connections(admin, worker.pid))[1] == 1

        await eventually(listening_once, timeout=10)
        assert most[0] >= 1 and most[0] <= POOL_SIZE, most  # one pool, never two
        assert most[1] == 1, most
    finally:
        await admin.close()
        await app.close()
        worker.terminate()
        worker.wait(20)
        await drop_pg_schema(postgres_url, namespace)
