"""Tasks the benchmark's worker process runs (``--app bench.bench_app:app``).

Each task does one Redis INCR when ``BENCH_REDIS_URL`` is set, the same extra work
the published peer measurements carry, and returns timestamps so the
harness computes rates from first to last completion across processes.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import stem

app = stem.Stem("bench")
_redis: Any = None
_COUNTER = os.environ.get("BENCH_COUNTER", "stem-bench:counter")


async def _incr() -> None:
    global _redis
    url = os.environ.get("BENCH_REDIS_URL")
    if not url:
        return
    if _redis is None:
        import redis.asyncio as redis

        # A connection per concurrent task (BENCH_POOL = the worker's concurrency), so
        # the pool never makes tasks queue for a connection and skew the drain rate.
        pool = int(os.environ.get("BENCH_POOL", "256"))
        _redis = redis.Redis(
            connection_pool=redis.BlockingConnectionPool.from_url(url, max_connections=pool)
        )
    await _redis.incr(_COUNTER)


@app.task(name="bench.noop", track_started=False)
async def noop(incr: bool = False) -> float:
    """W2: nothing (or one INCR, as the peers' tasks did); returns its completion time."""
    if incr:
        await _incr()
    return time.time()


@app.task(name="bench.start", track_started=False)
async def start() -> float:
    """W3: returns the time the handler started."""
    t = time.time()
    await _incr()
    return t


@app.task(name="bench.sleep", track_started=False)
async def sleep(seconds: float) -> list[float]:
    """W4: sleeps; returns [start, end]."""
    t = time.time()
    await asyncio.sleep(seconds)
    return [t, time.time()]


@app.task(name="bench.noop_limited", track_started=False, rate_limit="100000/s")
async def noop_limited() -> float:
    """bench/ratelimit_cost.py: bench.noop behind a rate limit too high to bind."""
    return time.time()


@app.task(name="bench.chord_done", track_started=False)
async def chord_done(results: list[float]) -> list[float]:
    """bench/chord_cost.py: a chord callback; returns [its start time, member count]."""
    return [time.time(), float(len(results))]
