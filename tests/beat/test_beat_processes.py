"""Two real `stem beat` processes sharing one schedule store and lock store.

Parametrized by the store URL; every store here is one that separate processes share
(memory is not). An `every:1s` entry runs for a window (15 s on Redis and Postgres, as
issue 13 asks; 10 s on SQLite): every due second is enqueued exactly once (at most one
second missing, around the failover), and after SIGKILL of the beat that dispatched
last, the other one carries on within the lock TTL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest

from stem.adapters import store_from_url
from stem.beat import ScheduleEntry
from tests.helpers import wait_until
from tests.services import drop_pg_schema, drop_redis_keys

ROOT = Path(__file__).resolve().parents[2]
LOCK_TTL = 2.0
#: Seconds before and after the kill (the run window itself is the only sleep).
WINDOWS = {"sqlite": (5.0, 5.0), "redis": (8.0, 7.0), "postgres": (8.0, 7.0)}


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path, namespace: str) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'beat.db'}"
    url: str = request.getfixturevalue(f"{request.param}_url")
    # The test's schema or keys go once the beats are gone.
    drop = drop_pg_schema if request.param == "postgres" else drop_redis_keys
    request.addfinalizer(lambda: asyncio.run(drop(url, namespace)))
    return url


def start_beat(url: str, broker: str, namespace: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "STEM_BROKER_URL": broker, "STEM_RESULT_BACKEND_URL": "",
           "STEM_NAMESPACE": namespace}
    return subprocess.Popen(
        [sys.executable, "-m", "stem_cli", "beat", "--app", "tests.beat.beat_app:app",
         "--schedule-store", url, "--lock-store", url, "--tick", "0.1",
         "--lock-ttl", str(LOCK_TTL), "--log-format", "json"],
        cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


async def _setup(url: str, namespace: str) -> None:
    store = store_from_url(url, namespace=namespace)
    first = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    await store.schedules.upsert(ScheduleEntry(
        id="tick", task="beat.tick", spec={"kind": "interval", "everyMs": 1000},
        next_run_at=first))
    await store.close()


async def _runs(url: str, broker: str, namespace: str) -> tuple[list[datetime], int]:
    store = store_from_url(url, namespace=namespace)
    runs = await store.schedules.history("tick", 1000)
    await store.close()
    async with store_from_url(broker, namespace=namespace) as b:
        pending = (await b.broker.stats("default")).pending
    return sorted(r.scheduled_at for r in runs), pending


@pytest.mark.slow
def test_two_beats_dispatch_each_second_once_and_fail_over(
        store_url: str, tmp_path: Path, namespace: str) -> None:
    broker = f"sqlite:///{tmp_path / 'broker.db'}"
    kind = "sqlite" if store_url.startswith("sqlite") else (
        "redis" if store_url.startswith("redis") else "postgres")
    before, after = WINDOWS[kind]
    logs = [tmp_path / "beat-0.log", tmp_path / "beat-1.log"]
    beats = [start_beat(store_url, broker, namespace, log) for log in logs]
    try:
        # The entry is written once both beats run (the next `due` call sees it), so a
        # slow process start cannot make its first runs late and skip seconds.
        wait_until(lambda: all(log.exists() and b"beat.started" in log.read_bytes()
                               for log in logs), timeout=30)
        asyncio.run(_setup(store_url, namespace))
        wait_until(lambda: any(b"beat.dispatched" in log.read_bytes() for log in logs
                               if log.exists()), timeout=20)
        time.sleep(before)
        # The beat whose log shows the latest dispatch is the one we kill.
        last = max(range(2), key=lambda i: logs[i].stat().st_mtime
                   if b"beat.dispatched" in logs[i].read_bytes() else 0)
        beats[last].send_signal(signal.SIGKILL)
        beats[last].wait(10)
        killed_at = datetime.now(UTC)
        survivor = beats[1 - last]
        time.sleep(after)
        assert survivor.poll() is None, logs[1 - last].read_text()[-2000:]
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(15) == 0, logs[1 - last].read_text()[-2000:]
    finally:
        for b in beats:
            if b.poll() is None:
                b.kill()
                b.wait(10)
    scheduled, pending = asyncio.run(_runs(store_url, broker, namespace))
    assert len(scheduled) == len(set(scheduled)), "a second was recorded twice"
    gaps = [(b - a).total_seconds() for a, b in pairwise(scheduled)]
    assert all(g >= 1 for g in gaps)
    missing = sum(round(g) - 1 for g in gaps)
    assert missing <= 1, f"more than one second missing: {gaps}"
    assert len(scheduled) >= before + after - 2
    # Each recorded run is one task in the broker (a run the killed beat enqueued but did
    # not record is enqueued again with the same task id, so the producer drops it).
    assert pending == len(scheduled)
    # The survivor took over within the lock TTL of the kill.
    after_kill = [t for t in scheduled if t > killed_at]
    assert after_kill and after_kill[0] - killed_at <= timedelta(seconds=LOCK_TTL + 1.5)
